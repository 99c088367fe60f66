"""Tracking and the registry through a real `mlflow server`, as a team runs it."""

import mlflow
import pytest

from flows.finetune import finetune
from tests.conftest import TWIN
from tests.e2e.conftest import champion_predicts


@pytest.mark.timeout(600)
def test_flow_tracks_and_registers_through_an_mlflow_server(
    prefect_server, mlflow_server, tiny_overrides, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = finetune(
        config=TWIN, overrides=tiny_overrides + [f"mlflow.tracking_uri={mlflow_server}", "registry.model_name=served"]
    )
    assert result["registration"]["alias"] == "champion"

    client = mlflow.MlflowClient(mlflow_server)
    assert (
        client.get_run(result["mlflow_run_id"]).data.metrics["test_bleu4_smoothed"]
        == result["metrics"]["bleu4_smoothed"]
    )
    summaries = champion_predicts(mlflow_server, "served", ["def add(a, b): return a + b"])
    assert len(summaries) == 1 and isinstance(summaries[0], str)
