"""`codetune serve` as a process: MLflow's scoring protocol, batching, limits, and the alias followed under load."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.training import train_model
from codetune.lifecycle.registry import log_pyfunc_model
from tests.conftest import TWIN
from tests.e2e.conftest import free_port, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
CODES = [
    "def add(a, b):\n    return a + b\n",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
]


def _register(name: str, cfg) -> str:
    run_dir = train_model(cfg, prepare_data(cfg.data, Examples.pairs), family_of(cfg.model)).run_dir
    with mlflow.start_run():
        uri = log_pyfunc_model(cfg, Path(run_dir))
    return mlflow.register_model(uri, name).version


def _post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _post_status(url: str, payload) -> tuple[int, str | None]:
    """(status, Retry-After header)."""
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


@pytest.mark.timeout(900)
def test_serve_answers_batches_and_follows_the_alias_under_load(tiny_overrides, tmp_path, monkeypatch):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("serve")  # not the experiment an earlier test left active, in another store
    client = mlflow.MlflowClient()
    first = _register("served", load_config(TWIN, tiny_overrides))
    second = _register("served", load_config(TWIN, tiny_overrides + ["training.seed=7", "training.max_steps=24"]))
    client.set_registered_model_alias("served", "champion", first)
    # What each version says, one code at a time, in this process: the reference for the served answers.
    expected = {}
    for v in (first, second):
        consumer = mlflow.pyfunc.load_model(f"models:/served/{v}")
        expected[v] = [consumer.predict([code])[0] for code in CODES]
    assert expected[first] != expected[second]

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--model", "models:/served@champion"]
        + ["--port", str(port), "--alias-poll-seconds", "1", "--max-batch-requests", "4", "--max-queued-requests", "8"]
        + ["--log-inputs", str(tmp_path / "served")],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/ping", server, "codetune serve", seconds=300)
        status, body = _post(f"{url}/invocations", {"inputs": CODES})
        assert status == 200 and body == {"predictions": expected[first], "model_version": first}
        [served_log] = (tmp_path / "served").glob("*.jsonl")
        logged = [json.loads(line) for line in served_log.read_text().splitlines()]
        assert [(r["input"], r["model_version"]) for r in logged] == [(code, first) for code in CODES]

        # Concurrent one-code requests (as many as may be in flight) are batched; each gets its answer alone.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _post(f"{url}/invocations", {"inputs": [CODES[i % 4]]}), range(32)))
        assert all(s == 200 and b["predictions"] == [expected[first][i % 4]] for i, (s, b) in enumerate(answers))
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        batched = [line for line in metrics.splitlines() if line.startswith("codetune_batch_rows_count")]
        assert batched and float(batched[0].split()[-1]) < 32 + 1  # fewer predict calls than requests

        # Malformed or oversized input is a 400 that names the problem; the server keeps serving.
        status, body = _post(f"{url}/invocations", {"wrong": [1]})
        assert status == 400 and "malformed input" in body["message"]
        assert _post(f"{url}/invocations", {"inputs": []})[0] == 400
        status, body = _post(f"{url}/invocations", {"inputs": ["x" * 100_001]})
        assert status == 400 and "at most 100000" in body["message"]
        assert _post(f"{url}/invocations", {"inputs": ["x" * 100_000] * 90})[0] == 413

        # Past 8 in flight and 8 queued: 503 with Retry-After, never a crash.
        with ThreadPoolExecutor(48) as pool:
            flood = list(pool.map(lambda _: _post_status(f"{url}/invocations", {"inputs": CODES}), range(48)))
        assert {status for status, _ in flood} == {200, 503}
        assert all(retry_after == "1" for status, retry_after in flood if status == 503)
        assert _post(f"{url}/invocations", {"inputs": CODES[:1]})[0] == 200

        # Move the alias under load: no request fails, and every answer matches the version that gave it.
        def load(i):
            return _post(f"{url}/invocations", {"inputs": [CODES[i % 4]]}), i % 4

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(load, i) for i in range(8)]
            client.set_registered_model_alias("served", "champion", second)
            deadline = time.time() + 120
            i = 8
            while time.time() < deadline:
                futures.append(pool.submit(load, i))
                i += 1
                if futures[-1].result()[0][1].get("model_version") == second:
                    break
            results = [f.result() for f in futures]
        assert all(status == 200 for (status, _), _ in results)
        assert all(body["predictions"] == [expected[body["model_version"]][k]] for (_, body), k in results)
        assert results[-1][0][1]["model_version"] == second
        assert json.loads(urllib.request.urlopen(f"{url}/version").read())["model"] == f"models:/served/{second}"
    finally:
        server.terminate()
        server.wait(timeout=60)
        mlflow.set_tracking_uri(None)
