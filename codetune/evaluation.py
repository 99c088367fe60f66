"""The evaluation stage: batched generation on the test split, metrics beside a trivial baseline, saved outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.code_search import lexical_similarity, match_ranks, similarity
from codetune.config import GENERATIVE_TASKS, Config, Direction, GenerationConfig, ModelConfig, ModelInit, ModelTask
from codetune.errors import ModelError
from codetune.metrics import (
    classification_metrics,
    code_metrics,
    function_name_words,
    retrieval_metrics,
    stub_function,
    summary_metrics,
)
from codetune.model import encode_prompt, load_exported, load_pretrained, task_of

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# Below this share of distinct predictions a generative model has collapsed onto a few stock outputs.
COLLAPSE_SHARE = 50.0


@dataclass
class EvalReport:
    metrics: dict[str, float]
    baseline: dict[str, float]
    """The same metrics for a trivial baseline (baseline_name): what the model must beat."""
    baseline_name: str
    num_examples: int
    examples_per_second: float
    examples: list[dict]
    """A few (input, reference, prediction) triples."""
    untuned: dict[str, float] | None = None
    """The same metrics for the pretrained base before fine-tuning, same prompt and generation: what tuning bought."""
    warnings: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | Path) -> "EvalReport":
        run_dir = Path(run_dir)
        if not (run_dir / METRICS_FILE).exists():
            raise ModelError(f"{run_dir} has no {METRICS_FILE}: evaluate it first (`codetune run` does)")
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        return cls(
            metrics=metrics["model"],
            baseline=metrics["baseline"],
            baseline_name=metrics["baseline_name"],
            num_examples=metrics["num_examples"],
            examples_per_second=metrics["examples_per_second"],
            examples=json.loads((run_dir / "examples.json").read_text()),
            untuned=metrics.get("untuned"),
            warnings=metrics.get("warnings", []),
        )

    def to_markdown(self) -> str:
        untuned = self.untuned or {}
        rows = "\n".join(
            f"| {name} | {self.metrics[name]:.2f} |" + (f" {untuned[name]:.2f} |" if untuned else "")
            + f" {self.baseline[name]:.2f} | {self.metrics[name] - max(self.baseline[name], untuned.get(name, -1e9)):+.2f} |"
            for name in self.metrics
        )
        untuned_header = ("untuned base | ", "---|") if untuned else ("", "")
        shown = "\n".join(
            f"| `{_cell(e['input'].splitlines()[0])}` | {_cell(e['reference'])} | {_cell(e['prediction'])} |"
            for e in self.examples[:5]
        )
        warnings = "".join(f"> **Warning:** {w}\n\n" for w in self.warnings)
        return (
            f"## Evaluation on {self.num_examples} test examples\n\n{warnings}"
            f"| metric | model | {untuned_header[0]}baseline: {self.baseline_name} | lift over the best other |\n"
            f"|---|---|{untuned_header[1]}---|---|\n"
            f"{rows}\n\n### Examples\n\n| input | reference | prediction |\n|---|---|---|\n{shown}\n"
        )


def _cell(text: str) -> str:
    """One markdown table cell: a generated function's lines joined, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")[:120]


