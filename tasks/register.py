from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.evaluation import EvalReport
from codetune.core.training import TrainedModel
from codetune.lifecycle.registry import Registration, register_model
from tasks.retry import stage_task


def promotion_slot(model_name: str):
    """A global concurrency slot (limit 1) per registered model: one run at a time moves its champion alias."""
    name = f"codetune-promotion-{model_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    return concurrency(name, occupy=1, strict=True)


@stage_task("register", retry_delays=[5, 30])
def register(
    cfg: Config, data: PreparedData, trained: TrainedModel, report: EvalReport, mlflow_run_id: str, lineage: dict
) -> Registration:
    test_rows = data.load("test")[: cfg.evaluation.max_examples]
    test_split = f"{data.sha256['test']}:{len(test_rows)}"
    registration = register_model(
        cfg,
        trained.run_dir,
        mlflow_run_id,
        report.metrics,
        test_rows,
        test_split,
        lineage,
        promotion_lock=promotion_slot(cfg.registry.model_name),
    )
    create_markdown_artifact(
        f"**{registration.model_name} v{registration.version} → `{registration.alias}`**: {registration.reason}",
        key="registration",
    )
    return registration
