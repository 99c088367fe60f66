"""The training stage: the Trainer with LoRA or full fine-tuning, resumable checkpoints, and a merged export.

A run's directory is named from what determines its weights (model, PEFT and training settings,
data fingerprint), so a retried or re-run training finds its own checkpoints and finished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from codetune.core.config import Config
from codetune.core.config.loader import to_yaml
from codetune.core.data import Examples, PreparedData
from codetune.core.data.profile import example_text
from codetune.core.distributed import launch_processes, launched, processes, rank_zero, world_size
from codetune.core.errors import ModelError
from codetune.core.families import Family
from codetune.core.model import (
    MergeError,
    add_lora,
    base_weights,
    count_parameters,
    load_model,
    load_pretrained,
    merge_adapter,
)
from codetune.core.precision import resolve_precision
from codetune.core.rundir import (
    ADAPTER_DIR,
    CHECKPOINTS,
    CONFIG_FILE,
    DATA_MANIFEST,
    DATA_PROFILE,
    EXPORT,
    FITTED_RECORD,
    TRAINER_STATE,
    TRAINING_RECORD,
    RunDir,
    last_complete_checkpoint,
    recipe_code,
    run_key,
)

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """What the training stage hands on: where the model is and how training went."""

    run_dir: str
    global_step: int
    train_loss: float
    validation_loss: float
    resumed_from_step: int
    """0 when training started fresh."""
    used_peft: bool
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    base_weights: dict = dataclasses.field(default_factory=dict)
    """Which pretrained weights training started from (base_weights in codetune.core.model)."""
    micro_batch_size: int | None = None
    """Set when the device ran out of memory and training finished at this micro-batch (with the accumulation raised
    to keep the configured effective batch)."""

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainedModel":
        run = RunDir(run_dir)
        if not run.trained:
            raise ModelError(
                f"{run_dir} holds no finished codetune training ({TRAINING_RECORD} missing): "
                "train it with `codetune run` first"
            )
        return cls(**run.read_json(TRAINING_RECORD))


@dataclass
class Fit:
    """A finished Trainer run: its record, and what is saved from it."""

    record: TrainedModel
    model: Any
    """The trained model: a PEFT wrapper under LoRA."""
    tokenizer: Any
    state: Any
    """The Trainer's state: the loss curve and the step."""


class TrainingStopped(Exception):
    """A callback stopped training before its end (a sweep's pruner): its checkpoints stay, nothing is exported."""


class StoppingCallback:
    """What a callback that may stop training early records, so that train_model raises TrainingStopped instead of
    exporting a model trained part of the way. Mixed into a transformers TrainerCallback."""

    stopped_at: int | None = None
    """The global step at which it set control.should_training_stop."""
    reason: str = "stopped"


def train_model(cfg: Config, data: PreparedData, family: Family, callbacks: Sequence[Any] = ()) -> TrainedModel:
    """Train (or resume, or skip if done) and export the model to its run directory.

    LoRA runs save the adapter and fitted.json as soon as training ends, then merge them into the export:
    a failed merge keeps both, and a re-run merges again without training. callbacks: TrainerCallbacks the caller
    adds (a sweep's pruner, a tracker); where a StoppingCallback stops training, TrainingStopped is raised and
    nothing is exported.
    """
    run = RunDir.of(cfg, data)
    with _held(run, cfg, data, family):
        if run.trained:
            log.info("training already finished in %s; not redoing it", run)
            return TrainedModel.load(run.path)
        if processes(cfg) > 1 and not launched():
            launch_processes(cfg, data, run)  # each process runs train_model in the run this one holds
            return TrainedModel.load(run.path)

        weights = base_weights(cfg.model)
        if rank_zero():
            run.write(CONFIG_FILE, f"# base weights: {json.dumps(weights)}\n" + to_yaml(cfg))
            shutil.copyfile(data.manifest_path, run / DATA_MANIFEST)
            shutil.copyfile(data.profile_path, run / DATA_PROFILE)
        train_rows, validation_rows = data.load("train"), data.load("validation")
        labels = sorted({r["label"] for r in train_rows}) if family.examples is Examples.labelled else None

        if cfg.peft.use_peft and run.fitted:
            log.info("training finished earlier in %s; merging its adapter without training again", run)
            trained = TrainedModel(**run.read_json(FITTED_RECORD))
        else:
            fitted = fit_with_oom_retry(cfg, family, run, train_rows, validation_rows, labels, weights, callbacks)
            if not rank_zero():
                return fitted.record
            _save(fitted, run, cfg.peft.use_peft)
            trained = fitted.record
        if cfg.peft.use_peft:
            _export_merged(cfg, family, run, labels, validation_rows)
        # Everything went to a staging directory first; training.json, written last, marks the export complete.
        run.install_export()
        run.finish_training(dataclasses.asdict(trained))
        return trained


