"""What every family provides (the Family protocol), and the pieces families share."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import torch
from transformers import PreTrainedModel, RobertaConfig

from codetune.core import progress
from codetune.core.config import (
    BenchmarkMode,
    Config,
    DataSource,
    Direction,
    GenerationConfig,
    ModelTask,
    ScratchArchitecture,
)
from codetune.core.data import Examples
from codetune.core.errors import ModelError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class InferenceSettings:
    """Everything besides the weights that tokenising and predicting need: written beside a registered model."""

    generation: GenerationConfig
    max_source_length: int
    """Inputs (code; a summary for text_to_code) are cut to this many tokens."""
    max_target_length: int
    """Outputs in training, and code-search queries, are cut to this many tokens."""
    prompt: str
    """causal_lm: the template the output follows."""
    batch_size: int = 16
    """Inputs predicted together (generated, classified or embedded): evaluation.batch_size."""
    system_prompt: str | None = None
    """chat: the system message a conversation without one gets (chat.system_prompt)."""

    @classmethod
    def of(cls, cfg: Config) -> "InferenceSettings":
        t = cfg.training
        return cls(
            cfg.generation,
            t.max_source_length,
            t.max_target_length,
            cfg.model.prompt,
            cfg.evaluation.batch_size,
            cfg.chat.system_prompt,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "InferenceSettings":
        settings = json.loads(Path(path).read_text())
        for training_only in ("fim_rate", "spm_rate", "seed"):  # saved with models registered before 2026-12-07
            settings.pop(training_only, None)
        generation = dict(settings.pop("generation"))
        earlier = generation.pop("batch_size", cls.batch_size)  # where models registered before 2026-12-04 kept it
        settings.setdefault("batch_size", earlier)
        return cls(**settings, generation=GenerationConfig(**generation))


@dataclass(frozen=True)
class Card:
    """How the model card describes a family's models."""

    pipeline_tag: str
    """The Hub's task tag."""
    purpose: str
    scoring: str


@dataclass
class Scored:
    """A family's outcome on the test rows: metrics beside the baseline's, and one record per row for
    predictions.jsonl."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    baseline_name: str
    records: list[dict]
    examples: list[dict]
    """(input, reference, prediction) for the report."""


class Family(Protocol):
    """What differs between model families; the pipeline's stages are generic and ask the run's family.

    A family is chosen by model.task (how the model is built and trained), and for generative
    families by model.direction too (what it reads and writes, and how that is scored).
    """

    task: ModelTask
    direction: Direction
    architecture: str
    """What model.init=scratch builds, for the model card."""
    peft_task_type: str
    """peft.TaskType of the LoRA wrapper."""
    primary_metric: str
    """What the family's outputs are scored by first."""
    registered_name: str
    """registry.model_name where the config leaves it null."""
    writes_code: bool
    """Its outputs are programs (they may run against tests)."""
    benchmark_mode: BenchmarkMode | None
    """How it solves a code benchmark (evaluation.benchmarks): continuing the prompt, or answering it as a user's
    message; None: it does not."""
    card: Card
    scores_untuned: bool
    """Whether evaluation also scores the pretrained base before tuning (generation: the same prompt works untuned)."""
    batches_by_length: bool
    """Whether training may batch similar lengths together (not when a batch is its own negatives)."""
    rows_independent: bool
    """Whether predict's answer for a row depends on that row alone, so a server may join requests in one call."""
    examples: Examples
    """What it trains on: {code, summary} pairs, {code, label} examples or whole files (data preparation reads it)."""
    directions: tuple[Direction, ...]
    """The model.direction values it implements."""
    decoder_only: bool
    """Loads decoder-only LMs (the packaged GGUF weights hold one)."""

    def config_errors(self, cfg: Config) -> list[str]:
        """What this family cannot do with cfg's settings, each with its fix (validation reports them)."""

    def gate_metric(self, cfg: Config, benchmarks: bool = True) -> str:
        """The metric the registry compares versions on (and the monitor scores new pairs by, benchmarks=False)."""

    def build_scratch(self, arch: ScratchArchitecture, tokenizer, labels: list[str] | None) -> PreTrainedModel: ...

    def load_base(self, name: str, tokenizer, labels: list[str] | None, **hub: Any) -> PreTrainedModel:
        """from_pretrained(name) with this family's head; hub: revision and trust_remote_code."""

    def load_export(self, model_dir: Path) -> PreTrainedModel: ...

    def lora_targets(self, model: PreTrainedModel) -> list[str] | str:
        """PEFT's target_modules where peft.target_modules is null (lora_layers names them per architecture)."""

    def modules_to_save(self, model: PreTrainedModel) -> list[str] | None:
        """Modules trained whole beside the adapters."""

    def tokenize(self, rows: list[dict], tokenizer, cfg: Config, label2id: dict | None) -> list[dict]:
        """Training examples: token ids and labels, cut to the configured lengths."""

    def collator(self, tokenizer, model: PreTrainedModel, pad_to_multiple_of: int | None) -> Callable: ...

    def add_tokens(self, model: PreTrainedModel, tokenizer) -> list[int]:
        """Tokens the family needs that the tokenizer lacks, added to both; the ids whose embedding rows train."""

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the Trainer runs: the model, or a module around it that computes this family's loss."""

    def probe_inputs(self, batch: dict) -> dict:
        """The model's own inputs from a training batch: what a merged and an adapted model are compared on."""

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored: ...

    def predict(self, model, tokenizer, model_input: Any, settings: InferenceSettings) -> list:
        """What a served model returns for a consumer's input (the MLflow pyfunc's predict)."""


