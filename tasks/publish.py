import os
import tempfile
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from codetune.config import Config, HubWeights, S3Config
from codetune.evaluation import EvalReport
from codetune.publishing import model_card, model_metadata, publish_files, publish_to_s3, push_to_hub, s3_prefix
from codetune.registry import Registration
from codetune.training import TrainedModel
from tasks.retry import stage_task


def s3_client(cfg: S3Config):
    """From the named S3Bucket block's AwsCredentials, else from the AWS environment; 5xx and throttling are retried
    with back-off."""
    from botocore.config import Config as BotoConfig

    # Bounded: a wrong endpoint fails within a minute instead of hanging on the default 60 s reads x 6 attempts.
    retries = BotoConfig(retries={"mode": "standard", "max_attempts": 6}, connect_timeout=5, read_timeout=30)
    if cfg.block:
        from prefect_aws import S3Bucket

        credentials = S3Bucket.load(cfg.block).credentials
        session = credentials.get_boto3_session()
        params = credentials.aws_client_parameters.get_params_override()
        params["config"] = retries.merge(params["config"]) if params.get("config") else retries
        if cfg.endpoint_url:
            params["endpoint_url"] = cfg.endpoint_url
        return session.client("s3", **params)
    import boto3

    return boto3.client("s3", endpoint_url=cfg.endpoint_url, config=retries)


def hub_token(block: str | None) -> str | None:
    if block:
        from prefect.blocks.system import Secret

        return Secret.load(block).get()
    return os.environ.get("HF_TOKEN")


def data_description(cfg: Config) -> str:
    return f"{cfg.data.source.value} {cfg.data.path or '(the Python standard library)'}"


def publication_plan(cfg: Config, trained: TrainedModel) -> str:
    """What a real run would register and upload (registry.dry_run=true)."""
    run_dir = Path(trained.run_dir)
    s3, hub = cfg.registry.s3, cfg.registry.huggingface
    lines = [f"- register `{run_dir}` as a new version of `{cfg.registry.model_name}` in MLflow"]
    if s3.bucket:
        names = [n for _, n in publish_files(run_dir, HubWeights.merged)] + ["metadata.json"]
        names += ["model.tar.gz", "model.tar.gz.sha256"] if s3.archive else []
        lines.append(f"- upload to s3://{s3.bucket}/{s3_prefix(cfg, '<version>')}/: {', '.join(names)}")
    if hub.repo_id:
        names = [n for _, n in publish_files(run_dir, hub.weights)] + ["README.md"]
        lines.append(
            f"- push to the Hub repo {hub.repo_id} ({'private' if hub.private else 'public'}): {', '.join(names)}"
        )
    return "\n".join(lines)


@stage_task("publish", retry_delays=[10, 30, 90])
def publish(
    cfg: Config, trained: TrainedModel, report: EvalReport, registration: Registration, lineage: dict
) -> dict[str, str]:
    """Upload to S3 and/or the Hub as configured; returns {destination: location}. Re-running re-sends nothing
    unchanged."""
    run_dir = Path(trained.run_dir)
    locations: dict[str, str] = {}
    s3, hub = cfg.registry.s3, cfg.registry.huggingface
    if s3.bucket:
        metadata = model_metadata(cfg, report.metrics, lineage, registration.version)
        with tempfile.TemporaryDirectory() as workdir:
            publish_to_s3(s3_client(s3), cfg, run_dir, metadata, registration.version, Path(workdir))
        locations["s3"] = f"s3://{s3.bucket}/{s3_prefix(cfg, registration.version)}/"
    if hub.repo_id:
        card = model_card(cfg, report, data_description(cfg), trained.base_weights)
        message = f"{registration.model_name} v{registration.version} ({registration.alias})"
        locations["huggingface"] = push_to_hub(
            hub.repo_id,
            hub_token(hub.token_block),
            hub.private,
            publish_files(run_dir, hub.weights),
            card,
            message,
            hub.endpoint,
            registration.hub_branch,
        )
    if locations:
        create_markdown_artifact("\n".join(f"- {k}: {v}" for k, v in locations.items()), key="published")
    return locations
