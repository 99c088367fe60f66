from prefect.artifacts import create_table_artifact

from codetune.core import pipeline
from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.families import Family
from tasks.retry import stage_task


@stage_task("load-data", retry_delays=[5, 30])
def load_data(cfg: Config, family: Family) -> PreparedData:
    """Prepared splits of the examples the family trains on; the core caches them by source content, so an unchanged
    source is not read again."""
    data = pipeline.prepare(cfg, family)
    counts = data.counts
    rows = [{"split": s, "examples": n} for s, n in counts["kept"].items()]
    rows += [{"split": f"dropped: {reason}", "examples": n} for reason, n in counts["dropped"].items()]
    create_table_artifact(rows, key="data-counts", description=f"{counts['read']} examples read")
    return data
