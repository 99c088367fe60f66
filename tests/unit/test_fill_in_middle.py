import random

import pytest
import torch

from codetune.core.config import (
    Config,
    Direction,
    FillInMiddleConfig,
    ModelConfig,
    ModelTask,
    ScratchArchitecture,
    TrainingConfig,
)
from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.families.base import InferenceSettings
from codetune.core.families.fill_in_middle import (
    ADDED_FIM_TOKENS,
    BLOCK,
    LINE,
    REST_OF_LINE,
    Cut,
    FimIds,
    add_fim_tokens,
    completes_in_spm,
    cursors,
    cut,
    fim_tokens,
    line_above,
    training_windows,
)
from codetune.core.metrics import block_completion_metrics, line_completion_metrics
from codetune.core.model import build_scratch_model, train_tokenizer

COMPLETION = "configs/tiny-completion.yaml"
ARCH = ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
SOURCE = '''import os


def walk(top, depth=0):
    """Yield every file under top."""
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path, depth + 1)
        else:
            yield path


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, n):
        self.count += n
        return self.count
'''


def _tokenizer(extra: list[str] = ()):
    tokenizer = train_tokenizer([SOURCE] * 20, vocab_size=300)
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def test_fim_tokens_are_found_by_name_whatever_their_position():
    qwen = _tokenizer(["<|im_start|>", "<|fim_middle|>", "<|endoftext|>", "<|fim_suffix|>", "<|fim_prefix|>"])
    tokens = fim_tokens(qwen)
    assert (tokens.prefix, tokens.suffix, tokens.middle, tokens.end) == (
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|endoftext|>",
    )
    ids = FimIds.of(qwen)
    assert qwen.convert_ids_to_tokens([ids.prefix, ids.suffix, ids.middle]) == list(ADDED_FIM_TOKENS)
    starcoder = fim_tokens(_tokenizer(["<fim_middle>", "<fim_prefix>", "<fim_suffix>"]))
    assert starcoder.prefix == "<fim_prefix>" and starcoder.end is None  # no <|endoftext|>: eos ends the middle
    # SmolLM2's additional special tokens: chat and repository markers, no FIM. Taken by position they would be
    # <|im_start|> as the prefix token.
    assert fim_tokens(_tokenizer(["<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>"])) is None