@contextlib.contextmanager
def _held(run: RunDir, cfg: Config, data: PreparedData, family: Family) -> Iterator[None]:
    """The run directory claimed for this configuration and locked; a launched process is inside its launcher's."""
    if launched():
        yield
        return
    run.claim(run_key(cfg, data), recipe_code(type(family)))
    with run.lock():
        yield


def _save(fitted: Fit, run: RunDir, lora: bool) -> None:
    """LoRA: the adapter alone, kept whatever the merge does; else the whole model, the export itself."""
    staged = run.staging(ADAPTER_DIR if lora else EXPORT)
    # PEFT saves the whole embedding and LM head of a model whose vocabulary grew; the added tokens' trained rows
    # are in the adapter already, and the base's rows are the base's.
    fitted.model.save_pretrained(staged, **({"save_embedding_layers": False} if lora else {}))
    fitted.tokenizer.save_pretrained(staged)
    fitted.state.save_to_json(str(staged / TRAINER_STATE))
    if lora:
        run.install(staged, ADAPTER_DIR)
        run.write_json(FITTED_RECORD, dataclasses.asdict(fitted.record))


def _export_merged(cfg: Config, family: Family, run: RunDir, labels, validation_rows: list[dict]) -> None:
    """Stage base + the saved adapter, merged, as the export; checked to compute what they compute unmerged.

    The merge starts from what is on disk, not from the Trainer's model (whose forward the Trainer
    wrapped in autocast): the export must equal what base + the saved adapter compute.
    """
    from peft import PeftModel

    base, tokenizer = load_pretrained(cfg.model, labels)
    family.add_tokens(base, tokenizer)  # the adapter's vocabulary: the trained rows replace the added ones
    model = PeftModel.from_pretrained(base, run / ADAPTER_DIR)
    label2id = model.config.label2id if labels else None
    # Four examples, as for every family: a completion file alone gives up to 16 windows.
    examples = family.tokenize(validation_rows[:4], tokenizer, cfg, label2id)[:4]
    probe = family.probe_inputs(dict(_collator(family, tokenizer, model)(examples)))
    try:
        merged = merge_adapter(model, probe)
    except MergeError as exc:
        raise MergeError(
            f"{exc}. Nothing is lost: the adapter is in {run / ADAPTER_DIR} and the training record in "
            f"{run / FITTED_RECORD}; re-running merges again without training. If it fails again, report it with the "
            "run directory."
        ) from None
    staged = run.staging(EXPORT)
    merged.save_pretrained(staged)  # safetensors
    tokenizer.save_pretrained(staged)
    shutil.copyfile(run / ADAPTER_DIR / TRAINER_STATE, staged / TRAINER_STATE)


