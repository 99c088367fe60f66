"""prefect.yaml deployed to a real `prefect server`, run by a real process worker with `prefect deployment run`."""

import json
import os
import subprocess
import sys

import boto3
import httpx
import mlflow
import pytest

from tests.conftest import TINY
from tests.e2e.conftest import REPO, run_twin_deployment
from tests.e2e.conftest import run_command as _run
from tests.servers import FlakyProxy


@pytest.mark.timeout(900)
def test_deployment_run_on_a_process_worker_with_a_parameter_and_a_flaky_upload(
    prefect_api, tmp_path, moto_url, stdlib_cache
):
    env = {
        **os.environ,
        **prefect_api,
        "CODETUNE_WORKDIR": str(REPO),
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    prefect = [sys.executable, "-m", "prefect"]
    # The team's command: pools, every deployment, and the deployer's credentials as blocks.
    _run(env | {"HF_TOKEN": "hf_deployer_token"}, sys.executable, "-m", "flows.cli", "deploy-flows")
    stored = _run(
        env,
        sys.executable,
        "-c",
        "from prefect_aws import S3Bucket; from prefect.blocks.system import Secret; "
        "c = S3Bucket.load('codetune-models').credentials; "
        "print(c.aws_secret_access_key.get_secret_value(), c.aws_client_parameters.endpoint_url, "
        "Secret.load('codetune-hf-token').get())",
    )
    assert stored.split() == ["s", "http://minio:9000", "hf_deployer_token"]
    pool = _run(env, *prefect, "work-pool", "inspect", "gpu-pool")
    assert "codetune_default" in pool and "codetune_runs:/opt/prefect/runs" in pool and "hf_deployer_token" not in pool
    _run(env, *prefect, "work-pool", "create", "test-pool", "--type", "process", "--overwrite")
    _run(env, *prefect, "--no-prompt", "deploy", "-n", "finetune/main", "--pool", "test-pool")

    with FlakyProxy(moto_url) as proxy:
        boto3.client(
            "s3", endpoint_url=moto_url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
        ).create_bucket(Bucket="deployed-models")
        # More 503s than botocore's 6 attempts: only the publish task's own retry can get the model up.
        proxy.state.fail_next, proxy.state.fail_path_contains = 7, "/models/deployed/"  # the model's upload
        db = tmp_path / "mlflow.db"
        overrides = TINY + [
            f"data.cache_dir={stdlib_cache}",
            f"training.output_dir={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{db}",
            "registry.model_name=deployed",
            "registry.s3.bucket=deployed-models",
            f"registry.s3.endpoint_url={proxy.url}",
        ]
        flow_run_id = run_twin_deployment(env, overrides, "learning_rate=0.002")
        _run(env, *prefect, "worker", "start", "--pool", "test-pool", "--run-once", timeout=600)
        assert proxy.state.fail_next == 0

    flow_run = json.loads(_run(env, *prefect, "flow-run", "inspect", flow_run_id, "--output", "json"))
    assert flow_run["state_type"] == "COMPLETED", _run(env, *prefect, "flow-run", "logs", flow_run_id)[-8000:]

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    champion = client.get_model_version_by_alias("deployed", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.params["training.learning_rate"] == "0.002"  # the UI field reached the training config
    assert champion.tags["prefect_flow_run_id"] == flow_run_id
    keys = [
        o["Key"]
        for o in boto3.client(
            "s3", endpoint_url=moto_url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
        ).list_objects_v2(Bucket="deployed-models")["Contents"]
    ]
    assert f"models/deployed/{champion.version}/model.safetensors" in keys
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "metrics.json").exists()


@pytest.mark.timeout(900)
def test_a_sweep_spreads_its_trials_over_process_workers(prefect_api, tmp_path, stdlib_cache):
    """finetune/trial on a process pool with two workers: two trials at once, four in all, the best registered."""
    import optuna

    from tests.e2e.test_sweep import SWEEP, sweep_overrides

    env = {**os.environ, **prefect_api, "CODETUNE_WORKDIR": str(REPO), "PYTHONPATH": str(REPO)}
    prefect = [sys.executable, "-m", "prefect"]
    _run(env, *prefect, "work-pool", "create", "trial-pool", "--type", "process", "--overwrite")
    # By the deployment's name alone: prefect.yaml's flow/name matching reads the entrypoint's function name
    # (flows/finetune.py:trial), not the flow's name (finetune).
    _run(env, *prefect, "--no-prompt", "deploy", "-n", "trial", "--pool", "trial-pool")
    workers = [
        subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "trial-pool", "--limit", "1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    # The study's storage as a team keeps a password-bearing URL: a Secret block, named, never passed.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    saving = "from codetune.lifecycle.sweep import save_storage_block as s; import os; print(s(os.environ))"
    block = _run(env | {"OPTUNA_STORAGE": storage}, sys.executable, "-c", saving).strip()
    overrides = [o for o in sweep_overrides(tmp_path, stdlib_cache) if not o.startswith("storage=")]
    try:
        command = [sys.executable, "-m", "flows.cli", "sweep", "--config", SWEEP, "--deployment", "finetune/trial"]
        out = _run(env, *command, "parallelism=2", "pruner=none", f"storage_block={block}", *overrides, timeout=800)
    finally:
        for worker in workers:
            worker.terminate()  # a worker drains before it exits; the trials are over, so it may be killed
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    result = json.loads(out[out.index("{") :])
    assert list(result["trials"].values()) == ["COMPLETE"] * 4
    assert result["registration"]["alias"] == "champion"
    study = optuna.load_study(study_name="tiny-seq2seq", storage=storage)
    runs = httpx.post(f"{prefect_api['PREFECT_API_URL']}/flow_runs/filter", json={}).json()
    assert len(runs) >= 5 and not any(str(tmp_path / "optuna.db") in json.dumps(r["parameters"]) for r in runs)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in study.trials)
    assert spans[0][1] > spans[1][0] and spans[2][1] > spans[3][0]  # run two at a time


@pytest.mark.timeout(300)
def test_the_run_form_offers_the_shipped_configs_shows_their_values_and_refuses_bad_ones(prefect_api):
    """Each deployment's parameter schema and defaults, as the Prefect UI reads them from the API."""
    from flows.finetune import FORM_FIELDS, SHIPPED_CONFIGS

    env = {**os.environ, **prefect_api, "CODETUNE_WORKDIR": str(REPO)}
    _run(env, sys.executable, "-m", "flows.cli", "deploy-flows")
    api = prefect_api["PREFECT_API_URL"]
    main = httpx.get(f"{api}/deployments/name/finetune/main").json()
    form = main["parameter_openapi_schema"]["properties"]
    assert set(form) == {"config", *FORM_FIELDS, "overrides"}  # no sweep hand-off
    assert form["config"]["enum"] == SHIPPED_CONFIGS
    assert all(field["description"] for field in form.values())
    assert "LoRA rank" in form["lora_r"]["description"]  # the schema's own words
    assert main["parameters"]["config"] == "configs/codet5-base.yaml" and main["parameters"]["learning_rate"] == 5e-4
    assert main["enforce_parameter_schema"]
    trial = httpx.get(f"{api}/deployments/name/finetune/trial").json()
    assert set(trial["parameter_openapi_schema"]["properties"]) == {"config", "overrides", "trial"}

    def start(**parameters) -> httpx.Response:
        return httpx.post(f"{api}/deployments/{main['id']}/create_flow_run", json={"parameters": parameters})

    for bad in ({"config": "configs/codet5-bass.yaml"}, {"learning_rate": -1e-4}, {"lora_r": 0}, {"use_lora": "yes"}):
        refused = start(**bad)
        assert refused.status_code == 409, (bad, refused.text)
    accepted = start(learning_rate=1e-4, config="configs/instruct.yaml")
    assert accepted.status_code == 201, accepted.text
