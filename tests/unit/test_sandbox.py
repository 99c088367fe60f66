"""The sandbox against what model output does by accident or by design: each is contained, reported as a failure
with its reason, and leaves nothing running."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from codetune.core.sandbox import Limits, run_program
from tests.hostile_programs import assert_contained

REPO = Path(__file__).resolve().parents[2]
QUICK = Limits(timeout=2.0)


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes that contain marker."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_error():
    assert run_program("assert sorted([3, 1, 2]) == [1, 2, 3]").passed
    wrong = run_program("def f():\n    return 1\n\nassert f() == 2, 'f() should be 2'")
    assert not wrong.passed and wrong.reason == "AssertionError: f() should be 2"
    broken = run_program("def f(:\n    pass")
    assert not broken.passed and broken.reason.startswith("SyntaxError")


def test_an_endless_loop_is_killed_at_the_timeout():
    verdict = run_program("while True:\n    pass", QUICK)
    assert not verdict.passed and verdict.reason == "timed out after 2.0 s"
    assert 2.0 <= verdict.seconds < 4.0


def test_no_process_of_a_timed_out_program_survives_it():
    """A child in a session of its own (out of the program's process group) is killed with the program."""
    marker = f"codetune-left-behind-{uuid.uuid4().hex}"
    program = (
        "import os, subprocess, time\n"
        f"subprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo {marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(1000)\n"
        "time.sleep(1000)\n"
    )
    verdict = run_program(program, QUICK)
    assert not verdict.passed and "timed out" in verdict.reason
    assert processes_with(marker) == []


def test_a_child_left_running_by_a_passing_program_is_killed():
    marker = f"codetune-daemon-{uuid.uuid4().hex}"
    program = (
        f"import subprocess\nsubprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo {marker}'], start_new_session=True)"
    )
    assert run_program(program, QUICK).passed
    assert processes_with(marker) == []


def test_a_fork_bomb_is_stopped_by_the_process_limit_and_swept():
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    verdict = run_program(program, QUICK)
    assert not verdict.passed
    assert processes_with("-B program.py") == []


def test_a_memory_hog_gets_memory_error():
    verdict = run_program("hog = bytearray(8 * 1024**3)", Limits(memory=512 * 1024 * 1024))
    assert not verdict.passed and verdict.reason == "MemoryError"


def test_cpu_time_is_limited_as_well_as_wall_time():
    verdict = run_program("while True:\n    pass", Limits(timeout=1.2))
    assert not verdict.passed and ("timed out" in verdict.reason or "CPU seconds" in verdict.reason)


@pytest.fixture
def world_writable_dir():
    """A directory anyone may write to, outside /tmp (the repository's git-ignored .codetune/)."""
    path = REPO / ".codetune" / f"sandbox-test-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_writing_outside_its_directory_fails_and_changes_nothing(world_writable_dir):
    target = world_writable_dir / "written-by-the-program"
    shared_tmp = Path("/tmp") / f"codetune-escape-{uuid.uuid4().hex}"
    verdict = run_program(f"open({str(target)!r}, 'w').write('x')")
    # Read-only where the program sees it; unseen where the repository lies under /tmp (its /tmp is its own).
    refusals = ("Read-only file system", "not allowed", "No such file or directory")
    assert not verdict.passed and any(refusal in verdict.reason for refusal in refusals), verdict.reason
    run_program(f"open({str(shared_tmp)!r}, 'w').write('x')")  # its own /tmp, where the machine allows
    assert not target.exists() and not shared_tmp.exists()
    assert run_program("open('scratch.txt', 'w').write('its own directory is writable')").passed


def test_a_file_over_the_size_limit_is_refused():
    verdict = run_program("open('big', 'wb').write(b'x' * (2 * 1024 * 1024))", Limits(file_size=1024 * 1024))
    assert not verdict.passed


def test_the_parent_environment_does_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "codetune-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_codetune_secret")
    program = (
        "import os\n"
        "assert not any('secret' in v for v in os.environ.values()), os.environ\n"
        "for pid in (os.getppid(), " + str(os.getpid()) + "):\n"
        "    try:\n"
        "        environ = open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    assert b'secret' not in environ, 'read a parent environment'\n"
    )
    verdict = run_program(program)
    assert verdict.passed, verdict.reason


def test_a_socket_reaches_nothing():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        verdict = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')")
        assert not verdict.passed
        with pytest.raises(TimeoutError):
            listener.accept()


