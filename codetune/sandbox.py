"""Run untrusted programs (a model's generated code and its tests) so that what they do stays theirs.

Each program runs in a launcher process of its own (this file, run as a script by a clean interpreter):

- as root: new PID, mount and network namespaces; a private /tmp, /var/tmp and /dev/shm (tmpfs) with the
  program's directory inside; a user id of its own (never root, so no file outside its directory or a
  world-writable one can change, and no other process can be signalled); no network interface at all. When the
  program's first process ends or is killed, the kernel kills everything else in its PID namespace.
- otherwise (a container's unprivileged user): its own session and process group, a fresh temporary directory,
  and a prelude that refuses sockets and signals to other processes by ordinary means; every descendant is found
  through /proc (the launcher is their child subreaper) and killed.

Both: CPU-seconds, address-space, file-size, process and open-file limits; a wall-clock timeout; an empty
environment (no tokens, no AWS keys reach the program); nothing but the standard library imports here, so the
launcher starts in ~20 ms.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

MIB = 1024 * 1024


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


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    """'passed', 'timed out after 3.0 s', 'exceeded 4 CPU seconds', or the last line of its error."""
    seconds: float
    """Wall-clock time of the program, interpreter start included."""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start programs on this machine (no verdict on the program)."""


UNAVAILABLE_FIX = (
    "as root it needs namespaces (CAP_SYS_ADMIN: a container run as root without --privileged has none; run it as a "
    "non-root user, where programs are confined without them)"
)


def run_program(source: str, limits: Limits = Limits()) -> Verdict:
    """Run one Python program; it passes when it exits with status 0 within the limits. Raises SandboxUnavailable
    when no program can run here, so that a broken sandbox never reads as failing code."""
    import subprocess  # here, not above: the launcher imports this module, and each import delays every program

    request = json.dumps({"source": source, "limits": asdict(limits)})
    # The launcher gets its own grace on top of the program's timeout, for its set-up and the clean-up after a kill.
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", __file__],
            input=request,
            capture_output=True,
            text=True,
            env={},
            timeout=limits.timeout + 30,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"the sandbox's launcher did not finish within {limits.timeout + 30:.0f} s", math.inf)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"unavailable": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no answer"}
    if "unavailable" in answer:
        raise SandboxUnavailable(f"the sandbox cannot run programs here ({answer['unavailable']}): {UNAVAILABLE_FIX}")
    return Verdict(**answer)


