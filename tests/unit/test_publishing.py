"""S3 uploads against moto's S3 server over real HTTP, and Hub pushes against a recording local endpoint."""

import dataclasses
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig

from codetune.core.config import PublishedWeights
from codetune.core.config.loader import load_config
from codetune.core.errors import ConfigError
from codetune.core.evaluation import EvalReport
from codetune.lifecycle.publishing import (
    PublishError,
    model_card,
    publish_files,
    publish_to_s3,
    push_to_hub,
    upload_to_s3,
)
from tests.conftest import TWIN
from tests.servers import FlakyProxy, RecordingHub


@pytest.fixture
def s3(moto_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with FlakyProxy(moto_url) as proxy:
        client = boto3.client(
            "s3", endpoint_url=proxy.url, config=BotoConfig(retries={"mode": "standard", "max_attempts": 6})
        )
        client.create_bucket(Bucket="models")
        yield client, proxy
        for obj in client.list_objects_v2(Bucket="models").get("Contents", []):
            client.delete_object(Bucket="models", Key=obj["Key"])
        client.delete_bucket(Bucket="models")


@pytest.fixture
def run_dir(tmp_path):
    """A run directory shaped like training's export (weights, config, tokenizer, records)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 12_000)  # 3 MB
    (d / "config.json").write_text('{"model_type": "t5"}')
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "metrics.json").write_text("{}")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    return d


def test_s3_upload_layout_metadata_checksums_and_archive(s3, run_dir, tmp_path):
    client, _ = s3
    cfg = load_config(TWIN, ["registry.s3.bucket=models", "registry.s3.archive=true", "registry.model_name=summ"])
    uploaded = publish_to_s3(client, cfg, run_dir, {"metrics": {"bleu4_smoothed": 9.1}}, "3", tmp_path)
    keys = {u.key for u in uploaded}
    prefix = "models/summ/3/"
    assert keys == {
        prefix + n
        for n in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "metadata.json",
            "model.tar.gz",
            "model.tar.gz.sha256",
        ]
    }
    body = client.get_object(Bucket="models", Key=prefix + "model.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    metadata = json.loads(client.get_object(Bucket="models", Key=prefix + "metadata.json")["Body"].read())
    assert metadata["metrics"]["bleu4_smoothed"] == 9.1
    archive = client.get_object(Bucket="models", Key=prefix + "model.tar.gz")["Body"].read()
    digest = client.get_object(Bucket="models", Key=prefix + "model.tar.gz.sha256")["Body"].read().decode().split()[0]
    assert hashlib.sha256(archive).hexdigest() == digest
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_s3_rerun_transfers_nothing(s3, run_dir, tmp_path):
    client, proxy = s3
    cfg = load_config(TWIN, ["registry.s3.bucket=models", "registry.s3.archive=true"])
    publish_to_s3(client, cfg, run_dir, {"v": 1}, "1", tmp_path)
    puts_before = sum(r.method == "PUT" for r in proxy.state.requests)
    again = publish_to_s3(client, cfg, run_dir, {"v": 1}, "1", tmp_path)
    assert not any(u.transferred for u in again)
    assert sum(r.method == "PUT" for r in proxy.state.requests) == puts_before


def test_s3_large_files_go_multipart_and_server_errors_are_retried(s3, run_dir):
    client, proxy = s3
    proxy.state.fail_next = 3  # the next three PUTs get 503
    uploaded = upload_to_s3(
        client, "models", "p", [(run_dir / "model.safetensors", "model.safetensors")], multipart_bytes=1024 * 1024
    )
    assert uploaded[0].transferred and proxy.state.fail_next == 0
    assert any("uploads" in r.path for r in proxy.state.requests if r.method == "POST")  # CreateMultipartUpload
    head = client.head_object(Bucket="models", Key="p/model.safetensors")
    assert head["ContentLength"] == (run_dir / "model.safetensors").stat().st_size


def test_s3_missing_bucket_is_a_clear_error(s3, run_dir):
    client, _ = s3
    with pytest.raises(PublishError, match="bucket 'nobucket' does not exist.*registry.s3.bucket"):
        upload_to_s3(client, "nobucket", "p", [(run_dir / "config.json", "config.json")])


def test_hub_push_creates_private_repo_and_one_commit_with_card(run_dir):
    cfg = load_config(TWIN, ["registry.huggingface.repo_id=org/summ"])
    report = EvalReport(
        metrics={"bleu4_smoothed": 9.1},
        baseline={"bleu4_smoothed": 4.2},
        baseline_name="function name split into words",
        num_examples=100,
        examples_per_second=1.0,
        examples=[],
        untuned={"bleu4_smoothed": 5.8},
    )
    card = model_card(cfg, report, "code_tree (stdlib)")
    with RecordingHub() as hub:
        files = publish_files(run_dir, PublishedWeights.merged)
        url = push_to_hub("org/summ", hub.state.valid_token, True, files, card, "v1", hub.url)
        create = next(r for r in hub.state.requests if r.path == "/api/repos/create")
        assert json.loads(create.body)["visibility"] == "private"
        [commit] = hub.state.commits
    assert url.endswith("/org/summ/commit/0123456789abcdef")
    files = {line["value"]["path"]: line["value"] for line in commit if line["key"] == "file"}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    import base64

    readme = base64.b64decode(files["README.md"]["content"]).decode()
    assert "model-index:" in readme and "value: 9.1" in readme and "license: apache-2.0" in readme
    assert "| bleu4_smoothed | 9.10 | 5.80 | 4.20 |" in readme and "Intended use and limitations" in readme


def test_the_model_card_states_the_run_s_warnings():
    """An unconfined evaluation (or a collapsed model) is said where a consumer of the model reads."""
    warning = "generated code ran unconfined: this machine offers neither Landlock nor root's namespaces"
    report = EvalReport({"bleu4_smoothed": 9.1}, {"bleu4_smoothed": 4.2}, "a baseline", 10, 1.0, [], warnings=[warning])
    card = model_card(load_config(TWIN), report, "code_tree (stdlib)")
    assert f"**Warning:** {warning}." in card
    assert "Warning" not in model_card(load_config(TWIN), dataclasses.replace(report, warnings=[]), "stdlib")


def test_hub_server_errors_are_retried(run_dir):
    with RecordingHub() as hub:
        hub.state.fail_next = 2
        url = push_to_hub(
            "org/summ", hub.state.valid_token, True, [(run_dir / "config.json", "config.json")], "card", "v1", hub.url
        )
        assert url and len(hub.state.commits) == 1
        assert [r.path for r in hub.state.requests[:3]] == ["/api/repos/create"] * 3


def test_a_stalled_hub_times_out_and_the_push_is_retried(run_dir, monkeypatch):
    import codetune.lifecycle.publishing

    monkeypatch.setattr(codetune.lifecycle.publishing, "HUB_TIMEOUT_S", 0.5)
    with RecordingHub() as hub:
        hub.state.stall_next, hub.state.stall_s = 1, 5.0
        started = time.perf_counter()
        push_to_hub(
            "org/summ", hub.state.valid_token, True, [(run_dir / "config.json", "config.json")], "card", "v1", hub.url
        )
        assert time.perf_counter() - started < 4.0  # the stalled answer was not awaited
        assert len(hub.state.commits) == 1


def test_hub_adapter_weights_push_only_the_adapter(run_dir):
    assert [n for _, n in publish_files(run_dir, PublishedWeights.adapter)] == ["adapter/adapter_model.safetensors"]
    assert len(publish_files(run_dir, PublishedWeights.both)) == 4


def test_hub_rejected_token_fails_at_once_naming_the_credential(run_dir):
    with RecordingHub() as hub:
        with pytest.raises(PublishError, match="refused the token.*HF_TOKEN"):
            push_to_hub("org/summ", "hf_wrong", True, [], "card", "v1", hub.url)
        assert len(hub.state.requests) == 1  # no retries on an auth error


def test_a_challenger_goes_to_its_version_branch_never_to_main(run_dir):
    from codetune.lifecycle.registry import CHALLENGER, CHAMPION, Registration

    champion = Registration("summ", "1", CHAMPION, "first version", "models:/summ/1")
    challenger = Registration("summ", "2", CHALLENGER, "lower than the champion", "models:/summ/2")
    with RecordingHub() as hub:
        files = [(run_dir / "config.json", "config.json")]
        for registration in (champion, challenger):
            branch, message = registration.hub_branch, f"summ v{registration.version}"
            push_to_hub("org/summ", hub.state.valid_token, True, files, "card", message, hub.url, branch)
        assert hub.state.revisions == ["main", "v2"] and hub.state.branches == {"v2"}


def test_a_hub_repo_whose_visibility_differs_is_refused(run_dir):
    with RecordingHub() as hub:
        hub.state.repos["org/summ"] = False  # created public earlier, by hand or by another tool
        with pytest.raises(PublishError, match="'org/summ' is public, but registry.huggingface.private=true"):
            push_to_hub("org/summ", hub.state.valid_token, True, [], "card", "v1", hub.url)
        assert hub.state.commits == []


def test_a_gguf_export_is_published_beside_the_weights(s3, run_dir, tmp_path):
    """registry.gguf: the publish task's GGUF and Modelfile go under gguf/ wherever the weights go."""
    client, _ = s3
    (run_dir / "gguf").mkdir()
    (run_dir / "gguf" / "run-q8_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    (run_dir / "gguf" / "Modelfile").write_text("FROM ./run-q8_0.gguf\n")
    causal = str(Path(TWIN).with_name("tiny-causal-lm.yaml"))
    cfg = load_config(causal, ["registry.s3.bucket=models", "registry.model_name=coder", "registry.gguf=q8_0"])
    keys = {u.key for u in publish_to_s3(client, cfg, run_dir, {}, "1", tmp_path)}
    assert {"models/coder/1/gguf/run-q8_0.gguf", "models/coder/1/gguf/Modelfile"} <= keys
    names = [name for _, name in publish_files(run_dir, PublishedWeights.adapter, cfg.registry.gguf)]
    assert names == ["adapter/adapter_model.safetensors", "gguf/run-q8_0.gguf", "gguf/Modelfile"]  # the Hub's


def test_a_gguf_of_a_model_without_a_decoder_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="registry.gguf publishes a GGUF of a decoder-only model"):
        load_config(TWIN, ["registry.gguf=f16"])
