"""The tracking stage: one MLflow run per training run, with params, the loss curve, metrics and artifacts.

mlflow is imported inside the functions: the training core runs where mlflow is not installed,
and the curve is logged afterwards from trainer_state.json, so a resumed training still makes one run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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

# trainer_state log_history key -> MLflow metric name
CURVES = {
    "loss": "train_loss",
    "eval_loss": "validation_loss",
    "learning_rate": "learning_rate",
    "tokens_per_second": "tokens_per_second",
}


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


def _curve_metrics(trainer_state: dict, timestamp_ms: int):
    from mlflow.entities import Metric

    for entry in trainer_state.get("log_history", []):
        for key, name in CURVES.items():
            if key in entry:
                yield Metric(name, float(entry[key]), timestamp_ms, int(entry["step"]))


def log_run(
    cfg: Config, run_dir: str | Path, summary: dict[str, float], tags: dict[str, str], base_weights: dict | None = None
) -> str:
    """Log a finished run directory to MLflow; returns the MLflow run id.

    A retried call reuses the unfinished MLflow run of the same run directory instead of making another.
    """
    import mlflow
    from mlflow.entities import Metric

    run_dir = Path(run_dir)
    uri = use_tracking_server(cfg.mlflow.tracking_uri)
    try:
        experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
        unfinished = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`codetune.run` = '{run_dir.name}' and attributes.status != 'FINISHED'",
            output_format="list",
            max_results=1,
        )
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(
            f"cannot use MLflow at {without_credentials(uri)}: {exc}. "
            "Fix mlflow.tracking_uri (or $MLFLOW_TRACKING_URI), "
            f"or set mlflow.enabled=false; the trained model is safe in {run_dir}"
        ) from exc

    metrics_file, trainer_state = (RunDir(run_dir).read_json(name) for name in (METRICS_FILE, TRAINER_STATE))
    with mlflow.start_run(run_id=unfinished[0].info.run_id if unfinished else None, run_name=run_dir.name) as run:
        mlflow.set_tags({"codetune.run": run_dir.name, "codetune.run_dir": str(run_dir.resolve()), **tags})
        params = {k: ("null" if v is None else v) for k, v in flatten(cfg).items()}
        params.update({f"base_weights.{k}": v for k, v in (base_weights or {}).items()})
        mlflow.log_params(params)
        if metrics_file.get("warnings"):
            mlflow.set_tag("codetune.warnings", " | ".join(metrics_file["warnings"]))
        now = int(time.time() * 1000)
        final = [Metric(f"test_{k}", float(v), now, 0) for k, v in metrics_file["model"].items()]
        final += [Metric(f"baseline_{k}", float(v), now, 0) for k, v in metrics_file["baseline"].items()]
        final += [Metric(f"untuned_{k}", float(v), now, 0) for k, v in (metrics_file.get("untuned") or {}).items()]
        final += [Metric(k, float(v), now, 0) for k, v in summary.items()]
        client = mlflow.tracking.MlflowClient()
        metrics = list(_curve_metrics(trainer_state, now)) + final
        for start in range(0, len(metrics), 1000):  # MLflow's per-batch limit
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                mlflow.log_artifact(str(run_dir / name))
        return run.info.run_id


def log_pruned_run(cfg: Config, run_name: str, why: str, tags: dict[str, str]) -> str:
    """An MLflow run for a sweep trial its pruner stopped: the config, the reason, status KILLED."""
    import mlflow
    from mlflow.entities import Param

    use_tracking_server(cfg.mlflow.tracking_uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment.experiment_id, run_name=run_name, tags={**tags, "codetune.trial_state": "PRUNED", "pruned": why}
    )
    params = [Param(key, str("null" if value is None else value)) for key, value in flatten(cfg).items()]
    client.log_batch(run.info.run_id, params=params)
    client.set_terminated(run.info.run_id, status="KILLED")
    return run.info.run_id


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
