"""The `finetune` flow: data -> train -> evaluate -> track -> register -> publish.

Run it with `codetune run`, or as the deployment finetune/main.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field, PositiveFloat, PositiveInt

from codetune.core.config import Config
from codetune.core.config.loader import key_help, load_config
from codetune.core.pipeline import Stages, run_pipeline
from codetune.core.training import TrainingStopped
from codetune.lifecycle.tracking import run_link
from tasks.data import load_data
from tasks.evaluate import evaluate
from tasks.preflight import preflight
from tasks.publish import publication_plan, publish
from tasks.register import register
from tasks.track import end_tracking, lineage, open_tracking, track
from tasks.train import train

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))

# The most changed settings get their own typed fields in the Prefect UI form; each maps to its schema key, and
# tests/unit/test_deployments.py checks names and types against the schema. Each deployment fills them with its
# config's values (prefect.yaml), so the form opens showing what a run would use. A field left as the form opened
# follows the config picked (the deployment's value is another config's, where the user picked another); a changed
# one overrides it; an empty one keeps the config's.
FORM_FIELDS = {
    "model_name": "model.name",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.num_train_epochs",
    "learning_rate": "training.learning_rate",
    "use_lora": "peft.use_peft",
    "lora_r": "peft.r",
}
_HELP = key_help()


def _described(name: str) -> Any:
    """A form field's default (empty) and its description: the schema's docstring of the key it sets."""
    key = FORM_FIELDS[name]
    return Field(None, description=f"{_HELP[key]} Empty: the config's value. (`{key}`)")


DEFAULT_CONFIG = "configs/default.yaml"
"""The embedded default as a file (tests/unit/test_config.py keeps them equal)."""


def _config_path(config: str) -> Path | None:
    """config as given, or as named from the repository (a deployment's worker may start elsewhere); None (the
    embedded default) for the default's file where no configs/ folder came with the installed package."""
    for path in (Path(config), REPO / config):
        if path.is_file():
            return path
    return None if config == DEFAULT_CONFIG else Path(config)  # load_config names the missing file


def _opened_with() -> dict[str, Any]:
    """The form's values as it opened: the deployment's parameters, in a run of a deployment."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if deployment.id is None:
        return {}
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment.id).parameters


def _load(config: str, overrides: list[str], form: dict[str, Any]) -> Config:
    opened = _opened_with()
    form_overrides = [f"{FORM_FIELDS[k]}={v}" for k, v in form.items() if v is not None and v != opened.get(k)]
    return load_config(_config_path(config), [*overrides, *form_overrides])


# Not retried as a whole: each task retries its own transient failures, and what is left fails the
# same way again. A flow run retried by hand (the UI, `prefect flow-run retry`) gets the persisted
# results of the tasks that finished; the others find their partial work on disk and go on from it.
@flow(name="finetune", log_prints=True)
def finetune(
    config: str = Field(
        DEFAULT_CONFIG,
        description="The recipe: one of the shipped configs (the README's Configuration section says what each does).",
        json_schema_extra={"enum": SHIPPED_CONFIGS},
    ),
    model_name: Optional[str] = _described("model_name"),
    max_steps: Optional[int] = _described("max_steps"),
    num_train_epochs: Optional[PositiveFloat] = _described("num_train_epochs"),
    learning_rate: Optional[PositiveFloat] = _described("learning_rate"),
    use_lora: Optional[bool] = _described("use_lora"),
    lora_r: Optional[PositiveInt] = _described("lora_r"),
    overrides: list[str] = Field(
        [],  # never mutated: the flow reads it
        description='Any other setting, as key=value: e.g. "data.max_examples=2000"; `codetune keys` lists them.',
    ),
) -> dict:
    """Fine-tune, evaluate, track, register and publish a code model: a summariser, code writer, completion or chat
    model, classifier or code-search encoder, per model.task and model.direction."""
    form = {
        "model_name": model_name,
        "max_steps": max_steps,
        "num_train_epochs": num_train_epochs,
        "learning_rate": learning_rate,
        "use_lora": use_lora,
        "lora_r": lora_r,
    }
    cfg = _load(config, overrides, form)
    preflight(cfg)
    tracking = TrackedTraining(cfg, enabled=cfg.mlflow.enabled and not cfg.registry.dry_run)
    try:
        outcome = run_pipeline(cfg, Stages(prepare=load_data, train=tracking.train, evaluate=evaluate))
        return release(cfg, outcome.data, outcome.trained, outcome.report)
    except BaseException as exc:
        tracking.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
        raise


class TrackedTraining:
    """The train stage with its MLflow run opened first, so that the run shows its curve as it is drawn; ended
    FAILED or KILLED when the run does not get as far as tracking its results."""

    def __init__(self, cfg: Config, enabled: bool, trial=None, tags: dict[str, str] | None = None):
        self.cfg, self.enabled, self.trial, self.tags, self.run_id = cfg, enabled, trial, tags or {}, None
        timeout = cfg.training.timeout_minutes
        self.task = train.with_options(timeout_seconds=timeout * 60 if timeout else None)

    def train(self, cfg: Config, family, data):
        if self.enabled:
            self.run_id = open_tracking(cfg, data, {**lineage(cfg, data), **self.tags})
        return self.task(cfg, family, data, trial=self.trial, mlflow_run_id=self.run_id)

    def end(self, status: str, why: str, tags: dict[str, str] | None = None) -> None:
        if self.run_id:
            end_tracking(self.cfg, self.run_id, status, why, tags or {}, return_state=True)


@flow(name="finetune", log_prints=True)
def trial(config: str, overrides: list[str], trial: dict) -> dict:
    """One trial of a sweep (the sweep flow starts these, as the deployment finetune/trial or as subflows).

    Args:
        config: the sweep's finetune config.
        overrides: the sweep's overrides and this trial's values.
        trial: the Optuna trial this run is (TrialRef's fields; its storage as the sweep file names it, a Prefect
            Secret block where it holds a password) and the sweep's MLflow run.
    """
    from codetune.lifecycle.sweep import TrialRef, tell_study

    cfg = _load(config, overrides, {})
    preflight(cfg)
    ref = TrialRef(**{k: trial[k] for k in ("storage", "storage_block", "study_name", "number", "pruning")})
    tags = {"mlflow.parentRunId": trial["parent_run_id"], "codetune.sweep": ref.study_name}
    tracking = TrackedTraining(cfg, cfg.mlflow.enabled, ref, tags)
    try:
        outcome = run_pipeline(cfg, Stages(prepare=load_data, train=tracking.train, evaluate=evaluate))
    except TrainingStopped as exc:
        tell_study(ref, pruned=True)
        tracking.end("KILLED", str(exc), {"codetune.trial_state": "PRUNED"})
        return {"trial": ref.number, "pruned": str(exc)}
    except BaseException as exc:
        tracking.end("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    data, trained, report = outcome.data, outcome.trained, outcome.report
    summary = {"trial": ref.number, "run_dir": trained.run_dir, "metrics": report.metrics}
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
        f"- MLflow run: {run_link(mlflow_run_id)}\n"
        f"- model version: `{registration.model_uri}` → **{registration.alias}** ({registration.reason})\n{links}\n\n"
        f"{report.to_markdown()}",
        key="finetune-summary",
    )
    registered = {"model": registration.model_name, "version": registration.version}
    return {
        "registration": {**registered, "alias": registration.alias, "reason": registration.reason},
        "published": published,
    }