def test_missing_fim_tokens_are_added_once_with_embedding_rows():
    tokenizer = _tokenizer(["<|im_start|>", "<|im_end|>"])
    model = build_scratch_model(ModelConfig(task=ModelTask.causal_lm, scratch=ARCH), tokenizer, seed=0)
    before = len(tokenizer)
    added = add_fim_tokens(model, tokenizer)
    assert added == list(range(before, before + 3))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == before + 3
    assert FimIds.of(tokenizer).end == tokenizer.eos_token_id
    assert tokenizer.decode(added, skip_special_tokens=True) == ""  # special: never in a completion's text
    assert add_fim_tokens(model, tokenizer) == [] and len(tokenizer) == before + 3
    native = _tokenizer(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    pretrained_with_fim = build_scratch_model(ModelConfig(task=ModelTask.causal_lm, scratch=ARCH), native, seed=0)
    assert add_fim_tokens(pretrained_with_fim, native) == [] and not completes_in_spm(pretrained_with_fim)


@pytest.mark.parametrize("kind", [LINE, REST_OF_LINE, BLOCK])
def test_a_cut_is_the_file_again_and_its_middle_is_the_kind_asked_for(kind):
    rng = random.Random(0)
    cuts = [c for c in (cut(SOURCE, kind, rng) for _ in range(40)) if c]  # None: no such place on the line drawn
    assert len(cuts) > 20
    for c in cuts:
        assert c.prefix + c.middle + c.suffix == SOURCE
        if kind == LINE:
            assert "\n" not in c.middle and c.suffix.startswith("\n")
            assert not c.prefix.rsplit("\n", 1)[-1].strip()  # the cursor at the line's indentation
        elif kind == REST_OF_LINE:
            assert "\n" not in c.middle and c.prefix.rsplit("\n", 1)[-1].strip()  # inside a line
        else:
            head = c.prefix.rstrip(" ").rstrip("\n").rsplit("\n", 1)[-1]
            assert head.endswith(":") and c.middle.strip()


def test_test_cursors_depend_on_the_file_alone():
    row = {"id": "x", "code": SOURCE}
    assert cursors(row) == cursors({"code": SOURCE}) and len(cursors(row)) >= 4
    assert {c.kind for c in cursors(row)} == {LINE, REST_OF_LINE, BLOCK}


def _config(rate: float, spm_rate: float = 0.5) -> Config:
    lengths = TrainingConfig(max_source_length=64, max_target_length=16)
    return Config(training=lengths, fill_in_middle=FillInMiddleConfig(rate, spm_rate))


def test_fim_windows_learn_the_middle_and_its_end_never_the_context():
    tokenizer = _tokenizer(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>"])
    ids = FimIds.of(tokenizer)
    row = {"code": SOURCE * 3}
    psm = training_windows(row, tokenizer, _config(1.0, 0.0))
    spm = training_windows(row, tokenizer, _config(1.0, 1.0))
    assert psm and spm
    for window in psm + spm:
        learned = [t for t, label in zip(window["input_ids"], window["labels"]) if label != -100]
        assert learned[-1] == ids.end and ids.middle not in learned and ids.prefix not in learned
        assert len(learned) <= 16 and len(window["input_ids"]) <= 64 + 16 + 3
        middle_at = window["input_ids"].index(ids.middle)
        assert all(label == -100 for label in window["labels"][: middle_at + 1])
    assert all(w["input_ids"][:2] != [ids.prefix, ids.suffix] for w in psm)
    assert all(w["input_ids"][:2] == [ids.prefix, ids.suffix] for w in spm)
    assert training_windows(row, tokenizer, _config(1.0)) == training_windows(row, tokenizer, _config(1.0))


def test_left_to_right_windows_learn_the_continuation():
    tokenizer = _tokenizer(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    ids = FimIds.of(tokenizer)
    for window in training_windows({"code": SOURCE * 3}, tokenizer, _config(0.0)):
        assert not {ids.prefix, ids.suffix, ids.middle} & set(window["input_ids"])
        learned = [label for label in window["labels"] if label != -100]
        assert learned == window["input_ids"][-len(learned) :] and len(learned) == 15


def test_line_completion_metrics_as_codexglue_computes_them():
    metrics = line_completion_metrics(["return  x + 1", "y = f(a)"], ["return x + 1", "y = f(b)"])
    assert metrics["exact_match"] == 50.0  # whitespace-split tokens equal
    # fuzz.ratio: 100 x (1 - Indel distance / both lengths): one deletion in 13 + 12 characters, two edits in 8 + 8
    assert metrics["edit_similarity"] == pytest.approx((100 * (1 - 1 / 25) + 100 * (1 - 2 / 16)) / 2)
    block = block_completion_metrics(["a\n    b"], ["a\n  b"])
    assert block["block_exact_match"] == 100.0 and block["block_edit_similarity"] < 100


def test_the_baseline_repeats_the_line_above():
    prefix = "def f(x):\n    x = 1\n    #\n    "  # a line too short to repeat is passed over
    assert line_above(Cut(prefix, "y = 2", "\n", LINE)) == "x = 1"
    assert line_above(Cut(prefix, "y = 2\n    z = 3", "\n", BLOCK)) == "x = 1\nx = 1"  # one per line of the block


def test_completion_is_only_for_decoder_only_models_on_whole_files(tiny_overrides):
    from codetune.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match="model.direction=fill_in_middle needs a generative model.task \\(causal_lm\\)"
    ):
        load_config(COMPLETION, tiny_overrides + ["model.task=seq2seq"])
    with pytest.raises(ConfigError, match="trains on whole source files: data.source=code_tree"):
        load_config(COMPLETION, tiny_overrides + ["data.source=files", "data.path=x.jsonl"])
    family = family_of(ModelConfig(task=ModelTask.causal_lm, direction=Direction.fill_in_middle))
    assert family.examples is Examples.whole_files


def test_the_test_split_holds_whole_files_unseen_in_training(tiny_overrides):
    cfg = load_config(COMPLETION, tiny_overrides)
    data = prepare_data(cfg.data, Examples.whole_files)
    splits = {s: data.load(s) for s in ("train", "validation", "test")}
    assert all(set(r) == {"id", "code", "origin"} for rows in splits.values() for r in rows)
    origins = {s: {r["origin"] for r in rows} for s, rows in splits.items()}
    assert not origins["test"] & origins["train"] and splits["test"]
    assert max(r["code"].count("\n") for r in splits["train"]) > cfg.data.max_code_lines  # whole, not cut


@pytest.fixture
def tiny_pretrained(tiny_decoder_base, tiny_overrides):
    overrides = [f"model.name={tiny_decoder_base}", "model.init=pretrained", "peft.use_peft=true", "peft.r=4"]
    return load_config(COMPLETION, tiny_overrides + overrides)


def test_added_fim_tokens_train_as_rows_and_the_merged_export_completes_as_base_plus_adapter(tiny_pretrained):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from codetune.core.model import load_pretrained
    from codetune.core.rundir import ADAPTER_DIR
    from codetune.core.training import train_model

    cfg = tiny_pretrained
    trained = train_model(cfg, prepare_data(cfg.data, Examples.whole_files), family_of(cfg.model))
    with safe_open(f"{trained.run_dir}/{ADAPTER_DIR}/adapter_model.safetensors", "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    token_rows = [shape for key, shape in shapes.items() if "trainable_tokens" in key]
    assert token_rows and all(shape == [3, ARCH.d_model] for shape in token_rows)
    vocabulary = len(AutoTokenizer.from_pretrained(cfg.model.name)) + 3
    assert not [key for key, shape in shapes.items() if vocabulary in shape]  # no whole embedding or LM head

    # The export: plain transformers, the tokens included.
    merged = AutoModelForCausalLM.from_pretrained(trained.run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained.run_dir)
    assert [t for t in ADDED_FIM_TOKENS if t in tokenizer.get_vocab()] == list(ADDED_FIM_TOKENS)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == vocabulary
    assert merged.config.codetune_fim_order == "spm"  # learned here: completes with the middle after the prefix

    base, base_tokenizer = load_pretrained(cfg.model)
    family = family_of(cfg.model)
    set_seed(cfg.training.seed)  # as training added them: the same initial rows
    family.add_tokens(base, base_tokenizer)
    initial = base.get_input_embeddings().weight[-3:].clone()
    assert not torch.allclose(merged.get_input_embeddings().weight[-3:], initial)  # the rows trained
    adapted = PeftModel.from_pretrained(base, f"{trained.run_dir}/{ADAPTER_DIR}").eval()
    requests = [{"prefix": "def load(fp):\n    return ", "suffix": "\n\n\ndef dump(obj):\n    pass\n"}] * 2
    requests += [{"prefix": "import ", "suffix": ""}]
    settings = InferenceSettings.of(cfg)
    assert family.predict(merged, tokenizer, requests, settings) == family.predict(
        adapted, tokenizer, requests, settings
    )
