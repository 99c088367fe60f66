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
from codetune.model import add_lora, count_parameters, encode_prompt, load_model, merge_adapter

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"
CHECKPOINTS = "checkpoints"
# What a run directory holds besides the model: records of how it was made and scored.
RUN_RECORDS = frozenset(
    {TRAINING_RECORD, "trainer_state.json", "config.yaml", "data_manifest.json", "metrics.json", "examples.json", "predictions.jsonl"}
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


def resolve_precision(cfg: Config) -> tuple[bool, bool]:
    """(bf16, fp16) for this device: bf16 wherever the GPU has it unless turned off; fp32 on a CPU, with a warning if asked otherwise."""
    t = cfg.training
    if not torch.cuda.is_available():
        if t.bf16 or t.fp16:
            log.warning("training.%s=true needs a CUDA GPU; none found, training in fp32", "bf16" if t.bf16 else "fp16")
        return False, False
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


def _throughput_callback(n_params: int):
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        """Adds non-padding source tokens/s to each log line, as nanoGPT prints its MFU inputs."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            then, seen_before = self.last
            if logs is not None and now > then and seen > seen_before:
                tokens_per_s = (seen - seen_before) / (now - then)
                logs["tokens_per_second"] = round(tokens_per_s, 1)
                logs["train_flops_per_second"] = 6 * n_params * tokens_per_s
            self.last = (now, seen)

    return Throughput()


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


def train_model(cfg: Config, data: PreparedData) -> TrainedModel:
    """Train (or resume, or skip if done) and export the model to the run directory."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed


    run_dir = Path(cfg.training.output_dir) / run_name(cfg, data)
    record = run_dir / TRAINING_RECORD
    if record.exists():
        log.info("training already finished in %s; not redoing it", run_dir)
        return TrainedModel.load(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    shutil.copyfile(Path(data.directory) / "manifest.json", run_dir / "data_manifest.json")

    t = cfg.training
    set_seed(t.seed)
    train_rows, validation_rows = data.load("train"), data.load("validation")
    labels = sorted({r["label"] for r in train_rows}) if cfg.model.task.labelled else None
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
    checkpointing = cfg.peft.use_peft if t.gradient_checkpointing is None else t.gradient_checkpointing
    if checkpointing:  # here, not by the Trainer: a code-search encoder reaches it inside its BiEncoder
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
    # Multiples of 8 fill a GPU's tensor cores; on a CPU they are only more padding.
    multiple = 8 if torch.cuda.is_available() else None
    if searching:
        collator = PairCollator(tokenizer, multiple)
    elif labels:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, model=base_model, label_pad_token_id=-100, pad_to_multiple_of=multiple)
    trainer = Seq2SeqTrainer(
        model=BiEncoder(model) if searching else model,
        args=args,
        train_dataset=tokenize(train_rows, tokenizer, cfg, label2id),
        eval_dataset=tokenize(validation_rows, tokenizer, cfg, label2id),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_throughput_callback(trainable if cfg.peft.use_peft else total)],
    )
    checkpoint = last_complete_checkpoint(checkpoints)
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("resuming from %s (step %d)", checkpoint, resumed_from)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    validation_loss = trainer.evaluate()["eval_loss"]

    # Everything goes to a staging directory first; training.json, written last, marks the export complete.
    export = run_dir / ".export"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir()
    if cfg.peft.use_peft:
        model.save_pretrained(export / "adapter")
        tokenizer.save_pretrained(export / "adapter")
        probe = collator([trainer.eval_dataset[i] for i in range(min(4, len(trainer.eval_dataset)))])
        if searching:  # the encoder alone, on the code side
            probe = {"input_ids": probe["code_input_ids"], "attention_mask": probe["code_attention_mask"]}
        probe = {k: v.to(model.device) for k, v in probe.items()}
        model = merge_adapter(model, probe)
    model.save_pretrained(export)  # safetensors
    tokenizer.save_pretrained(export)
    trainer.state.save_to_json(str(export / "trainer_state.json"))
    _move_into(export, run_dir)
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
    )
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(trained), indent=2))
    os.replace(tmp, record)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return trained
