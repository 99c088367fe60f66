import sqlite3

import botocore.exceptions
import httpx
import requests
from boto3.exceptions import S3UploadFailedError
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from codetune.core.errors import ConfigError, is_transient


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


def _s3_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def test_failures_another_try_can_fix_are_transient():
    assert is_transient(_http_error(503)) and is_transient(_http_error(429))
    assert is_transient(_s3_error(503, "SlowDown")) and is_transient(_s3_error(500, "InternalError"))
    assert is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"))
    assert is_transient(httpx.ConnectError("reset")) and is_transient(requests.ConnectionError("reset"))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert is_transient(TimeoutError("task ran past its timeout"))
    try:  # boto3 wraps the 503 it gave up on
        try:
            raise _s3_error(503, "ServiceUnavailable")
        except botocore.exceptions.ClientError:
            raise S3UploadFailedError("Failed to upload config.json: 503") from None
    except S3UploadFailedError as wrapper:
        assert is_transient(wrapper)


def test_mistakes_fail_the_same_way_again_and_are_not_retried():
    assert not is_transient(ConfigError("unknown key"))
    assert not is_transient(_http_error(404)) and not is_transient(_http_error(403))
    assert not is_transient(_s3_error(403, "AccessDenied")) and not is_transient(_s3_error(301, "PermanentRedirect"))
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(KeyError("a bug")) and not is_transient(ValueError("bad repo id"))
