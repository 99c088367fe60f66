"""Credentials as Prefect blocks: flow-run containers read them from Prefect, never from plain-text job variables.

`codetune deploy-flows` saves what the deployer's environment holds; runs name the blocks in their config
(`registry.s3.block=codetune-models`, `registry.huggingface.token_block=codetune-hf-token`).
"""

from __future__ import annotations

from typing import Mapping

S3_BLOCK = "codetune-models"
HF_TOKEN_BLOCK = "codetune-hf-token"
# The bucket docker/compose.yaml creates for models.
COMPOSE_MODEL_BUCKET = "models"


def save_credential_blocks(env: Mapping[str, str], s3_endpoint: str | None) -> list[str]:
    """Save the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, for s3_endpoint as flow-run containers
    reach it; None: AWS) and HF_TOKEN as blocks, overwriting earlier ones; returns the names saved."""
    saved = []
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

        credentials = AwsCredentials(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
        )
        S3Bucket(bucket_name=COMPOSE_MODEL_BUCKET, credentials=credentials).save(S3_BLOCK, overwrite=True)
        saved.append(S3_BLOCK)
    if env.get("HF_TOKEN"):
        from prefect.blocks.system import Secret

        Secret(value=env["HF_TOKEN"]).save(HF_TOKEN_BLOCK, overwrite=True)
        saved.append(HF_TOKEN_BLOCK)
    return saved
