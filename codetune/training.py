"""The training stage: Seq2SeqTrainer with LoRA or full fine-tuning, resumable checkpoints, and a merged export.

A run's directory is named from what determines its weights (model, PEFT and training settings,
data fingerprint), so a retried or re-run training finds its own checkpoints and finished work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.code_search import BiEncoder, PairCollator, tokenize_pairs
from codetune.config import Config, ModelTask, content_hash, to_yaml
from codetune.data import PreparedData
from codetune.errors import DataError, ModelError
from codetune.model import (
    MergeError,
    add_lora,
    base_weights,
    count_parameters,
    encode_prompt,
    load_model,
    load_pretrained,
    merge_adapter,
)

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"
FITTED_RECORD = "fitted.json"
"""Training ended and the adapter is saved; its merge into the export is still to do."""
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
# What a run directory holds besides the model: records of how it was made and scored.
RUN_RECORDS = frozenset(
    {TRAINING_RECORD, FITTED_RECORD, "trainer_state.json", "config.yaml", "data_manifest.json", "metrics.json", "examples.json", "predictions.jsonl"}
)


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
    """Which pretrained weights training started from (base_weights in codetune.model)."""

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainedModel":
        record = Path(run_dir) / TRAINING_RECORD
        if not record.exists():
            raise ModelError(f"{run_dir} holds no finished codetune training ({TRAINING_RECORD} missing): train it with `codetune run` first")
        return cls(**json.loads(record.read_text()))


def run_name(cfg: Config, data: PreparedData) -> str:
    if cfg.training.run_name:
        return cfg.training.run_name
    training = dataclasses.asdict(cfg.training)
    for key in ("output_dir", "run_name", "logging_steps", "dataloader_num_workers", "save_total_limit"):
        training.pop(key)
    key = content_hash(
        {"model": dataclasses.asdict(cfg.model), "peft": dataclasses.asdict(cfg.peft), "training": training, "data": data.fingerprint}
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name.rsplit("/", 1)[-1]).strip("-").lower()
    return f"{slug}-{key[:10]}"


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete."""
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            found.append((int(path.name.split("-")[1]), path))
        except (OSError, ValueError):
            log.warning("ignoring incomplete checkpoint %s", path)
    return max(found)[1] if found else None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): autocast then halves the step time."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: Config) -> tuple[bool, bool]:
    """(bf16, fp16) for this device: bf16 wherever the GPU or CPU computes it natively, unless turned off."""
    t = cfg.training
    if not torch.cuda.is_available():
        if t.fp16:
            log.warning("training.fp16=true needs a CUDA GPU; none found, training without it")
        if t.bf16 and not cpu_has_bf16():
            log.warning("training.bf16=true on a CPU without bf16 instructions is slower than fp32; training in fp32")
            return False, False
        return (cpu_has_bf16() if t.bf16 is None else t.bf16), False
    if t.fp16:
        return False, True
    supported = torch.cuda.is_bf16_supported()
    if t.bf16 and not supported:
        log.warning("this GPU has no bf16; training with fp16 instead (set training.fp16=true to silence this)")
        return False, True
    return (supported if t.bf16 is None else t.bf16), False


def tokenize(rows: list[dict], tokenizer, cfg: Config, label2id: dict[str, int] | None = None) -> list[dict]:
    t = cfg.training
    if cfg.model.task is ModelTask.classification:
        unknown = sorted({r["label"] for r in rows} - set(label2id))
        if unknown:
            raise DataError(f"labels {unknown} are not in the train split ({sorted(label2id)}): add training examples for them")
        encoded = tokenizer([r["code"] for r in rows], max_length=t.max_source_length, truncation=True)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label2id[r["label"]]}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)
        ]
    if cfg.model.task is ModelTask.code_search:
        return tokenize_pairs(rows, tokenizer, max_query_length=t.max_target_length, max_code_length=t.max_source_length)
    source, target = cfg.model.direction.source, cfg.model.direction.target
    if cfg.model.task is ModelTask.causal_lm:
        return [
            causal_example(tokenizer, cfg.model.prompt, r[source], r[target], t.max_source_length, t.max_target_length)
            for r in rows
        ]
    sources = tokenizer([r[source] for r in rows], max_length=t.max_source_length, truncation=True)
    targets = tokenizer(text_target=[r[target] for r in rows], max_length=t.max_target_length, truncation=True)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels in zip(sources["input_ids"], sources["attention_mask"], targets["input_ids"])
    ]