def run_programs(sources: list[str], limits: list[Limits], workers: int | None = None) -> list[Verdict]:
    """Run many programs, `workers` at a time (default: one per CPU core); verdicts in the order of sources."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(run_program, sources, limits))


# --- The launcher: below runs in the process `run_program` starts, never in the caller's. ---

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_CHILD_SUBREAPER = 36
# A user id no account has: per launcher, so a process limit and a kill count only this program's processes.
FIRST_SANDBOX_UID = 1_000_000

# Unprivileged, the only barrier between the program and the machine is this prelude: it keeps honest
# mistakes in (a test that opens a socket, a kill of the wrong pid), not a determined attacker.
UNPRIVILEGED_PRELUDE = """\
def _confine():
    import builtins, io, os, socket

    def refused(*args, **kwargs):
        raise PermissionError("not allowed in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refused()

    kill, own, home = os.kill, os.getpid(), os.getcwd() + os.sep
    plain_open, plain_os_open = builtins.open, os.open

    def own_kill(pid, sig):
        if pid not in (0, own):
            refused()
        kill(pid, sig)

    def allowed(path, writing):
        if isinstance(path, int):
            return True
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith("/proc/") and not path.startswith(("/proc/self/", f"/proc/{own}/")):
            return False  # another process's environment, memory or command line
        return not writing or path.startswith(home)

    def guarded_open(file, mode="r", *args, **kwargs):
        if not allowed(file, any(c in mode for c in "wax+")):
            refused()
        return plain_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if not allowed(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            refused()
        return plain_os_open(path, flags, *args, **kwargs)

    socket.socket, socket.create_connection = NoSocket, refused
    os.kill, os.killpg = own_kill, refused
    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


_confine()
del _confine
"""


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _private_tmp(libc) -> str:
    """New mount, PID and network namespaces with tmpfs over the world-writable directories; the program's
    directory inside the new /tmp."""
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _read_only_filesystems(libc)
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(directory):
            _check(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m"), directory)
    _expose_interpreter(libc)
    workdir = "/tmp/program"
    os.mkdir(workdir, 0o700)
    return workdir


def _read_only_filesystems(libc) -> None:
    """Every file system read-only in this mount namespace (a world-writable directory anywhere stays unchanged),
    but the kernel's own (/proc, /sys, /dev)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in points:
        if point.startswith(("/proc", "/sys", "/dev")):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        if libc.mount(None, point.encode(), None, flags, None) != 0 and point == "/":
            _check(-1, "remount / read-only")


def _expose_interpreter(libc) -> None:
    """Make the interpreter reachable for the program's user id where a directory above it is closed to others
    (pyenv under /root): that directory becomes an empty tmpfs holding only the path down to the interpreter, which
    also hides the rest of it (~/.aws, ~/.cache/huggingface) from the program."""
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    closed = next(
        ("/" + "/".join(parts[:i]) for i in range(1, len(parts)) if not os.stat("/" + "/".join(parts[:i])).st_mode & 1),
        None,
    )
    if closed is None:
        return
    stash = "/tmp/.interpreter"
    os.mkdir(stash)
    _check(libc.mount(prefix.encode(), stash.encode(), None, MS_BIND | MS_REC, None), f"bind {prefix}")
    _check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"), closed)
    os.makedirs(prefix, 0o755)
    _check(libc.mount(stash.encode(), prefix.encode(), None, MS_BIND | MS_REC, None), f"bind back {prefix}")


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


def _launch(source: str, limits: Limits) -> Verdict:
    privileged = os.geteuid() == 0
    libc = _libc()
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    cpu_seconds = math.ceil(limits.timeout) + 1
    if privileged:
        uid = FIRST_SANDBOX_UID + os.getpid()
        workdir = _private_tmp(libc)
        os.chown(workdir, uid, uid)
        processes = limits.processes
    else:
        workdir = tempfile.mkdtemp(prefix="codetune-sandbox-")
        source = UNPRIVILEGED_PRELUDE + source
        processes = _own_processes() + limits.processes  # the limit counts every process of this user
    program = os.path.join(workdir, "program.py")
    with open(program, "w") as f:
        f.write(source)
    stdout, stderr = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}

    # The base interpreter without site-packages (-S): the program sees the standard library only, and starts in
    # half the time.
    interpreter = getattr(sys, "_base_executable", sys.executable)
    started = time.perf_counter()
    # The child reports a failure to set the program up here; a successful exec closes the pipe (close-on-exec).
    setup_failed, setup_report = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program's first process
        try:
            os.close(setup_failed)
            os.setsid()
            os.chdir(workdir)
            out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            if privileged:
                os.fchown(out, uid, uid)
                os.fchown(err, uid, uid)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.closerange(3, setup_report)
            os.closerange(setup_report + 1, 1 << 16)
            _set_limits(limits, cpu_seconds, processes)
            os.execve(interpreter, [interpreter, "-I", "-S", "-B", "program.py"], env)
        except BaseException as exc:
            os.write(setup_report, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(127)

    os.close(setup_report)
    with os.fdopen(setup_failed, "rb") as report:
        failure = report.read().decode()
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
    if timed_out:
        verdict = Verdict(False, f"timed out after {limits.timeout:.1f} s", seconds)
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        verdict = Verdict(True, "passed", seconds)
    else:
        verdict = Verdict(False, _reason(status, _tail(stderr), cpu_seconds), seconds)
    if not privileged:  # a private /tmp goes with its namespace
        shutil.rmtree(workdir, ignore_errors=True)
    return verdict


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    try:
        answer = asdict(_launch(request["source"], Limits(**request["limits"])))
    except OSError as exc:  # namespaces, mounts or the interpreter refused: no program can run like this
        answer = {"unavailable": str(exc)}
    sys.stdout.write(json.dumps(answer))
