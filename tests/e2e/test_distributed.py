"""training.num_processes > 1: DDP through torch.distributed.run, gloo on this CPU."""

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.errors import TrainingProcessLost, is_transient
from codetune.core.families import family_of
from codetune.core.training import train_model
from tests.conftest import TWIN


def test_two_processes_train_to_the_loss_of_one_at_the_same_effective_batch(tiny_overrides, tmp_path, caplog):
    one = load_config(TWIN, tiny_overrides + [f"training.output_dir={tmp_path / 'one'}"])
    two = load_config(
        TWIN,
        tiny_overrides
        + [
            f"training.output_dir={tmp_path / 'two'}",
            "training.num_processes=2",
            "training.per_device_train_batch_size=4",
        ],
    )
    data = prepare_data(one.data, Examples.pairs)
    single = train_model(one, data, family_of(one.model))
    with caplog.at_level("INFO"):
        double = train_model(two, data, family_of(two.model))
    assert "effective batch 8: 4 per device x 2 processes x 1 accumulation" in caplog.text
    assert double.global_step == single.global_step == 12
    # The same 8 examples per step, averaged per process of 4 (and other dropout masks): within 1%.
    assert double.train_loss == pytest.approx(single.train_loss, rel=0.01)
    assert double.validation_loss == pytest.approx(single.validation_loss, rel=0.01)
    # One export, written once, in the single-process format.
    files = lambda run: sorted(p.name for p in Path(run).iterdir() if not p.name.startswith("."))  # noqa: E731
    assert files(double.run_dir) == files(single.run_dir)
    a, b = (load_file(Path(r) / "model.safetensors") for r in (single.run_dir, double.run_dir))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def _rank(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("LOCAL_RANK")
    except psutil.Error:
        return None


def test_a_killed_rank_fails_the_attempt_and_the_retry_finishes_at_the_same_step(tiny_overrides, tmp_path):
    cfg = load_config(TWIN, tiny_overrides + ["training.max_steps=240", "training.num_processes=2"])
    data = prepare_data(cfg.data, Examples.pairs)
    outcome = {}
    attempt = threading.Thread(target=lambda: outcome.update(result=_try(cfg, data)))
    attempt.start()
    deadline = time.time() + 300
    while time.time() < deadline and not list(
        Path(cfg.training.output_dir).glob("*/checkpoints/checkpoint-*/trainer_state.json")
    ):
        time.sleep(0.2)
    [victim] = [p for p in psutil.Process().children(recursive=True) if _rank(p) == "1"]
    os.kill(victim.pid, signal.SIGKILL)
    attempt.join(timeout=300)
    failure = outcome["result"]
    assert isinstance(failure, TrainingProcessLost) and is_transient(failure)

    resumed = train_model(cfg, data, family_of(cfg.model))  # what the task's retry does
    assert resumed.global_step == 240 and resumed.resumed_from_step > 0


def _try(cfg, data):
    try:
        return train_model(cfg, data, family_of(cfg.model))
    except TrainingProcessLost as exc:
        return exc
