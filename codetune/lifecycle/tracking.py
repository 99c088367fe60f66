"""The tracking stage: one MLflow run per training run, open from the run's start to its end.

The flow opens the run (params and tags) once the data is ready, before training; LiveMetrics, a Trainer callback
the train task hands to the training core, logs the curve as it happens, and MLflow's system metrics sample CPU,
memory and GPU meanwhile. log_run adds the evaluation's metrics and artifacts and ends it FINISHED; a failed stage
ends it FAILED, a pruned trial KILLED. A resumed or retried run finds its unfinished MLflow run by the run
directory's name and goes on in it. mlflow is imported inside the functions: the training core runs without it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from codetune.core.config import Config
from codetune.core.config.loader import flatten
from codetune.core.errors import CodetuneError, without_credentials
from codetune.core.rundir import (
    BENCHMARK_RESULTS,
    CONFIG_FILE,
    DATA_MANIFEST,
    DATA_PROFILE,
    EXAMPLES_FILE,
    METRICS_FILE,
    TRAINER_STATE,
    RunDir,
)

ARTIFACTS = (METRICS_FILE, EXAMPLES_FILE, BENCHMARK_RESULTS, CONFIG_FILE, DATA_MANIFEST, DATA_PROFILE, TRAINER_STATE)

log = logging.getLogger(__name__)

# The Trainer's log key (trainer_state's log_history) -> MLflow metric name
CURVES = {
    "loss": "train_loss",
    "eval_loss": "validation_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_second": "tokens_per_second",
    "epoch": "epoch",
}
RESEND_SECONDS = 10.0
"""How often metrics a tracking server did not take are offered again while training goes on."""
FLUSH_SECONDS = 10.0
"""How long the end of training waits for the last metrics to go; what has not gone by then log_run sends."""


class TrackingError(CodetuneError):
    pass


# MLflow's client waits up to 120 s per request and retries 7 times with doubling back-off: minutes before a dead
# server is reported. The task's retry (tasks/retry.py) owns the back-off; the client gets a bounded wait alone.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def use_tracking_server(tracking_uri: str | None) -> str:
    """Point MLflow at tracking_uri (None: $MLFLOW_TRACKING_URI or ./mlruns) with bounded requests; returns the URI.

    A value already in the environment wins over MLFLOW_CLIENT_ENV.
    """
    import mlflow

    for name, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.get_tracking_uri()


def run_link(run_id: str) -> str:
    """The run as markdown: a link to its page where the tracking server has one (http), else its id."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return f"`{run_id}` ({uri})"
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"


def _curve_metrics(trainer_state: dict, timestamp_ms: int):
    from mlflow.entities import Metric

    for entry in trainer_state.get("log_history", []):
        for key, name in CURVES.items():
            if key in entry:
                yield Metric(name, float(entry[key]), timestamp_ms, int(entry["step"]))


def _unfinished_run(cfg: Config, run_name: str, context: str):
    """The experiment and the unfinished MLflow run of run_name (None if there is none)."""
    import mlflow

    uri = use_tracking_server(cfg.mlflow.tracking_uri)
    try:
        experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
        unfinished = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`codetune.run` = '{run_name}' and attributes.status != 'FINISHED'",
            output_format="list",
            max_results=1,
        )
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(
            f"cannot use MLflow at {without_credentials(uri)}: {exc}. "
            f"Fix mlflow.tracking_uri (or $MLFLOW_TRACKING_URI), or set mlflow.enabled=false; {context}"
        ) from exc
    return experiment, (unfinished[0] if unfinished else None)


def _params(cfg: Config, base_weights: dict | None) -> dict:
    params = {k: ("null" if v is None else v) for k, v in flatten(cfg).items()}
    return params | {f"base_weights.{k}": v for k, v in (base_weights or {}).items()}


def open_run(cfg: Config, run_name: str, tags: dict[str, str], base_weights: dict | None = None) -> str:
    """The MLflow run of a training run, opened RUNNING with its config and tags before training starts, or the
    unfinished one a resumed or retried run left, opened again; returns its id. It stays open: log_run ends it."""
    import mlflow
    from mlflow.entities import Param, RunTag

    experiment, unfinished = _unfinished_run(cfg, run_name, "nothing has been trained yet")
    client = mlflow.MlflowClient()
    if unfinished:
        run_id = unfinished.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment.experiment_id, run_name=run_name).info.run_id
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in _params(cfg, base_weights).items()],
        tags=[RunTag(k, v) for k, v in {"codetune.run": run_name, **tags}.items()],
    )
    return run_id


