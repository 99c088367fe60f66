"""The sandbox against what model output does by accident or by design: each is contained, reported as a failure
with its reason, and leaves nothing running."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from codetune.sandbox import Limits, run_program

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


def test_killing_the_parent_or_the_caller_fails():
    verdict = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
    assert not verdict.passed
    run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert os.getpid()  # still here: the test process was not killed


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("su") or not Path("/usr/bin/python3").exists(),
    reason="runs the unprivileged path as `nobody` through the system Python",
)
def test_the_unprivileged_path_contains_the_same_programs():
    """Without root (a container's user) there are no namespaces: the process sweep and the prelude contain them."""
    marker = f"codetune-unprivileged-{uuid.uuid4().hex}"
    cases = {
        "loop": "while True:\n    pass",
        "orphan": f"import subprocess, time\nsubprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo {marker}'], "
        "start_new_session=True)\ntime.sleep(1000)",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "kill": "import os, signal\nos.kill(1, signal.SIGKILL)",
        "outside": "open('/tmp/codetune-unprivileged-escape', 'w').write('x')",
        "environ": "open('/proc/1/environ', 'rb').read()",
        "correct": "assert 1 + 1 == 2",
    }
    script = (
        "import json\nfrom codetune.sandbox import Limits, run_program\n"
        f"cases = {cases!r}\n"
        "print(json.dumps({k: run_program(v, Limits(timeout=2.0)).passed for k, v in cases.items()}))\n"
    )
    done = subprocess.run(
        ["su", "-s", "/bin/sh", "nobody", "-c", f"cd / && PYTHONPATH={REPO} /usr/bin/python3 -"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads(done.stdout) == {name: name == "correct" for name in cases}
    assert processes_with(marker) == []
    assert not Path("/tmp/codetune-unprivileged-escape").exists()


def test_the_launcher_starts_from_a_clean_interpreter():
    """The launcher is this module run as a script: it must not import anything of codetune or beyond the stdlib."""
    source = (REPO / "codetune" / "sandbox.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}
    assert signal.SIGKILL  # the module's kill path uses only signal/os


def test_a_sandbox_that_cannot_start_programs_is_an_error_not_a_failing_program(tmp_path, monkeypatch):
    """Where the program's interpreter cannot start (here: a path that does not exist), nothing is scored as failing:
    evaluation stops with the reason."""
    import codetune.sandbox
    from codetune.errors import SandboxError
    from codetune.execution import Problem, time_limits

    sandbox = REPO / "codetune" / "sandbox.py"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import sys\nsys._base_executable = '/nonexistent/python3'\n"
        f"exec(compile(open({str(sandbox)!r}).read(), {str(sandbox)!r}, 'exec'), {{'__name__': '__main__'}})\n"
    )
    monkeypatch.setattr(codetune.sandbox, "__file__", str(launcher))
    with pytest.raises(codetune.sandbox.SandboxUnavailable, match="/nonexistent/python3"):
        run_program("pass")
    with pytest.raises(SandboxError, match="the sandbox cannot run programs here"):
        time_limits([Problem("p", "", "pass", "pass")])
