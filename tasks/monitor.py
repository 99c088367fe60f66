from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from codetune.core.config import Config
from codetune.core.data.prepare import read_source
from codetune.core.families import family_of
from codetune.core.sandbox import unconfined_execution
from codetune.lifecycle.monitoring import DriftReport, compare, plot, quality_check, read_served_inputs, served_checks
from codetune.lifecycle.registry import Champion, find_champion, score_registered
from codetune.lifecycle.tracking import log_monitor_run
from tasks.retry import stage_task


@stage_task("champion", retry_delays=[5, 20, 60])
def champion(cfg: Config) -> Champion:
    return find_champion(cfg)


# Not retried: the same source and champion fail the same way again.
@task(name="drift")
def measure_drift(cfg: Config, champion: Champion) -> tuple[DriftReport, Path]:
    """Every check of the source against the champion's training data; the report and plot written to disk."""
    source = cfg.data.path or "the stdlib"
    family = family_of(cfg.model)
    current = read_source(cfg.data, family.examples)
    checks, seen, fresh = compare(champion.profile, current, cfg.monitor)
    m = cfg.monitor
    with unconfined_execution(cfg.evaluation.allow_unconfined_execution):
        quality, examples = quality_check(
            champion.metric,
            champion.test_value,
            fresh[: m.quality_examples],
            lambda rows: score_registered(champion.model_uri, rows),
            m.max_quality_drop,
        )
    checks.append(quality)
    if m.served_inputs:
        checks += served_checks(champion.profile, read_served_inputs(m.served_inputs), m)
    name = f"{champion.model_name} v{champion.version}"
    reference = len(champion.profile["code_hashes"])
    report = DriftReport(source, name, reference, len(current), len(fresh), checks, examples)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    directory = Path(cfg.training.output_dir) / "monitor" / f"{champion.model_name}-v{champion.version}-{stamp}"
    directory.mkdir(parents=True)
    (directory / "report.md").write_text(report.to_markdown())
    return report, plot(seen, f"{source} against the training data of {name}", directory / "drift.png")


@stage_task("record-drift", retry_delays=[5, 20, 60])
def record(cfg: Config, champion: Champion, report: DriftReport, figure: Path) -> str:
    """The report as a Prefect artifact and an MLflow run (with the plot); returns the MLflow run id."""
    tags = {
        "codetune.monitor": champion.model_name,
        "codetune.champion_version": champion.version,
        "codetune.drifted": ", ".join(report.drifted) or "none",
    }
    files = [figure, figure.with_name("report.md")]
    run_id = log_monitor_run(cfg, f"monitor-{champion.model_name}-v{champion.version}", report.metrics(), tags, files)
    create_markdown_artifact(
        f"{report.to_markdown()}\nPlot: `{figure}`, and `monitor/drift.png` in MLflow run `{run_id}`.\n",
        key="drift-report",
        description=report.champion,
    )
    return run_id