def fit_with_oom_retry(cfg: Config, *fit_args) -> Fit:
    """fit; after a device out-of-memory, once more at half the micro-batch and twice the gradient accumulation.

    The effective batch, and so the optimisation, stays the same, and the retry resumes from the last checkpoint.
    """
    t = cfg.training
    attempts = [t]
    if t.per_device_train_batch_size % 2 == 0:
        attempts.append(
            dataclasses.replace(
                t,
                per_device_train_batch_size=t.per_device_train_batch_size // 2,
                gradient_accumulation_steps=t.gradient_accumulation_steps * 2,
            )
        )
    for attempt, training in enumerate(attempts):
        if attempt:
            log.warning(
                "out of device memory at micro-batch %d: retrying once at micro-batch %d with gradient accumulation "
                "%d (the same effective batch of %d per device), resuming from the last checkpoint",
                t.per_device_train_batch_size,
                training.per_device_train_batch_size,
                training.gradient_accumulation_steps,
                t.per_device_train_batch_size * t.gradient_accumulation_steps,
            )
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            fitted = fit(dataclasses.replace(cfg, training=training), *fit_args)
        except torch.OutOfMemoryError:
            continue
        if attempt:
            fitted.record.micro_batch_size = training.per_device_train_batch_size
        return fitted
    if len(attempts) == 1:
        raise ModelError(
            f"out of device memory at training.per_device_train_batch_size={t.per_device_train_batch_size}, "
            "which cannot be halved at the same effective batch; lower it and raise "
            "training.gradient_accumulation_steps to match (or set training.gradient_checkpointing=true). "
            "Checkpoints so far are kept and the next run resumes from them"
        )
    raise ModelError(
        f"out of device memory at micro-batch {t.per_device_train_batch_size} and again at "
        f"{attempts[1].per_device_train_batch_size}; set training.gradient_checkpointing=true, lower "
        "training.max_source_length, or use a smaller model. Checkpoints so far are kept"
    )


def fit(
    cfg: Config,
    family: Family,
    run: RunDir,
    train_rows: list[dict],
    validation_rows: list[dict],
    labels: list[str] | None,
    weights: dict,
    callbacks: Sequence[Any],
) -> Fit:
    """The Trainer run, resumed from the newest complete checkpoint."""
    from transformers import set_seed

    t = cfg.training
    texts = (example_text(r) + "\n" + r.get("summary", "") for r in train_rows)
    base, tokenizer = load_model(cfg.model, texts, t.seed, labels)
    # Seeded after loading, right before the first random draw (LoRA's initial weights): a first load may convert
    # or download weights and draw on the global generator, which once gave the first run on a machine (a cold
    # weights cache) another model than every later run. A scratch model seeds its own initialisation.
    set_seed(t.seed)
    added = family.add_tokens(base, tokenizer)  # new embedding rows draw on the generator too
    model = add_lora(base, cfg.peft, added) if cfg.peft.use_peft else base
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    trainer = _trainer(cfg, family, run, model, base, tokenizer, train_rows, validation_rows, labels)
    for callback in callbacks:
        trainer.add_callback(callback)
    checkpoint = last_complete_checkpoint(run / CHECKPOINTS)
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("resuming from %s (step %d)", checkpoint, resumed_from)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    for callback in callbacks:
        if isinstance(callback, StoppingCallback) and callback.stopped_at is not None:
            raise TrainingStopped(f"{callback.reason} at step {callback.stopped_at}; its checkpoints stay in {run}")
    validation_loss = trainer.evaluate()["eval_loss"]
    train_loss = final_train_loss(trainer, outcome)
    steps = trainer.state.global_step
    log.info("trained %d steps in %.0f s: train loss %.4f, validation loss %.4f", steps, train_seconds, train_loss,
             validation_loss)  # fmt: skip
    record = TrainedModel(
        run_dir=str(run.path),
        global_step=steps,
        train_loss=train_loss,
        validation_loss=validation_loss,
        resumed_from_step=resumed_from,
        used_peft=cfg.peft.use_peft,
        trainable_parameters=trainable,
        total_parameters=total,
        train_seconds=round(train_seconds, 2),
        base_weights=weights,
    )
    return Fit(record, model, tokenizer, trainer.state)


