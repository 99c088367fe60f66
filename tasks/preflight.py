"""The pre-flight task: the core's checks, and whether every destination the run publishes to will take it."""

from prefect import task

from codetune.core.config import Config
from codetune.core.preflight import fail_on, preflight_errors
from codetune.lifecycle.destinations import DESTINATIONS


def publishing_errors(cfg: Config) -> list[str]:
    """Where a real run would publish, whether it can: checked before the hours of training, not after."""
    if cfg.registry.dry_run or not cfg.mlflow.enabled:
        return []
    return [error for d in DESTINATIONS if d.enabled(cfg) for error in d.probe(cfg)]


# Not retried: what it finds (a typo, a missing model, a refused credential) is there on the next try too.
@task(name="preflight")
def preflight(cfg: Config) -> None:
    """The run's pre-flight check, the flow's first task: every error before data, training or uploads."""
    fail_on(preflight_errors(cfg) + publishing_errors(cfg))
