import subprocess
import sys

from codetune.core.config.loader import load_config
from codetune.core.preflight import data_errors, disk_errors, memory_errors, model_errors, preflight_errors


def test_the_default_run_passes_on_this_machine():
    assert preflight_errors(load_config()) == []


def test_a_config_typo_is_reported_before_prefect_is_even_imported():
    code = (
        "import sys; from flows.cli import main; "
        "rc = main(['run', 'training.lerning_rate=1']); print(rc, 'prefect' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == ["2", "False"]
    assert "did you mean 'training.learning_rate'" in run.stderr and "Traceback" not in run.stderr


def test_an_incomplete_model_directory_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(None, [f"model.name={tmp_path}", "model.task=seq2seq"])
    [error] = model_errors(cfg)
    assert "without weights (*.safetensors or *.bin), tokenizer files" in error


def test_an_unreachable_hub_model_is_reported_without_loading_anything():
    cfg = load_config(None, ["model.name=codetune-tests/no-such-model", "model.task=seq2seq"])
    [error] = model_errors(cfg)
    assert "neither a local directory nor reachable on the Hub" in error


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = load_config(None, [f"model.name={tmp_path}", "model.task=seq2seq", f"data.path={tmp_path / 'nowhere'}"])
    errors = preflight_errors(cfg)
    assert len(errors) == 2 and "is not a directory of Python source" in errors[1]


def test_missing_data_files_are_reported():
    cfg = load_config(None, ["data.source=files", "data.path=/nonexistent/*.jsonl"])
    assert "no data files at data.path" in data_errors(cfg)[0]


def test_a_disk_too_small_for_the_checkpoints_is_reported(tmp_path):
    cfg = load_config(None, [f"training.output_dir={tmp_path / 'runs'}", "peft.use_peft=false"])
    [error] = disk_errors(cfg, weights_bytes=10**15)  # a petabyte model
    assert "GB free; this run needs about" in error
    assert disk_errors(cfg, weights_bytes=1000) == []


def test_s3_destination_is_probed_with_a_write_before_training(moto_url, moto_credentials):
    import boto3

    from codetune.lifecycle.destinations import S3

    s3_errors = S3().probe
    client = boto3.client("s3", endpoint_url=moto_url)
    client.create_bucket(Bucket="probed")
    cfg = load_config(None, ["registry.s3.bucket=probed", f"registry.s3.endpoint_url={moto_url}"])
    assert s3_errors(cfg) == []
    assert client.list_objects_v2(Bucket="probed").get("KeyCount") == 0  # the probe object is gone again
    cfg.registry.s3.bucket = "no-such-bucket"
    assert "S3 bucket 'no-such-bucket' does not exist" in s3_errors(cfg)[0]


def test_a_struggling_s3_does_not_stop_the_run_before_it_starts(moto_url, moto_credentials):
    import boto3

    from codetune.lifecycle.destinations import S3
    from tests.servers import FlakyProxy

    s3_errors = S3().probe
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="busy")
    with FlakyProxy(moto_url) as proxy:
        proxy.state.fail_next = 100  # every write answered 503: transient, so publishing's own retries get their turn
        cfg = load_config(None, ["registry.s3.bucket=busy", f"registry.s3.endpoint_url={proxy.url}"])
        assert s3_errors(cfg) == []
        assert proxy.state.fail_next < 100


def test_hub_token_and_repo_visibility_are_checked_before_training(monkeypatch):
    from codetune.lifecycle.destinations import Hub
    from tests.servers import RecordingHub

    hub_errors = Hub().probe
    with RecordingHub() as hub:
        cfg = load_config(None, ["registry.huggingface.repo_id=org/summ", f"registry.huggingface.endpoint={hub.url}"])
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert "refused the token" in hub_errors(cfg)[0]
        monkeypatch.setenv("HF_TOKEN", hub.state.valid_token)
        assert hub_errors(cfg) == []  # the repo does not exist yet: the push creates it
        hub.state.repos["org/summ"] = False
        assert "'org/summ' is public, but registry.huggingface.private=true" in hub_errors(cfg)[0]
        assert hub.state.commits == []


def test_a_model_too_big_for_this_machines_memory_is_reported():
    full = load_config(None, ["peft.use_peft=false"])
    [error] = memory_errors(full, weights_bytes=10**15)
    assert "needs at least 4000000.0 GB to train" in error and "use LoRA (peft.use_peft=true)" in error
    assert memory_errors(full, weights_bytes=10**6) == []