def generate(
    model, tokenizer, texts: list[str], gen: GenerationConfig, max_source_length: int, prompt: str = "{code}", writes_code: bool = False
) -> list[str]:
    """Greedy or beam generation in length-sorted batches (little padding); on GPU out-of-memory the batch is halved.

    A decoder-only model continues the prompt with the text filled in, padded on the left so every
    row's prompt ends where generation starts. Prose comes back on one line; code keeps its layout.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    predictions: list[str] = [""] * len(texts)
    batch_size, start = gen.batch_size, 0
    decoder_only = not model.config.is_encoder_decoder
    while start < len(order):
        index = order[start : start + batch_size]
        if decoder_only:
            prompts = [encode_prompt(tokenizer, prompt, texts[i], max_source_length) for i in index]
            batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        else:
            batch = tokenizer([texts[i] for i in index], max_length=max_source_length, truncation=True, padding=True, return_tensors="pt")
        batch = batch.to(model.device)
        try:
            with torch.inference_mode():
                out = model.generate(
                    **batch, num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens, pad_token_id=tokenizer.pad_token_id
                )
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory in generation; retrying with generation batch size %d", batch_size)
            continue
        if decoder_only:
            out = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(index, tokenizer.batch_decode(out, skip_special_tokens=True)):
            predictions[i] = text.strip() if writes_code else " ".join(text.split())
        start += len(index)
    return predictions


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@torch.inference_mode()
def classify(model, tokenizer, codes: list[str], batch_size: int, max_source_length: int) -> list[str]:
    """The label name the classifier gives each code, in length-sorted batches."""
    order = sorted(range(len(codes)), key=lambda i: len(codes[i]), reverse=True)
    predictions: list[str] = [""] * len(codes)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer([codes[i] for i in index], max_length=max_source_length, truncation=True, padding=True, return_tensors="pt")
        for i, label_id in zip(index, model(**batch.to(model.device)).logits.argmax(-1).tolist()):
            predictions[i] = model.config.id2label[label_id]
    return predictions


def predict(model, tokenizer, texts: list[str], gen: GenerationConfig, max_source_length: int, prompt: str, writes_code: bool = False) -> list[str]:
    """What the model makes of each input: a summary, a function, or a label for a classifier."""
    if task_of(type(model).__name__, model.config.is_encoder_decoder) is ModelTask.classification:
        return classify(model, tokenizer, texts, gen.batch_size, max_source_length)
    return generate(model, tokenizer, texts, gen, max_source_length, prompt, writes_code)


def primary_metric(model: ModelConfig) -> str:
    """The metric the registry compares versions on."""
    if model.direction is Direction.text_to_code:
        return "codebleu"
    return {ModelTask.classification: "accuracy", ModelTask.code_search: "mrr"}.get(model.task, "bleu4_smoothed")


def score(model: ModelConfig, references: list[str], predictions: list[str]) -> dict[str, float]:
    """The task's metrics; a generative model's also give the share of its outputs that are distinct."""
    if model.task.labelled:
        return classification_metrics(references, predictions)
    metrics = code_metrics(references, predictions) if model.direction is Direction.text_to_code else summary_metrics(references, predictions)
    if predictions:
        metrics["distinct_predictions"] = 100 * len(set(predictions)) / len(predictions)
    return metrics


def reference(row: dict, model: ModelConfig) -> str:
    return row["label"] if model.task.labelled else row[model.direction.target]


def baseline(model: ModelConfig, rows: list[dict]) -> tuple[str, list[str]]:
    """(name, predictions) of the trivial baseline the model must beat."""
    if model.task.labelled:
        majority = Counter(r["label"] for r in rows).most_common(1)[0][0]
        return "majority class", [majority] * len(rows)
    if model.direction is Direction.text_to_code:
        return "a stub named after the summary", [stub_function(r["summary"]) for r in rows]
    return "function name split into words", [function_name_words(r["code"]) for r in rows]


@dataclass
class Scored:
    """A task's outcome on the test rows: metrics beside the baseline's, and one record per row for predictions.jsonl."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    baseline_name: str
    records: list[dict]
    examples: list[dict]


def score_predictions(model, tokenizer, rows: list[dict], cfg: Config) -> Scored:
    """Summaries, functions or labels for every row, scored against the references."""
    inputs = [r[cfg.model.direction.source] for r in rows]
    writes_code = cfg.model.direction is Direction.text_to_code
    predictions = predict(model, tokenizer, inputs, cfg.generation, cfg.training.max_source_length, cfg.model.prompt, writes_code)
    references = [reference(r, cfg.model) for r in rows]
    baseline_name, baseline_predictions = baseline(cfg.model, rows)
    return Scored(
        metrics=score(cfg.model, references, predictions),
        baseline=score(cfg.model, references, baseline_predictions),
        baseline_name=baseline_name,
        records=[
            {"id": r.get("id"), "reference": ref, "prediction": pred, "baseline": base}
            for r, ref, pred, base in zip(rows, references, predictions, baseline_predictions)
        ],
        examples=[{"input": text, "reference": ref, "prediction": pred} for text, ref, pred in zip(inputs, references, predictions)],
    )


