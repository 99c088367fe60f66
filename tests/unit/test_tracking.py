import socket
import time

import pytest

import codetune.lifecycle.tracking
from codetune.core.config.loader import load_config
from codetune.core.errors import is_transient
from codetune.lifecycle.tracking import TrackingError, log_run
from tests.conftest import TWIN


def test_a_tracking_server_that_never_answers_fails_the_attempt_in_bounded_time(tmp_path, monkeypatch):
    """MLflow's own client would wait 120 s and retry 7 times; the task's retry owns the back-off instead."""
    for name in codetune.lifecycle.tracking.MLFLOW_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(codetune.lifecycle.tracking.MLFLOW_CLIENT_ENV, "MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.create_server(("127.0.0.1", 0)) as stuck:  # accepts connections, never answers
        cfg = load_config(TWIN, [f"mlflow.tracking_uri=http://127.0.0.1:{stuck.getsockname()[1]}"])
        started = time.perf_counter()
        with pytest.raises(TrackingError, match="cannot use MLflow at http://127.0.0.1") as failure:
            log_run(cfg, tmp_path, {}, {})
    assert time.perf_counter() - started < 10
    assert is_transient(failure.value)  # so the task retries it, after its own delay