def end_run(cfg: Config, run_id: str, status: str, why: str = "", tags: dict[str, str] | None = None) -> None:
    """A run whose stage failed (FAILED) or was stopped (KILLED) ends so, with the reason as a tag."""
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    for key, value in {**(tags or {}), **({"codetune.ended_because": why[:5000]} if why else {})}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def log_run(
    cfg: Config, run_dir: str | Path, summary: dict[str, float], tags: dict[str, str], base_weights: dict | None = None
) -> str:
    """The evaluation's metrics and the run's artifacts added to its MLflow run (the one open_run opened, or a new
    one), which then ends FINISHED; returns the MLflow run id. Curve points the live logging could not send (a
    tracking server that stopped answering, or a run trained without it) are sent from trainer_state.json."""
    import mlflow
    from mlflow.entities import Metric

    run_dir = Path(run_dir)
    _, unfinished = _unfinished_run(cfg, run_dir.name, f"the trained model is safe in {run_dir}")
    metrics_file, trainer_state = (RunDir(run_dir).read_json(name) for name in (METRICS_FILE, TRAINER_STATE))
    with mlflow.start_run(run_id=unfinished.info.run_id if unfinished else None, run_name=run_dir.name) as run:
        mlflow.set_tags({"codetune.run": run_dir.name, **tags})  # the directory under training.output_dir: no host path
        mlflow.log_params(_params(cfg, base_weights))
        if metrics_file.get("warnings"):
            mlflow.set_tag("codetune.warnings", " | ".join(metrics_file["warnings"]))
        now = int(time.time() * 1000)
        final = [Metric(f"test_{k}", float(v), now, 0) for k, v in metrics_file["model"].items()]
        final += [Metric(f"baseline_{k}", float(v), now, 0) for k, v in metrics_file["baseline"].items()]
        final += [Metric(f"untuned_{k}", float(v), now, 0) for k, v in (metrics_file.get("untuned") or {}).items()]
        final += [Metric(k, float(v), now, 0) for k, v in summary.items()]
        client = mlflow.tracking.MlflowClient()
        metrics = _unsent(client, run.info.run_id, list(_curve_metrics(trainer_state, now))) + final
        for start in range(0, len(metrics), 1000):  # MLflow's per-batch limit
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                mlflow.log_artifact(str(run_dir / name))
        return run.info.run_id


def _unsent(client, run_id: str, curve: list) -> list:
    """The curve points the run does not have yet (by metric and step)."""
    sent = {(m.key, m.step) for key in {m.key for m in curve} for m in client.get_metric_history(run_id, key)}
    return [m for m in curve if (m.key, m.step) not in sent]


class LiveMetrics(TrainerCallback):
    """The Trainer's logs (loss, learning rate, gradient norm, tokens/s, epoch, validation loss) sent to an open
    MLflow run as they happen, with MLflow's system metrics (CPU, memory, GPU) sampled meanwhile.

    A thread of its own sends them, so a slow or silent tracking server never holds training up: what it does not
    take waits and is offered again; what is still unsent when training ends, log_run sends from trainer_state.json.
    Only the first process of a distributed run sends.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.logs: queue.Queue = queue.Queue()
        self.sender: threading.Thread | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sender = threading.Thread(target=self._send, name="codetune-live-metrics", daemon=True)
            self.sender.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sender and logs:
            self.logs.put((int(time.time() * 1000), state.global_step, dict(logs)))

    def on_train_end(self, args, state, control, **kwargs):
        if self.sender:
            self.logs.put(None)
            self.sender.join(FLUSH_SECONDS)
            self.sender = None

    def _send(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Started here, not in on_train_begin: resuming its step count asks the server, which may not answer.
        system = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.tracking_uri)
        system.start()
        client, pending, ended, warned = MlflowClient(self.tracking_uri), [], False, False
        while not ended:
            try:
                item = self.logs.get(timeout=RESEND_SECONDS if pending else None)
            except queue.Empty:
                item = ()
            if item is None:
                ended = True
            elif item:
                stamp, step, logs = item
                pending += [Metric(CURVES[k], float(v), stamp, step) for k, v in logs.items() if k in CURVES]
            if not pending:
                continue
            try:
                while pending:
                    client.log_batch(self.run_id, metrics=pending[:1000])  # MLflow's per-batch limit
                    pending = pending[1000:]
            except Exception as exc:  # the server is down or slow: training goes on, the metrics wait
                if not warned:
                    log.warning("MLflow did not take the training metrics (%s); they are offered again", exc)
                    warned = True
        system.finish()


def log_monitor_run(
    cfg: Config, run_name: str, metrics: dict[str, float], tags: dict[str, str], files: list[Path]
) -> str:
    """A drift check as an MLflow run beside the runs of the model it watched: a metric per check, the report and
    plot as artifacts."""
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment_name)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="monitor")
        return run.info.run_id