def score_search(model, tokenizer, rows: list[dict], cfg: Config) -> Scored:
    """Each row's summary as a query over all the rows' code; MRR of the row's own code, beside lexical matching."""
    queries, codes = [r["summary"] for r in rows], [r["code"] for r in rows]
    t = cfg.training
    ranks, top = match_ranks(similarity(model, tokenizer, queries, codes, cfg.generation.batch_size, t.max_target_length, t.max_source_length))
    baseline_ranks, _ = match_ranks(lexical_similarity(queries, codes))
    first_line = lambda code: code.split("\n", 1)[0]
    return Scored(
        metrics=retrieval_metrics(ranks),
        baseline=retrieval_metrics(baseline_ranks),
        baseline_name="identifier overlap (query words found in the code's names)",
        records=[
            {"id": r.get("id"), "query": q, "rank": rank, "baseline_rank": base, "top_id": rows[j].get("id")}
            for r, q, rank, base, j in zip(rows, queries, ranks, baseline_ranks, top)
        ],
        examples=[
            {"input": q, "reference": first_line(code), "prediction": first_line(codes[j])}
            for q, code, j in zip(queries, codes, top)
        ],
    )


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """What to tell the user when a generative model gives the same few outputs to different inputs."""
    distinct = metrics.get("distinct_predictions", 100.0)
    if distinct >= COLLAPSE_SHARE:
        return None
    return (
        f"the model has collapsed: only {distinct:.1f}% of its predictions are distinct (below {COLLAPSE_SHARE:.0f}%); "
        "train longer, raise the learning rate, or start from a pretrained model"
    )


def evaluate_model(model_dir: str | Path, test_rows: list[dict], cfg: Config) -> EvalReport:
    """Predict every test example, score it beside a baseline, and write predictions.jsonl, examples.json, metrics.json."""
    gen, task = cfg.generation, cfg.model.task
    model_dir = Path(model_dir)
    # A stale metrics.json would make an interrupted evaluation look finished.
    (model_dir / METRICS_FILE).unlink(missing_ok=True)
    rows = test_rows[: cfg.evaluation.max_examples] if cfg.evaluation.max_examples else test_rows
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_exported(model_dir)
    model = model.to(device).eval()

    started = time.perf_counter()
    scored = (score_search if task is ModelTask.code_search else score_predictions)(model, tokenizer, rows, cfg)
    seconds = time.perf_counter() - started
    untuned = None
    if cfg.model.init is ModelInit.pretrained and task.value in GENERATIVE_TASKS:
        del model
        base, base_tokenizer = load_pretrained(cfg.model)
        untuned = score_predictions(base.to(device).eval(), base_tokenizer, rows, cfg).metrics
        del base
    warnings = [w for w in [collapse_warning(scored.metrics)] if w]
    for warning in warnings:
        log.warning(warning)
    report = EvalReport(
        metrics=scored.metrics,
        baseline=scored.baseline,
        baseline_name=scored.baseline_name,
        num_examples=len(rows),
        examples_per_second=round(len(rows) / seconds, 2),
        examples=scored.examples[: cfg.evaluation.num_saved_examples],
        untuned=untuned,
        warnings=warnings,
    )
    _write_atomic(model_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in scored.records))
    _write_atomic(model_dir / "examples.json", json.dumps(report.examples, indent=2))
    metrics = {
        "model": report.metrics,
        "baseline": report.baseline,
        "baseline_name": report.baseline_name,
        "num_examples": report.num_examples,
        "examples_per_second": report.examples_per_second,
        "generation": {"num_beams": gen.num_beams, "max_new_tokens": gen.max_new_tokens},
        "untuned": untuned,
        "warnings": warnings,
    }
    _write_atomic(model_dir / METRICS_FILE, json.dumps(metrics, indent=2))  # last: marks the run complete
    name = primary_metric(cfg.model)
    log.info("%s %.2f (baseline %.2f%s) on %d examples", name, report.metrics[name], report.baseline[name],
             f", untuned base {untuned[name]:.2f}" if untuned else "", len(rows))
    return report
