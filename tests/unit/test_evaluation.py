import json
import logging
import re
from pathlib import Path

import pytest

from codetune.core.config import EvaluationConfig, GenerationConfig
from codetune.core.config.loader import load_config
from codetune.core.data import Examples
from codetune.core.evaluation import collapse_warning, evaluate_model
from codetune.core.families.base import InferenceSettings
from codetune.core.families.generative import generate
from codetune.core.rundir import METRICS_FILE
from tests.conftest import TWIN


@pytest.mark.parametrize(
    "config",
    [TWIN, "configs/tiny-encoder-decoder.yaml", "configs/tiny-causal-lm.yaml"],
    ids=["seq2seq", "encoder_decoder", "causal_lm"],
)
def test_batched_generation_matches_one_at_a_time(config, tiny_overrides):
    """Padding (right for the encoder, left for a decoder-only prompt) must not change what is generated.

    Random weights, made to write real tokens (no padding token, no early end), so that any
    padding leak shows as a different string.
    """
    from codetune.core.data import prepare_data
    from codetune.core.model import load_model

    cfg = load_config(config, tiny_overrides)
    data = prepare_data(cfg.data, Examples.pairs)
    model, tokenizer = load_model(cfg.model, (r["code"] + "\n" + r["summary"] for r in data.load("train")), seed=0)
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.bos_token_id]
    model.generation_config.min_new_tokens = 8
    codes = sorted((r["code"] for r in data.load("test")), key=len)[:12]  # short and of different lengths: padded
    one, batched = (
        generate(
            model.eval(),
            tokenizer,
            codes,
            InferenceSettings(GenerationConfig(max_new_tokens=8), 512, 16, cfg.model.prompt, n),
        )
        for n in (1, 12)
    )
    assert batched == one and any(batched)


def test_a_long_generation_reports_its_progress(tiny_cfg, monkeypatch, caplog):
    from codetune.core.data import prepare_data
    from codetune.core.model import load_model

    monkeypatch.setattr("codetune.core.families.base.PROGRESS_EVERY_S", 0.0)  # every batch counts as long
    data = prepare_data(tiny_cfg.data, Examples.pairs)
    model, tokenizer = load_model(tiny_cfg.model, (r["code"] for r in data.load("train")), seed=0)
    codes = [r["code"] for r in data.load("test")][:12]
    settings = InferenceSettings(GenerationConfig(max_new_tokens=4), 64, 16, tiny_cfg.model.prompt, batch_size=4)
    with caplog.at_level(logging.INFO, logger="codetune.core.families.base"):
        generate(model.eval(), tokenizer, codes, settings)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generated ")]
    assert [m.split(",")[0] for m in progress] == ["generated 4 of 12", "generated 8 of 12"], progress
    assert all(re.search(r"about \d+ s to go$", m) for m in progress)


def test_evaluation_writes_predictions_examples_and_metrics(trained_run):
    cfg, data, trained = trained_run
    cfg.evaluation = EvaluationConfig(max_examples=10, num_saved_examples=3)
    report = evaluate_model(trained.run_dir, data.load("test"), cfg)
    run_dir = Path(trained.run_dir)
    predictions = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10 == report.num_examples
    assert {"reference", "prediction", "baseline"} <= set(predictions[0])
    assert len(json.loads((run_dir / "examples.json").read_text())) == 3
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert set(metrics["model"]) == {"bleu4_smoothed", "bleu_corpus", "rouge_l", "exact_match", "distinct_predictions"}
    assert metrics["untuned"] is None  # a scratch model has no pretrained base to compare with
    assert metrics["baseline"]["bleu4_smoothed"] > 0 and metrics["baseline_name"] == "function name split into words"
    assert "| bleu4_smoothed |" in report.to_markdown()


def test_a_collapsed_model_is_reported_in_the_log_and_the_report(trained_run):
    cfg, data, trained = trained_run
    assert collapse_warning({"distinct_predictions": 50.0}) is None
    warning = collapse_warning({"distinct_predictions": 49.9})
    assert "collapsed" in warning and "49.9%" in warning
    cfg.evaluation = EvaluationConfig(max_examples=10)
    report = evaluate_model(trained.run_dir, data.load("test"), cfg)  # 12 steps of a tiny model: a few stock outputs
    assert report.metrics["distinct_predictions"] < 50
    assert report.warnings == [collapse_warning(report.metrics)]
    assert "**Warning:** the model has collapsed" in report.to_markdown()
    assert json.loads((Path(trained.run_dir) / METRICS_FILE).read_text())["warnings"] == report.warnings


def test_the_untuned_base_is_scored_once_per_base_and_test_split(tmp_path, tiny_overrides):
    import shutil

    from codetune.core.data import prepare_data
    from codetune.core.evaluation import untuned_metrics
    from codetune.core.families import InferenceSettings, family_of
    from codetune.core.model import build_scratch_model, train_tokenizer

    cfg = load_config(str(Path(TWIN).with_name("tiny-causal-lm.yaml")), tiny_overrides)
    rows = prepare_data(cfg.data, Examples.pairs).load("test")[:4]
    tokenizer = train_tokenizer([r["code"] for r in rows] * 20, vocab_size=300)
    base = tmp_path / "base"
    build_scratch_model(cfg.model, tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = load_config(
        str(Path(TWIN).with_name("tiny-causal-lm.yaml")),
        [*tiny_overrides, "model.init=pretrained", f"model.name={base}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    settings, family = InferenceSettings.of(cfg), family_of(cfg.model)
    first = untuned_metrics(cfg, family, rows, settings, "cpu", [])
    shutil.rmtree(base)  # a second scoring would have to load it
    assert untuned_metrics(cfg, family, rows, settings, "cpu", []) == first
    with pytest.raises(Exception, match="cannot load"):  # other rows are scored afresh
        untuned_metrics(cfg, family, rows[:2], settings, "cpu", [])
