"""`codetune export --format gguf`: the file holds what llama.cpp needs (tensor layout, tokenizer, the end-of-turn
token, the chat template) and loads back, through transformers' own GGUF reader, to the logits of the export."""

import json

import pytest
import torch

from codetune.core.config import GGUFPrecision
from codetune.core.errors import ModelError
from codetune.core.gguf_export import export_gguf
from codetune.core.weights import materialize
from tests.conftest import skip_module_without_default_weights

DEFAULT_WEIGHTS = skip_module_without_default_weights()

SYSTEM_PROMPT = "You are a Python expert."


def save_run(run, model, tokenizer, end_of_turn: int) -> None:
    """A run directory as training exports one: the merged weights, tokenizer, template and generation config."""
    from transformers import GenerationConfig

    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    GenerationConfig(bos_token_id=1, eos_token_id=[end_of_turn], pad_token_id=end_of_turn).save_pretrained(run)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """SmolLM2's tokenizer and ChatML template on a 2-layer Llama with grouped-query attention (the default's shape,
    small), weights spread wide enough that next-token choices are not ties."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, _ = materialize(DEFAULT_WEIGHTS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "tiny-llama"
    save_run(run, LlamaForCausalLM(config), tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return run, tokenizer


def test_an_f16_gguf_loads_back_to_the_exports_logits_with_its_tokens_and_end_of_turn(tiny_run):
    import gguf

    run, tokenizer = tiny_run
    exported = export_gguf(run, GGUFPrecision.f16, SYSTEM_PROMPT, 160)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert exported.reload["same_tokens"] and exported.reload["top1_agreement"] == 1.0
    assert exported.reload["max_logit_difference"] < 0.05
    assert exported.reload["end_of_turn"] in (im_end, [im_end])

    fields = gguf.GGUFReader(exported.path).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == im_end
    assert fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tokenizer) and tokens[im_end] == "<|im_end|>"
    assert types[im_end] == gguf.TokenType.CONTROL  # a special token, whole, not text

    modelfile = exported.modelfile.read_text()
    assert modelfile.startswith(f"FROM ./{exported.path.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and f'SYSTEM """{SYSTEM_PROMPT}"""' in modelfile


def test_q8_0_weights_are_about_half_of_f16s_and_keep_the_next_token_choices(tiny_run):
    import gguf

    def weight_bytes(path) -> int:  # the tiny model's file is mostly its 49k-token vocabulary
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    run, _ = tiny_run
    f16 = export_gguf(run, GGUFPrecision.f16, None, 160)
    q8 = export_gguf(run, GGUFPrecision.q8_0, None, 160)
    assert weight_bytes(q8.path) < 0.6 * weight_bytes(f16.path)
    assert q8.reload["same_tokens"] and q8.reload["top1_agreement"] >= 0.9
    assert "SYSTEM" not in q8.modelfile.read_text()


def test_a_base_whose_eos_is_not_the_end_of_turn_stops_at_the_end_of_turn(tiny_run, tmp_path):
    """The run's generation config decides: llama.cpp stops at eos_token_id, so a base model's <|endoftext|> there
    would make the chat model run on past its turn."""
    import gguf
    from transformers import AutoModelForCausalLM

    run, tokenizer = tiny_run
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer_config = json.loads((run / "tokenizer_config.json").read_text())
    other = tmp_path / "eos-endoftext"
    save_run(other, AutoModelForCausalLM.from_pretrained(run), tokenizer, im_end)
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (other / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    exported = export_gguf(other, GGUFPrecision.f16, None, 160)
    assert gguf.GGUFReader(exported.path).fields["tokenizer.ggml.eos_token_id"].contents() == im_end


def test_an_architecture_llama_cpp_export_does_not_cover_is_refused_by_name(tmp_path, tiny_run):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny_run
    run = tmp_path / "gpt2-run"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    save_run(run, GPT2LMHeadModel(config), tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with pytest.raises(
        ModelError, match="GGUF export supports llama, qwen2 decoders; this run is a gpt2, whose formats"
    ):
        export_gguf(run, GGUFPrecision.f16, None, 160)


def test_a_completion_models_fill_in_the_middle_tokens_are_named_for_llama_cpps_infill(tiny_run, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.families.fill_in_middle import ADDED_FIM_TOKENS

    run, _ = tiny_run
    tokenizer, model = AutoTokenizer.from_pretrained(run), AutoModelForCausalLM.from_pretrained(run)
    tokenizer.add_tokens(list(ADDED_FIM_TOKENS), special_tokens=True)  # as a completion fine-tune adds them
    model.resize_token_embeddings(len(tokenizer))
    completion = tmp_path / "completion-run"
    save_run(completion, model, tokenizer, tokenizer.eos_token_id)
    fields = gguf.GGUFReader(export_gguf(completion, GGUFPrecision.f16, None, 64).path).fields
    prefix, suffix, middle = tokenizer.convert_tokens_to_ids(list(ADDED_FIM_TOKENS))
    assert fields[gguf.Keys.Tokenizer.FIM_PRE_ID].contents() == prefix
    assert fields[gguf.Keys.Tokenizer.FIM_SUF_ID].contents() == suffix
    assert fields[gguf.Keys.Tokenizer.FIM_MID_ID].contents() == middle
