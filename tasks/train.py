from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.families import Family
from codetune.core.training import TrainedModel, train_model
from codetune.lifecycle.sweep import TrialRef, pruning_callback
from codetune.lifecycle.tracking import LiveMetrics, use_tracking_server
from tasks.progress import TrainingProgressArtifact
from tasks.retry import stage_task


# A retry calls train_model again, which resumes from the newest complete checkpoint
# (or returns at once if the export finished), so no finished step is trained twice.
@stage_task("train", retry_delays=[10, 60])
def train(
    cfg: Config, family: Family, data: PreparedData, trial: TrialRef | None = None, mlflow_run_id: str | None = None
) -> TrainedModel:
    """pipeline.train; trial: a sweep's trial, told each validation loss, whose pruner may stop training
    (TrainingStopped); mlflow_run_id: the open MLflow run the training metrics go to as they happen."""
    callbacks = [TrainingProgressArtifact(), *([pruning_callback(trial)] if trial else [])]
    if mlflow_run_id:
        callbacks.append(LiveMetrics(use_tracking_server(cfg.mlflow.tracking_uri), mlflow_run_id))
    return train_model(cfg, data, family, callbacks)
