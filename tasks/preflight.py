from prefect import task

from codetune.config import Config
from codetune.preflight import check


# Not retried: what it finds (a typo, a missing model, a full disk) is there on the next try too.
@task(name="preflight")
def preflight(cfg: Config) -> None:
    """The run's pre-flight check, the flow's first task: every problem before data, training or servers."""
    check(cfg)
