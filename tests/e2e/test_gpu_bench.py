"""bench/gpu.py, the GPU half of the benchmarks, runs here with --cpu: every check but the CUDA-only ones, on the
twins and two-layer versions of the architectures, so that a lent GPU's minutes go to measuring, not debugging."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, skip_module_without_default_weights

skip_module_without_default_weights()  # the architectures take the default model's tokenizer


def test_what_the_gpu_machine_needs_fits_what_the_device_tool_carries(tmp_path):
    carry = tmp_path / "carry"
    prepared = subprocess.run(
        [sys.executable, "bench/gpu.py", "--prepare", "--carry", str(carry)], cwd=ROOT, capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    total = float(re.search(r"\) ([\d.]+) MB of the device tool's 64 MiB", prepared.stdout).group(1))
    assert total < 64, prepared.stdout
    wheels = {w.name.split("-")[0].lower() for w in (carry / "wheels").glob("*.whl")}
    assert {"omegaconf", "antlr4_python3_runtime", "transformers", "peft", "trl", "datasets"} <= wheels
    for arch in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        assert {"config.json", "tokenizer.json"} <= {f.name for f in (carry / "models" / arch).iterdir()}


@pytest.mark.timeout(1800)
def test_the_gpu_benchmark_runs_every_check_but_the_cuda_ones_on_cpu(tmp_path):
    run = subprocess.run(
        [sys.executable, "bench/gpu.py", "--cpu", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (written,) = tmp_path.glob("gpu-*.json")
    result = json.loads(written.read_text())
    assert result["device"] == "cpu" and "failed:" not in run.stdout, run.stdout

    assert result["summary"]["twins_trained"] == result["summary"]["twins"] >= 8
    for arch in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        recipes = result["speed"][arch]
        losses = [recipes[name]["validation_loss"] for name in ("codetune", "plain_trainer", "trl_sft_trainer")]
        assert all(recipes[name]["tokens_per_second"] > 0 for name in ("codetune", "plain_trainer", "trl_sft_trainer"))
        assert max(losses) - min(losses) < 0.02 * min(losses), losses  # the same examples, LoRA and steps
        assert all(share and share > 0 for share in result["summary"]["mfu"][arch].values())
    assert result["generation"]["codetune_examples_per_second"] > 0
    assert result["summary"]["resume_same_step_and_loss"], result["resume"]
    assert "generation_oom" not in result and "fp16" not in result  # CUDA only
    assert "resume after a kill: met" in run.stdout
