"""The MLflow run lives as the run does: open and RUNNING while training, the curve arriving as it is drawn, system
metrics beside it, ended FINISHED with a duration that covers training and evaluation, or FAILED when a stage fails.
Through a real `mlflow server` and `codetune run`."""

import os
import subprocess
import sys
import time

import httpx
import mlflow
import pytest

from tests.conftest import TINY, TWIN
from tests.e2e.conftest import REPO


def _runs(tracking_uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _artifacts(api: str, key: str) -> list[dict]:
    """The progress artifacts under key, as the Prefect UI reads them."""
    return httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()


@pytest.mark.timeout(600)
def test_mlflow_and_prefect_show_the_run_while_training_goes_on(mlflow_server, prefect_api, stdlib_cache, tmp_path):
    experiment = "live"
    overrides = TINY + [
        f"data.cache_dir={stdlib_cache}",
        f"training.output_dir={tmp_path / 'runs'}",
        "training.max_steps=400",
        "training.save_steps=200",
        "training.logging_steps=5",
        f"mlflow.tracking_uri={mlflow_server}",
        f"mlflow.experiment_name={experiment}",
        "registry.model_name=live",
    ]
    env = {**os.environ, **prefect_api, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    started = time.time()
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", TWIN, *overrides],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = mlflow.MlflowClient(mlflow_server)
    seen, progress = None, set()
    while run.poll() is None and not (seen and progress):
        for found in _runs(mlflow_server, experiment):
            curve = client.get_metric_history(found.info.run_id, "train_loss")
            if found.info.status == "RUNNING" and len(curve) >= 3 and "test_bleu4_smoothed" not in found.data.metrics:
                seen = seen or (found, curve)
        progress |= {a["data"] for a in _artifacts(prefect_api["PREFECT_API_URL"], "training") if 0 < a["data"] < 100}
        time.sleep(0.2)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert seen, "the MLflow run was never seen RUNNING with a curve before the run ended"
    assert progress, "the Prefect progress artifact was never read between 0 and 100% while training ran"
    [done] = _artifacts(prefect_api["PREFECT_API_URL"], "training")
    assert done["data"] == 100 and done["description"] == "step 400 of 400"
    [evaluated] = _artifacts(prefect_api["PREFECT_API_URL"], "evaluation")
    assert evaluated["data"] == 100 and evaluated["description"].startswith("generated ")
    during, curve = seen
    assert len({point.timestamp for point in curve}) == len(curve)  # logged as they came, not copied in at the end

    finished = client.get_run(during.info.run_id)
    assert finished.info.status == "FINISHED" and len(_runs(mlflow_server, experiment)) == 1
    whole = client.get_metric_history(finished.info.run_id, "train_loss")
    assert [p.step for p in whole] == list(range(5, 401, 5))  # every point once: none sent again at the end
    assert finished.info.start_time / 1000 >= started and finished.info.start_time <= curve[0].timestamp
    evaluated = client.get_metric_history(finished.info.run_id, "test_bleu4_smoothed")[0].timestamp
    assert finished.info.end_time >= evaluated  # the run's duration covers training and evaluation
    assert {"learning_rate", "grad_norm", "epoch", "validation_loss"} <= set(finished.data.metrics)
    assert any(key.startswith("system/cpu_utilization") for key in finished.data.metrics)
    assert finished.data.params["training.max_steps"] == "400"
    assert not any(str(tmp_path) in value for value in finished.data.tags.values())  # no host path in a shared server
    [summary] = _artifacts(prefect_api["PREFECT_API_URL"], "finetune-summary")
    experiment_id = finished.info.experiment_id
    assert f"({mlflow_server}/#/experiments/{experiment_id}/runs/{finished.info.run_id})" in summary["data"]


@pytest.mark.timeout(600)
def test_a_failed_stage_leaves_the_mlflow_run_failed_with_the_reason(
    prefect_server, tiny_overrides, tmp_path, monkeypatch
):
    import flows.finetune
    from tasks.retry import stage_task

    @stage_task("evaluate", retry_delays=[])
    def failing_evaluate(cfg, trained, data):
        raise RuntimeError("the evaluation ran out of disk")

    monkeypatch.setattr(flows.finetune, "evaluate", failing_evaluate)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_overrides + [f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=failing"]
    with pytest.raises(RuntimeError, match="out of disk"):
        flows.finetune.finetune(config=TWIN, overrides=overrides)
    [failed] = _runs(uri, "failing")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["codetune.ended_because"] == "RuntimeError: the evaluation ran out of disk"
    assert "train_loss" in failed.data.metrics  # what training logged stays


@pytest.mark.timeout(300)
def test_metrics_logged_while_the_tracking_server_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    """A real `mlflow server` stopped in the middle of training and started again on its port and database: the
    points logged while it was away reach the run, each once, without training waiting for it."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from codetune.lifecycle.tracking import RESEND_SECONDS, LiveMetrics
    from tests.e2e.conftest import free_port, start_mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    live = LiveMetrics(uri, run_id)
    args, state, control = TrainingArguments("unused", use_cpu=True), TrainerState(), TrainerControl()
    live.on_train_begin(args, state, control)

    def train(steps: range) -> None:
        for step in steps:
            state.global_step = step
            started = time.perf_counter()
            live.on_log(args, state, control, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
            assert time.perf_counter() - started < 0.1  # training never waits for the server

    def curve() -> list[int]:
        return [point.step for point in client.get_metric_history(run_id, "train_loss")]

    try:
        train(range(1, 11))
        deadline = time.time() + 30
        while curve() != list(range(1, 11)) and time.time() < deadline:
            time.sleep(0.2)
        assert curve() == list(range(1, 11))
        server.terminate()
        server.wait(timeout=30)
        train(range(11, 21))  # logged while the server is away
        time.sleep(3)
        server = start_mlflow_server(tmp_path, port)
        deadline = time.time() + RESEND_SECONDS + 20
        while len(curve()) < 20 and time.time() < deadline:
            time.sleep(0.5)
        assert curve() == list(range(1, 21))  # offered again once it answered, before training ended
        train(range(21, 31))
        live.on_train_end(args, state, control)
        assert curve() == list(range(1, 31))
    finally:
        server.terminate()
        server.wait(timeout=30)
