"""Progress artifacts: how far training and evaluation are, in the Prefect UI while the task runs."""

import logging
import time
from typing import Optional

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from transformers import TrainerCallback

log = logging.getLogger(__name__)
UPDATE_SECONDS = 10.0
"""How often a progress artifact is updated: often enough to watch, rarely enough for the API."""


class ProgressArtifact:
    """A progress artifact under key, written at most every UPDATE_SECONDS and always at 100%. An API that does
    not answer costs the artifact, not the run."""

    def __init__(self, key: str):
        self.key, self.id, self.updated = key, None, float("-inf")

    def show(self, percent: float, description: str) -> None:
        now = time.monotonic()
        if now - self.updated < UPDATE_SECONDS and percent < 100:
            return
        self.updated = now
        try:
            if self.id is None:
                self.id = create_progress_artifact(percent, key=self.key, description=description)
            else:
                update_progress_artifact(self.id, percent, description=description)
        except Exception as exc:
            log.warning("the %s progress artifact was not written: %s", self.key, exc)


def time_left(seconds: Optional[float]) -> str:
    return f", about {seconds / 60:.0f} min left" if seconds else ""


class TrainingProgressArtifact(TrainerCallback):
    """Training's progress: steps done of the total, the time left at the rate so far."""

    def __init__(self):
        self.artifact, self.started = ProgressArtifact("training"), None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started = (time.monotonic(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.started:  # from the first step: a rate to estimate the time left from
            self._show(state)

    def _show(self, state) -> None:
        began, first = self.started
        done, left = state.global_step - first, None
        if done:
            left = (time.monotonic() - began) / done * (state.max_steps - state.global_step)
        description = f"step {state.global_step} of {state.max_steps}{time_left(left)}"
        self.artifact.show(100 * state.global_step / state.max_steps, description)


class EvaluationProgressArtifact:
    """Evaluation's progress, as the core reports it (codetune.core.progress.listening): each pass over the test
    examples or a benchmark's problems, items done of the total."""

    def __init__(self):
        self.artifact = ProgressArtifact("evaluation")

    def __call__(self, what: str, done: int, total: int, seconds_left: Optional[float]) -> None:
        self.artifact.show(100 * done / total, f"{what} {done} of {total}{time_left(seconds_left)}")
