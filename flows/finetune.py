"""The `finetune` flow: data -> train -> evaluate -> track -> register -> publish.

Run it with `codetune run`, or as the deployment finetune/main.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Union

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from codetune.core.config import Config
from codetune.core.config.loader import load_config
from codetune.core.pipeline import Stages, run_pipeline
from codetune.core.training import TrainingStopped
from tasks.data import load_data
from tasks.evaluate import evaluate
from tasks.preflight import preflight
from tasks.publish import publication_plan, publish
from tasks.register import register
from tasks.track import end_tracking, lineage, open_tracking, track, track_pruned
from tasks.train import train

# The most changed settings get their own typed fields in the Prefect UI form; each maps to its
# schema key, and tests/unit/test_deployments.py checks names and types against the schema.
FORM_FIELDS = {
    "model_name": "model.name",
    "num_train_epochs": "training.num_train_epochs",
    "learning_rate": "training.learning_rate",
    "use_lora": "peft.use_peft",
    "lora_r": "peft.r",
}


# Not retried as a whole: each task retries its own transient failures, and what is left fails the
# same way again. A flow run retried by hand (the UI, `prefect flow-run retry`) gets the persisted
# results of the tasks that finished; the others find their partial work on disk and go on from it.
@flow(name="finetune", log_prints=True)
def finetune(
    config: Union[str, Config, None] = None,
    overrides: Optional[list[str]] = None,
    model_name: Optional[str] = None,
    num_train_epochs: Optional[float] = None,
    learning_rate: Optional[float] = None,
    use_lora: Optional[bool] = None,
    lora_r: Optional[int] = None,
    trial: Optional[dict] = None,
) -> dict:
    """Fine-tune, evaluate, track, register and publish a code model: a summariser, code writer, completion or chat
    model, classifier or code-search encoder, per model.task and model.direction.

    Args:
        config: YAML file in configs/; empty runs the embedded offline default. `codetune run` hands in the config
            it has read and validated already, so it is read once.
        overrides: dot-list settings, e.g. ["training.num_train_epochs=3", "peft.use_peft=true"].
        model_name: Hub id or local directory of the model (model.name); empty keeps the config's.
        num_train_epochs: passes over the train split (training.num_train_epochs).
        learning_rate: peak learning rate (training.learning_rate).
        use_lora: train LoRA adapters instead of all weights (peft.use_peft).
        lora_r: LoRA rank (peft.r).
        trial: set by the sweep flow: the Optuna trial this run is (TrialRef's fields) and the sweep's MLflow run.
            The run reports its validation losses and result to the study and is tracked, not registered.
    """
    form = {
        "model_name": model_name,
        "num_train_epochs": num_train_epochs,
        "learning_rate": learning_rate,
        "use_lora": use_lora,
        "lora_r": lora_r,
    }
    form_overrides = [f"{FORM_FIELDS[k]}={v}" for k, v in form.items() if v is not None]
    if isinstance(config, Config):
        if overrides or form_overrides:
            raise ValueError("a Config is handed in resolved: apply overrides before, not beside it")
        cfg = config
    else:
        cfg = load_config(config, [*(overrides or []), *form_overrides])
    preflight(cfg)
    timeout = cfg.training.timeout_minutes
    train_task = train.with_options(timeout_seconds=timeout * 60 if timeout else None)
    if trial:
        return train_trial(cfg, train_task, trial)
    tracked = cfg.mlflow.enabled and not cfg.registry.dry_run
    opened: list[str] = []

    def train_tracked(cfg: Config, family, data):
        """Training with its MLflow run open, so that the run shows its curve as it is drawn."""
        opened.append(open_tracking(cfg, data, lineage(cfg, data)))
        return train_task(cfg, family, data, mlflow_run_id=opened[0])

    try:
        stages = Stages(prepare=load_data, train=train_tracked if tracked else train_task, evaluate=evaluate)
        outcome = run_pipeline(cfg, stages)
        return release(cfg, outcome.data, outcome.trained, outcome.report)
    except BaseException as exc:
        if opened:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            end_tracking(cfg, opened[0], status, f"{type(exc).__name__}: {exc}", return_state=True)
        raise


def train_trial(cfg, train_task, trial: dict) -> dict:
    """A sweep's trial: train (pruned or not), evaluate, track under the sweep's MLflow run, tell the study."""
    from codetune.lifecycle.sweep import TrialRef, tell_study

    ref = TrialRef(**{k: trial[k] for k in ("storage", "study_name", "number", "pruning")})
    try:
        outcome = run_pipeline(cfg, Stages(prepare=load_data, train=partial(train_task, trial=ref), evaluate=evaluate))
    except TrainingStopped as exc:
        tell_study(ref, pruned=True)
        if cfg.mlflow.enabled:
            track_pruned(cfg, ref.number, str(exc), {"mlflow.parentRunId": trial["parent_run_id"]})
        return {"trial": ref.number, "pruned": str(exc)}
    data, trained, report = outcome.data, outcome.trained, outcome.report
    summary = {"trial": ref.number, "run_dir": trained.run_dir, "metrics": report.metrics}
    tags = {"mlflow.parentRunId": trial["parent_run_id"], "codetune.sweep": ref.study_name}
    if cfg.mlflow.enabled:
        summary["mlflow_run_id"] = track(cfg, trained, report, {**lineage(cfg, data), **tags})
    value = trained.validation_loss if trial["metric"] == "validation_loss" else report.metrics[trial["metric"]]
    tell_study(ref, value=value, attrs={"run_dir": trained.run_dir, "mlflow_run_id": summary.get("mlflow_run_id")})
    return summary


def release(cfg, data, trained, report) -> dict:
    """Track, register and publish a trained, evaluated run (shared with `codetune deploy`)."""
    origin = lineage(cfg, data)
    summary = {"run_dir": trained.run_dir, "metrics": report.metrics, "baseline": report.baseline}
    if report.untuned:
        summary["untuned"] = report.untuned
    if report.warnings:
        summary["warnings"] = report.warnings
    if cfg.registry.dry_run:
        summary["plan"] = publication_plan(cfg, trained)
        print(summary["plan"])
        create_markdown_artifact(
            f"Dry run; nothing registered or uploaded.\n\n{summary['plan']}", key="finetune-summary"
        )
        return summary
    if not cfg.mlflow.enabled:
        return summary
    summary["mlflow_run_id"] = track(cfg, trained, report, origin)
    summary.update(register_and_publish(cfg, data, trained, report, summary["mlflow_run_id"], origin))
    return summary


def register_and_publish(cfg, data, trained, report, mlflow_run_id: str, origin: dict) -> dict:
    """Register the tracked run's model (the champion gate decides its alias) and publish it."""
    registration = register(cfg, data, trained, report, mlflow_run_id, origin)
    published = publish(cfg, trained, report, registration, origin)
    links = (
        "\n".join(f"- {k}: {v}" for k, v in published.items())
        or "- not published (no registry.s3.bucket or registry.huggingface.repo_id)"
    )
    create_markdown_artifact(
        f"- MLflow run: `{mlflow_run_id}`\n"
        f"- model version: `{registration.model_uri}` → **{registration.alias}** ({registration.reason})\n{links}\n\n"
        f"{report.to_markdown()}",
        key="finetune-summary",
    )
    registered = {"model": registration.model_name, "version": registration.version}
    return {
        "registration": {**registered, "alias": registration.alias, "reason": registration.reason},
        "published": published,
    }
