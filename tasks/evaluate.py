from prefect.artifacts import create_markdown_artifact

from codetune.config import Config
from codetune.data import PreparedData
from codetune.evaluation import EvalReport, evaluate_model
from codetune.training import TrainedModel
from tasks.retry import stage_task


@stage_task("evaluate", retry_delays=[10, 60])
def evaluate(cfg: Config, trained: TrainedModel, data: PreparedData) -> EvalReport:
    report = evaluate_model(trained.run_dir, data.load("test"), cfg)
    create_markdown_artifact(report.to_markdown(), key="eval-report", description=trained.run_dir)
    return report
