"""Where a registered model is published: one class per destination, each turned on by its section of the config.

A destination says whether a config publishes to it, what it would upload (the dry run's plan), whether its
credentials work (the pre-flight, before hours of training), how to publish (the publish task), and which of a
deployer's credentials it keeps as a Prefect block (`codetune deploy-flows`). The uploads themselves are in
publishing.py; credentials come from the Prefect blocks a config names (prefect_aws's S3Bucket, a Secret), else from
the environment.

Adding a destination: its upload code in publishing.py (or a module of its own), a class here with its line in
DESTINATIONS, and its section of the schema (registry.<name> in codetune/core/config/schema.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from codetune.core.config import Config, PublishedWeights, S3Config
from codetune.core.errors import is_transient
from codetune.core.evaluation import EvalReport
from codetune.lifecycle.publishing import (
    NO_S3_CREDENTIALS,
    bound_hub_requests,
    known_s3_error,
    model_card,
    model_metadata,
    publish_files,
    publish_to_s3,
    push_to_hub,
    s3_prefix,
    visibility_problem,
)
from codetune.lifecycle.registry import Registration

log = logging.getLogger(__name__)

S3_BLOCK = "codetune-models"
HF_TOKEN_BLOCK = "codetune-hf-token"
COMPOSE_MODEL_BUCKET = "models"
"""The bucket docker/compose.yaml creates for models."""


@dataclass
class Release:
    """What is published: a registered version, its files, its scores and where it came from."""

    run_dir: Path
    report: EvalReport
    registration: Registration
    lineage: dict
    base_weights: dict


class Destination(Protocol):
    name: str
    """The key of its location in the publish task's result."""

    def enabled(self, cfg: Config) -> bool: ...

    def plan(self, cfg: Config, run_dir: Path) -> str:
        """One line of the dry run's plan: where it would upload which files."""

    def probe(self, cfg: Config) -> list[str]:
        """What would make publishing fail (credentials, bucket, visibility), each with its fix."""

    def publish(self, cfg: Config, release: Release) -> str:
        """Upload, sending nothing already there unchanged; returns where it went."""

    def save_credentials(self, env: Mapping[str, str]) -> str | None:
        """Keep the credentials env holds for it as a Prefect block; returns the block's name (None: none held)."""


def data_description(cfg: Config) -> str:
    return f"{cfg.data.source.value} {cfg.data.path or '(the Python standard library)'}"


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


class S3:
    """Model files, metadata.json and optionally a tar.gz under s3://bucket/prefix/<model>/<version>/ (registry.s3)."""

    name = "s3"

    def enabled(self, cfg: Config) -> bool:
        return bool(cfg.registry.s3.bucket)

    def plan(self, cfg: Config, run_dir: Path) -> str:
        s3 = cfg.registry.s3
        names = [n for _, n in publish_files(run_dir, PublishedWeights.merged, cfg.registry.gguf)] + ["metadata.json"]
        names += ["model.tar.gz", "model.tar.gz.sha256"] if s3.archive else []
        return f"- upload to s3://{s3.bucket}/{s3_prefix(cfg, '<version>')}/: {', '.join(names)}"

    def probe(self, cfg: Config) -> list[str]:
        """The bucket exists and these credentials may write to it: a small object is written under the prefix, then
        deleted."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        s3 = cfg.registry.s3
        client = s3_client(s3)
        key = f"{s3.prefix.strip('/')}/.codetune-preflight-{uuid.uuid4().hex}"
        try:
            client.head_bucket(Bucket=s3.bucket)
            client.put_object(Bucket=s3.bucket, Key=key, Body=b"")
            client.delete_object(Bucket=s3.bucket, Key=key)
        except NoCredentialsError:
            return [NO_S3_CREDENTIALS]
        except (ClientError, BotoCoreError) as exc:
            if is_transient(exc):  # S3 is there but struggling: publishing has its own retries
                log.warning("could not probe s3://%s (%s); publishing will retry", s3.bucket, exc)
                return []
            known = known_s3_error(exc, s3.bucket)
            return [str(known or f"cannot write to s3://{s3.bucket}/{s3.prefix}: {exc}")]
        return []

    def publish(self, cfg: Config, release: Release) -> str:
        s3, version = cfg.registry.s3, release.registration.version
        metadata = model_metadata(cfg, release.report.metrics, release.lineage, version)
        with tempfile.TemporaryDirectory() as workdir:
            publish_to_s3(s3_client(s3), cfg, release.run_dir, metadata, version, Path(workdir))
        return f"s3://{s3.bucket}/{s3_prefix(cfg, version)}/"

    def save_credentials(self, env: Mapping[str, str]) -> str | None:
        """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, for the endpoint AWS_ENDPOINT_URL_S3 (unset: AWS)."""
        if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
            return None
        from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

        credentials = AwsCredentials(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_client_parameters=AwsClientParameters(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or None),
        )
        S3Bucket(bucket_name=COMPOSE_MODEL_BUCKET, credentials=credentials).save(S3_BLOCK, overwrite=True)
        return S3_BLOCK


class Hub:
    """The chosen weights and the model card, one commit to a Hugging Face Hub repo (registry.huggingface)."""

    name = "huggingface"

    def enabled(self, cfg: Config) -> bool:
        return bool(cfg.registry.huggingface.repo_id)

    def plan(self, cfg: Config, run_dir: Path) -> str:
        hub = cfg.registry.huggingface
        names = [n for _, n in publish_files(run_dir, hub.weights, cfg.registry.gguf)] + ["README.md"]
        return f"- push to the Hub repo {hub.repo_id} ({'private' if hub.private else 'public'}): {', '.join(names)}"

    def probe(self, cfg: Config) -> list[str]:
        """The token is accepted and may write, and an existing repo has the configured visibility."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        hub = cfg.registry.huggingface
        bound_hub_requests()
        api = HfApi(endpoint=hub.endpoint, token=hub_token(hub.token_block))
        try:
            role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
        except Exception as exc:
            if is_transient(exc) or not isinstance(exc, HfHubHTTPError):
                log.warning("could not reach the Hugging Face Hub (%s); publishing will retry", exc)
                return []
            return ["the Hugging Face Hub refused the token: set HF_TOKEN, or registry.huggingface.token_block"]
        if role == "read":
            return ["the Hugging Face token is read-only: registry.huggingface.repo_id needs a token with write access"]
        try:
            private = api.repo_info(hub.repo_id).private
        except RepositoryNotFoundError:
            return []  # created on the first push
        return [p for p in [visibility_problem(hub.repo_id, private, hub.private)] if p]

    def publish(self, cfg: Config, release: Release) -> str:
        hub, registration = cfg.registry.huggingface, release.registration
        return push_to_hub(
            hub.repo_id,
            hub_token(hub.token_block),
            hub.private,
            publish_files(release.run_dir, hub.weights, cfg.registry.gguf),
            model_card(cfg, release.report, data_description(cfg), release.base_weights),
            f"{registration.model_name} v{registration.version} ({registration.alias})",
            hub.endpoint,
            registration.hub_branch,
        )

    def save_credentials(self, env: Mapping[str, str]) -> str | None:
        """HF_TOKEN."""
        if not env.get("HF_TOKEN"):
            return None
        from prefect.blocks.system import Secret

        Secret(value=env["HF_TOKEN"]).save(HF_TOKEN_BLOCK, overwrite=True)
        return HF_TOKEN_BLOCK


DESTINATIONS: tuple[Destination, ...] = (S3(), Hub())
