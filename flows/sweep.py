"""The `sweep` flow: Optuna proposes, `finetune` runs train and evaluate, the best trial goes through the registry.

Run it with `codetune sweep --config configs/sweeps/<file>.yaml`, or as the deployment sweep/main.
"""

from __future__ import annotations

from typing import Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment

from codetune.core.config.loader import load_config
from codetune.core.evaluation import EvalReport
from codetune.core.families import family_of
from codetune.core.training import TrainedModel
from codetune.lifecycle.sweep import Pruner, SweepConfig, load_sweep, open_study, suggest
from codetune.lifecycle.tracking import use_tracking_server
from flows.finetune import register_and_publish
from flows.finetune import trial as run_trial
from tasks.data import load_data
from tasks.track import lineage


@task(name="trial")
def launch_trial(spec: SweepConfig, number: int, overrides: list[str], parent_run_id: str, deployment: Optional[str]):
    """One trial as a finetune run: a subflow here, or a run of the finetune deployment on its work pool."""
    trial = {
        "storage": spec.storage,
        "storage_block": spec.storage_block,  # the block's name: the URL and its password stay in it
        "study_name": spec.study_name,
        "number": number,
        "pruning": spec.pruner is Pruner.median,
        "metric": spec.metric,
        "parent_run_id": parent_run_id,
    }
    # No run_name: a trial asked again after a crash has the same settings, so the same run directory, and resumes.
    trial_overrides = spec.overrides + overrides
    # The trial tells the study its outcome itself; the sweep reads it from there, whichever way the run went.
    if deployment:
        parameters = {"config": spec.config, "overrides": trial_overrides, "trial": trial}
        run_deployment(deployment, parameters=parameters, timeout=None)
    else:
        run_trial(config=spec.config, overrides=trial_overrides, trial=trial)


def _abandoned_to_retry(study) -> None:
    """Trials a killed sweep left running: marked failed, and their settings asked again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        _ask_again_once(study, trial, "the sweep was stopped")


def _parent_run(cfg, study_name: str) -> str:
    """The sweep's MLflow run, found again when the sweep is resumed."""
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment_name)
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment.experiment_id], f"tags.`codetune.sweep_parent` = '{study_name}'")
    if found:
        return found[0].info.run_id
    return client.create_run(
        experiment.experiment_id, run_name=f"sweep-{study_name}", tags={"codetune.sweep_parent": study_name}
    ).info.run_id


@flow(name="sweep", log_prints=True)
def sweep(sweep_config: str, overrides: Optional[list[str]] = None, deployment: Optional[str] = None) -> dict:
    """Search hyperparameters with Optuna: each trial a finetune run, the best one registered.

    Args:
        sweep_config: a file in configs/sweeps/.
        overrides: dot-list settings of the sweep file, e.g. ["trials=16", "parallelism=4"].
        deployment: run each trial as this deployment (e.g. "finetune/main") on its pool's workers;
            empty runs them here, as subflows.
    """
    from optuna.trial import TrialState

    spec = load_sweep(sweep_config, overrides or [])
    base = load_config(spec.config, spec.overrides)
    study = open_study(spec)
    _abandoned_to_retry(study)
    parent_run_id = _parent_run(base, spec.study_name) if base.mlflow.enabled else ""
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    while (done := len(study.get_trials(deepcopy=False, states=finished))) < spec.trials:
        trials = [study.ask() for _ in range(min(spec.parallelism, spec.trials - done))]
        futures = [launch_trial.submit(spec, t.number, suggest(t, spec), parent_run_id, deployment) for t in trials]
        for trial, future in zip(trials, futures):
            future.wait()
            if study.get_trials(deepcopy=False)[trial.number].state is TrialState.RUNNING:
                study.tell(trial.number, state=TrialState.FAIL)
                _ask_again_once(study, trial, future.state.name)
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if failed > spec.trials:
            raise RuntimeError(
                f"{failed} trials of sweep '{spec.study_name}' failed (more than its {spec.trials} trials): see their "
                "flow runs' logs; starting the sweep again continues the study"
            )
    return _conclude(spec, study, parent_run_id)


def _ask_again_once(study, trial, why: str) -> None:
    """A trial that ended without a result is asked again once: a lost worker passes, a setting that fails does not."""
    from optuna.trial import TrialState

    failures = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.params == trial.params]
    if len(failures) == 1:
        print(f"trial {trial.number} ended without a result ({why}); its settings are asked again")
        study.enqueue_trial(trial.params)
    else:
        print(f"trial {trial.number} failed again with the same settings ({why}); the sampler moves on")


def _conclude(spec: SweepConfig, study, parent_run_id: str) -> dict:
    """The trials table and plot, and the best trial through the registry gate."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    completed = [t for t in trials if t.state is TrialState.COMPLETE]
    best = study.best_trial
    rows = sorted(completed, key=lambda t: t.value, reverse=spec.direction.value == "maximize")
    table = "\n".join(
        f"| {t.number} | {t.value:.4f} | "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        + " |"
        for t in rows
    )
    pruned = [t.number for t in trials if t.state is TrialState.PRUNED]
    summary = {
        "study": spec.study_name,
        "trials": {t.number: t.state.name for t in trials},
        "best": {"number": best.number, spec.metric: best.value, "params": best.params},
    }
    cfg = load_config(spec.config, spec.overrides + [f"{k}={v}" for k, v in best.params.items()])
    if cfg.mlflow.enabled:
        _log_sweep(parent_run_id, study, spec)
        data = load_data(cfg, family_of(cfg.model))
        run_dir = best.user_attrs["run_dir"]
        trained, report = TrainedModel.load(run_dir), EvalReport.load(run_dir)
        summary.update(
            register_and_publish(cfg, data, trained, report, best.user_attrs["mlflow_run_id"], lineage(cfg, data))
        )
    create_markdown_artifact(
        f"**Sweep `{spec.study_name}`**: best trial {best.number}, {spec.metric} {best.value:.4f}"
        f" (MLflow run `{best.user_attrs.get('mlflow_run_id')}`, sweep run `{parent_run_id}`)\n\n"
        f"| trial | {spec.metric} | parameters |\n|---|---|---|\n{table}\n\n"
        f"Pruned: {pruned or 'none'}. The plot of {spec.metric} by trial is the sweep run's `sweep.png`.",
        key="sweep-summary",
    )
    return summary


def _log_sweep(parent_run_id: str, study, spec: SweepConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([t.number for t in completed], [t.value for t in completed], "o-")
    axes.set_xlabel("trial")
    axes.set_ylabel(spec.metric)
    axes.set_title(f"sweep {spec.study_name}")
    client = mlflow.MlflowClient()
    client.log_figure(parent_run_id, figure, "sweep.png")
    plt.close(figure)
    client.set_tag(parent_run_id, "sweep.trials", spec.trials)  # a tag: a resumed sweep may raise its budget
    client.log_metric(parent_run_id, f"best_{spec.metric}", study.best_value)
    client.set_terminated(parent_run_id)
