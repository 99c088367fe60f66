"""A GGUF export run by llama.cpp itself (node-llama-cpp's prebuilt binary, `make test` installs it): it reads the
file, splits a chat turn into the tokens the run's tokenizer gives, and decodes greedily what transformers decodes
from the export."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from codetune.core.config import GGUFPrecision
from codetune.core.gguf_export import export_gguf
from tests.e2e.conftest import REPO
from tests.unit.test_gguf_export import tiny_run  # noqa: F401  (the fixture)

NODE_LLAMA_CPP = REPO / ".venv" / "llama.cpp" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
GENERATE = Path(__file__).with_name("llama_cpp_generate.mjs")
TURN = [{"role": "user", "content": "Write a Python function that returns the larger of two numbers."}]


def llama_cpp(gguf_file: Path, prompt: str, max_tokens: int) -> dict:
    if not NODE_LLAMA_CPP.is_file() or not shutil.which("node"):
        pytest.fail(f"llama.cpp for tests is not installed ({NODE_LLAMA_CPP}): run `make test`, which installs it")
    done = subprocess.run(
        ["node", str(GENERATE), str(gguf_file), prompt, str(max_tokens)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NODE_LLAMA_CPP": str(NODE_LLAMA_CPP)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ANSWER = "```python\ndef larger(a, b):\n    return a if a > b else b\n```"


@pytest.fixture(scope="module")
def taught_run(tiny_run, tmp_path_factory):  # noqa: F811
    """The tiny Llama taught one answer, ended by <|im_end|>: its greedy choices have clear margins, so f16 and
    fp32 arithmetic choose alike, and it has a turn's end to stop at."""
    from transformers import AutoModelForCausalLM

    from tests.unit.test_gguf_export import save_run

    run, tokenizer = tiny_run
    model = AutoModelForCausalLM.from_pretrained(run)
    taught_turn = tokenizer.apply_chat_template(TURN + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    ids = torch.tensor([tokenizer(taught_turn).input_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    taught = tmp_path_factory.mktemp("runs") / "taught"
    save_run(taught, model, tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return taught, tokenizer


@pytest.mark.timeout(900)
def test_llama_cpp_reads_the_f16_export_and_decodes_what_transformers_decodes_to_the_turns_end(taught_run):
    from transformers import AutoModelForCausalLM

    run, tokenizer = taught_run
    exported = export_gguf(run, GGUFPrecision.f16, None, 160)
    prompt = tokenizer.apply_chat_template(TURN, tokenize=False, add_generation_prompt=True)
    ran = llama_cpp(exported.path, prompt, 64)
    ids = tokenizer(prompt).input_ids
    assert ran["prompt_ids"] == ids  # <|im_start|> and <|im_end|> whole, the same pre-tokenizer split
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ran["eos"] == ran["eot"] == im_end
    model = AutoModelForCausalLM.from_pretrained(run)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=im_end)
    assert tokenizer.decode(greedy[0, len(ids) :]) == ANSWER + "<|im_end|>"
    assert ran["text"] == ANSWER and ran["stop_reason"] == "eogToken"  # stopped at the turn's end, as served
