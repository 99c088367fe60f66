"""The drift monitor against a real `prefect server` (its automations running) and MLflow: the training source emits
nothing; another package's source emits codetune.drift.detected, and finetune/main's trigger starts a retraining run
with the event's parameters."""

import json
import os
import re
import sys
import time
from pathlib import Path

import httpx
import mlflow
import omegaconf
import pytest

from flows.monitor import DRIFT_EVENT
from tests.conftest import TINY, TWIN
from tests.e2e.conftest import REPO
from tests.e2e.conftest import run_command as _run

pytestmark = pytest.mark.e2e


def _api(url: str, path: str, body: dict) -> list:
    response = httpx.post(f"{url}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


@pytest.mark.timeout(900)
def test_drift_from_the_training_source_emits_the_event_that_starts_a_retraining_run(
    prefect_api, tmp_path, stdlib_cache
):
    env = {**os.environ, **prefect_api, "CODETUNE_WORKDIR": str(REPO)}
    api = prefect_api["PREFECT_API_URL"]
    db = tmp_path / "mlflow.db"
    overrides = TINY + [
        f"data.cache_dir={stdlib_cache}",
        f"training.output_dir={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{db}",
        "registry.model_name=watched",
    ]
    cli, prefect = [sys.executable, "-m", "flows.cli"], [sys.executable, "-m", "prefect"]
    _run(env, *cli, "run", "--config", TWIN, *overrides, timeout=600)  # the champion, trained on the stdlib
    _run(env, *prefect, "work-pool", "create", "monitor-pool", "--type", "process", "--overwrite")
    for deployment in ("finetune/main", "monitor/main"):
        _run(env, *prefect, "--no-prompt", "deploy", "-n", deployment, "--pool", "monitor-pool")

    # The source the champion was trained on: every check within its threshold, no event.
    same = json.loads(_run(env, *cli, "monitor", "--config", TWIN, *overrides, timeout=600))
    assert same["drifted"] == [] and "event" not in same
    same_report = (Path(same["report"]) / "report.md").read_text()
    assert "| new functions | share unseen | 0.000 |" in same_report and "**No drift**" in same_report

    # Another package's source, through the deployment and a process worker, as the schedule would run it. Its config
    # as a deployment names one, from the repository: the retraining's form takes only the shipped configs.
    shipped = "configs/tiny-seq2seq.yaml"
    other = str(Path(omegaconf.__file__).parent)
    out = _run(
        env,
        *prefect,
        "deployment",
        "run",
        "monitor/main",
        "--param",
        f"config={shipped}",
        "--param",
        f"overrides={json.dumps(overrides)}",
        "--param",
        f"data_path={other}",
    )
    monitor_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    _run(env, *prefect, "worker", "start", "--pool", "monitor-pool", "--run-once", timeout=600)
    flow_run = json.loads(_run(env, *prefect, "flow-run", "inspect", monitor_run_id, "--output", "json"))
    assert flow_run["state_type"] == "COMPLETED", _run(env, *prefect, "flow-run", "logs", monitor_run_id)[-8000:]

    [event] = _api(api, "events/filter", {"filter": {"event": {"name": [DRIFT_EVENT]}}, "limit": 10})["events"]
    assert event["resource"]["prefect.resource.id"] == "codetune.model.watched"
    assert {"new functions", "code embedding", "identifier vocabulary"} <= set(event["payload"]["drifted"])
    retraining_parameters = {"config": shipped, "overrides": [*overrides, f"data.path={other}"]}
    assert {k: event["payload"][k] for k in retraining_parameters} == retraining_parameters

    # The automation prefect.yaml declares turns the event into a finetune/main run on the drifted source.
    [main] = _api(
        api,
        "deployments/filter",
        {"deployments": {"name": {"any_": ["main"]}}, "flows": {"name": {"any_": ["finetune"]}}},
    )
    deadline, runs = time.time() + 60, []
    while not runs and time.time() < deadline:
        time.sleep(1)
        runs = _api(api, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [main["id"]]}}})
    [retraining] = runs
    # The event's parameters over the deployment's form values (its own config's: left as they are, they follow the
    # event's config).
    assert {k: retraining["parameters"][k] for k in retraining_parameters} == retraining_parameters
    assert retraining["created_by"]["type"] == "AUTOMATION"

    # The report, in Prefect and in MLflow.
    artifacts = _api(api, "artifacts/filter", {"artifacts": {"key": {"any_": ["drift-report"]}}})
    assert (
        sum("**Drift:" in a["data"] for a in artifacts) == 1
        and sum("**No drift**" in a["data"] for a in artifacts) == 1
    )
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    [drifted] = client.search_runs(
        [client.get_experiment_by_name("codetune").experiment_id],
        "tags.`codetune.monitor` = 'watched' and tags.`codetune.drifted` != 'none'",
    )
    assert drifted.data.metrics["new_functions"] == 1.0
    assert {f.path for f in client.list_artifacts(drifted.info.run_id, "monitor")} == {
        "monitor/drift.png",
        "monitor/report.md",
    }
