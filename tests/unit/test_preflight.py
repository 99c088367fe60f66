import subprocess
import sys

from codetune.config import load_config
from codetune.preflight import data_problems, disk_problems, model_problems, preflight


def test_the_default_run_passes_on_this_machine():
    assert preflight(load_config()) == []


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
    [problem] = model_problems(cfg)
    assert "without weights (*.safetensors or *.bin), tokenizer files" in problem


def test_an_unreachable_hub_model_is_reported_without_loading_anything():
    cfg = load_config(None, ["model.name=codetune-tests/no-such-model", "model.task=seq2seq"])
    [problem] = model_problems(cfg)
    assert "neither a local directory nor reachable on the Hub" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = load_config(None, [f"model.name={tmp_path}", "model.task=seq2seq", f"data.path={tmp_path / 'nowhere'}"])
    problems = preflight(cfg)
    assert len(problems) == 2 and "is not a directory of Python source" in problems[1]


def test_missing_data_files_are_reported():
    cfg = load_config(None, ["data.source=files", "data.path=/nonexistent/*.jsonl"])
    assert "no data files at data.path" in data_problems(cfg)[0]


def test_a_disk_too_small_for_the_checkpoints_is_reported(tmp_path):
    cfg = load_config(None, [f"training.output_dir={tmp_path / 'runs'}", "peft.use_peft=false"])
    [problem] = disk_problems(cfg, weights_bytes=10**15)  # a petabyte model
    assert "GB free; this run needs about" in problem
    assert disk_problems(cfg, weights_bytes=1000) == []
