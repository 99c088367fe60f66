from prefect import task

from codetune.config import Config
from codetune.data import PreparedData
from codetune.training import TrainedModel, train_model
from tasks.retry import retry_unless_user_error


# A retry calls train_model again, which resumes from the newest complete checkpoint
# (or returns at once if the export finished), so no finished step is trained twice.
@task(
    name="train",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_user_error,
    persist_result=True,
)
def train(cfg: Config, data: PreparedData) -> TrainedModel:
    return train_model(cfg, data)
