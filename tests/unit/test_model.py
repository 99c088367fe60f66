import pytest
import torch

from codetune.core.config import ModelConfig, ModelTask, PeftConfig, ScratchArchitecture
from codetune.core.errors import ModelError
from codetune.core.families.generative import encode_prompt
from codetune.core.model import (
    add_lora,
    build_scratch_model,
    count_parameters,
    load_exported,
    load_pretrained,
    main_output,
    merge_adapter,
    train_tokenizer,
)

TEXTS = [f"def add_{i}(a, b):\n    return a + b * {i}\nReturn the sum of a and b." for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(params=list(ModelTask), ids=lambda t: t.value)
def tiny_model(request, tokenizer):
    arch = ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
    labels = ["clean", "buggy"] if request.param is ModelTask.classification else None
    return build_scratch_model(ModelConfig(scratch=arch, task=request.param), tokenizer, seed=0, labels=labels)


def test_tokenizer_keeps_codet5_special_tokens_and_round_trips(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
    ids = tokenizer("def f(x):\n    return x  # ünïcode")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x  # ünïcode"


def test_lora_trains_only_adapter_weights(tiny_model):
    model = add_lora(tiny_model, PeftConfig(use_peft=True, r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # A new head (a warm-started decoder's cross-attention, a classifier) trains whole; the rest stays frozen.
    # A search encoder has no head: only its adapters train.
    assert trainable and all("lora_" in n or "crossattention" in n or "classifier" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert count_parameters(model)[0] < 0.2 * count_parameters(model)[1]


def test_merged_model_equals_base_plus_adapter_and_saves_tokenizer(tiny_model, tokenizer, tmp_path):
    model = add_lora(tiny_model, PeftConfig(use_peft=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a trained adapter is non-zero; a fresh one is the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.eval()
    probe = dict(tokenizer(TEXTS[:2], return_tensors="pt", padding=True))
    if tiny_model.config.is_encoder_decoder:
        probe["decoder_input_ids"] = torch.zeros((2, 3), dtype=torch.long)
    expected = main_output(model(**probe))
    merged = merge_adapter(model, probe)
    merged.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tok = load_exported(tmp_path)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(main_output(reloaded(**probe)), expected, atol=1e-5, rtol=1e-5)
    assert reloaded_tok.all_special_tokens == tokenizer.all_special_tokens


def test_unknown_architecture_needs_explicit_lora_targets(tiny_model):
    config = getattr(tiny_model.config, "encoder", tiny_model.config)  # a warm start is typed by its encoder
    config.model_type = "mystery"
    with pytest.raises(ModelError, match="set peft.target_modules"):
        add_lora(tiny_model, PeftConfig(use_peft=True))


def test_missing_local_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load model.name=.*config.json"):
        load_pretrained(ModelConfig(name=str(tmp_path / "empty"), init="pretrained"))


def test_prompt_keeps_its_ending_when_the_code_is_cut(tokenizer):
    ids = encode_prompt(tokenizer, "{code}\n# Summary:", "def f(x):\n" + "    x += 1\n" * 200, max_length=40)
    assert len(ids) <= 40
    assert tokenizer.decode(ids).endswith("\n# Summary:")


def test_code_generation_prompt_fills_the_summary(tokenizer):
    ids = encode_prompt(tokenizer, "# {summary}\n", "Add two numbers.", max_length=40)
    assert tokenizer.decode(ids) == "# Add two numbers.\n"


def test_last_layers_adapts_only_the_top_of_the_stack_and_the_backward_pass_stops_there(tokenizer):
    arch = ScratchArchitecture(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2)
    model = build_scratch_model(ModelConfig(scratch=arch, task=ModelTask.causal_lm), tokenizer, seed=0)
    model = add_lora(model, PeftConfig(use_peft=True, r=4, alpha=8, last_layers=1))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"2"}  # three layers, the last one adapted
    batch = tokenizer(["def f(x):\n    return x"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    lower = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lower.weight.grad is None and model.base_model.model.model.embed_tokens.weight.grad is None


def test_last_layers_is_refused_where_it_means_nothing(tokenizer):
    arch = ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
    causal = build_scratch_model(ModelConfig(scratch=arch, task=ModelTask.causal_lm), tokenizer, seed=0)
    with pytest.raises(ModelError, match="has 2 layers"):
        add_lora(causal, PeftConfig(use_peft=True, last_layers=3))
    seq2seq = build_scratch_model(ModelConfig(scratch=arch, task=ModelTask.seq2seq), tokenizer, seed=0)
    with pytest.raises(ModelError, match="an encoder and a decoder"):
        add_lora(seq2seq, PeftConfig(use_peft=True, last_layers=1))
