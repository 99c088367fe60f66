from prefect.artifacts import create_table_artifact

from codetune.config import DataConfig
from codetune.data import PreparedData, prepare_data
from tasks.retry import stage_task


@stage_task("load-data", retry_delays=[5, 30])
def load_data(cfg: DataConfig, labelled: bool = False) -> PreparedData:
    """Prepared splits; the core caches them by source content, so an unchanged source is not read again."""
    data = prepare_data(cfg, labelled)
    counts = data.counts
    rows = [{"split": s, "examples": n} for s, n in counts["kept"].items()]
    rows += [{"split": f"dropped: {reason}", "examples": n} for reason, n in counts["dropped"].items()]
    create_table_artifact(rows, key="data-counts", description=f"{counts['read']} examples read")
    return data
