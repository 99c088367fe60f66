"""The process `run_program` starts: it confines one program, runs it, kills what it leaves behind, and answers with
its verdict as JSON on stdout. Standard library only: it starts from `python -I -S` in ~20 ms."""

from __future__ import annotations

import ctypes
import fcntl
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict

from codetune.core.sandbox import Confinement, Limits, Verdict, landlock, namespaces, seccomp

PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
# A user id no account has, where the launcher is root: per launcher, so a process limit and a kill count only
# this program's processes.
FIRST_SANDBOX_UID = 1_000_000
DONE_FD = 3
"""The program writes its run's token here once its last line (after its tests) has run."""
# What a Landlock-confined program may read: the interpreter, its standard library and the system's libraries.
SYSTEM_READABLE = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime"]
DEVICES = ["/dev/zero", "/dev/urandom", "/dev/random"]


class Unconfinable(OSError):
    """No mode confines programs here, and running them unconfined was not allowed."""


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        verdict = launch(request["source"], Limits(**request["limits"]), request["allow_unconfined"])
        answer = {**asdict(verdict), "confinement": verdict.confinement.value}
    except OSError as exc:  # no mode confines here, or the program's interpreter cannot start: no program can run
        answer = {"unavailable": str(exc)}
    sys.stdout.write(json.dumps(answer))


def launch(source: str, limits: Limits, allow_unconfined: bool) -> Verdict:
    libc = ctypes.CDLL(None, use_errno=True)
    namespaces.check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    confinement, workdir, seccomp_library = _choose_confinement(libc, allow_unconfined)
    uid = FIRST_SANDBOX_UID + os.getpid() if os.geteuid() == 0 else None
    if uid is not None:
        os.chown(workdir, uid, uid)
    # The process limit counts every process of the user: where the program shares the caller's, add theirs.
    processes = limits.processes + (0 if uid is not None else _own_processes())
    token = secrets.token_hex(16)
    program = os.path.join(workdir, "program.py")
    with open(program, "w") as f:
        f.write(f"{source}\n\n__import__('os').write({DONE_FD}, b'{token}')\n")
    stdout, stderr = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    # The base interpreter without site-packages (-S): the program sees the standard library only, and starts in
    # half the time.
    interpreter = getattr(sys, "_base_executable", sys.executable)
    cpu_seconds = math.ceil(limits.timeout) + 1

    started = time.perf_counter()
    done_read, done_write = os.pipe()
    # The child reports a failure to set the program up here; a successful exec closes the pipe (close-on-exec).
    setup_failed, setup_report = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program's first process
        report = setup_report
        try:
            report = fcntl.fcntl(setup_report, fcntl.F_DUPFD_CLOEXEC, 10)  # clear of the descriptors set below
            os.setsid()
            os.chdir(workdir)
            out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            if uid is not None:
                os.fchown(out, uid, uid)
                os.fchown(err, uid, uid)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.dup2(done_write, DONE_FD)
            os.closerange(DONE_FD + 1, report)
            os.closerange(report + 1, 1 << 16)
            _set_limits(limits, cpu_seconds, processes)
            if confinement is not Confinement.unconfined:
                namespaces.check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
                if confinement is Confinement.landlock:
                    readable = [os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(interpreter))]
                    landlock.restrict(libc, readable + SYSTEM_READABLE + DEVICES, [workdir, os.devnull])
                seccomp.load(seccomp_library)
            os.execve(interpreter, [interpreter, "-I", "-S", "-B", "program.py"], env)
        except BaseException as exc:
            os.write(report, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(127)

    os.close(setup_report)
    os.close(done_write)
    with os.fdopen(setup_failed, "rb") as setup:
        failure = setup.read().decode()
    if failure:
        os.waitpid(pid, 0)
        raise OSError(f"starting the program: {failure}")
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], limits.timeout)[0]
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    _kill_descendants()
    ran_to_the_end = _reported(done_read) == token.encode()
    if timed_out:
        verdict = Verdict(False, f"timed out after {limits.timeout:.1f} s", seconds, confinement)
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        reason = "passed" if ran_to_the_end else "exited before its tests finished"
        verdict = Verdict(ran_to_the_end, reason, seconds, confinement)
    else:
        verdict = Verdict(False, _reason(status, _tail(stderr), cpu_seconds), seconds, confinement)
    if confinement is not Confinement.namespaces:  # a private /tmp goes with its namespace
        shutil.rmtree(workdir, ignore_errors=True)
    return verdict


def _choose_confinement(libc, allow_unconfined: bool) -> tuple[Confinement, str, object]:
    """The first mode that works here, the program's directory, and libseccomp (both modes load its filter: a read-only
    file system in a network namespace still lets a program connect to a Unix socket, PostgreSQL's say)."""
    seccomp_library = seccomp.library()
    if seccomp_library is None:
        refusals = ["seccomp: libseccomp is not installed"]
    else:
        if os.geteuid() == 0:
            try:
                return Confinement.namespaces, namespaces.enter(libc), seccomp_library
            except namespaces.Refused as exc:
                refusals = [f"namespaces: {exc.strerror}"]
        else:
            refusals = ["namespaces: not root"]
        if landlock.abi(libc) >= 1:
            return Confinement.landlock, tempfile.mkdtemp(prefix="codetune-sandbox-"), seccomp_library
        refusals.append("Landlock: this kernel has none, or a seccomp profile refuses it")
    if not allow_unconfined:
        raise Unconfinable("; ".join(refusals))
    return Confinement.unconfined, tempfile.mkdtemp(prefix="codetune-sandbox-"), None


def _reported(done_read: int) -> bytes:
    """What the program wrote to DONE_FD (every writer is gone by now)."""
    os.set_blocking(done_read, False)
    try:
        return os.read(done_read, 256)
    except BlockingIOError:
        return b""
    finally:
        os.close(done_read)


def _descendants(ancestor: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    found, frontier = [], [ancestor]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_descendants() -> None:
    """SIGKILL every process below the launcher until none is left (a fork bomb keeps forking while it is swept)."""
    for _ in range(100):
        pids = _descendants(os.getpid())
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:  # reap what was ours (orphans are re-parented to this subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break
        time.sleep(0.01)


def _set_limits(limits: Limits, cpu_seconds: int, processes: int) -> None:
    for which, value in (
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_AS, limits.memory),
        (resource.RLIMIT_FSIZE, limits.file_size),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _own_processes() -> int:
    uid = os.getuid()
    return sum(1 for e in os.listdir("/proc") if e.isdigit() and _owner(e) == uid)


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _reason(status: int, stderr: str, cpu_seconds: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return f"exceeded {cpu_seconds} CPU seconds"
        if sig == signal.SIGXFSZ:
            return "wrote a file larger than the sandbox allows"
        return f"killed by signal {signal.Signals(sig).name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exited with status {os.WEXITSTATUS(status)}"
