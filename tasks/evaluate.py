from prefect import task
from prefect.artifacts import create_markdown_artifact

from codetune.config import Config
from codetune.data import PreparedData
from codetune.evaluation import EvalReport, evaluate_model
from codetune.training import TrainedModel
from tasks.retry import retry_unless_user_error


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_user_error,
    persist_result=True,
)
def evaluate(cfg: Config, trained: TrainedModel, data: PreparedData) -> EvalReport:
    report = evaluate_model(trained.run_dir, data.load("test"), cfg)
    create_markdown_artifact(report.to_markdown(), key="eval-report", description=trained.run_dir)
    return report
