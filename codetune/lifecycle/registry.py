"""The registration stage: log the model as an MLflow pyfunc, register a version with its lineage, and gate promotion.

The alias `champion` moves to a new version only if it clears the configured thresholds and
beats the current champion on the same test split; otherwise the version becomes `challenger`
and the reason is recorded. mlflow is imported inside the functions (the core runs without it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import codetune
from codetune.core.config import Config
from codetune.core.errors import without_credentials
from codetune.core.families import InferenceSettings, family_of
from codetune.core.families.base import Scored
from codetune.core.rundir import DATA_PROFILE, RunDir
from codetune.core.sandbox import unconfined_execution
from codetune.core.weights import sha256_file
from codetune.lifecycle.tracking import TrackingError, use_tracking_server

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DIGEST_TAG = "codetune.model_sha256"
PROMOTION_TAG = "promotion"
UNDECIDED = "undecided"
SERVING_CODE = Path(__file__).with_name("serving.py")


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str
    """champion or challenger."""
    reason: str
    model_uri: str

    @property
    def hub_branch(self) -> str | None:
        """Where on the Hub repo this version goes: a champion to main (None), where from_pretrained("org/name")
        finds it; a challenger to its version's branch, there to compare, without replacing what the repo serves."""
        return None if self.alias == CHAMPION else f"v{self.version}"


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    # Explicit: the default inference imports torchvision, which the model does not need.
    return [
        f"{pkg}=={version(pkg)}"
        for pkg in (
            "torch",
            "transformers",
            "tokenizers",
            "safetensors",
            "omegaconf",
            "sacrebleu",
            "rouge-score",
            "mlflow",
        )
    ]


def log_pyfunc_model(cfg: Config, run_dir: Path) -> str:
    """Log the run's model (merged weights and tokenizer) into the active MLflow run; returns its model URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        for path in RunDir(run_dir).model_files():
            shutil.copy2(path, model_dir / path.name)
        settings = Path(tmp) / "inference.json"
        InferenceSettings.of(cfg).save(settings)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"model": str(model_dir), "settings": str(settings)},
            code_paths=[str(Path(codetune.__file__).parent)],
            pip_requirements=_pip_requirements(),
        )
    return info.model_uri


def _champion_score(cfg: Config, champion, test_split: str, test_rows: list[dict]) -> float:
    """The champion's gate metric on this test split (or benchmark): its recorded one if scored on the same, else
    re-scored now."""
    metric = family_of(cfg.model).gate_metric(cfg)
    recorded = champion.tags.get(f"metric.{metric}")
    benchmark = next((b for b in cfg.evaluation.benchmarks if metric.startswith(f"{b.value}_")), None)
    if recorded is not None and (benchmark or champion.tags.get("test_split") == test_split):
        return float(recorded)
    uri = f"models:/{cfg.registry.model_name}@{CHAMPION}"
    with unconfined_execution(cfg.evaluation.allow_unconfined_execution):
        if benchmark:
            log.info("champion v%s has no %s; solving %s with it", champion.version, metric, benchmark.value)
            return solve_registered(uri, cfg, benchmark)[metric]
        log.info("champion v%s was scored on another test split; scoring it on this one", champion.version)
        return score_registered(uri, test_rows).metrics[metric]


def download_registered(cfg: Config, model_uri: str, dest: Path) -> tuple[Path, InferenceSettings]:
    """A registered version's model folder (merged weights, tokenizer, template, generation config) and the
    inference settings it was registered with, downloaded under dest."""
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dest)))
    return local / "artifacts" / "model", InferenceSettings.load(local / "artifacts" / "inference.json")


def load_registered(cfg: Config, model_uri: str):
    """(model, tokenizer) of a registered version (models:/<name>@<alias>), as a consumer's pyfunc loads them."""
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return served.model, served.tokenizer


def score_registered(model_uri: str, rows: list[dict]) -> Scored:
    """A registered model scored on rows: loaded as a consumer loads it, then scored as evaluation scores (a
    code-search model ranks every query in chunks instead of scoring n x n pairs through predict())."""
    import mlflow

    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return served.family.score(served.model, served.tokenizer, rows, served.settings)


def solve_registered(model_uri: str, cfg: Config, benchmark) -> dict[str, float]:
    """A registered model's pass@k on a benchmark, solved as evaluation solves it."""
    import mlflow

    from codetune.core.evaluation import BenchmarkRun

    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    run = BenchmarkRun.prepare(cfg, benchmark, served.family.benchmark_mode)
    return run.solve(cfg, served.model, served.tokenizer)[0]