def causal_example(tokenizer, template: str, source: str, target: str, max_source: int, max_target: int) -> dict:
    """Prompt, target, EOS in one sequence; the loss sees only the target and EOS, never the prompt."""
    prompt = encode_prompt(tokenizer, template, source, max_source)
    # A prompt ending in a newline is followed by code as it is; a summary gets the space a word would have.
    lead = "" if template.endswith("\n") else " "
    output = tokenizer(lead + target, add_special_tokens=False)["input_ids"][: max_target - 1]
    output.append(tokenizer.eos_token_id)
    return {"input_ids": prompt + output, "attention_mask": [1] * (len(prompt) + len(output)), "labels": [-100] * len(prompt) + output}


class CausalLMCollator:
    """Right-padded prompt+target batches whose LM head runs only where a next token carries loss.

    The prompt is masked from the loss, so projecting its positions onto a 49k vocabulary is wasted
    work; the model gets those positions as logits_to_keep and the matching labels already shifted.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples])

        labels = padded("labels", -100)
        next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
        return {
            "input_ids": padded("input_ids", self.pad_token_id),
            "attention_mask": padded("attention_mask", 0),
            "logits_to_keep": keep,
            "labels": next_labels[:, keep],
            "shift_labels": next_labels[:, keep],  # already aligned: the loss must not shift again
        }


def _progress_callback(n_params: int):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One progress bar (steps, ETA, loss, tokens/s) in place of a dict per log line; the figures go to trainer_state too."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), state.num_input_tokens_seen)
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", mininterval=5)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            then, seen_before = self.last
            if logs is not None and now > then and seen > seen_before:
                tokens_per_s = (seen - seen_before) / (now - then)
                logs["tokens_per_second"] = round(tokens_per_s, 1)
                logs["train_flops_per_second"] = 6 * n_params * tokens_per_s
            self.last = (now, seen)
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=logs.get("tokens_per_second"), refresh=False)
            elif logs and "eval_loss" in logs:
                log.info("step %d: validation loss %.4f", state.global_step, logs["eval_loss"])

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


def final_train_loss(trainer, outcome) -> float:
    """The last logged training loss; a run shorter than logging_steps logged none, and its mean loss stands in."""
    return next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), outcome.training_loss)


def model_files(run_dir: str | Path) -> list[Path]:
    """The files from_pretrained needs (weights, config, tokenizer): not the run's records, not the adapter."""
    return sorted(
        p for p in Path(run_dir).iterdir() if p.is_file() and p.name not in RUN_RECORDS and not p.name.endswith(".tmp")
    )


def _move_into(src_dir: Path, dest_dir: Path) -> None:
    for item in src_dir.iterdir():
        target = dest_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    src_dir.rmdir()


def _write_record(path: Path, trained: TrainedModel) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(trained), indent=2))
    os.replace(tmp, path)


def _collator(cfg: Config, tokenizer, model, labelled: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    # Multiples of 8 fill a GPU's tensor cores; on a CPU they are only more padding.
    multiple = 8 if torch.cuda.is_available() else None
    if cfg.model.task is ModelTask.code_search:
        return PairCollator(tokenizer, multiple)
    if labelled:
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    if cfg.model.task is ModelTask.causal_lm:
        return CausalLMCollator(tokenizer.pad_token_id, multiple)
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=multiple)


def _probe(cfg: Config, collator, examples: list[dict]) -> dict[str, torch.Tensor]:
    """A few validation examples to compare merged and base+adapter outputs on: every position, the prompt's too."""
    batch = dict(collator(examples))
    if cfg.model.task is ModelTask.code_search:  # the encoder alone, on the code side
        batch = {"input_ids": batch["code_input_ids"], "attention_mask": batch["code_attention_mask"]}
    for key in ("labels", "shift_labels", "logits_to_keep"):
        batch.pop(key, None)
    return batch


