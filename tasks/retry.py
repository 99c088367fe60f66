"""How a core stage becomes a Prefect task: retried only when another try can succeed, its result kept."""

from prefect import task

from codetune.core.errors import is_transient


def retry_if_transient(task, task_run, state) -> bool:
    """A 5xx, a dropped connection or a timeout may pass; a config, data or credential mistake fails the same way."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def stage_task(name: str, retry_delays: list[int]):
    """A core stage as a Prefect task, retried after each of retry_delays (seconds) when its failure is transient.

    The client libraries retry a single call (botocore's standard mode, codetune's Hub back-off);
    these retries re-run the stage, whose work on disk makes the rerun go on rather than start over.
    Its result is persisted, so a retried flow run takes a finished stage's result instead of redoing it.
    """
    return task(
        name=name,
        retries=len(retry_delays),
        retry_delay_seconds=retry_delays,
        retry_condition_fn=retry_if_transient,
        persist_result=True,
    )
