import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def champion_predicts(tracking_uri: str, model_name: str, codes: list[str]) -> list:
    """What a consumer gets from `models:/<model_name>@champion` in the registry at tracking_uri."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{model_name}@champion").predict(codes)
    finally:
        mlflow.set_tracking_uri(None)


def wait_until_healthy(url: str, process: subprocess.Popen, name: str, seconds: float = 120) -> None:
    """Poll a service's health URL until it answers; fail the test (and kill the service) if it never does."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"{name} did not become healthy in {seconds:.0f} s")


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` process on port: SQLite backend, artifacts proxied to a directory, both under root."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + [
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, "mlflow server")
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` process (SQLite, its services running: automations too) per test module."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    wait_until_healthy(f"{url}/health", server, "prefect server")
    yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    server.terminate()
    server.wait(timeout=30)


def run_command(env, *command, timeout=300) -> str:
    """Run a command from the repo root; fail the test with its output if it fails."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def run_twin_deployment(env, overrides: list[str], *params: str) -> str:
    """`prefect deployment run finetune/main` on the seq2seq twin with these overrides; returns the flow run's id."""
    import json

    command = [sys.executable, "-m", "prefect", "deployment", "run", "finetune/main"]
    command += ["--param", "config=configs/tiny-seq2seq.yaml", "--param", f"overrides={json.dumps(overrides)}"]
    for param in params:
        command += ["--param", param]
    out = run_command(env, *command)
    return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
