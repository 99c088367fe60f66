from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from codetune.core.config import Config
from codetune.core.evaluation import EvalReport
from codetune.core.families import InferenceSettings
from codetune.core.gguf_export import export_gguf, gguf_path
from codetune.core.training import TrainedModel
from codetune.lifecycle.destinations import DESTINATIONS, Release
from codetune.lifecycle.registry import Registration
from tasks.retry import stage_task


def publication_plan(cfg: Config, trained: TrainedModel) -> str:
    """What a real run would register and upload (registry.dry_run=true)."""
    run_dir = Path(trained.run_dir)
    lines = [f"- register `{run_dir}` as a new version of `{cfg.registry.model_name}` in MLflow"]
    return "\n".join(lines + [d.plan(cfg, run_dir) for d in DESTINATIONS if d.enabled(cfg)])


@stage_task("publish", retry_delays=[10, 30, 90])
def publish(
    cfg: Config, trained: TrainedModel, report: EvalReport, registration: Registration, lineage: dict
) -> dict[str, str]:
    """Upload to every configured destination; returns {destination: location}. Re-running re-sends nothing
    unchanged."""
    release = Release(Path(trained.run_dir), report, registration, lineage, trained.base_weights)
    if cfg.registry.gguf and not gguf_path(release.run_dir, cfg.registry.gguf).exists():  # a retry reuses it
        settings = InferenceSettings.of(cfg)
        exported = export_gguf(
            release.run_dir, cfg.registry.gguf, settings.system_prompt, settings.generation.max_new_tokens
        )
        create_markdown_artifact(f"GGUF `{exported.path.name}`, loaded back: {exported.reload}", key="gguf")
    locations = {d.name: d.publish(cfg, release) for d in DESTINATIONS if d.enabled(cfg)}
    if locations:
        create_markdown_artifact("\n".join(f"- {k}: {v}" for k, v in locations.items()), key="published")
    return locations
