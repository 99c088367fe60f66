"""What live MLflow logging costs training: the default recipe trained without it and with it, to a real `mlflow
server` on this machine, each in a fresh process, alternated.

    python bench/live_tracking.py    # writes bench/results/live-tracking-<machine>.json and prints the table

Live logging is LiveMetrics (codetune/lifecycle/tracking.py): the Trainer's logs queued on the training thread and
sent by a thread of its own, with MLflow's system-metrics sampler beside it. Both threads share the CPU with
training, so the cost is measured end to end, as training seconds (the Trainer's own clock, from the first step to
the last). The runs log every step (training.logging_steps=1), fifty times as often as the default, for an upper
bound. Target: under 2% of training time.

Run-to-run noise on a shared 2-core machine is several percent, more than the target, so the cost is also counted
exactly: the seconds the training thread spends in LiveMetrics (queueing each log, starting the sender, waiting for
it to flush at the end) plus the CPU seconds of the sender's thread and of the MLflow server answering it (beyond
what the server spends while an untracked run trains), all of which a 2-core machine takes from training. The
server runs on this machine here; on a team's stack it is elsewhere, and only the first two count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import bench_config, cpu_model, machine_name  # noqa: E402

STEPS = 24
ROUNDS = 3
TARGET = 0.02


def train(workdir: Path, variant: str, uri: str, round_: int) -> dict:
    """One training of the default recipe; with variant "live", its logs go to a run on the server at uri."""
    from codetune.core import pipeline
    from codetune.core.families import family_of
    from codetune.core.training import train_model

    cfg = bench_config(workdir, STEPS, "training.logging_steps=1", f"training.run_name={variant}-{round_}")
    family = family_of(cfg.model)
    data = pipeline.prepare(cfg, family)
    callbacks = []
    if variant == "live":
        import mlflow

        from codetune.lifecycle.tracking import LiveMetrics

        class TimedLiveMetrics(LiveMetrics):
            """LiveMetrics, its time on the training thread and its sender's CPU time counted."""

            on_thread = sender_cpu = 0.0

            def _timed(self, method, *args, **kwargs):
                started = time.perf_counter()
                method(*args, **kwargs)
                TimedLiveMetrics.on_thread += time.perf_counter() - started

            def on_train_begin(self, *args, **kwargs):
                self._timed(super().on_train_begin, *args, **kwargs)

            def on_log(self, *args, **kwargs):
                self._timed(super().on_log, *args, **kwargs)

            def on_train_end(self, *args, **kwargs):
                self._timed(super().on_train_end, *args, **kwargs)

            def _send(self):
                super()._send()
                TimedLiveMetrics.sender_cpu = time.thread_time()

        client = mlflow.MlflowClient(uri)  # mlflow imported before training, as the flow's open-tracking task does
        experiment = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
        run_id = client.create_run(experiment.experiment_id, run_name=f"live-{round_}").info.run_id
        callbacks.append(TimedLiveMetrics(uri, run_id))
    trained = train_model(cfg, data, family, callbacks)  # as the train task calls it
    result = {"train_seconds": trained.train_seconds, "steps": trained.global_step}
    if variant == "live":
        sent = len(mlflow.MlflowClient(uri).get_metric_history(run_id, "train_loss"))
        result |= {"loss_points_sent": sent, "on_training_thread_seconds": round(TimedLiveMetrics.on_thread, 3)}
        result["sender_cpu_seconds"] = round(TimedLiveMetrics.sender_cpu, 3)
    return result


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its children (the server's workers)."""
    import psutil

    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def start_server(root: Path, port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["untracked", "live"])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--uri", default="")
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train(args.workdir, args.worker, args.uri, args.round)))
        return

    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs: dict[str, list[dict]] = {"untracked": [], "live": []}
    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as tmp:
        workdir = Path(tmp)
        server = start_server(workdir, port)
        try:
            for round_ in range(ROUNDS):  # alternated: a machine that slows down slows both alike
                for variant in runs:
                    server_cpu = cpu_seconds(server.pid)
                    done = subprocess.run(
                        [sys.executable, __file__, "--worker", variant, "--workdir", tmp]
                        + ["--uri", f"http://127.0.0.1:{port}", "--round", str(round_)],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"},
                    )
                    if done.returncode:
                        raise RuntimeError(f"{variant} training failed:\n{done.stderr[-3000:]}")
                    runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    runs[variant][-1]["server_cpu_seconds"] = round(cpu_seconds(server.pid) - server_cpu, 3)
                    print(variant, runs[variant][-1], flush=True)
        finally:
            server.terminate()
    median = {v: statistics.median(r["train_seconds"] for r in rs) for v, rs in runs.items()}
    overhead = median["live"] / median["untracked"] - 1
    # The server's own background work (its job runner polls) goes on during an untracked run too.
    idle_server = statistics.median(r["server_cpu_seconds"] for r in runs["untracked"])
    counted = statistics.median(
        (r["on_training_thread_seconds"] + r["sender_cpu_seconds"] + r["server_cpu_seconds"] - idle_server)
        / r["train_seconds"]
        for r in runs["live"]
    )
    results = {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "steps": STEPS,
        "logging_steps": 1,
        "runs": runs,
        "median_train_seconds": median,
        "end_to_end_overhead": round(overhead, 4),
        "counted_overhead": round(counted, 4),
        "target": TARGET,
        "met": counted < TARGET,
    }
    output = ROOT / "bench" / "results" / f"live-tracking-{results['machine']}.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| training, {STEPS} steps of the default | median seconds ({ROUNDS} runs) |\n|---|---|")
    for variant, seconds in median.items():
        print(f"| {variant} | {seconds:.1f} |")
    print(
        f"\nlive logging: {counted:.2%} of training time counted (training thread + sender + server CPU), "
        f"{overhead:+.1%} end to end (noise: see the untracked runs); target < {TARGET:.0%}; written to {output}"
    )


if __name__ == "__main__":
    main()
