"""The `monitor` flow: has the code base drifted from the champion's training data? If so, an event asks for a retrain.

Run it with `codetune monitor`, or as the deployment monitor/main. finetune/main's trigger (prefect.yaml)
turns the event into a training run on the drifted source.
"""

from __future__ import annotations

from typing import Optional

from prefect import flow
from prefect.events import emit_event

from codetune.core.config.loader import load_config
from tasks.monitor import champion, measure_drift, record

DRIFT_EVENT = "codetune.drift.detected"


@flow(name="monitor", log_prints=True)
def monitor(
    config: Optional[str] = None, overrides: Optional[list[str]] = None, data_path: Optional[str] = None
) -> dict:
    """Compare a code source with the training data of a registered model's champion, and score the champion on the
    functions it never saw; emit codetune.drift.detected when a monitor.* threshold is crossed.

    Args:
        config: the finetune config of the watched model (its registry, MLflow and data settings); retraining runs it.
        overrides: dot-list settings, e.g. ["monitor.max_quality_drop=0.1"].
        data_path: the source to check (data.path); empty: the config's own.
    """
    overrides = [*(overrides or []), *([f"data.path={data_path}"] if data_path else [])]
    cfg = load_config(config, overrides)
    watched = champion(cfg)
    report, figure = measure_drift(cfg, watched)
    mlflow_run_id = record(cfg, watched, report, figure)
    print(report.to_markdown())
    summary = {
        "champion": report.champion,
        "drifted": report.drifted,
        "report": str(figure.parent),
        "mlflow_run_id": mlflow_run_id,
    }
    if report.drifted:
        event = emit_event(
            DRIFT_EVENT,
            resource={
                "prefect.resource.id": f"codetune.model.{watched.model_name}",
                "prefect.resource.name": watched.model_name,
            },
            payload={
                "config": config,
                "overrides": overrides,
                "drifted": report.drifted,
                "champion_version": watched.version,
                "monitor_run": mlflow_run_id,
            },
        )
        summary["event"] = str(event.id) if event else None
    return summary
