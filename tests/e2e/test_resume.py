"""A training process killed part-way resumes from its newest complete checkpoint, not from step 0."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, TWIN

RESUME = TINY + [
    "model.scratch.d_model=64",
    "model.scratch.d_ff=128",
    "training.max_source_length=128",
    "training.max_steps=60",
    "training.save_steps=10",
    "training.logging_steps=5",
    "training.run_name=resume",
    "data.max_examples=600",
]


def _train(output_dir: Path, cache: Path) -> subprocess.Popen:
    args = RESUME + [f"training.output_dir={output_dir}", f"data.cache_dir={cache}"]
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--config", TWIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.timeout(600)
def test_killed_training_resumes_at_the_same_step_and_loss(tmp_path, stdlib_cache):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = _train(killed_dir, stdlib_cache)
    checkpoint_state = killed_dir / "resume" / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint_state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed_dir / "resume" / "training.json").exists()

    resumed = _train(killed_dir, stdlib_cache)
    clean = _train(clean_dir, stdlib_cache)
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-3000:]
    assert clean.wait() == 0, clean.stdout.read().decode()[-3000:]

    record = json.loads((killed_dir / "resume" / "training.json").read_text())
    assert record["resumed_from_step"] >= 10
    assert (
        record["global_step"] == 60 == json.loads((clean_dir / "resume" / "training.json").read_text())["global_step"]
    )
    resumed_losses, clean_losses = _losses(killed_dir / "resume"), _losses(clean_dir / "resume")
    assert set(resumed_losses) == set(clean_losses)  # the curve is whole: steps before the kill kept
    assert resumed_losses[60] == pytest.approx(clean_losses[60], rel=0.02)
