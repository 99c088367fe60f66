"""The finetune flow end to end: a real Prefect server, MLflow (SQLite and `mlflow server`), moto's S3 server,
a recording Hub endpoint, and a tiny model trained on real stdlib data."""

import json
from pathlib import Path

import mlflow
import pytest

from codetune.core.data import Examples
from codetune.core.families import family_of
from flows.finetune import finetune
from tests.conftest import TWIN, arithmetic_rows
from tests.e2e.conftest import champion_predicts
from tests.servers import RecordingHub


@pytest.mark.timeout(600)
def test_finetune_flow_trains_evaluates_tracks_and_registers(prefect_server, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_overrides + [f"mlflow.tracking_uri={uri}", "registry.model_name=flow-e2e"]
    result = finetune(config=TWIN, overrides=overrides)

    run_dir = Path(result["run_dir"])
    for name in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.json",
        "examples.json",
        "trainer_state.json",
        "predictions.jsonl",
        "config.yaml",
        "data_manifest.json",
    ]:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == result["metrics"]

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["training.max_steps"] == "12"
    assert run.data.metrics["test_bleu4_smoothed"] == metrics["model"]["bleu4_smoothed"]
    assert "baseline_bleu4_smoothed" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6  # logging_steps=2 over 12 steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "examples.json", "config.yaml"} <= artifacts
    assert result["registration"]["alias"] == "champion" and result["published"] == {}

    # Unchanged data and settings: the splits and the trained model are reused, and registering the
    # same model again gives back its version and decision instead of making a second version.
    again = finetune(config=TWIN, overrides=overrides)
    assert again["run_dir"] == result["run_dir"] and again["metrics"] == result["metrics"]
    assert again["registration"] == result["registration"]
    assert len(client.search_model_versions("name='flow-e2e'")) == 1
    version = client.get_model_version("flow-e2e", again["registration"]["version"])
    assert {"prefect_flow_run_id", "git_commit", "data_fingerprint", "config_hash", "base_model", "test_split"} <= set(
        version.tags
    )


@pytest.mark.timeout(600)
def test_flow_publishes_to_s3_and_the_hub_and_never_leaks_secrets(
    prefect_server, tiny_overrides, tmp_path, monkeypatch, moto_url, caplog
):
    import boto3

    canary_hf, canary_aws = "hf_canary_7f3a9c2e41", "aws-canary-secret-55e1b0"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", canary_hf)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "canary-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary_aws)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="team-models")
    with RecordingHub() as hub, caplog.at_level("DEBUG"):
        hub.state.valid_token = canary_hf
        result = finetune(
            config=TWIN,
            overrides=tiny_overrides
            + [
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "registry.model_name=published",
                "registry.s3.bucket=team-models",
                f"registry.s3.endpoint_url={moto_url}",
                "registry.s3.archive=true",
                "registry.huggingface.repo_id=team/summarizer",
                f"registry.huggingface.endpoint={hub.url}",
            ],
        )
        commit = hub.state.commits[-1]

    version = result["registration"]["version"]
    assert result["published"]["s3"] == f"s3://team-models/models/published/{version}/"
    keys = {
        o["Key"] for o in boto3.client("s3", endpoint_url=moto_url).list_objects_v2(Bucket="team-models")["Contents"]
    }
    assert {
        f"models/published/{version}/{n}"
        for n in ["model.safetensors", "metadata.json", "model.tar.gz", "model.tar.gz.sha256"]
    } <= keys
    assert "README.md" in {line["value"]["path"] for line in commit if line["key"] == "file"}

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written)
    for path in written:
        content = path.read_bytes()
        assert canary_hf.encode() not in content and canary_aws.encode() not in content, path
    assert canary_hf not in caplog.text and canary_aws not in caplog.text
    assert canary_hf not in json.dumps(result) and canary_aws not in json.dumps(result)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:  # parameters, states and artifacts as the Prefect UI shows them
        stored = [r.model_dump_json() for r in prefect.read_flow_runs() + prefect.read_task_runs()]
        stored += [a.model_dump_json() for a in prefect.read_artifacts()]
    assert any("team/summarizer" in record for record in stored)  # what was read is this run's
    assert not any(canary_hf in record or canary_aws in record for record in stored)


