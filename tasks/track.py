import subprocess

from prefect import task
from prefect.runtime import flow_run

from codetune.config import Config
from codetune.data import PreparedData
from codetune.evaluation import EvalReport
from codetune.training import TrainedModel
from codetune.tracking import log_run
from tasks.retry import retry_unless_user_error


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@task(name="track", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_unless_user_error)
def track(cfg: Config, data: PreparedData, trained: TrainedModel, report: EvalReport) -> str:
    """Log the run to MLflow; returns the MLflow run id."""
    summary = {
        "global_step": trained.global_step,
        "final_train_loss": trained.train_loss,
        "final_validation_loss": trained.validation_loss,
        "train_seconds": trained.train_seconds,
        "trainable_parameters": trained.trainable_parameters,
        "eval_examples_per_second": report.examples_per_second,
    }
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "git_commit": git_commit(),
        "data_fingerprint": data.fingerprint,
        "base_model": cfg.model.name,
    }
    return log_run(cfg, trained.run_dir, summary, tags)
