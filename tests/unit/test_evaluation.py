import json
from pathlib import Path

from codetune.config import EvaluationConfig, GenerationConfig
from codetune.evaluation import METRICS_FILE, evaluate_model, generate_summaries


def test_batched_generation_matches_one_at_a_time(trained_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cfg, data, trained = trained_run
    model = AutoModelForSeq2SeqLM.from_pretrained(trained.run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained.run_dir)
    codes = [r["code"] for r in data.load("test")[:12]]
    one = generate_summaries(model, tokenizer, codes, GenerationConfig(batch_size=1, max_new_tokens=8), 64)
    batched = generate_summaries(model, tokenizer, codes, GenerationConfig(batch_size=12, max_new_tokens=8), 64)
    assert batched == one


def test_evaluation_writes_predictions_examples_and_metrics(trained_run):
    cfg, data, trained = trained_run
    report = evaluate_model(trained.run_dir, data.load("test"), cfg.generation, EvaluationConfig(max_examples=10, num_saved_examples=3), 64)
    run_dir = Path(trained.run_dir)
    predictions = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10 == report.num_examples
    assert {"reference", "prediction", "baseline"} <= set(predictions[0])
    assert len(json.loads((run_dir / "examples.json").read_text())) == 3
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert set(metrics["model"]) == {"bleu4_smoothed", "bleu_corpus", "rouge_l", "exact_match"}
    assert metrics["baseline_function_name"]["bleu4_smoothed"] > 0
    assert "| bleu4_smoothed |" in report.to_markdown()
