"""Errors caused by user input, each message naming the problem and how to fix it; and which errors are transient."""

from urllib.parse import urlsplit, urlunsplit


class CodetuneError(Exception):
    """Base for mistakes a user can fix; the CLI prints these without a traceback."""


class ConfigError(CodetuneError):
    pass


class DataError(CodetuneError):
    pass


class SandboxError(CodetuneError):
    """Generated code cannot run on this machine: no score is better than a score of 0."""


class ModelError(CodetuneError):
    pass


class TrainingProcessLost(Exception):
    """A process of a multi-process training died (killed, lost its device); another try resumes from the newest
    checkpoint."""


# Raised by the HTTP and AWS clients for a dropped connection or a timeout, whichever library's they are.
TRANSIENT_TYPES = {
    "TransportError",  # httpx (huggingface_hub)
    "ConnectionError",  # requests (MLflow's client), botocore, builtin
    "Timeout",  # requests
    "ConnectionClosedError",  # botocore
}
TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"}
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable", "InternalError"}


def is_transient(exc: BaseException) -> bool:
    """Whether another try can succeed: 5xx and 429 answers, dropped connections, timeouts, a busy database.

    Everything else, the user's mistakes first, fails the same way again: retrying only delays the message.
    A wrapper (boto3's S3UploadFailedError around a 503) is judged by the error it wraps, and so is a codetune
    error raised from one (an MLflow server that timed out).
    """
    if isinstance(exc, CodetuneError):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    wrapped = exc.__cause__ or exc.__context__
    return _is_transient_itself(exc) or (wrapped is not None and wrapped is not exc and is_transient(wrapped))


def _is_transient_itself(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:  # requests, httpx
        return status >= 500 or status == 429
    if isinstance(response, dict):  # botocore's ClientError
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.get("Code") in TRANSIENT_S3_CODES
    if getattr(exc, "error_code", None) in TRANSIENT_MLFLOW_CODES:
        return True
    if "database is locked" in str(exc):  # SQLite under concurrent writers
        return True
    # TimeoutError covers a task that ran past its timeout: its retry resumes from the last checkpoint.
    names = {c.__name__ for c in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError, TrainingProcessLost)) or bool(names & TRANSIENT_TYPES)


def without_credentials(url: str) -> str:
    """url with any user:password@ removed, for messages and logs."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