# Llama-style decoders: every linear layer, attention and MLP (QLoRA: adapting them all matches full
# fine-tuning; the default's measurement is in docs/configuration.md). Elsewhere the attention projections, as the
# CodeT5 and LoRA papers place them.
DECODER_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_LAYERS = {
    "t5": ["q", "k", "v", "o"],
    "roberta": ["query", "key", "value"],  # CodeBERT, GraphCodeBERT, UniXcoder
    "bert": ["query", "key", "value"],
    "qwen2": DECODER_LINEAR,
    "llama": DECODER_LINEAR,
    "mistral": DECODER_LINEAR,
    "gpt2": ["c_attn", "c_proj"],
    "gpt_bigcode": ["c_attn", "c_proj"],  # StarCoder
    "codegen": ["qkv_proj", "out_proj"],
}


def add_special_tokens(model: PreTrainedModel, tokenizer, tokens: Sequence[str]) -> list[int]:
    """tokens added to the tokenizer as special tokens and to the model as embedding rows; their ids, whose rows train.

    The rows are drawn around the mean embedding (transformers' mean_resizing), after set_seed: the same every run.
    """
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(tokens))


def lora_layers(model_type: str) -> list[str]:
    """The layers LoRA adapts by default in an architecture (config.model_type)."""
    if model_type not in LORA_LAYERS:
        raise ModelError(
            f"no default LoRA targets for model type '{model_type}'; set peft.target_modules "
            f"(known: {', '.join(LORA_LAYERS)})"
        )
    return LORA_LAYERS[model_type]


class FamilyDefaults:
    """The members most families implement alike; a family overrides the ones it does differently."""

    auto_class: type
    """The transformers Auto class that loads this family's models."""
    rows_independent = True
    examples = Examples.pairs
    directions = (Direction.code_to_text,)
    decoder_only = False
    writes_code = False
    benchmark_mode = None

    def __init__(self, direction: Direction = Direction.code_to_text):
        self.direction = direction

    def probe_inputs(self, batch: dict) -> dict:
        """The batch without what only the loss reads."""
        return {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}

    def config_errors(self, cfg: Config) -> list[str]:
        if self.examples is Examples.labelled and cfg.data.source is DataSource.code_tree:
            return [
                f"model.task={self.task.value} needs labelled data: data.source=files (or hub) with data.label_field"
            ]
        return []

    def gate_metric(self, cfg: Config, benchmarks: bool = True) -> str:
        return self.primary_metric

    def load_base(self, name: str, tokenizer, labels: list[str] | None = None, **hub: Any) -> PreTrainedModel:
        return self.auto_class.from_pretrained(name, **hub)

    def load_export(self, model_dir: Path) -> PreTrainedModel:
        return self.auto_class.from_pretrained(model_dir)

    def lora_targets(self, model: PreTrainedModel) -> list[str] | str:
        return lora_layers(model.config.model_type)

    def modules_to_save(self, model: PreTrainedModel) -> list[str] | None:
        return None

    def add_tokens(self, model: PreTrainedModel, tokenizer) -> list[int]:
        return []

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def roberta_config(arch: ScratchArchitecture, tokenizer, layers: int, **extra) -> RobertaConfig:
    """A from-scratch RoBERTa (CodeBERT's architecture) shaped by model.scratch."""
    return RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.d_model,
        intermediate_size=arch.d_ff,
        num_hidden_layers=layers,
        num_attention_heads=arch.num_heads,
        max_position_embeddings=1026,  # RoBERTa positions start after the padding index
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def scored_predictions(
    rows: list[dict],
    inputs: list[str],
    references: list[str],
    predictions: list[str],
    baseline: tuple[str, list[str]],
    metrics: Callable[[list[str], list[str]], dict[str, float]],
) -> Scored:
    """Predictions and a baseline's, scored against the references."""
    baseline_name, baseline_predictions = baseline
    return Scored(
        metrics=metrics(references, predictions),
        baseline=metrics(references, baseline_predictions),
        baseline_name=baseline_name,
        records=[
            {"id": r.get("id"), "reference": ref, "prediction": pred, "baseline": base}
            for r, ref, pred, base in zip(rows, references, predictions, baseline_predictions)
        ],
        examples=[
            {"input": text, "reference": ref, "prediction": pred}
            for text, ref, pred in zip(inputs, references, predictions)
        ],
    )


