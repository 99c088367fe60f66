"""`codetune serve` against MLflow's stock scoring server (`mlflow models serve`), on the same registered model.

    python bench/serve.py --run-dir runs/<the default run>   # writes bench/results/serve-<machine>.json
    python bench/serve.py --run-dir runs/<a completion run> --completion   # serve-completion-<machine>.json

--completion: what an editor waits for. One-line completions (prefix and suffix of held-out cursors, stopping at the
newline) through `/v1/completions` at concurrency 1 and 8, against a plain transformers `generate` loop on the same
merged model in this process; and the OpenAI route's overhead against the scoring route (`/invocations`), both asked
for the same full-length middles.

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

from codetune.core.data import Examples

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

    from codetune.core.config.loader import load_config
    from codetune.lifecycle.registry import log_pyfunc_model

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
    bodies = [{"inputs": [codes[i % len(codes)]]} for i in range(requests)]
    result, answers = await post_load(url, bodies, concurrency, lambda body: body["predictions"][0])
    return {**result, "answers": answers}


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


async def post_load(url: str, bodies: list[dict], concurrency: int, answer) -> tuple[dict, list]:
    """`concurrency` clients post `bodies` back to back; latency percentiles, throughput and answer(json) of each."""
    import httpx

    latencies, answers, errors = [], [None] * len(bodies), 0
    queue = iter(range(len(bodies)))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            started = time.perf_counter()
            response = await http.post(url, json=bodies[i])
            latencies.append(time.perf_counter() - started)
            if response.status_code == 200:
                answers[i] = answer(response.json())
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(bodies), "errors": errors, **_timing(latencies, wall)}, answers


def _timing(latencies: list[float], wall: float) -> dict:
    latencies = sorted(latencies)

    def percentile(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

    return {
        "throughput_rps": round(len(latencies) / wall, 3),
        "p50_s": percentile(0.5),
        "p95_s": percentile(0.95),
        "p99_s": percentile(0.99),
    }


def completion_bench(run_dir: Path, requests: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.config.loader import load_config
    from codetune.core.data import prepare_data
    from codetune.core.families import InferenceSettings, family_of
    from codetune.core.families.fill_in_middle import BLOCK, completes_in_spm, cursors, end_token_id, prompt_ids

    cfg = load_config(str(run_dir / "config.yaml"))
    family = family_of(cfg.model)
    test = prepare_data(cfg.data, family.examples).load("test")
    cuts = [c for row in test for c in cursors(row) if c.kind != BLOCK][:requests]
    settings = InferenceSettings.of(cfg)
    line = {"max_tokens": settings.max_target_length, "temperature": 0, "stop": ["\n"]}

    # The plain loop: the merged export, one cursor at a time, greedy to the newline or the end token.
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    plain_answers, latencies = [], []
    started = time.perf_counter()
    for c in cuts:
        begun = time.perf_counter()
        ids = torch.tensor([prompt_ids(tokenizer, c.prefix, c.suffix, settings, completes_in_spm(model))])
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=line["max_tokens"], eos_token_id=end_token_id(tokenizer), do_sample=False,
                stop_strings=["\n"], tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        plain_answers.append(text.split("\n", 1)[0])
        latencies.append(time.perf_counter() - begun)
    plain = {"concurrency": 1, "requests": len(cuts), **_timing(latencies, time.perf_counter() - started)}
    print(f"{'transformers loop':>22}  c=1   {plain['throughput_rps']:7.2f} req/s  p50 {plain['p50_s']:.3f}s  "
          f"p95 {plain['p95_s']:.3f}s", flush=True)  # fmt: skip
    del model

    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/registry.db"
        model_uri = register(run_dir, tracking)
        port = free_port()
        bin_dir = Path(sys.executable).parent
        command = [str(bin_dir / "codetune"), "serve", "--model", model_uri, "--port", str(port)]
        server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
        try:
            wait_until_up(f"http://127.0.0.1:{port}/ping", server)
            base = f"http://127.0.0.1:{port}"
            bodies = [{"model": "bench", "prompt": c.prefix, "suffix": c.suffix, **line} for c in cuts]
            text = lambda body: body["choices"][0]["text"]  # noqa: E731
            asyncio.run(post_load(f"{base}/v1/completions", bodies[:2], 1, text))  # warm-up
            served = {}
            for concurrency in (1, 8):
                served[concurrency], answers = asyncio.run(
                    post_load(f"{base}/v1/completions", bodies, concurrency, text)
                )
                r = served[concurrency]
                print(f"{'codetune /v1/completions':>22}  c={concurrency:<3} {r['throughput_rps']:7.2f} req/s  "
                      f"p50 {r['p50_s']:.3f}s  p95 {r['p95_s']:.3f}s  errors {r['errors']}", flush=True)  # fmt: skip
            same = answers == plain_answers
            # The same work through both routes: full-length middles, no stop.
            full = settings.generation.max_new_tokens
            openai_full = [{"model": "bench", "prompt": c.prefix, "suffix": c.suffix, "max_tokens": full} for c in cuts]
            scoring = [{"dataframe_records": [{"prefix": c.prefix, "suffix": c.suffix}]} for c in cuts]
            route_openai, via_openai = asyncio.run(post_load(f"{base}/v1/completions", openai_full, 1, text))
            route_scoring, via_scoring = asyncio.run(
                post_load(f"{base}/invocations", scoring, 1, lambda body: body["predictions"][0])
            )
        finally:
            server.terminate()
            server.wait(timeout=120)
    summary = {
        "one_line_completion": {"transformers_loop": plain, "codetune_serve": list(served.values())},
        "served_answers_equal_the_loop": same,
        "openai_route_full_middles": route_openai,
        "scoring_route_full_middles": route_scoring,
        "openai_over_scoring_p50": round(route_openai["p50_s"] / route_scoring["p50_s"], 3),
        "routes_answer_alike": via_openai == via_scoring,
    }
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run directory (runs/<name>)")
    parser.add_argument("--levels", default="1:8,8:32,32:96", help="concurrency:requests pairs")
    parser.add_argument("--completion", action="store_true", help="a completion run: editor latency (see above)")
    parser.add_argument("--requests", type=int, default=48, help="--completion: cursors sent at each concurrency")
    args = parser.parse_args()
    levels = dict(tuple(map(int, pair.split(":"))) for pair in args.levels.split(","))
    run_dir = args.run_dir.resolve()
    if args.completion:
        summary = completion_bench(run_dir, args.requests)
        out = ROOT / "bench" / "results" / f"serve-completion-{_machine()}.json"
        out.write_text(
            json.dumps({"model": run_dir.name, "date": time.strftime("%Y-%m-%d"), **summary}, indent=2) + "\n"
        )
        print(f"written to {out.relative_to(ROOT)}")
        return
    from codetune.core.config.loader import load_config
    from codetune.core.data import prepare_data

    codes = [
        row["code"]
        for row in prepare_data(load_config(str(run_dir / "config.yaml")).data, Examples.pairs).load("test")[:64]
    ]

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
    out = ROOT / "bench" / "results" / f"serve-{_machine()}.json"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answers"} for r in rows]  # noqa: E731
    out.write_text(
        json.dumps(
            {"model": str(run_dir.name), "mlflow_models_serve": strip(stock), "codetune_serve": strip(ours), **summary},
            indent=2,
        )
        + "\n"
    )
    print(f"written to {out.relative_to(ROOT)}")


def _machine() -> str:
    import torch

    machine = f"{'gpu' if torch.cuda.is_available() else 'cpu'}-{os.cpu_count()}core-{platform.machine()}"
    return machine.lower().replace("_", "-")


if __name__ == "__main__":
    main()