def test_signalling_the_caller_or_the_launcher_fails_and_reaches_neither():
    """SIGUSR1 rather than SIGKILL at the caller: a handler records whether it arrived (a SIGKILL would end the test
    run, which also fails it, but says nothing). A killed launcher leaves no verdict: SandboxUnavailable."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        verdict = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)")
        assert not verdict.passed
        run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")  # a verdict: the launcher lived
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []


def run_hostile_programs(directory: Path, as_user: str | None = None) -> dict:
    """tests/hostile_programs.py's report, run as this process's user or (through su, with the system Python, since
    the virtual environment's interpreter may lie where other users cannot reach) as as_user."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "CODETUNE_CANARY": f"canary-{uuid.uuid4().hex}"}
    command = [sys.executable, str(REPO / "tests" / "hostile_programs.py"), str(directory)]
    if as_user:
        assignments = " ".join(f"{k}={v}" for k, v in env.items())
        command = [
            "su",
            "-s",
            "/bin/sh",
            as_user,
            "-c",
            f"cd / && {assignments} /usr/bin/python3 {' '.join(command[1:])}",
        ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespaces mode needs root")
def test_as_root_hostile_programs_stay_in_their_namespaces(world_writable_dir):
    report = run_hostile_programs(world_writable_dir)
    assert report["confinement"] == "namespaces"
    assert_contained(report)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("su") or not Path("/usr/bin/python3").exists(),
    reason="runs the unprivileged mode as `nobody` through the system Python",
)
def test_as_an_unprivileged_user_hostile_programs_are_held_by_landlock_and_seccomp(world_writable_dir):
    """The case of the worker image's uid 1000: the same user id as the caller, so only the kernel's Landlock and
    seccomp stand between the programs and the caller's files, sockets and processes."""
    report = run_hostile_programs(world_writable_dir, as_user="nobody")
    assert report["confinement"] == "landlock" and report["uid"] != 0
    assert_contained(report)


# Makes the kernel look as if it had no Landlock (as a container runtime's seccomp profile without its calls does).
WITHOUT_LANDLOCK = """
import ctypes, errno
from codetune.core.sandbox import seccomp
lib = seccomp.library()
ctx = lib.seccomp_init(seccomp.ALLOW)
landlock = lib.seccomp_syscall_resolve_name(b"landlock_create_ruleset")
lib.seccomp_rule_add_array(ctx, 0x00050000 | errno.ENOSYS, landlock, 0, None)
assert lib.seccomp_load(ctx) == 0
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("su") or not Path("/usr/bin/python3").exists(),
    reason="needs a user without namespaces: runs as `nobody` through the system Python",
)
def test_where_nothing_confines_programs_scoring_stops_with_the_fix_unless_allowed():
    """No namespaces (not root) and no Landlock: no program runs and no score is made, rather than a weaker mode;
    with allow_unconfined the programs run, and say so."""
    script = WITHOUT_LANDLOCK + (
        "import json\n"
        "from codetune.core.errors import SandboxError\n"
        "from codetune.core.execution import Problem, time_limits\n"
        "from codetune.core.sandbox import SandboxUnavailable, run_program, unconfined_execution\n"
        "answer = {}\n"
        "try:\n    time_limits([Problem('p', '', 'pass', 'pass')])\nexcept SandboxError as exc:\n"
        "    answer['refused'] = str(exc)\n"
        "with unconfined_execution(True):\n"
        "    answer['allowed'] = run_program('assert 1 + 1 == 2').confinement.value\n"
        "    answer['early exit'] = run_program('raise SystemExit(0)').reason\n"
        "print(json.dumps(answer))\n"
    )
    done = subprocess.run(
        ["su", "-s", "/bin/sh", "nobody", "-c", f"cd / && PYTHONPATH={REPO} /usr/bin/python3 -"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert "the sandbox cannot run programs here" in answer["refused"]
    assert "Landlock" in answer["refused"] and "evaluation.allow_unconfined_execution=true" in answer["refused"]
    assert "the trained model is kept" in answer["refused"]
    assert answer["allowed"] == "unconfined"
    assert answer["early exit"] == "exited before its tests finished"


def test_the_launcher_starts_from_a_clean_interpreter():
    """The launcher imports the sandbox package from a `python -I -S`: nothing of codetune beyond it, nothing beyond
    the standard library."""
    for module in (REPO / "codetune" / "core" / "sandbox").glob("*.py"):
        imports = {
            line.split()[1].split(".")[0]
            for line in module.read_text().splitlines()
            if line.startswith(("import ", "from "))
        }
        imports -= {"codetune"} if "from codetune.core.sandbox import" in module.read_text() else set()
        assert imports <= set(sys.stdlib_module_names) | {"__future__"}, (module.name, imports)
    imported = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
         "import json, codetune.core.sandbox.launcher; "
         "print(json.dumps([m for m in sys.modules if m.startswith('codetune')]))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert set(json.loads(imported.stdout)) <= {
        "codetune", "codetune.core", "codetune.core.sandbox", "codetune.core.sandbox.launcher",
        "codetune.core.sandbox.landlock", "codetune.core.sandbox.namespaces", "codetune.core.sandbox.seccomp",
    }  # fmt: skip


def test_a_program_passes_only_when_it_runs_to_its_end():
    """A pass is status 0 and the line after the tests reached: an exit with status 0 before the tests, from the
    module or from the function the tests call, fails and says why."""
    tests = "\n\nassert add(1, 2) == 3\n"
    for body in ("raise SystemExit(0)", "import sys; sys.exit()", "import os; os._exit(0)", "raise SystemExit"):
        verdict = run_program(f"def add(a, b):\n    {body}{tests}")
        assert not verdict.passed and verdict.reason == "exited before its tests finished", body
    assert run_program(f"def add(a, b):\n    return a + b{tests}").passed
    assert not run_program("import os\nos.write(3, b'0' * 32)\nos._exit(0)").passed  # a guessed token
