"""Hyperparameter sweeps: the search space in YAML, Optuna's study in an RDB, each trial a finetune run.

A sweep file names the finetune config every trial starts from and, by their config keys, the
settings to search. Optuna (imported only here, and only when a sweep runs) keeps the study in
its RDB storage, so a killed sweep started again continues the same study; the trials report
their validation loss to it, so its pruner can stop hopeless ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from codetune.core.config import SCHEMA_KEYS
from codetune.core.config.loader import load_config, unknown_key_message
from codetune.core.errors import ConfigError

if typing.TYPE_CHECKING:
    import optuna


class StudyDirection(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


class Pruner(str, Enum):
    median = "median"
    none = "none"


@dataclass
class Parameter:
    """One searched setting: `choices`, or a `low`..`high` range (integers for an integer setting)."""

    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    """Sample the range on a log scale (learning rates)."""
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


@dataclass
class SweepConfig:
    config: Optional[str] = None
    """The finetune config every trial starts from; null: the embedded default."""
    overrides: list[str] = field(default_factory=list)
    """Settings every trial shares, as dot-list overrides of that config."""
    parameters: dict[str, Parameter] = field(default_factory=dict)
    """The searched settings, by config key (see `codetune keys`)."""
    metric: str = "validation_loss"
    """What the study optimises: validation_loss (what pruning watches too) or an evaluation metric."""
    direction: StudyDirection = StudyDirection.minimize
    trials: int = 8
    """Completed or pruned trials the sweep runs to; failed ones are retried and do not count."""
    parallelism: int = 1
    """Trials at once: on a work pool, one per worker; locally, on this machine's cores."""
    storage: str = "sqlite:///optuna.db"
    """Optuna's RDB storage; the team stack's Postgres for sweeps on several workers."""
    storage_block: Optional[str] = None
    """A Prefect Secret block holding the storage URL, used in place of storage: a URL with a password in it then
    never travels as a flow parameter, where the Prefect UI and database show it (`codetune deploy-flows` saves
    OPTUNA_STORAGE as the block codetune-optuna-storage)."""
    study_name: Optional[str] = None
    """null: the sweep file's name."""
    pruner: Pruner = Pruner.median
    """median: stop a trial whose validation loss is worse than the median of earlier trials at the same step."""
    seed: int = 0
    """The sampler's seed: the same sweep file proposes the same trials."""


def _parameter_errors(key: str, spec: Any) -> list[str]:
    if key not in SCHEMA_KEYS:
        return [unknown_key_message(key, "sweep parameters")]
    if not isinstance(spec, dict):
        return [f"parameters.{key} must be a mapping: {{low: .., high: ..}} or {{choices: [..]}}"]
    unknown = set(spec) - {f.name for f in dataclasses.fields(Parameter)}
    if unknown:
        return [f"parameters.{key}: unknown field(s) {sorted(unknown)}; use low, high, log, step or choices"]
    ranged = spec.get("low") is not None and spec.get("high") is not None
    if bool(spec.get("choices")) == ranged:
        return [f"parameters.{key}: give either choices: [..] or both low and high"]
    if ranged and not spec["low"] < spec["high"]:
        return [f"parameters.{key}: low ({spec['low']}) must be below high ({spec['high']})"]
    return []