def test_secrets_offered_through_the_config_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """Through an override, a YAML value and a URL: `codetune run` refuses each before Prefect starts, and never
    echoes the secret."""
    from flows.cli import main

    canary = "aws-canary-secret-91c4d2"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    yaml_file = tmp_path / "leaky.yaml"
    yaml_file.write_text("registry:\n  huggingface:\n    license: ${oc.env:AWS_SECRET_ACCESS_KEY}\n")
    attempts = {
        "override": ["run", "registry.huggingface.license=${oc.env:AWS_SECRET_ACCESS_KEY}"],
        "yaml": ["run", "--config", str(yaml_file)],
        "url": ["run", f"registry.s3.endpoint_url=https://AKIA:{canary}@s3.example.com", "registry.s3.bucket=b"],
    }
    for way, argv in attempts.items():
        assert main(argv) == 2, way
        printed = capsys.readouterr()
        assert canary not in printed.out + printed.err, way
        assert "interpolation" in printed.err or "credentials" in printed.err, (way, printed.err)
    assert [p.name for p in tmp_path.rglob("*")] == ["leaky.yaml"]  # no run, no mlruns, no Prefect home


def test_flow_reports_a_config_typo_without_training(prefect_server):
    from codetune.core.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'training.learning_rate'"):
        finetune.with_options(retries=0)(overrides=["training.lerning_rate=1"])


@pytest.mark.timeout(600)
def test_dry_run_prints_the_plan_and_registers_nothing(prefect_server, tiny_overrides, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = finetune(
        config=TWIN,
        overrides=tiny_overrides
        + [
            "registry.dry_run=true",
            "registry.s3.bucket=somewhere",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ],
    )
    assert "upload to s3://somewhere/models/codetune-code-summarizer/<version>/" in result["plan"]
    assert "registration" not in result and not (tmp_path / "m.db").exists()


def test_promotion_slot_serialises_concurrent_runs(prefect_server):
    import threading
    import time

    from tasks.register import promotion_slot

    spans = []

    def promote():
        with promotion_slot("concurrency-test"):
            start = time.monotonic()
            time.sleep(0.5)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=promote) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end  # the second run read the champion only after the first had moved it


@pytest.mark.timeout(600)
def test_deploy_publishes_an_existing_run_without_retraining(
    prefect_server, tiny_cfg, tiny_overrides, tmp_path, monkeypatch, moto_url
):
    import boto3

    from codetune.core.data import prepare_data
    from codetune.core.evaluation import evaluate_model
    from codetune.core.training import train_model
    from flows.deploy import deploy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    data = prepare_data(tiny_cfg.data, Examples.pairs)
    trained = train_model(tiny_cfg, data, family_of(tiny_cfg.model))
    evaluate_model(trained.run_dir, data.load("test"), tiny_cfg)
    weights = (Path(trained.run_dir) / "model.safetensors").stat().st_mtime_ns
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="deployed")

    result = deploy(
        model_path=trained.run_dir,
        overrides=tiny_overrides
        + [
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "registry.model_name=deployed",
            "registry.s3.bucket=deployed",
            f"registry.s3.endpoint_url={moto_url}",
        ],
    )
    assert result["registration"]["alias"] == "champion"
    assert result["published"]["s3"].startswith("s3://deployed/models/deployed/")
    assert (Path(trained.run_dir) / "model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.timeout(600)
def test_retried_flow_run_does_not_redo_finished_stages(
    prefect_server, tiny_overrides, tmp_path, monkeypatch, moto_url
):
    """Publishing is refused once (403) after registration; the flow's retry publishes without registering or tracking
    again."""
    import boto3

    from tests.servers import FlakyProxy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="retried")
    with FlakyProxy(moto_url) as proxy:
        # A permission error on the model's upload (not the pre-flight probe): the publish task fails at once.
        proxy.state.fail_next, proxy.state.fail_status, proxy.state.fail_path_contains = 1, 403, "/models/retried/"
        result = finetune.with_options(retries=1, retry_delay_seconds=1)(
            config=TWIN,
            overrides=tiny_overrides
            + [
                f"mlflow.tracking_uri={uri}",
                "registry.model_name=retried",
                "registry.s3.bucket=retried",
                f"registry.s3.endpoint_url={proxy.url}",
            ],
        )
        assert proxy.state.fail_next == 0
    client = mlflow.MlflowClient(uri)
    assert result["published"]["s3"].startswith("s3://retried/")
    assert len(client.search_model_versions("name='retried'")) == 1
    assert len(client.search_runs([client.get_experiment_by_name("codetune").experiment_id])) == 1


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["tiny-causal-lm", "tiny-encoder-decoder"])
def test_other_summarisation_families_end_to_end(family, prefect_server, tiny_overrides, tmp_path, monkeypatch):
    """Decoder-only and warm-started encoder-decoder models: trained, evaluated, registered and served like CodeT5."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = finetune(
        config=str(Path(__file__).parents[2] / "configs" / f"{family}.yaml"),
        overrides=tiny_overrides + [f"mlflow.tracking_uri={uri}", "registry.model_name=causal"],
    )
    assert set(result["metrics"]) == {"bleu4_smoothed", "bleu_corpus", "rouge_l", "exact_match", "distinct_predictions"}
    assert result["registration"]["alias"] == "champion"
    summaries = champion_predicts(uri, "causal", ["def add(a, b): return a + b"])
    assert len(summaries) == 1 and isinstance(summaries[0], str)


def test_publishing_credentials_come_from_prefect_blocks(prefect_server, moto_url, tmp_path):
    """registry.s3.block names an S3Bucket block (AwsCredentials inside); registry.huggingface.token_block a Secret."""
    from prefect.blocks.system import Secret
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from codetune.core.config import S3Config
    from codetune.lifecycle.destinations import hub_token, s3_client
    from codetune.lifecycle.publishing import upload_to_s3

    credentials = AwsCredentials(
        aws_access_key_id="block-key",
        aws_secret_access_key="block-secret",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_url),
    )
    S3Bucket(bucket_name="from-block", credentials=credentials).save("team-models", overwrite=True)
    Secret(value="hf_from_block").save("hf-token", overwrite=True)

    client = s3_client(S3Config(bucket="from-block", block="team-models"))
    client.create_bucket(Bucket="from-block")
    (tmp_path / "config.json").write_text("{}")
    [uploaded] = upload_to_s3(client, "from-block", "p", [(tmp_path / "config.json", "config.json")])
    assert uploaded.transferred and client.head_object(Bucket="from-block", Key="p/config.json")["ContentLength"] == 2
    assert hub_token("hf-token") == "hf_from_block"


@pytest.mark.timeout(600)
def test_classifier_family_end_to_end(prefect_server, labelled_jsonl, tiny_overrides, tmp_path, monkeypatch):
    """model.task=classification: the registered model's consumer gets labels, not summaries."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = finetune(
        config=str(Path(__file__).parents[2] / "configs" / "tiny-classifier.yaml"),
        overrides=tiny_overrides + [f"data.path={labelled_jsonl}", f"mlflow.tracking_uri={uri}"],
    )
    assert set(result["metrics"]) == {"accuracy", "f1_macro", "mcc"}
    assert result["registration"]["alias"] == "champion" and "accuracy" in result["registration"]["reason"]
    [labelled] = champion_predicts(uri, "codetune-code-classifier", ["def f(x):\n    return x\n"])
    assert labelled["label"] in {"method", "function"} and 0.5 <= labelled["score"] <= 1.0  # two classes


