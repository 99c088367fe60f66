import logging
import time
from functools import partial

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from transformers import TrainerCallback

from codetune.core.config import Config
from codetune.core.data import PreparedData
from codetune.core.families import Family
from codetune.core.training import TrainedModel, train_model
from codetune.lifecycle.sweep import TrialRef, pruning_callback
from codetune.lifecycle.tracking import LiveMetrics, use_tracking_server
from tasks.retry import stage_task

log = logging.getLogger(__name__)
UPDATE_SECONDS = 10.0
"""How often the training progress artifact is updated: often enough to watch, rarely enough for the API."""


class PrefectProgress(TrainerCallback):
    """Training's progress in the Prefect UI: a progress artifact (steps done of the total, the time left at the
    rate so far) updated while the train task runs. An API that does not answer costs the artifact, not the run."""

    def __init__(self):
        self.artifact, self.updated, self.started = None, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started = (time.monotonic(), state.global_step)
            self.artifact = self._report(partial(create_progress_artifact, key="training"), state)

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.updated >= UPDATE_SECONDS or state.global_step == state.max_steps
        if self.artifact and due:
            self._report(partial(update_progress_artifact, self.artifact), state)
            self.updated = time.monotonic()

    def _report(self, write, state):
        try:
            return write(progress=100 * state.global_step / state.max_steps, description=self._describe(state))
        except Exception as exc:
            log.warning("the training progress artifact was not written: %s", exc)

    def _describe(self, state) -> str:
        began, first = self.started
        done = state.global_step - first
        text = f"step {state.global_step} of {state.max_steps}"
        if done and state.global_step < state.max_steps:
            left = (time.monotonic() - began) / done * (state.max_steps - state.global_step)
            text += f", about {left / 60:.0f} min left"
        return text


# A retry calls train_model again, which resumes from the newest complete checkpoint
# (or returns at once if the export finished), so no finished step is trained twice.
@stage_task("train", retry_delays=[10, 60])
def train(
    cfg: Config, family: Family, data: PreparedData, trial: TrialRef | None = None, mlflow_run_id: str | None = None
) -> TrainedModel:
    """pipeline.train; trial: a sweep's trial, told each validation loss, whose pruner may stop training
    (TrainingStopped); mlflow_run_id: the open MLflow run the training metrics go to as they happen."""
    callbacks = [PrefectProgress(), *([pruning_callback(trial)] if trial else [])]
    if mlflow_run_id:
        callbacks.append(LiveMetrics(use_tracking_server(cfg.mlflow.tracking_uri), mlflow_run_id))
    return train_model(cfg, data, family, callbacks)
