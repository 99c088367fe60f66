"""The sweep flow through a real Prefect server, Optuna's RDB storage and MLflow."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
SWEEP = str(ROOT / "configs" / "sweeps" / "tiny-seq2seq.yaml")


def sweep_overrides(tmp_path, stdlib_cache) -> list[str]:
    """The shipped tiny sweep, with its finetune config, storage and outputs under tmp_path."""
    shared = [o for o in TINY if not o.startswith(("training.max_steps", "data.max_examples"))] + [
        "training.max_steps=24",
        "training.eval_steps=6",
        "data.max_examples=400",
        f"data.cache_dir={stdlib_cache}",
        f"training.output_dir={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    return [
        f"config={ROOT / 'configs' / 'tiny-seq2seq.yaml'}",
        f"storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"overrides=[{','.join(repr(o) for o in shared)}]",
    ]


def finished(storage: str, study: str = "tiny-seq2seq") -> dict[str, int]:
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return {}
    states = [t.state.name for t in trials]
    return {s: states.count(s) for s in set(states)}


@pytest.mark.timeout(900)
def test_a_sweep_runs_its_trials_prunes_a_hopeless_one_and_registers_only_the_best(
    prefect_server, tmp_path, stdlib_cache, monkeypatch
):
    from flows.sweep import sweep

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="tiny-seq2seq", storage=storage)
    for lr in (3e-3, 2e-3, 1e-5):  # the third barely learns: the median pruner stops it at its first validation
        study.enqueue_trial({"training.learning_rate": lr, "model.scratch.d_model": 32})

    result = sweep(sweep_config=SWEEP, overrides=sweep_overrides(tmp_path, stdlib_cache))

    states = finished(storage)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4 and "FAIL" not in states
    assert result["trials"][0] == result["trials"][1] == "COMPLETE" and result["trials"][2] == "PRUNED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(["0", "1"], "tags.`codetune.sweep_parent` = 'tiny-seq2seq'")
    children = client.search_runs(["0", "1"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = [r.info.status for r in children]
    assert statuses.count("FINISHED") == states["COMPLETE"] and statuses.count("KILLED") == states["PRUNED"]
    assert all(r.data.tags["codetune.trial_state"] == "PRUNED" for r in children if r.info.status == "KILLED")
    assert "sweep.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # Only the best trial is registered, and it went through the champion gate.
    [version] = client.search_model_versions("name = 'codetune-code-summarizer'")
    best = optuna.load_study(study_name="tiny-seq2seq", storage=storage).best_trial
    assert version.run_id == best.user_attrs["mlflow_run_id"] and result["registration"]["alias"] == "champion"

    # Raising the budget continues the same study and the same sweep run.
    sweep(sweep_config=SWEEP, overrides=sweep_overrides(tmp_path, stdlib_cache) + ["trials=5"])
    states = finished(storage)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 5
    assert client.get_run(parent.info.run_id).data.tags["sweep.trials"] == "5"


@pytest.mark.timeout(900)
def test_a_killed_sweep_resumes_its_study_and_counts_no_trial_twice(tmp_path, stdlib_cache):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, "-m", "flows.cli", "sweep", "--config", SWEEP, "pruner=none"]
    command += sweep_overrides(tmp_path, stdlib_cache)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while finished(storage).get("COMPLETE", 0) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep, its trial in flight and its temporary Prefect server
    first.wait()
    killed_at = finished(storage)
    assert killed_at.get("COMPLETE", 0) in (2, 3)

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = finished(storage)
    assert after.get("COMPLETE") == 4  # exactly the budget
    completed = optuna.load_study(study_name="tiny-seq2seq", storage=storage).get_trials(states=[TrialState.COMPLETE])
    assert len({tuple(sorted(t.params.items())) for t in completed}) == 4  # no setting proposed again on resume
    # A trial the kill left running is failed and asked again, never counted.
    assert after.get("FAIL", 0) == killed_at.get("RUNNING", 0)


@pytest.mark.timeout(600)
def test_settings_that_fail_are_asked_again_once_and_a_failing_sweep_stops(
    prefect_server, tmp_path, stdlib_cache, monkeypatch
):
    from flows.sweep import sweep

    monkeypatch.chdir(tmp_path)
    overrides = sweep_overrides(tmp_path, stdlib_cache)
    # Every trial's data stage fails: no summary has 1000 words.
    overrides[-1] = overrides[-1][:-1] + ",'data.min_summary_words=1000','data.max_summary_words=2000']"
    with pytest.raises(RuntimeError, match="2 trials of sweep 'tiny-seq2seq' failed"):
        sweep(sweep_config=SWEEP, overrides=overrides + ["trials=1", "pruner=none"])
    failed = optuna.load_study(study_name="tiny-seq2seq", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.state for t in failed] == [TrialState.FAIL, TrialState.FAIL] and failed[0].params == failed[1].params
