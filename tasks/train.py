from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.families import Family
from codetune.core.training import TrainedModel, train_model
from codetune.lifecycle.sweep import TrialRef, pruning_callback
from tasks.retry import stage_task


# A retry calls train_model again, which resumes from the newest complete checkpoint
# (or returns at once if the export finished), so no finished step is trained twice.
@stage_task("train", retry_delays=[10, 60])
def train(cfg: Config, family: Family, data: PreparedData, trial: TrialRef | None = None) -> TrainedModel:
    """pipeline.train; trial: a sweep's trial, told each validation loss, whose pruner may stop training
    (TrainingStopped)."""
    return train_model(cfg, data, family, [pruning_callback(trial)] if trial else [])