@dataclass
class Champion:
    """The version a registered model's champion alias points at, and what it was measured on."""

    model_name: str
    version: str
    run_id: str
    metric: str
    test_value: float
    """Its primary metric on its own test split."""
    profile: dict
    """Its training data's profile (codetune.core.data.profile)."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


def find_champion(cfg: Config) -> Champion:
    """cfg.registry.model_name's champion, with the profile of the data its run trained on."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = use_tracking_server(cfg.mlflow.tracking_uri)
    name = cfg.registry.model_name
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"cannot read the registry at {without_credentials(uri)}: {exc}") from exc
        raise TrackingError(
            f"registry.model_name='{name}' has no {CHAMPION} at {without_credentials(uri)}: there is no model to "
            "monitor yet; train and register one (codetune run), or point registry.model_name / mlflow.tracking_uri "
            "at the model to watch"
        ) from None
    try:
        profile = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{DATA_PROFILE}")
    except MlflowException as exc:
        raise TrackingError(
            f"{name} v{version.version} (run {version.run_id}) has no {DATA_PROFILE}: it was registered before "
            "codetune recorded its training data's profile; retrain it (codetune run) to monitor it"
        ) from exc
    # New pairs carry no benchmark: the monitor scores them by their own tests, else by the text metric.
    metric = family_of(cfg.model).gate_metric(cfg, benchmarks=False)
    test_value = float(version.tags[f"metric.{metric}"])
    return Champion(name, str(version.version), version.run_id, metric, test_value, profile)


def decide_alias(metric: str, value: float, min_score: float, champion_value: float | None) -> tuple[str, str]:
    """(alias, reason) for a new version whose primary metric is `value`."""
    if value < min_score:
        return CHALLENGER, f"{metric} {value:.2f} is below registry.min_score {min_score:.2f}"
    if champion_value is None:
        return CHAMPION, f"first version to pass the thresholds ({metric} {value:.2f})"
    if value > champion_value:
        return CHAMPION, f"{metric} {value:.2f} beats the champion's {champion_value:.2f} on the same test split"
    return CHALLENGER, f"{metric} {value:.2f} does not beat the champion's {champion_value:.2f} on the same test split"


def model_digest(run_dir: str | Path) -> str:
    """SHA-256 over the model's files (names and contents): the same model, the same digest."""
    digest = hashlib.sha256()
    for path in RunDir(run_dir).model_files():
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _registered_version(client, name: str, digest: str):
    """The version this model was registered as before (a retried task, a second `codetune deploy`), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_model(
    cfg: Config,
    run_dir: str | Path,
    mlflow_run_id: str,
    metrics: dict[str, float],
    test_rows: list[dict],
    test_split: str,
    lineage: dict[str, str],
    promotion_lock: AbstractContextManager | None = None,
) -> Registration:
    """Register the run's model as a version, once, and decide its alias.

    Registering the same model again returns the version (and decision) it got the first time.
    `promotion_lock` serialises the read-compare-move of the champion alias across concurrent
    runs (the flow passes a Prefect global concurrency slot), so two runs cannot both win.
    """
    import mlflow

    use_tracking_server(cfg.mlflow.tracking_uri)
    name = cfg.registry.model_name
    client = mlflow.MlflowClient()
    digest = model_digest(run_dir)
    registered = _registered_version(client, name, digest)
    if registered is None:
        with mlflow.start_run(run_id=mlflow_run_id):
            model_uri = log_pyfunc_model(cfg, Path(run_dir))
        tags = {
            **lineage,
            "test_split": test_split,
            DIGEST_TAG: digest,
            **{f"metric.{k}": str(v) for k, v in metrics.items()},
        }
        version = mlflow.register_model(model_uri, name, tags=tags).version
    else:
        version = registered.version
        if PROMOTION_TAG in registered.tags and not registered.tags[PROMOTION_TAG].startswith(UNDECIDED):
            alias, reason = registered.tags[PROMOTION_TAG].split(": ", 1)
            log.info("%s v%s is this model, registered before (%s: %s)", name, version, alias, reason)
            return Registration(name, str(version), alias, reason, f"models:/{name}/{version}")
    try:
        alias, reason = _promote(cfg, client, version, metrics, test_split, test_rows, promotion_lock)
    except Exception as exc:  # fail closed: the version keeps no alias, and says why
        with contextlib.suppress(Exception):
            client.set_model_version_tag(name, version, PROMOTION_TAG, f"{UNDECIDED}: {type(exc).__name__}: {exc}")
        raise
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"{alias}: {reason}")
    log.info("%s v%s -> %s: %s", name, version, alias, reason)
    return Registration(name, str(version), alias, reason, f"models:/{name}/{version}")


def _promote(cfg: Config, client, version: str, metrics, test_split: str, test_rows, promotion_lock) -> tuple[str, str]:
    """Compare the version with the champion and move the alias; any registry error propagates (no champion is
    assumed because the registry could not be read)."""
    name = cfg.registry.model_name
    with promotion_lock or contextlib.nullcontext():
        champion_version = client.get_registered_model(name).aliases.get(CHAMPION)
        champion = client.get_model_version(name, champion_version) if champion_version else None
        champion_value = _champion_score(cfg, champion, test_split, test_rows) if champion else None
        metric = family_of(cfg.model).gate_metric(cfg)
        alias, reason = decide_alias(metric, metrics[metric], cfg.registry.min_score, champion_value)
        client.set_registered_model_alias(name, alias, version)
    return alias, reason
