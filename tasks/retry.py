"""How a core stage becomes a Prefect task: when it is retried, and that its result is kept."""

from prefect import task

from codetune.errors import CodetuneError


def retry_unless_user_error(task, task_run, state) -> bool:
    """A config, data or credential mistake fails the same way every time: retrying only delays the message."""
    try:
        state.result()
    except CodetuneError:
        return False
    except Exception:
        return True
    return True


def stage_task(name: str, retry_delays: list[int]):
    """A core stage as a Prefect task, retried after each of retry_delays (seconds) unless the error is the user's.

    Its result is persisted, so a retried flow run takes a finished stage's result instead of redoing it.
    """
    return task(
        name=name,
        retries=len(retry_delays),
        retry_delay_seconds=retry_delays,
        retry_condition_fn=retry_unless_user_error,
        persist_result=True,
    )
