from prefect.artifacts import create_markdown_artifact

from codetune.core import pipeline
from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.evaluation import EvalReport
from codetune.core.progress import listening
from codetune.core.training import TrainedModel
from tasks.progress import EvaluationProgressArtifact
from tasks.retry import stage_task


@stage_task("evaluate", retry_delays=[10, 60])
def evaluate(cfg: Config, trained: TrainedModel, data: PreparedData) -> EvalReport:
    with listening(EvaluationProgressArtifact()):
        report = pipeline.evaluate(cfg, trained, data)
    create_markdown_artifact(report.to_markdown(), key="eval-report", description=trained.run_dir)
    return report
