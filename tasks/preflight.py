"""The pre-flight task: the core's checks, and the publishing destinations' credentials."""

import logging
import uuid

from prefect import task

from codetune.config import Config, HubConfig, S3Config
from codetune.errors import is_transient
from codetune.preflight import fail_on
from codetune.preflight import preflight as core_problems
from codetune.publishing import NO_S3_CREDENTIALS, bound_hub_requests, known_s3_error, visibility_problem
from tasks.publish import hub_token, s3_client

log = logging.getLogger(__name__)


def s3_problems(cfg: S3Config) -> list[str]:
    """The bucket exists and these credentials may write to it: a small object is written under the prefix, then
    deleted."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    client = s3_client(cfg)
    key = f"{cfg.prefix.strip('/')}/.codetune-preflight-{uuid.uuid4().hex}"
    try:
        client.head_bucket(Bucket=cfg.bucket)
        client.put_object(Bucket=cfg.bucket, Key=key, Body=b"")
        client.delete_object(Bucket=cfg.bucket, Key=key)
    except NoCredentialsError:
        return [NO_S3_CREDENTIALS]
    except (ClientError, BotoCoreError) as exc:
        if is_transient(exc):  # S3 is there but struggling: publishing has its own retries
            log.warning("could not probe s3://%s (%s); publishing will retry", cfg.bucket, exc)
            return []
        known = known_s3_error(exc, cfg.bucket)
        return [str(known or f"cannot write to s3://{cfg.bucket}/{cfg.prefix}: {exc}")]
    return []


def hub_problems(cfg: HubConfig) -> list[str]:
    """The token is accepted and may write, and an existing repo has the configured visibility."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    bound_hub_requests()
    api = HfApi(endpoint=cfg.endpoint, token=hub_token(cfg.token_block))
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
        private = api.repo_info(cfg.repo_id).private
    except RepositoryNotFoundError:
        return []  # created on the first push
    return [p for p in [visibility_problem(cfg.repo_id, private, cfg.private)] if p]


def publishing_problems(cfg: Config) -> list[str]:
    """Where a real run would publish, whether it can: checked before the hours of training, not after."""
    registry = cfg.registry
    if registry.dry_run or not cfg.mlflow.enabled:
        return []
    return (s3_problems(registry.s3) if registry.s3.bucket else []) + (
        hub_problems(registry.huggingface) if registry.huggingface.repo_id else []
    )


# Not retried: what it finds (a typo, a missing model, a refused credential) is there on the next try too.
@task(name="preflight")
def preflight(cfg: Config) -> None:
    """The run's pre-flight check, the flow's first task: every problem before data, training or uploads."""
    fail_on(core_problems(cfg) + publishing_problems(cfg))
