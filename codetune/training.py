"""The training stage: the Trainer with LoRA or full fine-tuning, resumable checkpoints, and a merged export.

A run's directory is named from what determines its weights (model, PEFT and training settings,
data fingerprint), so a retried or re-run training finds its own checkpoints and finished work.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.config import Config, content_hash, to_yaml
from codetune.data import PreparedData
from codetune.errors import ModelError, TrainingProcessLost
from codetune.families import Family, InferenceSettings, family_of
from codetune.model import (
    MergeError,
    add_lora,
    base_weights,
    count_parameters,
    load_model,
    load_pretrained,
    merge_adapter,
)
from codetune.rundir import (
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
    write_atomic,
)
from codetune.sweep import TrialRef

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
    """Which pretrained weights training started from (base_weights in codetune.model)."""
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


# Settings that change how a run is watched or stored, never its weights: left out of its key, so
# raising a timeout after a timed-out run resumes that run instead of starting another.
NOT_IN_RUN_KEY = (
    "output_dir",
    "run_name",
    "logging_steps",
    "dataloader_num_workers",
    "save_total_limit",
    "timeout_minutes",
)


def run_key(cfg: Config, data: PreparedData) -> str:
    """Hash of everything that determines the trained weights: model, LoRA and training settings, data."""
    training = {k: v for k, v in dataclasses.asdict(cfg.training).items() if k not in NOT_IN_RUN_KEY}
    model, peft = dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.peft)
    return content_hash({"model": model, "peft": peft, "training": training, "data": data.fingerprint})


def run_name(cfg: Config, data: PreparedData) -> str:
    if cfg.training.run_name:
        return cfg.training.run_name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name.rsplit("/", 1)[-1]).strip("-").lower()
    return f"{slug}-{run_key(cfg, data)[:10]}"


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete."""
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((path / TRAINER_STATE).read_text())
            found.append((int(path.name.split("-")[1]), path))
        except (OSError, ValueError):
            log.warning("ignoring incomplete checkpoint %s", path)
    return max(found)[1] if found else None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it. A oneDNN held to
    AVX2 (ONEDNN_MAX_CPU_ISA) computes bf16 in reference kernels, far slower than fp32 (docs/cpu-speed.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
    """Training examples for the config's family: token ids and labels, cut to the configured lengths."""
    return family_of(cfg.model).tokenize(rows, tokenizer, InferenceSettings.of(cfg), label2id)


# Steps timed before the run says how long training will take.
ESTIMATE_AFTER_STEPS = 5


def _progress_callback(n_params: int, tokens_per_step: float):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One progress bar (steps, ETA, loss, tokens/s) in place of a dict per log line; the figures go to
        trainer_state too."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), state.num_input_tokens_seen)
            self.started = (time.perf_counter(), state.global_step)
            self.tokens_before = state.num_input_tokens_seen
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step", mininterval=5
            )

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)
            started, first_step = self.started
            steps_left = state.max_steps - state.global_step
            if state.global_step - first_step == ESTIMATE_AFTER_STEPS and steps_left and state.num_input_tokens_seen:
                # By tokens, not steps: batches grouped by length start with the longest, so the first steps
                # carry up to twice the average step's tokens.
                per_token = (time.perf_counter() - started) / (state.num_input_tokens_seen - self.tokens_before)
                log.info(
                    "training: about %.0f more minutes on this machine (%d steps of ~%.0f tokens at %.0f tokens/s, "
                    "measured over the first %d steps)",
                    per_token * tokens_per_step * steps_left / 60,
                    steps_left,
                    tokens_per_step,
                    1 / per_token,
                    ESTIMATE_AFTER_STEPS,
                )

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


def _collator(family: Family, tokenizer, model):
    # Multiples of 8 fill a GPU's tensor cores; on a CPU they are only more padding.
    return family.collator(tokenizer, model, 8 if torch.cuda.is_available() else None)


def train_model(cfg: Config, data: PreparedData, trial: TrialRef | None = None) -> TrainedModel:
    """Train (or resume, or skip if done) and export the model to the run directory.

    LoRA runs finish in two steps: the adapter and fitted.json are saved as soon as training ends,
    then merged into the export. A failed merge keeps both, and a re-run merges again without training.
    trial: a sweep's trial, told each validation loss; if its pruner stops training, TrialPruned is raised
    and nothing is exported.
    """
    run = RunDir(Path(cfg.training.output_dir) / run_name(cfg, data))
    run.claim(run_key(cfg, data))
    with run.lock():
        if run.trained:
            log.info("training already finished in %s; not redoing it", run)
            return TrainedModel.load(run.path)
        if processes(cfg) > 1 and not launched():
            launch_processes(cfg, data, run)
            return TrainedModel.load(run.path)
        return train_locked(cfg, data, run, trial)


def processes(cfg: Config) -> int:
    return cfg.training.num_processes or max(torch.cuda.device_count(), 1)


def launched() -> bool:
    """Whether this is one of the processes torch.distributed.run started."""
    return "LOCAL_RANK" in os.environ