# A long inference (an evaluation) says how far it is this often; a served batch ends sooner and says nothing.
PROGRESS_EVERY_S = 30


def in_length_order(
    texts: list[str], batch_size: int, infer: Callable[[list[str]], Sequence[T]], done: str | None = None
) -> list[T]:
    """infer(batch) over texts in batches of similar length (little padding), longest first, the results in the
    order of texts. On device out-of-memory the batch is halved, down to one text; with `done` ("generated"), a
    long run logs how far it is.

    Longest first: a batch that does not fit fails at the start, not after minutes of work.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    results: list = [None] * len(texts)
    start, started = 0, time.perf_counter()
    reported = started
    while start < len(order):
        index = order[start : start + batch_size]
        try:
            outputs = infer([texts[i] for i in index])
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory in inference; retrying with batch size %d (evaluation.batch_size)", batch_size)
            continue
        for i, output in zip(index, outputs):
            results[i] = output
        start += len(index)
        if done:
            left = (len(order) - start) * (time.perf_counter() - started) / start
            progress.report(done, start, len(order), left)
            if time.perf_counter() - reported > PROGRESS_EVERY_S and start < len(order):
                reported = time.perf_counter()
                log.info("%s %d of %d, about %.0f s to go", done, start, len(order), left)
    return results


def input_texts(model_input: Any) -> list[str]:
    """A consumer's input as a list of texts: one string, a list, or a DataFrame whose first column holds them."""
    if hasattr(model_input, "iloc"):
        model_input = model_input.iloc[:, 0].tolist()
    return [model_input] if isinstance(model_input, str) else [str(text) for text in model_input]


@dataclass(frozen=True)
class Sampling:
    """How a completion is drawn: what an OpenAI-style request asks for (`max_tokens`, `temperature`, `n`, `stop`)."""

    max_tokens: int
    temperature: float = 0.0
    """0: greedy (n > 1 then gives the n best beams)."""
    n: int = 1
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop": the end token or a stop sequence came; "length": max_tokens did."""


def sample_completions(
    model, tokenizer, prompts: list[list[int]], sampling: Sampling, end_id: int | list[int], batch_size: int
) -> list[list[Completion]]:
    """`sampling.n` completions of each prompt (token ids), in length-sorted batches that halve on out-of-memory.

    Generation stops at an end_id (one, or a generation config's list) or a stop sequence; the text includes neither.
    """
    n, stop = sampling.n, list(sampling.stop)
    ends = {end_id} if isinstance(end_id, int) else set(end_id)

    def complete_batch(batch_prompts: list[list[int]]) -> list[list[Completion]]:
        encoded = tokenizer.pad({"input_ids": batch_prompts}, padding_side="left", return_tensors="pt").to(model.device)
        drawing = (
            {"do_sample": True, "temperature": sampling.temperature, "top_p": 0.95, "num_return_sequences": n}
            if sampling.temperature > 0
            else {"do_sample": False, "num_beams": n, "num_return_sequences": n}
        )
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=sampling.max_tokens,
                eos_token_id=end_id,
                pad_token_id=tokenizer.pad_token_id,
                **({"stop_strings": stop, "tokenizer": tokenizer} if stop else {}),
                **drawing,
            )
        completions = []
        for row, ids in enumerate(out[:, encoded["input_ids"].shape[1] :].tolist()):
            ended = next((i for i, token in enumerate(ids) if token in ends), None)
            ids = ids[:ended] if ended is not None else ids
            while ids and ids[-1] == tokenizer.pad_token_id:  # a row that stopped at a stop sequence, padded
                ids.pop()
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            stopped = ended is not None or cut >= 0
            text = text[:cut] if cut >= 0 else text
            prompt = batch_prompts[row // n]
            completions.append(Completion(text, len(prompt), len(ids), "stop" if stopped else "length"))
        return [completions[i * n : (i + 1) * n] for i in range(len(batch_prompts))]

    return in_length_order(prompts, batch_size, complete_batch, done="completed")
