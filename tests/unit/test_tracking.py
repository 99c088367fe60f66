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


def test_a_tracking_server_that_stops_answering_never_holds_training_up(monkeypatch):
    """LiveMetrics sends from a thread of its own: a log returns at once, and the end of training waits at most
    FLUSH_SECONDS for a server that does not answer (log_run sends the rest from trainer_state.json later)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from codetune.lifecycle.tracking import FLUSH_SECONDS, LiveMetrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.create_server(("127.0.0.1", 0)) as stuck:  # accepts connections, never answers
        live = LiveMetrics(f"http://127.0.0.1:{stuck.getsockname()[1]}", "0" * 32)
        args, state, control = TrainingArguments("unused", use_cpu=True), TrainerState(), TrainerControl()
        live.on_train_begin(args, state, control)
        started = time.perf_counter()
        for step in range(1, 51):
            state.global_step = step
            live.on_log(args, state, control, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
        assert time.perf_counter() - started < 0.5
        live.on_train_end(args, state, control)
        assert time.perf_counter() - started < FLUSH_SECONDS + 2
