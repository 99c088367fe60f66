"""`codetune serve` against MLflow's stock scoring server (`mlflow models serve`), on the same registered model.

    python bench/serve.py --run-dir runs/<the default run>   # writes bench/results/serve-<machine>.json

The model is a run directory of the default job (`make run`), registered in a throwaway registry.
Each server is started alone (they would fight for the cores), warmed up, then loaded at each
concurrency by as many clients, each sending one function per request, back to back. Throughput
and latency percentiles are the client's view. Both servers' answers are compared: batching must
not change what a request gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_THROUGHPUT_RATIO = 3.0  # at the highest concurrency, with p95 no worse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(run_dir: Path, tracking_uri: str) -> str:
    """Log run_dir as codetune's pyfunc and make it champion of a fresh registry; returns the model URI."""
    import mlflow

    from codetune.config import load_config
    from codetune.registry import log_pyfunc_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serve-bench")
    with mlflow.start_run():
        uri = log_pyfunc_model(load_config(str(run_dir / "config.yaml")), run_dir)
    version = mlflow.register_model(uri, "bench").version
    mlflow.MlflowClient().set_registered_model_alias("bench", "champion", version)
    return "models:/bench@champion"


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 600) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer from {url} in {seconds:.0f} s")


async def load(url: str, codes: list[str], concurrency: int, requests: int) -> dict:
    """`concurrency` clients send `requests` single-function requests in all; the answers come back in order."""
    import httpx

    latencies, answers, errors = [], [None] * requests, 0
    queue = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            started = time.perf_counter()
            response = await http.post(url, json={"inputs": [codes[i % len(codes)]]})
            latencies.append(time.perf_counter() - started)
            if response.status_code == 200:
                answers[i] = response.json()["predictions"][0]
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "throughput_rps": round(requests / wall, 3),
        "p50_s": percentile(0.50),
        "p95_s": percentile(0.95),
        "p99_s": percentile(0.99),
        "answers": answers,
    }


def measure(name: str, command: list[str], port: int, env: dict, codes: list[str], levels: dict[int, int]) -> list:
    output = tempfile.TemporaryFile()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        except SystemExit:
            output.seek(0)
            print(output.read().decode(errors="replace")[-3000:], file=sys.stderr)
            raise
        url = f"http://127.0.0.1:{port}/invocations"
        asyncio.run(load(url, codes, 1, 2))  # warm-up: first-call allocations, lazy imports
        results = []
        for concurrency, requests in levels.items():
            result = asyncio.run(load(url, codes, concurrency, requests))
            print(
                f"{name:>18}  c={concurrency:<3} {result['throughput_rps']:7.2f} req/s  "
                f"p50 {result['p50_s']:6.2f}s  p95 {result['p95_s']:6.2f}s  p99 {result['p99_s']:6.2f}s  "
                f"errors {result['errors']}",
                flush=True,
            )
            results.append(result)
        return results
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run directory (runs/<name>)")
    parser.add_argument("--levels", default="1:8,8:32,32:96", help="concurrency:requests pairs")
    args = parser.parse_args()
    levels = dict(tuple(map(int, pair.split(":"))) for pair in args.levels.split(","))
    run_dir = args.run_dir.resolve()
    from codetune.config import load_config
    from codetune.data import prepare_data

    codes = [row["code"] for row in prepare_data(load_config(str(run_dir / "config.yaml")).data).load("test")[:64]]

    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/registry.db"
        model = register(run_dir, tracking)
        bin_dir = Path(sys.executable).parent
        # mlflow models serve execs `uvicorn` from PATH: this environment's, even when it is not activated.
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        port = free_port()
        stock = measure(
            "mlflow models serve",
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local", "-p", str(port)],
            port,
            env,
            codes,
            levels,
        )
        port = free_port()
        command = [str(bin_dir / "codetune"), "serve", "--model", model, "--port", str(port)]
        ours = measure("codetune serve", command, port, env, codes, levels)

    same_answers = all(a["answers"] == b["answers"] for a, b in zip(stock, ours))
    top = max(levels)
    stock_top, ours_top = stock[-1], ours[-1]
    ratio = ours_top["throughput_rps"] / stock_top["throughput_rps"]
    summary = {
        "throughput_ratio_at_top_concurrency": round(ratio, 2),
        "p95_ratio_at_top_concurrency": round(ours_top["p95_s"] / stock_top["p95_s"], 2),
        "target": f">= {TARGET_THROUGHPUT_RATIO}x throughput at concurrency {top}, p95 no worse",
        "met": ratio >= TARGET_THROUGHPUT_RATIO and ours_top["p95_s"] <= stock_top["p95_s"],
        "same_answers": same_answers,
    }
    print(json.dumps(summary, indent=2))
    import torch

    machine = f"{'gpu' if torch.cuda.is_available() else 'cpu'}-{os.cpu_count()}core-{platform.machine()}"
    out = ROOT / "bench" / "results" / f"serve-{machine.lower().replace('_', '-')}.json"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answers"} for r in rows]  # noqa: E731
    out.write_text(
        json.dumps(
            {"model": str(run_dir.name), "mlflow_models_serve": strip(stock), "codetune_serve": strip(ours), **summary},
            indent=2,
        )
        + "\n"
    )
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
