"""The `deploy` flow: register and publish a run directory that was already trained and evaluated."""

from __future__ import annotations

from typing import Optional

from prefect import flow

from codetune.core.config.loader import load_config
from codetune.core.evaluation import EvalReport
from codetune.core.families import family_of
from codetune.core.training import TrainedModel
from flows.finetune import release
from tasks.data import load_data


@flow(name="deploy", log_prints=True)
def deploy(model_path: str, config: Optional[str] = None, overrides: Optional[list[str]] = None) -> dict:
    """Track, register and publish model_path without retraining.

    Args:
        model_path: a run directory written by `codetune run` (runs/<run name>).
        config: the YAML file it was trained with; its registry section says where to publish.
        overrides: dot-list settings, e.g. ["registry.s3.bucket=models"].
    """
    cfg = load_config(config, overrides or [])
    trained, report = TrainedModel.load(model_path), EvalReport.load(model_path)
    return release(cfg, load_data(cfg, family_of(cfg.model)), trained, report)
