"""Programs that try to get out of the sandbox, run through it where this script runs; prints a JSON report.

    python tests/hostile_programs.py DIR     # DIR: where to put the files and sockets the programs go after

The same script runs as root, as an unprivileged user and inside the worker image (tests/unit/test_sandbox.py,
tests/e2e/test_team_stack.py), so it needs nothing but the standard library and codetune.core.sandbox. Each hostile
program ends normally only if its attack worked, so a contained one fails; the script also looks for what an attack
would leave: a connection at its TCP, UDP or Unix listener, a file written or changed in DIR, a signal to itself or
a victim process, a process left running. Set CODETUNE_CANARY in its environment: a program that finds it passes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from codetune.core.sandbox import Limits, SandboxUnavailable, run_program

LIMITS = Limits(timeout=2.0, file_size=1024 * 1024)
EARLY_EXITS = ("raise SystemExit(0)", "sys.exit()", "os._exit(0)", "atexit os._exit(0)")


def hostile_programs(outside: Path, tcp: int, udp: int, unix: Path, victim: int, marker: str) -> dict[str, str]:
    caller, canary = os.getpid(), os.environ["CODETUNE_CANARY"]
    secret, victim_file = outside / "secret", outside / "victim"
    libc = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    # Where success leaves a verdict no different from failure, the script judges the program by its traces.
    judged = "\nraise AssertionError('judged by what it leaves')"
    return {
        "endless loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(1000)",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory hog": "hog = bytearray(8 * 1024**3)",
        "file-size hog": "open('big', 'wb').write(b'x' * (4 * 1024 * 1024))",
        "write outside (open)": f"open({str(outside / 'open')!r}, 'w').write('x')",
        "write outside (_io)": f"import _io\n_io.FileIO({str(outside / 'io')!r}, 'w').write(b'x')",
        "write outside (posix)": f"import posix\nfd = posix.open({str(outside / 'posix')!r}, 0o101, 0o644)\n"
        "posix.write(fd, b'x')",
        "write outside (ctypes)": f"{libc}fd = libc.open({str(outside / 'ctypes')!r}.encode(), 0o101, 0o644)\n"
        "assert fd >= 0 and libc.write(fd, b'x', 1) == 1",
        "write outside (shell)": f"import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo x > {outside}/shell'], "
        "check=True)",
        "chmod outside": f"import posix\nposix.chmod({str(victim_file)!r}, 0o777)",
        "truncate outside": f"import posix\nposix.truncate({str(victim_file)!r}, 0)",
        "read a secret file": f"assert {canary!r} in open({str(secret)!r}).read()",
        "read the environment": "import os\nfound = [v for v in os.environ.values() if "
        f"{canary!r} in v]\nfor pid in ({caller}, os.getppid(), 1):\n    try:\n"
        f"        found += [pid] if {canary!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read() else []\n"
        "    except OSError:\n        pass\nassert found",
        "tcp (socket)": f"import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=1).send(b'x')",
        "tcp (_socket)": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {tcp}))\ns.send(b'x')",
        "tcp (ctypes)": f"{libc}import socket, struct\nfd = libc.socket(2, 1, 0)\nassert fd >= 0\n"
        f"address = struct.pack('<HH4s8x', 2, socket.htons({tcp}), bytes([127, 0, 0, 1]))\n"
        "assert libc.connect(fd, address, len(address)) == 0",
        "udp": f"import _socket\n_socket.socket(2, 2).sendto(b'x', ('127.0.0.1', {udp}))",
        "unix socket": f"import _socket\ns = _socket.socket(1)\ns.connect({str(unix)!r})\ns.send(b'x')",
        "signal a process of its user": f"import posix\nposix.kill({victim}, 9)",
        "signal the caller (ctypes)": f"{libc}assert libc.kill({caller}, 10) == 0",
        "signal the launcher": f"import posix\nposix.kill(posix.getppid(), 9){judged}",
        "signal every process it may": f"import posix\nposix.kill(-1, 9){judged}",
        "ptrace": f"{libc}assert libc.ptrace(16, {victim}, 0, 0) == 0",
        "lower another process's limits": f"import resource\nresource.prlimit({victim}, resource.RLIMIT_NOFILE, "
        "(3, 3))",
        "orphan": f"import subprocess, time\nsubprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo {marker}'], "
        "start_new_session=True)\ntime.sleep(1000)",
        "kill its own test runner": "import os, signal\nos.killpg(0, signal.SIGKILL)\nassert False",
        **{f"early exit: {how}": early_exit(how) for how in EARLY_EXITS},
    }


def early_exit(how: str) -> str:
    """A HumanEval-shaped program whose completion ends the program, with status 0, before its tests run (or fail)."""
    body = {
        "raise SystemExit(0)": "    raise SystemExit(0)",
        "sys.exit()": "    import sys\n    sys.exit()",
        "os._exit(0)": "    import os\n    os._exit(0)",
        "atexit os._exit(0)": "    import atexit, os\n    atexit.register(os._exit, 0)\n    return 0",
    }[how]
    tests = "def check(candidate):\n    assert candidate(1, 2) == 3\n\n\ncheck(add)"
    return f'def add(a, b):\n    """a + b"""\n{body}\n\n\n{tests}'


CORRECT = {
    "a correct function": "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3",
    "a correct program that runs a command": "import subprocess\n"
    "assert subprocess.run(['/bin/echo', 'hi'], capture_output=True, text=True).stdout == 'hi\\n'",
    "a correct program that writes its own directory": "open('scratch', 'w').write('x')\n"
    "assert open('scratch').read() == 'x'",
}


def main(base: Path) -> dict:
    outside = base.resolve() / f"hostile-{uuid.uuid4().hex[:8]}"
    outside.mkdir(parents=True)
    outside.chmod(0o777)  # writable by any user id, so only the sandbox stands in the way
    (outside / "victim").write_text("unchanged")
    (outside / "victim").chmod(0o644)
    (outside / "secret").write_text(os.environ["CODETUNE_CANARY"])
    (outside / "secret").chmod(0o600)
    signals = []
    signal.signal(signal.SIGUSR1, lambda *_: signals.append("SIGUSR1"))
    tcp, udp, unix = socket.socket(), socket.socket(type=socket.SOCK_DGRAM), socket.socket(socket.AF_UNIX)
    for listener, address in ((tcp, ("127.0.0.1", 0)), (udp, ("127.0.0.1", 0)), (unix, str(outside / "unix"))):
        listener.bind(address)
        listener.settimeout(0.2)
    tcp.listen()
    unix.listen()
    os.chmod(outside / "unix", 0o777)
    before = sorted(p.name for p in outside.iterdir())
    victim = subprocess.Popen(["sleep", "600"])
    marker = f"codetune-orphan-{uuid.uuid4().hex}"
    programs = hostile_programs(
        outside, tcp.getsockname()[1], udp.getsockname()[1], outside / "unix", victim.pid, marker
    )
    verdicts, confinement = {}, None
    for name, source in {**programs, **CORRECT}.items():
        try:
            verdict = run_program(source, LIMITS)
            verdicts[name] = {"passed": verdict.passed, "reason": verdict.reason}
            confinement = verdict.confinement.value
        except SandboxUnavailable as exc:  # its launcher was killed: the program got out
            verdicts[name] = {"passed": None, "reason": str(exc)}

    escapes = []
    for name, listener in (("TCP", tcp), ("Unix", unix)):
        try:
            listener.accept()
            escapes.append(f"a connection reached the {name} listener")
        except TimeoutError:
            pass
    try:
        udp.recvfrom(16)
        escapes.append("a datagram reached the UDP listener")
    except TimeoutError:
        pass
    if victim.poll() is not None:
        escapes.append("the victim process was killed")
    victim.kill()
    escapes += [f"the caller received {s}" for s in signals]
    after = sorted(p.name for p in outside.iterdir())
    if after != before:
        escapes.append(f"files appeared outside: {sorted(set(after) - set(before))}")
    victim_file = outside / "victim"
    if victim_file.read_text() != "unchanged" or victim_file.stat().st_mode & 0o777 != 0o644:
        escapes.append("the victim file was changed")
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and marker.encode() in _cmdline(pid)]
    if left:
        escapes.append(f"{len(left)} process(es) left running")
    return {
        "confinement": confinement,
        "uid": os.getuid(),
        "hostile": {name: verdicts[name] for name in programs},
        "correct": {name: verdicts[name] for name in CORRECT},
        "escapes": escapes,
    }


def assert_contained(report: dict) -> None:
    """Every hostile program failed (none killed its launcher), nothing it tried left a trace, correct ones passed."""
    assert {name: v for name, v in report["hostile"].items() if v["passed"] is not False} == {}
    assert report["escapes"] == []
    assert all(v["passed"] for v in report["correct"].values()), report["correct"]
    early = {name: v["reason"] for name, v in report["hostile"].items() if name.startswith("early exit")}
    assert set(early.values()) == {"exited before its tests finished"}, early


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
