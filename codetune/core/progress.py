"""What a run shows while it runs: training's progress bar, estimate of the time left and throughput in the logs;
evaluation's batches done, told to whoever listens (the Prefect task's progress artifact)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger(__name__)

ESTIMATE_AFTER_STEPS = 5
"""Steps timed before the run says how long training will take."""

Listener = Callable[[str, int, int, Optional[float]], None]
"""(what is being done, items done, items in all, seconds left at the rate so far)."""
_listener: ContextVar[Optional[Listener]] = ContextVar("progress_listener", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within the block, report() tells listener: the orchestration layer hears the core without the core
    importing it."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(what: str, done: int, total: int, seconds_left: Optional[float]) -> None:
    """A long loop's progress, told to the listener of this context, if any."""
    if listener := _listener.get():
        listener(what, done, total, seconds_left)


class TrainingProgress(TrainerCallback):
    """One progress bar (steps, ETA, loss, tokens/s) in place of a dict per log line; the figures go to
    trainer_state too.

    tokens_per_step: the mean tokens of an optimiser step, for the estimate of the time left.
    """

    def __init__(self, tokens_per_step: float):
        self.tokens_per_step = tokens_per_step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # for the FLOP rate
        self.last = (time.perf_counter(), state.num_input_tokens_seen)
        self.started = (time.perf_counter(), state.global_step)
        self.tokens_before = state.num_input_tokens_seen
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", mininterval=5)

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
                per_token * self.tokens_per_step * steps_left / 60,
                steps_left,
                self.tokens_per_step,
                1 / per_token,
                ESTIMATE_AFTER_STEPS,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        then, seen_before = self.last
        if logs is not None and now > then and seen > seen_before:
            tokens_per_s = (seen - seen_before) / (now - then)
            logs["tokens_per_second"] = round(tokens_per_s, 1)
            logs["train_flops_per_second"] = 6 * self.n_params * tokens_per_s
        self.last = (now, seen)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=logs.get("tokens_per_second"), refresh=False)
        elif logs and "eval_loss" in logs:
            log.info("step %d: validation loss %.4f", state.global_step, logs["eval_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
