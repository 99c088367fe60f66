"""Run untrusted programs (a model's generated code and its tests) so that what they do stays theirs.

Each program runs under a launcher process of its own (launcher.py, in a clean interpreter), confined by what the
kernel enforces, in the first mode that works here:

- namespaces (root with CAP_SYS_ADMIN: CI, a GPU box): new PID, mount and network namespaces, every file system
  read-only, a private /tmp holding its directory, a user id of its own;
- landlock (any user, e.g. the worker image's uid 1000 under Docker's default seccomp profile): Landlock lets it
  read only the interpreter and system libraries and write only its own directory; a seccomp filter refuses
  sockets, signals and other calls that reach outside its own processes (landlock.py, seccomp.py);
- unconfined, only where no mode works and the caller allowed it (evaluation.allow_unconfined_execution).

Every mode: CPU-seconds, address-space, file-size, process and open-file limits, a wall-clock timeout, an empty
environment, every descendant killed when it ends. A program passes only when it ran to its end: the launcher
appends a line reporting a per-run random token after the program's tests, so an early `exit(0)` is a failure.
This package imports only the standard library, so the launcher starts in ~20 ms.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from enum import Enum

MIB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
"""The directory holding the codetune package: the launcher imports it from there."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0
    """Wall-clock seconds before the program and everything it started are killed."""
    memory: int = 1024 * MIB
    """Address space of each process (a memory hog gets MemoryError)."""
    file_size: int = 16 * MIB
    """Largest file it may write."""
    processes: int = 32
    """Processes it may run at once (a fork bomb stops here)."""
    open_files: int = 64


class Confinement(str, Enum):
    namespaces = "namespaces"
    landlock = "landlock"
    unconfined = "unconfined"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    """'passed', 'timed out after 3.0 s', 'exited before its tests finished', or the last line of its error."""
    seconds: float
    """Wall-clock time of the program, interpreter start included."""
    confinement: Confinement | None
    """How the program was confined; None where its launcher gave no answer."""


class SandboxUnavailable(RuntimeError):
    """No program can run confined here (and running them unconfined was not allowed): no verdict on the program."""


UNAVAILABLE_FIX = (
    "run the worker on a kernel with Landlock (Linux 5.13+ with landlock among its LSMs; Docker's and Podman's "
    "default seccomp profiles allow its calls, an old or custom one may not) and libseccomp installed, or as root "
    "with CAP_SYS_ADMIN; or set "
    "evaluation.allow_unconfined_execution=true to run generated code without confinement (the report, the MLflow "
    "run and the model card then say so)"
)

_unconfined_allowed: ContextVar[bool] = ContextVar("unconfined_allowed", default=False)


@contextmanager
def unconfined_execution(allowed: bool):
    """Within this block, where no mode confines programs, they run unconfined instead of raising
    SandboxUnavailable. A run's policy (evaluation.allow_unconfined_execution), set once where its stage starts
    rather than passed through every family's scoring."""
    token = _unconfined_allowed.set(allowed)
    try:
        yield
    finally:
        _unconfined_allowed.reset(token)


def run_program(source: str, limits: Limits = Limits(), allow_unconfined: bool | None = None) -> Verdict:
    """Run one Python program; it passes when it runs to its end and exits with status 0 within the limits. Raises
    SandboxUnavailable when no program can run here, so that a broken sandbox never reads as failing code."""
    import subprocess  # here, not above: the launcher imports this module, and each import delays every program

    allowed = _unconfined_allowed.get() if allow_unconfined is None else allow_unconfined
    request = json.dumps({"source": source, "limits": asdict(limits), "allow_unconfined": allowed})
    start = f"import sys; sys.path.insert(0, {ROOT!r}); from codetune.core.sandbox.launcher import main; main()"
    # The launcher gets its own grace on top of the program's timeout, for its set-up and the clean-up after a kill.
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", start],
            input=request,
            capture_output=True,
            text=True,
            env={},
            timeout=limits.timeout + 30,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        reason = f"the sandbox's launcher did not finish within {limits.timeout + 30:.0f} s"
        return Verdict(False, reason, math.inf, None)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        lines = done.stderr.strip().splitlines()
        answer = {"unavailable": lines[-1] if lines else f"the launcher ended with status {done.returncode}"}
    if "unavailable" in answer:
        raise SandboxUnavailable(f"the sandbox cannot run programs here ({answer['unavailable']}): {UNAVAILABLE_FIX}")
    return Verdict(**{**answer, "confinement": Confinement(answer["confinement"])})


def run_programs(sources: list[str], limits: list[Limits], workers: int | None = None) -> list[Verdict]:
    """Run many programs, `workers` at a time (default: one per CPU core); verdicts in the order of sources."""
    from concurrent.futures import ThreadPoolExecutor

    allowed = _unconfined_allowed.get()  # read here: the pool's threads do not share this thread's context
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s, lim: run_program(s, lim, allowed), sources, limits))


def confinement() -> Confinement:
    """How programs are confined on this machine (one trivial program is run to find out); raises
    SandboxUnavailable where none can run."""
    return run_program("pass").confinement
