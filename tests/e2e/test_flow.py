"""The finetune flow end to end: a real Prefect server, a real MLflow SQLite store, a tiny model on real stdlib data."""

import json
from pathlib import Path

import mlflow
import pytest

from flows.finetune import finetune


@pytest.mark.timeout(600)
def test_finetune_flow_trains_evaluates_and_tracks(prefect_server, tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_overrides + [f"mlflow.tracking_uri={uri}"]
    result = finetune(config=None, overrides=overrides)

    run_dir = Path(result["run_dir"])
    for name in ["model.safetensors", "config.json", "tokenizer.json", "metrics.json", "examples.json",
                 "trainer_state.json", "predictions.jsonl", "config.yaml", "data_manifest.json"]:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == result["metrics"]

    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["training.max_steps"] == "12"
    assert run.data.metrics["test_bleu4_smoothed"] == metrics["model"]["bleu4_smoothed"]
    assert "baseline_bleu4_smoothed" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6  # logging_steps=2 over 12 steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "examples.json", "config.yaml"} <= artifacts

    # A re-run on unchanged data and settings reuses the prepared splits and the trained model.
    again = finetune(config=None, overrides=overrides)
    assert again["run_dir"] == result["run_dir"] and again["metrics"] == result["metrics"]


def test_flow_reports_a_config_typo_without_training(prefect_server):
    from prefect.flows import Flow

    from codetune.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'training.learning_rate'"):
        Flow.with_options(finetune, retries=0)(config=None, overrides=["training.lerning_rate=1"])
