"""The pipeline, written once: data -> train -> evaluate.

`codetune train` runs the stages as they are; the finetune flow hands in its Prefect tasks, which wrap the same
stages with retries and artifacts; bench/run.py times them one at a time. The family is resolved once, here, and
handed to each stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from codetune.core.config import Config
from codetune.core.data import PreparedData, prepare_data
from codetune.core.evaluation import EvalReport, evaluate_model
from codetune.core.families import Family, family_of
from codetune.core.training import TrainedModel, train_model


def prepare(cfg: Config, family: Family) -> PreparedData:
    """The data stage: the examples the family trains on, read, filtered, deduplicated and split (cached by content)."""
    return prepare_data(cfg.data, family.examples)


def train(cfg: Config, family: Family, data: PreparedData) -> TrainedModel:
    """The training stage: trained (or resumed, or found finished) and exported to the run directory."""
    return train_model(cfg, data, family)


def evaluate(cfg: Config, trained: TrainedModel, data: PreparedData) -> EvalReport:
    """The evaluation stage: the export scored on the test split beside the baselines."""
    return evaluate_model(trained.run_dir, data.load("test"), cfg)


@dataclass(frozen=True)
class Stages:
    """The function run for each stage: these, or the flow's tasks around them."""

    prepare: Callable[[Config, Family], PreparedData] = prepare
    train: Callable[[Config, Family, PreparedData], TrainedModel] = train
    evaluate: Callable[[Config, TrainedModel, PreparedData], EvalReport] = evaluate


@dataclass
class Outcome:
    family: Family
    data: PreparedData
    trained: TrainedModel
    report: EvalReport


def run_pipeline(cfg: Config, stages: Stages = Stages()) -> Outcome:
    """Every stage in order, for a validated config."""
    family = family_of(cfg.model)
    data = stages.prepare(cfg, family)
    trained = stages.train(cfg, family, data)
    return Outcome(family, data, trained, stages.evaluate(cfg, trained, data))