def rank_zero() -> bool:
    """The process that writes: checkpoints (the Trainer's rule), the adapter, the export and the records."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_processes(cfg: Config, data: PreparedData, run: RunDir) -> None:
    """Train in processes(cfg) processes with torch.distributed.run, their output in this process's log.

    The launcher runs inside the caller (the train task keeps its retries and timeout); the processes
    train the run directory this caller has claimed and locked. One that dies fails them all, and
    TrainingProcessLost tells the task to try again, resuming from the newest complete checkpoint.
    """
    n = processes(cfg)
    settings = run / ".launch-config.yaml"
    write_atomic(settings, to_yaml(cfg))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    command += ["-m", "codetune.distributed", str(settings), data.directory, str(run.path)]
    log.info("training in %d processes (%s)", n, "nccl" if torch.cuda.is_available() else "gloo")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as launcher:
        for line in launcher.stdout:
            log.info("%s", line.rstrip())
    if launcher.returncode != 0:
        raise TrainingProcessLost(
            f"a training process failed (torch.distributed.run exited with {launcher.returncode}; its output is above)"
            f"; checkpoints are kept in {run / CHECKPOINTS} and the next try resumes from the newest"
        )


def train_locked(cfg: Config, data: PreparedData, run: RunDir, trial: TrialRef | None = None) -> TrainedModel:
    """Fit (or take the adapter an earlier attempt fitted), export, and mark the run trained."""
    weights = base_weights(cfg.model)
    if rank_zero():
        run.write(CONFIG_FILE, f"# base weights: {json.dumps(weights)}\n" + to_yaml(cfg))
        shutil.copyfile(Path(data.directory) / "manifest.json", run / DATA_MANIFEST)
        shutil.copyfile(data.profile_path, run / DATA_PROFILE)

    family = family_of(cfg.model)
    train_rows, validation_rows = data.load("train"), data.load("validation")
    labels = sorted({r["label"] for r in train_rows}) if cfg.model.task.labelled else None
    if cfg.peft.use_peft and run.fitted:
        log.info("training finished earlier in %s; merging its adapter without training again", run)
        trained = TrainedModel(**run.read_json(FITTED_RECORD))
    else:
        fit = _fit_in_memory(cfg, family, run, train_rows, validation_rows, labels, weights, trial)
        trained, model, tokenizer, state = fit
        if not rank_zero():
            return trained
        # LoRA: the adapter alone, kept whatever the merge does; else the whole model, the export itself.
        staged = run.staging(ADAPTER_DIR if cfg.peft.use_peft else EXPORT)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        state.save_to_json(str(staged / TRAINER_STATE))
        if cfg.peft.use_peft:
            run.install(staged, ADAPTER_DIR)
            run.write_json(FITTED_RECORD, dataclasses.asdict(trained))
    if cfg.peft.use_peft:
        _export_merged(cfg, family, run, labels, validation_rows)
    # Everything went to a staging directory first; training.json, written last, marks the export complete.
    run.install_export()
    run.finish_training(dataclasses.asdict(trained))
    return trained


def _export_merged(cfg: Config, family: Family, run: RunDir, labels, validation_rows: list[dict]) -> None:
    """Stage base + the saved adapter, merged, as the export; checked to compute what they compute unmerged.

    The merge starts from what is on disk, not from the Trainer's model (whose forward the Trainer
    wrapped in autocast): the export must equal what base + the saved adapter compute.
    """
    from peft import PeftModel

    base, tokenizer = load_pretrained(cfg.model, labels)
    model = PeftModel.from_pretrained(base, run / ADAPTER_DIR)
    label2id = model.config.label2id if labels else None
    examples = family.tokenize(validation_rows[:4], tokenizer, InferenceSettings.of(cfg), label2id)
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


def _training_arguments(cfg: Config, family: Family, checkpoints: Path):
    """The Trainer's settings: one keyword per setting, in the config's order."""
    from transformers import Seq2SeqTrainingArguments

    t = cfg.training
    bf16, fp16 = resolve_precision(cfg)
    cuda = torch.cuda.is_available()
    return Seq2SeqTrainingArguments(
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


def _fit_in_memory(cfg: Config, *fit_args):
    """_fit; after a device out-of-memory, once more at half the micro-batch and twice the gradient accumulation.

    The effective batch, and so the optimisation, stays the same, and the retry resumes from the last checkpoint.
    """
    t = cfg.training
    try:
        return _fit(cfg, *fit_args)
    except torch.OutOfMemoryError:
        if t.per_device_train_batch_size % 2:
            raise ModelError(
                f"out of device memory at training.per_device_train_batch_size={t.per_device_train_batch_size}, "
                "which cannot be halved at the same effective batch; lower it and raise "
                "training.gradient_accumulation_steps to match (or set training.gradient_checkpointing=true). "
                "Checkpoints so far are kept and the next run resumes from them"
            ) from None
    halved = dataclasses.replace(
        t,
        per_device_train_batch_size=t.per_device_train_batch_size // 2,
        gradient_accumulation_steps=t.gradient_accumulation_steps * 2,
    )
    log.warning(
        "out of device memory at micro-batch %d: retrying once at micro-batch %d with gradient accumulation %d "
        "(the same effective batch of %d per device), resuming from the last checkpoint",
        t.per_device_train_batch_size,
        halved.per_device_train_batch_size,
        halved.gradient_accumulation_steps,
        t.per_device_train_batch_size * t.gradient_accumulation_steps,
    )
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        trained, *rest = _fit(dataclasses.replace(cfg, training=halved), *fit_args)
    except torch.OutOfMemoryError:
        raise ModelError(
            f"out of device memory at micro-batch {t.per_device_train_batch_size} and again at "
            f"{halved.per_device_train_batch_size}; set training.gradient_checkpointing=true, lower "
            "training.max_source_length, or use a smaller model. Checkpoints so far are kept"
        ) from None
    trained.micro_batch_size = halved.per_device_train_batch_size
    return (trained, *rest)


def _fit(
    cfg: Config,
    family: Family,
    run: RunDir,
    train_rows: list[dict],
    validation_rows: list[dict],
    labels,
    weights,
    trial: TrialRef | None,
):
    """The Trainer run, resumed from the newest complete checkpoint: (record, trained model, tokenizer, trainer
    state)."""
    from transformers import PrinterCallback, ProgressCallback, Seq2SeqTrainer, set_seed

    t = cfg.training
    texts = (r["code"] + "\n" + r.get("summary", "") for r in train_rows)
    model, tokenizer = load_model(cfg.model, texts, t.seed, labels)
    # Seeded after loading, right before the first random draw (LoRA's initial weights): a first load may convert
    # or download weights and draw on the global generator, which once gave the first run on a machine (a cold
    # weights cache) another model than every later run. A scratch model seeds its own initialisation.
    set_seed(t.seed)
    label2id = model.config.label2id if labels else None
    base_model = model
    if cfg.peft.use_peft:
        model = add_lora(model, cfg.peft)
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    log.info(
        "effective batch %d: %d per device x %d processes x %d accumulation",
        t.per_device_train_batch_size * world * t.gradient_accumulation_steps,
        t.per_device_train_batch_size,
        world,
        t.gradient_accumulation_steps,
    )
    if t.gradient_checkpointing:  # here, not by the Trainer: a code-search encoder reaches it inside its BiEncoder
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    settings = InferenceSettings.of(cfg)
    train_examples = family.tokenize(train_rows, tokenizer, settings, label2id)
    # Every token sequence of an example: a code-search pair holds two (query_input_ids, code_input_ids).
    token_lists = [ids for e in train_examples for key, ids in e.items() if key.endswith("input_ids")]
    mean_tokens = sum(map(len, token_lists)) / len(train_examples)
    trainer = Seq2SeqTrainer(
        model=family.trainable(model),
        args=_training_arguments(cfg, family, run / CHECKPOINTS),
        train_dataset=train_examples,
        eval_dataset=family.tokenize(validation_rows, tokenizer, settings, label2id),
        data_collator=_collator(family, tokenizer, base_model),
        processing_class=tokenizer,
        callbacks=[
            _progress_callback(
                trainable if cfg.peft.use_peft else total,
                mean_tokens * t.per_device_train_batch_size * world * t.gradient_accumulation_steps,
            )
        ],
    )
    if trial:
        from codetune.sweep import pruning_callback

        reporter = pruning_callback(trial)
        trainer.add_callback(reporter)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Under accumulation or across processes the Trainer counts the batch's items and trusts the model to divide.
    if (t.gradient_accumulation_steps > 1 or world > 1) and trainer.model_accepts_loss_kwargs:
        probe = trainer.data_collator(trainer.eval_dataset[:2])
        trainer.model_accepts_loss_kwargs = loss_honours_item_count(trainer.model, probe)
    checkpoint = last_complete_checkpoint(run / CHECKPOINTS)
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("resuming from %s (step %d)", checkpoint, resumed_from)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    if trial and reporter.pruned_at is not None:
        from codetune.sweep import TrialPruned

        raise TrialPruned(f"trial {trial.number} pruned at step {reporter.pruned_at}; its checkpoints stay in {run}")
    validation_loss = trainer.evaluate()["eval_loss"]
    train_loss = final_train_loss(trainer, outcome)
    log.info(
        "trained %d steps in %.0f s: train loss %.4f, validation loss %.4f",
        trainer.state.global_step,
        train_seconds,
        train_loss,
        validation_loss,
    )
    trained = TrainedModel(
        run_dir=str(run.path),
        global_step=trainer.state.global_step,
        train_loss=train_loss,
        validation_loss=validation_loss,
        resumed_from_step=resumed_from,
        used_peft=cfg.peft.use_peft,
        trainable_parameters=trainable,
        total_parameters=total,
        train_seconds=round(train_seconds, 2),
        base_weights=weights,
    )
    return trained, model, tokenizer, trainer.state
