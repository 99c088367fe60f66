"""`codetune serve` speaking the OpenAI API, through the official `openai` client: a fill-in-the-middle model's
completions with a suffix, streamed and not, chat through the tokenizer's template, and OpenAI-shaped errors."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import openai
import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.families.base import Sampling
from codetune.core.training import train_model
from codetune.lifecycle.registry import log_pyfunc_model
from tests.e2e.conftest import free_port, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
PREFIX = "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return "
SUFFIX = "\n\n\ndef dump(obj, path):\n    with open(path, 'w') as f:\n        json.dump(obj, f)\n"


@contextlib.contextmanager
def served(tracking: str, model: str):
    """`codetune serve` of a registered model (models:/<name>@<alias>) on a free port; the official client for it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--model", model, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/ping", server, "codetune serve", seconds=300)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.timeout(900)
def test_openai_client_completes_with_a_suffix_streams_and_chats(tiny_decoder_base, tiny_overrides, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("serve-openai")
    overrides = [f"model.name={tiny_decoder_base}", "model.init=pretrained", "peft.use_peft=true", "peft.r=4"]
    cfg = load_config(REPO / "configs" / "tiny-completion.yaml", tiny_overrides + overrides)
    run_dir = train_model(cfg, prepare_data(cfg.data, Examples.whole_files), family_of(cfg.model)).run_dir
    with mlflow.start_run():
        version = mlflow.register_model(log_pyfunc_model(cfg, Path(run_dir)), "completer").version
    mlflow.MlflowClient().set_registered_model_alias("completer", "champion", version)
    # What the registered model answers in this process: the reference for the served answers.
    local = mlflow.pyfunc.load_model(f"models:/completer/{version}").unwrap_python_model()
    [[expected]] = local.generate("completions", [(PREFIX, SUFFIX)], Sampling(max_tokens=12))
    conversation = [{"role": "user", "content": "Write a function that reads JSON."}]
    [[expected_reply]] = local.generate("chat", [conversation], Sampling(max_tokens=12))
    templated = local.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")  # what the model was asked: the template applied
    mlflow.set_tracking_uri(None)

    with served(tracking, "models:/completer@champion") as client:
        assert [m.id for m in client.models.list()] == ["completer"]

        answer = client.completions.create(
            model="completer", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0
        )
        assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == expected.finish_reason
        assert answer.usage.prompt_tokens == expected.prompt_tokens
        assert answer.usage.completion_tokens == expected.completion_tokens > 0
        assert answer.system_fingerprint == f"completer/{version}"

        chunks = list(
            client.completions.create(
                model="completer", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == expected.finish_reason

        sampled = client.completions.create(
            model="completer", prompt=[PREFIX, "import "], max_tokens=6, temperature=0.8, n=2
        )
        assert [c.index for c in sampled.choices] == [0, 1, 2, 3]

        reply = client.chat.completions.create(model="completer", messages=conversation, max_tokens=12)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected_reply.text
        streamed = client.chat.completions.create(model="completer", messages=conversation, max_tokens=12, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected_reply.text

        with pytest.raises(openai.NotFoundError, match="this server serves 'completer'"):
            client.completions.create(model="gpt-4o", prompt=PREFIX)
        with pytest.raises(openai.BadRequestError, match="'max_tokens' must be between 1 and 4096") as refused:
            client.completions.create(model="completer", prompt=PREFIX, max_tokens=0)
        assert refused.value.body["param"] == "max_tokens" and refused.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError, match="at most 100000"):
            client.completions.create(model="completer", prompt="x" * 100_001)
        with pytest.raises(openai.APIStatusError) as too_big:
            client.completions.create(model="completer", prompt=["x" * 100_000] * 90)
        assert too_big.value.status_code == 413
        # Still serving after the refusals.
        assert client.completions.create(model="completer", prompt=PREFIX, max_tokens=2).choices[0].text is not None


QUESTIONS = [
    "Write a Python function `is_palindrome(s)` that says whether a string reads the same backwards.",
    "What does this function do?\n```python\ndef f(xs):\n    return [x for x in xs if x % 2 == 0]\n```",
    "Write a function that returns the n-th Fibonacci number.",
]


@pytest.mark.timeout(900)
def test_an_instruct_fine_tune_is_served_and_its_chat_answers_stop_by_themselves(stdlib_cache, tmp_path):
    """configs/instruct.yaml on the default's real weights, a few steps: registered, served, asked through the
    official client with room to spare, every answer ends at the assistant's end of turn (finish_reason stop)."""
    pytest.importorskip("gguf", reason="gguf reads the packaged weights: pip install gguf (make does)")
    from codetune.core.pipeline import run_pipeline

    overrides = [
        f"data.cache_dir={stdlib_cache}",
        f"training.output_dir={tmp_path / 'runs'}",
        "data.max_examples=240",
        "training.max_steps=4",
        "training.per_device_train_batch_size=4",
        "training.max_source_length=192",
        "training.max_target_length=64",
        "evaluation.max_examples=4",
        "generation.max_new_tokens=48",
    ]
    cfg = load_config(REPO / "configs" / "instruct.yaml", overrides)
    run_dir = run_pipeline(cfg).trained.run_dir
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("serve-instruct")
    with mlflow.start_run():
        version = mlflow.register_model(log_pyfunc_model(cfg, Path(run_dir)), "assistant").version
    mlflow.MlflowClient().set_registered_model_alias("assistant", "champion", version)
    mlflow.set_tracking_uri(None)

    with served(tracking, "models:/assistant@champion") as client:
        for question in QUESTIONS:
            reply = client.chat.completions.create(
                model="assistant", messages=[{"role": "user", "content": question}], max_tokens=400, temperature=0
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "stop", (question, choice.message.content)
            assert choice.message.content.strip() and "<|im_end|>" not in choice.message.content
            assert reply.usage.completion_tokens < 400
