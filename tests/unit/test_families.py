import inspect
import json

import pytest

from codetune.core.config import Direction, ModelConfig, ModelTask, ScratchArchitecture
from codetune.core.errors import ModelError
from codetune.core.families import FAMILIES, Family, family_class, family_of, family_of_model
from codetune.core.model import build_scratch_model, load_exported, train_tokenizer

PROTOCOL = [name for name in dir(Family) if not name.startswith("_")] + list(Family.__annotations__)
ARCH = ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)


def test_every_task_has_one_family_module_and_every_direction_implements_the_protocol():
    for task in ModelTask:
        assert inspect.getmodule(FAMILIES[task]).__name__ == f"codetune.core.families.{task.value}"
    checked = set()
    for task in ModelTask:
        for direction in Direction:
            cls = family_class(task.value, direction.value)
            if direction in cls.directions:
                family = cls(direction)  # every member read: one missing or failing on this instance fails here
                missing = [name for name in PROTOCOL if not hasattr(family, name)]
                assert not missing, f"{task.value}/{direction.value} lacks {missing}"
                assert family.task is task and family.direction is direction
                checked.add(cls.__name__)
    assert checked == {"Seq2Seq", "EncoderDecoder", "CausalLM", "Classification", "CodeSearch", "FillInMiddle", "Chat"}


def test_direction_picks_what_a_generative_family_reads_writes_and_is_gated_on():
    summariser = family_of(ModelConfig(task=ModelTask.causal_lm, direction=Direction.code_to_text))
    generator = family_of(ModelConfig(task=ModelTask.causal_lm, direction=Direction.text_to_code))
    assert (summariser.objective.source, summariser.primary_metric) == ("code", "bleu4_smoothed")
    assert (generator.objective.source, generator.primary_metric) == ("summary", "codebleu")


def test_the_family_is_read_from_the_exported_config_not_guessed_from_the_class_name(tmp_path):
    """GPT2LMHeadModel-style names once passed for a search encoder ('...Model'); the stamp decides now."""
    tokenizer = train_tokenizer([f"def f{i}(x):\n    return x * {i}" for i in range(30)], vocab_size=300)
    cfg = ModelConfig(task=ModelTask.causal_lm, direction=Direction.text_to_code, scratch=ARCH)
    model = build_scratch_model(cfg, tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["codetune_family"], config["codetune_direction"]) == ("causal_lm", "text_to_code")
    config["architectures"] = ["LookLikeAnEncoderModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded, _ = load_exported(tmp_path)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert family_of_model(reloaded.config).primary_metric == "codebleu"


def test_a_model_without_a_family_stamp_is_refused_with_the_fix(tmp_path):
    tokenizer = train_tokenizer([f"def f{i}(x):\n    return x * {i}" for i in range(30)], vocab_size=300)
    build_scratch_model(ModelConfig(task=ModelTask.seq2seq, scratch=ARCH), tokenizer, seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["codetune_family"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no 'codetune_family'.*re-export it with `codetune run`"):
        load_exported(tmp_path)


def test_inference_settings_hold_what_inference_needs_and_load_as_registered_before(tmp_path):
    from codetune.core.config.loader import load_config
    from codetune.core.families import InferenceSettings

    settings = InferenceSettings.of(load_config(None))
    settings.save(tmp_path / "inference.json")
    assert set(json.loads((tmp_path / "inference.json").read_text())) == {
        "generation", "max_source_length", "max_target_length", "prompt", "batch_size", "system_prompt"
    }  # fmt: skip
    # As a model registered on 2026-12-06 kept them: training's values beside, the batch size in generation.
    earlier = {
        "generation": {"num_beams": 1, "max_new_tokens": 32, "batch_size": 8},
        "max_source_length": 256, "max_target_length": 64, "prompt": "{code}\n# Summary:",
        "fim_rate": 0.9, "spm_rate": 0.5, "seed": 42,
    }  # fmt: skip
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    loaded = InferenceSettings.load(tmp_path / "earlier.json")
    assert loaded.batch_size == 8 and loaded.max_source_length == 256 and loaded.generation.max_new_tokens == 32
    assert loaded.system_prompt is None  # registered before system prompts travelled with the model