def load_sweep(path: str | Path, overrides: typing.Sequence[str] = ()) -> SweepConfig:
    """The sweep file, validated: its keys, each parameter's config key (with "did you mean"), and the base config
    with a trial's worth of values applied."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(str(p) for p in Path("configs/sweeps").glob("*.yaml"))) or "none found here"
        raise ConfigError(f"sweep file '{path}' not found (shipped sweeps: {shipped})")
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping (config:, parameters:, trials:, ...)")
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    errors = [f"unknown key '{k}' in {path}; sweep keys: {', '.join(sorted(fields))}" for k in raw if k not in fields]
    for key, spec in (raw.get("parameters") or {}).items():
        errors += _parameter_errors(key, spec)
    if errors:
        raise ConfigError("; ".join(errors))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw, OmegaConf.from_dotlist(list(overrides)))
        sweep = OmegaConf.to_object(merged)
    except Exception as exc:  # OmegaConf's validation errors: the key and the expected type
        raise ConfigError(f"{path}: {getattr(exc, 'full_key', '')}: {str(exc).splitlines()[0]}") from None
    if sweep.trials < 1 or sweep.parallelism < 1:
        raise ConfigError(f"{path}: trials and parallelism must be at least 1")
    if not sweep.parameters:
        raise ConfigError(f"{path}: parameters is empty; name at least one config key to search")
    sweep.study_name = sweep.study_name or path.stem
    shared = [k for k in sweep.parameters if k.startswith("data.")]
    if shared:
        raise ConfigError(f"{path}: {shared} cannot be searched: every trial is scored on the same data splits")
    base = load_config(sweep.config, sweep.overrides)
    if sweep.pruner is Pruner.median and not base.training.eval_steps:
        raise ConfigError(
            f"{path}: pruning compares validation losses during training; set training.eval_steps in overrides, "
            "or pruner: none"
        )
    # Every bound must make a valid finetune config, so a typo fails here and not in trial 5.
    for bound in ("low", "high"):
        load_config(sweep.config, sweep.overrides + _fixed_overrides(sweep, bound))
    return sweep


def _fixed_overrides(sweep: SweepConfig, bound: str) -> list[str]:
    values = {k: (p.choices[0] if p.choices else getattr(p, bound)) for k, p in sweep.parameters.items()}
    return [f"{k}={_as_setting(k, v)}" for k, v in values.items()]


def _is_int_key(key: str) -> bool:
    annotation = SCHEMA_KEYS[key]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation) is int


def _as_setting(key: str, value: Any) -> Any:
    return int(value) if _is_int_key(key) and isinstance(value, float) and value.is_integer() else value


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> list[str]:
    """The trial's values, as overrides of the sweep's base config."""
    overrides = []
    for key, p in sweep.parameters.items():
        if p.choices:
            value = trial.suggest_categorical(key, p.choices)
        elif _is_int_key(key):
            value = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            value = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
        overrides.append(f"{key}={value}")
    return overrides


def open_study(sweep: SweepConfig) -> optuna.Study:
    """The sweep's study in its storage: created on the first run, continued on every later one."""
    import optuna

    # No pruner here: the trials decide whether to stop (pruning_callback), this side only asks and tells.
    study = optuna.create_study(
        study_name=sweep.study_name,
        storage=storage_url(sweep.storage, sweep.storage_block),
        direction=sweep.direction.value,
        load_if_exists=True,
    )
    # Seeded by the trials so far: a resumed sweep reseeded alike would propose its first trials again.
    study.sampler = optuna.samplers.TPESampler(seed=sweep.seed + len(study.trials))
    return study


STORAGE_BLOCK = "codetune-optuna-storage"


def storage_url(storage: str, block: str | None) -> str:
    """The study's storage URL: from the Secret block where one is named."""
    if block:
        from prefect.blocks.system import Secret

        return Secret.load(block).get()
    return storage


def save_storage_block(env: typing.Mapping[str, str]) -> str | None:
    """OPTUNA_STORAGE as the Secret block a sweep file names in storage_block (`codetune deploy-flows`)."""
    if not env.get("OPTUNA_STORAGE"):
        return None
    from prefect.blocks.system import Secret

    Secret(value=env["OPTUNA_STORAGE"]).save(STORAGE_BLOCK, overwrite=True)
    return STORAGE_BLOCK


@dataclass(frozen=True)
class TrialRef:
    """Which study and trial a finetune run is: it reports its validation losses there."""

    storage: str
    study_name: str
    number: int
    pruning: bool
    storage_block: Optional[str] = None


def _trial_in_storage(ref: TrialRef, pruner=None):
    """(study, storage, trial id) of the trial ref names, through Optuna's public storage API."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url(ref.storage, ref.storage_block))
    study = optuna.load_study(study_name=ref.study_name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(ref.study_name)
    return study, storage, storage.get_trial_id_from_study_id_trial_number(study_id, ref.number)


def pruning_callback(ref: TrialRef):
    """A TrainerCallback reporting each validation loss to the trial, stopping training when the pruner says so
    (train_model then raises TrainingStopped)."""
    import optuna
    from transformers import TrainerCallback

    from codetune.core.training import StoppingCallback

    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if ref.pruning else optuna.pruners.NopPruner()
    study, _, trial_id = _trial_in_storage(ref, pruner)
    trial = optuna.Trial(study, trial_id)
    # The pruner ranks intermediate values in the study's direction: a study maximising BLEU is told -loss,
    # or it would stop the trials whose loss is lowest.
    sign = -1.0 if study.direction is optuna.study.StudyDirection.MAXIMIZE else 1.0

    class ReportToStudy(TrainerCallback, StoppingCallback):
        reason = f"trial {ref.number} pruned"

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                trial.report(sign * metrics["eval_loss"], state.global_step)
                if trial.should_prune():
                    self.stopped_at = state.global_step
                    control.should_training_stop = True

    return ReportToStudy()


def tell_study(ref: TrialRef, value: float | None = None, pruned: bool = False, attrs: dict | None = None) -> None:
    """Record a trial's outcome in the study: its value, or that it was pruned."""
    import optuna

    study, storage, trial_id = _trial_in_storage(ref)
    for key, attr in (attrs or {}).items():
        storage.set_trial_user_attr(trial_id, key, attr)
    if pruned:
        study.tell(ref.number, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(ref.number, value)
