"""When a failed task is worth retrying."""

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