def _trainer(cfg: Config, family: Family, run: RunDir, model, base, tokenizer, train_rows, validation_rows, labels):
    """The Trainer for this run: examples, settings, collator, progress reporting, and the loss's item count."""
    from transformers import PrinterCallback, ProgressCallback, Trainer

    from codetune.core.progress import TrainingProgress

    t = cfg.training
    world = world_size()
    log.info(
        "effective batch %d: %d per device x %d processes x %d accumulation",
        t.per_device_train_batch_size * world * t.gradient_accumulation_steps,
        t.per_device_train_batch_size,
        world,
        t.gradient_accumulation_steps,
    )
    if t.gradient_checkpointing:  # here, not by the Trainer: a code-search encoder reaches it inside its BiEncoder
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    label2id = base.config.label2id if labels else None
    train_examples = family.tokenize(train_rows, tokenizer, cfg, label2id)
    if t.packing:
        train_examples = pack(train_examples, t.max_source_length + t.max_target_length)
    # Every token sequence of an example: a code-search pair holds two (query_input_ids, code_input_ids).
    token_lists = [ids for e in train_examples for key, ids in e.items() if key.endswith("input_ids")]
    tokens_per_step = (
        sum(map(len, token_lists)) / len(train_examples)
        * t.per_device_train_batch_size * world * t.gradient_accumulation_steps
    )  # fmt: skip
    trainer = Trainer(
        model=family.trainable(model),
        args=_training_arguments(cfg, family, run / CHECKPOINTS),
        train_dataset=train_examples,
        eval_dataset=family.tokenize(validation_rows, tokenizer, cfg, label2id),
        data_collator=_collator(family, tokenizer, base),
        processing_class=tokenizer,
        callbacks=[TrainingProgress(tokens_per_step)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Under accumulation or across processes the Trainer counts the batch's items and trusts the model to divide.
    if (t.gradient_accumulation_steps > 1 or world > 1) and trainer.model_accepts_loss_kwargs:
        probe = trainer.data_collator(trainer.eval_dataset[:2])
        trainer.model_accepts_loss_kwargs = loss_honours_item_count(trainer.model, probe)
    return trainer


def pack(examples: list[dict], budget: int) -> list[dict]:
    """Examples packed into rows of at most `budget` tokens, longest first into the first row with room (first-fit
    decreasing: the same packs every run). Each example's positions start at 0, and its first token is never a label:
    the token before it belongs to another example."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        size = len(example["input_ids"])
        fits = next((i for i, left in enumerate(room) if left >= size), None)
        if fits is None:
            rows.append([example])
            room.append(budget - size)
        else:
            rows[fits].append(example)
            room[fits] -= size
    return [
        {
            "input_ids": [t for e in row for t in e["input_ids"]],
            "position_ids": [p for e in row for p in range(len(e["input_ids"]))],
            "labels": [label for e in row for label in [-100, *e["labels"][1:]]],
        }
        for row in rows
    ]


def final_train_loss(trainer, outcome) -> float:
    """The last logged training loss; a run shorter than logging_steps logged none, and its mean loss stands in."""
    return next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), outcome.training_loss)


def _collator(family: Family, tokenizer, model):
    # Multiples of 8 fill a GPU's tensor cores; on a CPU they are only more padding.
    return family.collator(tokenizer, model, 8 if torch.cuda.is_available() else None)


def _training_arguments(cfg: Config, family: Family, checkpoints: Path):
    """The Trainer's settings: one keyword per setting, in the config's order."""
    from transformers import TrainingArguments

    t = cfg.training
    bf16, fp16 = resolve_precision(cfg)
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        lr_scheduler_type=t.lr_scheduler_type,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,  # the Trainer takes bf16 on a CPU only when told it is one
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        train_sampling_strategy="group_by_length" if t.group_by_length and family.batches_by_length else "random",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        prediction_loss_only=True,  # validation needs the loss; gathering every logit for it costs GBs
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # the tracking stage logs the curve from trainer_state, once, even across resumes
        disable_tqdm=True,
    )


def loss_honours_item_count(model: torch.nn.Module, batch: dict) -> bool:
    """Whether the model's loss divides by the `num_items_in_batch` the Trainer passes it under gradient accumulation.

    T5, EncoderDecoderModel and RoBERTa's heads take the keyword (in **kwargs) and average per micro-batch anyway;
    the Trainer, told the keyword is accepted, then skips its own division, and gradients and the logged loss come
    out multiplied by the accumulation steps. Measured, not looked up: any model class may do either.
    """
    was_training = model.training
    model.eval()  # no dropout: the two losses differ only by the count
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            averaged = model(**batch)["loss"]
            counted = model(**batch, num_items_in_batch=torch.tensor(10**6, device=device))["loss"]
    finally:
        model.train(was_training)
    return not torch.allclose(averaged, counted)
