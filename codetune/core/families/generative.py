"""What the generative families (seq2seq, encoder_decoder, causal_lm) share: generation, and the two objectives.

An objective is what a generative model reads and writes and how that is scored; model.direction
picks it: code_to_text summarises code (smoothed BLEU-4), text_to_code writes code (CodeBLEU).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch

from codetune.core.config import Config, Direction
from codetune.core.execution import (
    STOP_SEQUENCES,
    function_only,
    functional_correctness,
    rows_as_problems,
    time_limits,
    truncate,
)
from codetune.core.families.base import (
    Card,
    FamilyDefaults,
    InferenceSettings,
    Sampling,
    Scored,
    in_length_order,
    input_texts,
    sample_completions,
    scored_predictions,
)
from codetune.core.metrics import code_metrics, function_name_words, stub_function, summary_metrics

log = logging.getLogger(__name__)

SUMMARY_SCORING = "smoothed BLEU-4 as CodeXGLUE computes it, corpus BLEU, ROUGE-L and exact match, x100"
CODE_GENERATION_CARD = Card(
    "text-generation",
    "Writes a Python function from a one-sentence description of what it does.",
    "CodeBLEU from codebleu 0.7 (n-gram, syntax-tree and data-flow match), exact match, and pass@k of the functions "
    "run against tests in a sandbox (HumanEval, the data's own tests) where configured, x100",
)


@dataclass(frozen=True)
class Objective:
    source: str
    """The example field the model reads."""
    target: str
    """The example field the model writes."""
    writes_code: bool
    """Outputs keep their line layout; prose comes back on one line."""
    primary_metric: str
    metrics: Callable[[list[str], list[str]], dict[str, float]]
    baseline_name: str
    baseline: Callable[[dict], str]
    """The trivial prediction for a row, which the model must beat."""


OBJECTIVES = {
    Direction.code_to_text: Objective(
        "code",
        "summary",
        False,
        "bleu4_smoothed",
        summary_metrics,
        "function name split into words",
        lambda row: function_name_words(row["code"]),
    ),
    Direction.text_to_code: Objective(
        "summary",
        "code",
        True,
        "codebleu",
        code_metrics,
        "a stub named after the summary",
        lambda row: stub_function(row["summary"]),
    ),
}


def encode_prompt(tokenizer, template: str, text: str, max_length: int) -> list[int]:
    """Token ids of template with text where {code} or {summary} stands; the text is cut, never the template, to fit."""
    prefix, suffix = re.split(r"\{(?:code|summary)\}", template)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = max(max_length - len(prefix_ids) - len(suffix_ids), 0)
    return prefix_ids + tokenizer(text, add_special_tokens=False)["input_ids"][:room] + suffix_ids


def generate(
    model,
    tokenizer,
    texts: list[str],
    settings: InferenceSettings,
    writes_code: bool = False,
) -> list[str]:
    """Greedy or beam generation, in length-sorted batches that halve on out-of-memory.

    A decoder-only model continues the prompt with the text filled in, padded on the left so every
    row's prompt ends where generation starts. Prose comes back on one line; code keeps its layout.
    """
    gen, decoder_only = settings.generation, not model.config.is_encoder_decoder

    def generate_batch(batch_texts: list[str]) -> list[str]:
        if decoder_only:
            prompts = [encode_prompt(tokenizer, settings.prompt, t, settings.max_source_length) for t in batch_texts]
            batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        else:
            batch = tokenizer(
                batch_texts, max_length=settings.max_source_length, truncation=True, padding=True, return_tensors="pt"
            )
        batch = batch.to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **batch, num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
        if decoder_only:
            out = out[:, batch["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
        return [text.strip() if writes_code else " ".join(text.split()) for text in decoded]

    return in_length_order(texts, settings.batch_size, generate_batch, done="generated")


def complete_code(
    model, tokenizer, prompts: list[str], batch_size: int, samples: int, temperature: float, max_new_tokens: int
) -> list[list[str]]:
    """`samples` continuations of each code prompt (greedy when 1), each cut where the function ends.

    Generation stops at the stop sequences (a row at a time: a finished row pads while the others go on).
    """
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    sampling = Sampling(max_new_tokens, temperature if samples > 1 else 0.0, samples, STOP_SEQUENCES)
    done = sample_completions(model, tokenizer, ids, sampling, model.generation_config.eos_token_id, batch_size)
    return [[truncate(c.text, prompt.endswith("\n")) for c in row] for prompt, row in zip(prompts, done)]


class Generative(FamilyDefaults):
    """The generation half of a generative family; subclasses say how the model is built, tokenised and batched."""

    scores_untuned = True
    batches_by_length = True
    directions = tuple(OBJECTIVES)

    def __init__(self, direction: Direction = Direction.code_to_text):
        super().__init__(direction)
        self.objective = OBJECTIVES[direction]

    def config_errors(self, cfg: Config) -> list[str]:
        errors = super().config_errors(cfg)
        if self.objective.writes_code and importlib.util.find_spec("codebleu") is None:
            errors.append("model.direction=text_to_code is scored with CodeBLEU: pip install 'codetune[codegen]'")
        return errors

    summary_card: Card
    """How the model card describes the family's summarisers; code generators share CODE_GENERATION_CARD."""

    @property
    def card(self) -> Card:
        return CODE_GENERATION_CARD if self.objective.writes_code else self.summary_card

    @property
    def registered_name(self) -> str:
        return "codetune-code-generator" if self.objective.writes_code else "codetune-code-summarizer"

    @property
    def primary_metric(self) -> str:
        return self.objective.primary_metric

    @property
    def writes_code(self) -> bool:
        return self.objective.writes_code

    def gate_metric(self, cfg: Config, benchmarks: bool = True) -> str:
        """Code that runs against the data's own tests, else a benchmark's, else the objective's text metric."""
        if self.writes_code and cfg.data.tests_field:
            return "pass_at_1"
        if self.writes_code and benchmarks and cfg.evaluation.benchmarks:
            return f"{cfg.evaluation.benchmarks[0].value}_pass_at_1"
        return self.primary_metric

    def metrics(self, references: list[str], predictions: list[str]) -> dict[str, float]:
        """The objective's metrics, and the share of distinct outputs (a collapsed model repeats a few)."""
        metrics = self.objective.metrics(references, predictions)
        if predictions:
            metrics["distinct_predictions"] = 100 * len(set(predictions)) / len(predictions)
        return metrics

    def predict(self, model, tokenizer, model_input, settings: InferenceSettings) -> list[str]:
        return generate(model, tokenizer, input_texts(model_input), settings, self.objective.writes_code)

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored:
        inputs = [r[self.objective.source] for r in rows]
        references = [r[self.objective.target] for r in rows]
        predictions = self.predict(model, tokenizer, inputs, settings)
        baseline = (self.objective.baseline_name, [self.objective.baseline(r) for r in rows])
        scored = scored_predictions(rows, inputs, references, predictions, baseline, self.metrics)
        if self.writes_code and rows and "tests" in rows[0]:
            run_tests(scored, rows, predictions, baseline[1])
        return scored


def run_tests(scored: Scored, rows: list[dict], predictions: list[str], baseline: list[str]) -> None:
    """Add pass_at_1 of the predicted functions (and the baseline's) against each row's tests, and each record's
    verdict."""
    problems = rows_as_problems(rows)
    limits = time_limits(problems)
    model = functional_correctness(problems, [[function_only(p)] for p in predictions], limits)
    scored.metrics.update(model.metrics)
    scored.baseline.update(functional_correctness(problems, [[b] for b in baseline], limits).metrics)
    verdicts = {r["task_id"]: r for r in model.records}
    for record, problem in zip(scored.records, problems):
        verdict = verdicts.get(problem.task_id)
        record["passed"] = bool(verdict and verdict["passed"])
        record["failure"] = verdict["failures"][0] if verdict and verdict["failures"] else None