def train_model(cfg: Config, data: PreparedData) -> TrainedModel:
    """Train (or resume, or skip if done) and export the model to the run directory.

    LoRA runs finish in two steps: the adapter and fitted.json are saved as soon as training ends,
    then merged into the export. A failed merge keeps both, and a re-run merges again without training.
    """
    run_dir = Path(cfg.training.output_dir) / run_name(cfg, data)
    record = run_dir / TRAINING_RECORD
    if record.exists():
        log.info("training already finished in %s; not redoing it", run_dir)
        return TrainedModel.load(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = base_weights(cfg.model)
    (run_dir / "config.yaml").write_text(f"# base weights: {json.dumps(weights)}\n" + to_yaml(cfg))
    shutil.copyfile(Path(data.directory) / "manifest.json", run_dir / "data_manifest.json")

    train_rows, validation_rows = data.load("train"), data.load("validation")
    labels = sorted({r["label"] for r in train_rows}) if cfg.model.task.labelled else None
    fitted = run_dir / FITTED_RECORD
    if cfg.peft.use_peft and fitted.exists():
        log.info("training finished earlier in %s; merging its adapter without training again", run_dir)
        trained = TrainedModel(**json.loads(fitted.read_text()))
    else:
        trained, model, tokenizer, state = _fit(cfg, run_dir, train_rows, validation_rows, labels, weights)
        staging = run_dir / (".adapter" if cfg.peft.use_peft else ".export")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)  # LoRA: the adapter alone; else the whole model, as safetensors
        tokenizer.save_pretrained(staging)
        state.save_to_json(str(staging / "trainer_state.json"))
        if cfg.peft.use_peft:  # kept whatever the merge does
            shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
            os.replace(staging, run_dir / ADAPTER_DIR)
            _write_record(fitted, trained)

    # Everything goes to a staging directory first; training.json, written last, marks the export complete.
    export = run_dir / ".export"
    if cfg.peft.use_peft:
        # The merge starts from what is on disk, not from the Trainer's model (whose forward the Trainer
        # wrapped in autocast): the export must equal what base + the saved adapter compute.
        from peft import PeftModel

        base, tokenizer = load_pretrained(cfg.model, labels)
        model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR)
        label2id = model.config.label2id if labels else None
        examples = tokenize(validation_rows[:4], tokenizer, cfg, label2id)
        probe = _probe(cfg, _collator(cfg, tokenizer, model, bool(labels)), examples)
        try:
            merged = merge_adapter(model, probe)
        except MergeError as exc:
            raise MergeError(
                f"{exc}. Nothing is lost: the adapter is in {run_dir / ADAPTER_DIR} and the training record in {fitted}; "
                "re-running merges again without training. If it fails again, report it with the run directory."
            ) from None
        shutil.rmtree(export, ignore_errors=True)
        export.mkdir()
        merged.save_pretrained(export)  # safetensors
        tokenizer.save_pretrained(export)
        shutil.copyfile(run_dir / ADAPTER_DIR / "trainer_state.json", export / "trainer_state.json")
    _move_into(export, run_dir)
    _write_record(record, trained)
    fitted.unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    return trained


def _fit(cfg: Config, run_dir: Path, train_rows: list[dict], validation_rows: list[dict], labels, weights: dict):
    """The Trainer run, resumed from the newest complete checkpoint: (record, trained model, tokenizer, trainer state)."""
    from transformers import PrinterCallback, ProgressCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    t = cfg.training
    set_seed(t.seed)
    texts = (r["code"] + "\n" + r.get("summary", "") for r in train_rows)
    model, tokenizer = load_model(cfg.model, texts, t.seed, labels)
    label2id = model.config.label2id if labels else None
    base_model = model
    if cfg.peft.use_peft:
        model = add_lora(model, cfg.peft)
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    searching = cfg.model.task is ModelTask.code_search
    bf16, fp16 = resolve_precision(cfg)
    if t.gradient_checkpointing:  # here, not by the Trainer: a code-search encoder reaches it inside its BiEncoder
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpoints = run_dir / CHECKPOINTS
    args = Seq2SeqTrainingArguments(
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
        use_cpu=not torch.cuda.is_available(),  # the Trainer takes bf16 on a CPU only when told it is one
        tf32=True if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else None,
        # A code-search batch is its own negatives: batches of look-alike code would be a different, harder task.
        train_sampling_strategy="group_by_length" if t.group_by_length and not searching else "random",
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
        dataloader_pin_memory=torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # the tracking stage logs the curve from trainer_state, once, even across resumes
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=BiEncoder(model) if searching else model,
        args=args,
        train_dataset=tokenize(train_rows, tokenizer, cfg, label2id),
        eval_dataset=tokenize(validation_rows, tokenizer, cfg, label2id),
        data_collator=_collator(cfg, tokenizer, base_model, bool(labels)),
        processing_class=tokenizer,
        callbacks=[_progress_callback(trainable if cfg.peft.use_peft else total)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    checkpoint = last_complete_checkpoint(checkpoints)
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("resuming from %s (step %d)", checkpoint, resumed_from)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    validation_loss = trainer.evaluate()["eval_loss"]
    log.info("trained %d steps in %.0f s: train loss %.4f, validation loss %.4f",
             trainer.state.global_step, train_seconds, final_train_loss(trainer, outcome), validation_loss)
    trained = TrainedModel(
        run_dir=str(run_dir),
        global_step=trainer.state.global_step,
        train_loss=final_train_loss(trainer, outcome),
        validation_loss=validation_loss,
        resumed_from_step=resumed_from,
        used_peft=cfg.peft.use_peft,
        trainable_parameters=trainable,
        total_parameters=total,
        train_seconds=round(train_seconds, 2),
        base_weights=weights,
    )
    return trained, model, tokenizer, trainer.state