@pytest.mark.timeout(600)
def test_code_search_family_end_to_end(prefect_server, tiny_overrides, tmp_path, monkeypatch):
    """model.task=code_search: MRR in the run, a consumer that scores (query, code) pairs, and a champion
    from another test split re-scored."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = str(Path(__file__).parents[2] / "configs" / "tiny-code-search.yaml")
    overrides = tiny_overrides + [f"mlflow.tracking_uri={uri}"]
    result = finetune(config=config, overrides=overrides)
    assert set(result["metrics"]) == {"mrr", "recall_at_1", "recall_at_10"}
    assert result["registration"]["alias"] == "champion" and "mrr" in result["registration"]["reason"]

    candidates = [
        "def add(a, b):\n    return a + b\n",
        "def connect(host):\n    return socket.create_connection(host)\n",
    ]
    pairs = pd.DataFrame({"query": ["Add two numbers."] * 2 + ["Open a socket."], "code": candidates + candidates[:1]})
    ranked = champion_predicts(uri, "codetune-code-search", pairs)
    assert all(isinstance(r["score"], float) and -1.0 <= r["score"] <= 1.0 for r in ranked)
    assert sorted(r["rank"] for r in ranked[:2]) == [1, 2] and ranked[2]["rank"] == 1  # ranked per query
    assert (ranked[0]["rank"] < ranked[1]["rank"]) == (ranked[0]["score"] > ranked[1]["score"])

    other_split = finetune(config=config, overrides=overrides + ["data.test_fraction=0.08"])
    assert "on the same test split" in other_split["registration"]["reason"]


@pytest.mark.timeout(600)
def test_code_generation_direction_end_to_end(prefect_server, tiny_overrides, tmp_path, monkeypatch):
    """model.direction=text_to_code: a decoder-only model writes functions from summaries, scored with CodeBLEU."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = finetune(
        config=str(Path(__file__).parents[2] / "configs" / "tiny-code-generation.yaml"),
        overrides=tiny_overrides + [f"mlflow.tracking_uri={uri}", "training.max_target_length=48"],
    )
    assert set(result["metrics"]) == {
        "codebleu",
        "syntax_match",
        "dataflow_match",
        "exact_match",
        "distinct_predictions",
    }
    assert result["registration"]["alias"] == "champion" and "codebleu" in result["registration"]["reason"]
    records = [json.loads(line) for line in (Path(result["run_dir"]) / "predictions.jsonl").read_text().splitlines()]
    assert all(r["reference"].startswith(("def ", "async def ")) for r in records)  # the function is the reference
    assert all(r["baseline"].startswith("def ") and r["baseline"].endswith("pass") for r in records)
    functions = champion_predicts(uri, "codetune-code-generator", ["Return the sum of two numbers."])
    assert len(functions) == 1 and isinstance(functions[0], str)


