"""The `finetune` flow: data -> train -> evaluate -> track. Run it with `codetune run` or `python -m flows.finetune`."""

from __future__ import annotations

import sys
from typing import Optional

from prefect import flow

from codetune.config import load_config
from tasks.data import load_data
from tasks.evaluate import evaluate
from tasks.track import track
from tasks.train import train


# A flow retry re-enters every stage; each one finds its finished work on disk (cached splits,
# exported model, checkpoints) instead of redoing it.
@flow(name="finetune", retries=1, retry_delay_seconds=30)
def finetune(config: Optional[str] = None, overrides: Optional[list[str]] = None) -> dict:
    """Fine-tune, evaluate and track a code summarisation model.

    Args:
        config: YAML file in configs/; empty runs the embedded offline default.
        overrides: dot-list settings, e.g. ["training.num_train_epochs=3", "peft.use_peft=true"].
    """
    cfg = load_config(config, overrides or [])
    data = load_data(cfg.data)
    trained = train(cfg, data)
    report = evaluate(cfg, trained, data)
    mlflow_run_id = track(cfg, data, trained, report) if cfg.mlflow.enabled else None
    return {
        "run_dir": trained.run_dir,
        "global_step": trained.global_step,
        "metrics": report.metrics,
        "baseline": report.baseline,
        "mlflow_run_id": mlflow_run_id,
    }


if __name__ == "__main__":
    from codetune.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
