import os
import subprocess

from prefect.runtime import flow_run

from codetune.core.config import Config, ModelInit, content_hash
from codetune.core.data import PreparedData
from codetune.core.evaluation import EvalReport
from codetune.core.model import base_weights
from codetune.core.rundir import RunDir
from codetune.core.training import TrainedModel
from codetune.lifecycle.tracking import end_run, log_run, open_run
from tasks.retry import stage_task


def git_commit() -> str:
    """The checkout's commit; in the worker image, which has no .git, the one it was built from."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("CODETUNE_GIT_COMMIT", "unknown")


def lineage(cfg: Config, data: PreparedData) -> dict[str, str]:
    """Where a model came from: tagged on its MLflow run and model version, and written to its metadata."""
    return {
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
        "git_commit": git_commit(),
        "data_fingerprint": data.fingerprint,
        "config_hash": content_hash(cfg),
        "base_model": cfg.model.name if cfg.model.init is ModelInit.pretrained else f"scratch:{cfg.model.name}",
    }


@stage_task("open-tracking", retry_delays=[5, 20, 60])
def open_tracking(cfg: Config, data: PreparedData, lineage: dict[str, str]) -> str:
    """The run's MLflow run, open from before training (params and tags first) to the end of track; its id."""
    return open_run(cfg, RunDir.of(cfg, data).path.name, lineage, base_weights(cfg.model))


@stage_task("end-tracking", retry_delays=[5, 20])
def end_tracking(cfg: Config, mlflow_run_id: str, status: str, why: str, tags: dict[str, str]) -> None:
    """A run whose stage failed ends FAILED in MLflow, one that was stopped (or pruned) KILLED, with the reason."""
    end_run(cfg, mlflow_run_id, status, why, tags)


@stage_task("track", retry_delays=[5, 20, 60])
def track(cfg: Config, trained: TrainedModel, report: EvalReport, lineage: dict[str, str]) -> str:
    """Log the run to MLflow; returns the MLflow run id."""
    summary = {
        "global_step": trained.global_step,
        "final_train_loss": trained.train_loss,
        "final_validation_loss": trained.validation_loss,
        "train_seconds": trained.train_seconds,
        "trainable_parameters": trained.trainable_parameters,
        "eval_examples_per_second": report.examples_per_second,
    }
    if trained.micro_batch_size:  # halved after an out-of-memory
        summary["micro_batch_size"] = trained.micro_batch_size
    return log_run(cfg, trained.run_dir, summary, lineage, trained.base_weights)
