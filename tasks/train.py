from codetune.config import Config
from codetune.data import PreparedData
from codetune.sweep import TrialRef
from codetune.training import TrainedModel, train_model
from tasks.retry import stage_task


# A retry calls train_model again, which resumes from the newest complete checkpoint
# (or returns at once if the export finished), so no finished step is trained twice.
@stage_task("train", retry_delays=[10, 60])
def train(cfg: Config, data: PreparedData, trial: TrialRef | None = None) -> TrainedModel:
    return train_model(cfg, data, trial)