@pytest.mark.timeout(600)
def test_code_generation_with_tests_registers_on_pass_at_1(
    prefect_server, tiny_overrides, tmp_path, monkeypatch, capsys
):
    """Rows that carry tests: the generated functions run in the sandbox, pass@1 is reported beside CodeBLEU and the
    HumanEval problems asked for, and the registry gates on pass@1."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "arithmetic.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows()))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = finetune(
        config=str(Path(__file__).parents[2] / "configs" / "tiny-code-generation.yaml"),
        overrides=tiny_overrides
        + [
            f"mlflow.tracking_uri={uri}",
            "data.source=files",
            f"data.path={data}",
            "data.target_field=text",
            "data.tests_field=test_list",
            "evaluation.benchmarks=[humaneval]",
            "evaluation.max_benchmark_problems=3",
            "evaluation.benchmark_max_new_tokens=16",
            "registry.min_score=101",  # above any pass@1: the reason shows which metric the gate read
        ],
    )
    metrics = result["metrics"]
    assert {"codebleu", "pass_at_1", "humaneval_pass_at_1"} <= set(metrics)
    assert result["registration"] == result["registration"] | {
        "alias": "challenger",
        "reason": f"pass_at_1 {metrics['pass_at_1']:.2f} is below registry.min_score 101.00",
    }
    run_dir = Path(result["run_dir"])
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert records and all(isinstance(r["passed"], bool) for r in records)
    assert all(r["failure"] for r in records if not r["passed"])  # each failure says why
    assert 100 * sum(r["passed"] for r in records) / len(records) == pytest.approx(metrics["pass_at_1"], abs=0.01)
    solved = [json.loads(line) for line in (run_dir / "benchmarks.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in solved] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert json.loads((run_dir / "metrics.json").read_text())["benchmarks"]["humaneval"]["problems"] == 3

    client = mlflow.MlflowClient(uri)
    logged = client.get_run(result["mlflow_run_id"]).data.metrics
    assert logged["test_pass_at_1"] == metrics["pass_at_1"]
    assert logged["test_humaneval_pass_at_1"] == metrics["humaneval_pass_at_1"]
    version = client.get_model_version("codetune-code-generator", result["registration"]["version"])
    assert float(version.tags["metric.pass_at_1"]) == metrics["pass_at_1"]

    # Any registered model solves a benchmark the same way from the command line.
    from flows.cli import main

    model_uri = f"models:/codetune-code-generator/{version.version}"
    output = tmp_path / "solved.jsonl"
    capsys.readouterr()
    argv = [
        "bench-eval",
        "--model",
        model_uri,
        "--benchmark",
        "humaneval",
        "--output",
        str(output),
        f"mlflow.tracking_uri={uri}",
    ]
    assert main(argv + ["evaluation.max_benchmark_problems=3", "evaluation.benchmark_max_new_tokens=16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == model_uri and set(printed["metrics"]) == {"humaneval_pass_at_1"}
    assert [json.loads(line)["task_id"] for line in output.read_text().splitlines()] == [s["task_id"] for s in solved]


def test_a_completion_model_trains_on_whole_files_and_registers_on_edit_similarity(
    prefect_server, tiny_overrides, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = finetune(
        config=str(Path(__file__).parents[2] / "configs" / "tiny-completion.yaml"),
        overrides=tiny_overrides + [f"mlflow.tracking_uri={uri}", "registry.min_score=101"],
    )
    metrics = result["metrics"]
    assert {"exact_match", "edit_similarity", "block_exact_match", "block_edit_similarity"} <= set(metrics)
    assert result["registration"]["reason"] == (
        f"edit_similarity {metrics['edit_similarity']:.2f} is below registry.min_score 101.00"
    )
    run_dir = Path(result["run_dir"])
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["num_examples"] == len(records) > len({r["id"] for r in records})  # cursors, several to a file
    assert {r["kind"] for r in records} == {"line", "rest_of_line", "block"}
    assert all(r["prefix_end"] and r["reference"].strip() for r in records)
