import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.precision import resolve_precision
from codetune.core.rundir import last_complete_checkpoint
from codetune.core.training import train_model
from tests.conftest import TWIN


def test_training_exports_a_complete_run_directory(trained_run):
    cfg, data, result = trained_run
    run_dir = Path(result.run_dir)
    for name in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
        "config.yaml",
        "data_manifest.json",
        "training.json",
    ]:
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".export").exists()
    assert result.global_step == 12 and result.resumed_from_step == 0
    state = json.loads((run_dir / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


def test_finished_training_is_not_redone(trained_run, caplog):
    cfg, data, first = trained_run
    mtime = (Path(first.run_dir) / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = train_model(cfg, data, family_of(cfg.model))
    assert again == first
    assert (Path(first.run_dir) / "model.safetensors").stat().st_mtime_ns == mtime
    assert "not redoing it" in caplog.text


def test_training_says_how_long_it_will_take_after_its_first_steps(tiny_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="codetune"):
        train_model(tiny_cfg, prepare_data(tiny_cfg.data, Examples.pairs), family_of(tiny_cfg.model))
    estimates = [r.getMessage() for r in caplog.records if "more minutes on this machine" in r.getMessage()]
    assert len(estimates) == 1 and re.search(r"7 steps of ~\d+ tokens at \d+ tokens/s", estimates[0]), estimates


def test_same_seed_gives_identical_weights(trained_run, tiny_overrides, tmp_path):
    cfg, data, first = trained_run
    twin = load_config(TWIN, tiny_overrides + [f"training.output_dir={tmp_path / 'twin'}"])
    second = train_model(twin, data, family_of(twin.model))
    a = load_file(Path(first.run_dir) / "model.safetensors")
    b = load_file(Path(second.run_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def lora_on(base, output_dir: Path) -> list[str]:
    """Overrides for LoRA on a model trained earlier in the test session, as a local pretrained model."""
    return [
        "model.init=pretrained",
        f"model.name={base.run_dir}",
        "peft.use_peft=true",
        "peft.r=4",
        f"training.output_dir={output_dir}",
    ]


def test_lora_on_a_local_pretrained_model_saves_adapter_and_merged_model(trained_run, tiny_overrides, tmp_path):
    _, data, base = trained_run
    cfg = load_config(TWIN, tiny_overrides + lora_on(base, tmp_path / "lora"))
    result = train_model(cfg, data, family_of(cfg.model))
    run_dir = Path(result.run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert result.trainable_parameters < 0.2 * result.total_parameters
    assert not any("lora" in k for k in load_file(run_dir / "model.safetensors"))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for step, state in [(5, '{"global_step": 5}'), (10, '{"global_st')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-15").mkdir()  # killed before trainer_state.json was written
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-5"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rules")
def test_cpu_precision_follows_the_cpus_bf16_instructions(caplog, monkeypatch):
    precision = lambda *overrides: resolve_precision(load_config(TWIN, list(overrides)))
    monkeypatch.setattr("codetune.core.precision.cpu_has_bf16", lambda: True)
    assert precision() == (True, False)
    assert precision("training.bf16=false") == (False, False)
    monkeypatch.setattr("codetune.core.precision.cpu_has_bf16", lambda: False)
    assert precision() == (False, False)
    with caplog.at_level(logging.WARNING):
        assert precision("training.bf16=true") == (False, False)
        assert precision("training.fp16=true") == (False, False)
    assert "without bf16 instructions" in caplog.text and "needs a CUDA GPU" in caplog.text


def test_causal_lm_loss_sees_only_the_summary(tiny_cfg):
    from codetune.core.families.causal_lm import causal_example
    from codetune.core.model import train_tokenizer

    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n# Summary: Add two numbers."] * 20, 300)
    row = {"code": "def add(a, b):\n    return a + b", "summary": "Add two numbers."}
    example = causal_example(tokenizer, "{code}\n# Summary:", row["code"], row["summary"], max_source=64, max_target=16)
    scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(scored, skip_special_tokens=True).strip() == "Add two numbers."
    assert scored[-1] == tokenizer.eos_token_id
    prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
    assert tokenizer.decode(prompt).endswith("# Summary:")


@pytest.mark.parametrize(
    "config, auto_class, model_type",
    [
        ("tiny-seq2seq", "AutoModelForSeq2SeqLM", "t5"),
        ("tiny-causal-lm", "AutoModelForCausalLM", "qwen2"),
        ("tiny-encoder-decoder", "AutoModelForSeq2SeqLM", "encoder-decoder"),
        ("tiny-classifier", "AutoModelForSequenceClassification", "roberta"),
        ("tiny-code-search", "AutoModel", "roberta"),
        ("tiny-completion", "AutoModelForCausalLM", "qwen2"),
    ],
)
def test_every_family_exports_a_model_plain_transformers_loads(config, auto_class, model_type, tiny_overrides, request):
    import transformers

    labelled = [f"data.path={request.getfixturevalue('labelled_jsonl')}"] if config == "tiny-classifier" else []
    cfg = load_config(f"configs/{config}.yaml", tiny_overrides + labelled)
    family = family_of(cfg.model)
    result = train_model(cfg, prepare_data(cfg.data, family.examples), family_of(cfg.model))
    model = getattr(transformers, auto_class).from_pretrained(result.run_dir)
    assert model.config.model_type == model_type and result.global_step == 12


def test_classifier_beats_the_majority_class_on_a_real_stdlib_task(labelled_jsonl, stdlib_cache, tmp_path):
    from codetune.core.evaluation import evaluate_model

    cfg = load_config(
        "configs/tiny-classifier.yaml",
        [
            f"data.path={labelled_jsonl}",
            f"data.cache_dir={stdlib_cache}",
            f"training.output_dir={tmp_path}",
            "training.max_steps=100",
            "training.max_source_length=48",
            "training.learning_rate=3e-3",
            "model.scratch.vocab_size=1000",
            "model.scratch.d_model=64",
            "model.scratch.d_ff=128",
            "model.scratch.num_layers=1",
            "data.test_fraction=0.2",
        ],
    )
    data = prepare_data(cfg.data, Examples.labelled)
    report = evaluate_model(train_model(cfg, data, family_of(cfg.model)).run_dir, data.load("test"), cfg)
    assert report.baseline_name == "majority class"
    assert report.metrics["accuracy"] > report.baseline["accuracy"]


def test_run_shorter_than_the_logging_interval_still_reports_its_loss(tiny_cfg):
    from codetune.core.data import prepare_data
    from codetune.core.training import train_model

    tiny_cfg.training.max_steps, tiny_cfg.training.logging_steps = 3, 50
    trained = train_model(tiny_cfg, prepare_data(tiny_cfg.data, Examples.pairs), family_of(tiny_cfg.model))
    assert trained.global_step == 3 and trained.train_loss > 0


def test_dynamic_padding_gives_the_loss_of_max_length_padding(tiny_cfg):
    """The collator pads to the batch's longest example (a multiple of 8), not max_length: the loss must not move."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from codetune.core.families import family_of
    from codetune.core.model import load_model

    rows = prepare_data(tiny_cfg.data, Examples.pairs).load("train")[:16]
    model, tokenizer = load_model(tiny_cfg.model, (r["code"] + "\n" + r["summary"] for r in rows), seed=0)
    examples = family_of(tiny_cfg.model).tokenize(rows, tokenizer, tiny_cfg)
    dynamic = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)(examples)
    full = DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=-100, padding="max_length", max_length=128
    )(examples)
    assert dynamic["labels"].shape[1] < full["labels"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**dynamic).loss, model(**full).loss, atol=1e-5, rtol=1e-5)


def test_length_grouped_batches_train_as_well_as_random_ones(tiny_overrides, tmp_path):
    """Batches of similar length (little padding) see the same examples per epoch; the model they give is as good."""
    losses = {}
    for grouped in (True, False):
        cfg = load_config(
            TWIN,
            tiny_overrides
            + [
                "training.max_steps=60",
                f"training.group_by_length={grouped}",
                f"training.output_dir={tmp_path / str(grouped)}",
            ],
        )
        losses[grouped] = train_model(cfg, prepare_data(cfg.data, Examples.pairs), family_of(cfg.model)).validation_loss
    assert abs(losses[True] - losses[False]) / losses[False] < 0.05, losses


def test_activation_checkpointing_under_lora_changes_memory_not_the_model(
    trained_run, tiny_overrides, tmp_path, monkeypatch
):
    """training.gradient_checkpointing=true recomputes activations; the adapters it trains are the same."""
    from transformers import PreTrainedModel

    _, data, base = trained_run
    enabled = []
    real_enable = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(
        PreTrainedModel,
        "activation_checkpointing_enable",
        lambda self, *a, **k: (enabled.append(True), real_enable(self, *a, **k))[1],
    )
    adapters = {}
    for checkpointing in ("true", "false"):
        overrides = [*lora_on(base, tmp_path / checkpointing), f"training.gradient_checkpointing={checkpointing}"]
        cfg = load_config(TWIN, tiny_overrides + overrides)
        adapters[checkpointing] = load_file(
            Path(train_model(cfg, data, family_of(cfg.model)).run_dir) / "adapter" / "adapter_model.safetensors"
        )
    assert enabled == [True]  # the run with it on recomputed activations; the one with it off did not
    recomputed, stored = adapters["true"], adapters["false"]
    assert recomputed.keys() == stored.keys()
    for key in recomputed:
        torch.testing.assert_close(recomputed[key], stored[key], atol=1e-6, rtol=1e-5)


def test_lm_head_on_loss_positions_only_gives_the_full_logits_loss(tiny_overrides):
    """The causal collator projects only positions whose next token carries loss; loss and gradients must not move."""
    from transformers import DataCollatorForSeq2Seq

    from codetune.core.families import family_of
    from codetune.core.families.causal_lm import CausalLMCollator
    from codetune.core.model import load_model

    cfg = load_config("configs/tiny-causal-lm.yaml", tiny_overrides)
    rows = prepare_data(cfg.data, Examples.pairs).load("train")[:8]
    model, tokenizer = load_model(cfg.model, (r["code"] + "\n" + r["summary"] for r in rows), seed=0)
    examples = family_of(cfg.model).tokenize(rows, tokenizer, cfg)
    trimmed = CausalLMCollator(tokenizer.pad_token_id)(examples)
    full = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)(examples)
    assert trimmed["logits_to_keep"].numel() < full["input_ids"].shape[1]  # the prompt positions are skipped
    model.eval()
    losses, grads = [], []
    for batch in (trimmed, full):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU autocast path")
def test_bf16_autocast_trains_to_the_fp32_loss(tiny_overrides, tmp_path):
    """bf16 on a CPU that has it halves the step time of the default; the model it trains must be as good (2%)."""
    from codetune.core.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions: codetune trains in fp32 here")
    losses = {}
    for bf16 in ("true", "false"):
        cfg = load_config(
            TWIN,
            tiny_overrides
            + ["training.max_steps=40", f"training.bf16={bf16}", f"training.output_dir={tmp_path / bf16}"],
        )
        losses[bf16] = train_model(cfg, prepare_data(cfg.data, Examples.pairs), family_of(cfg.model)).validation_loss
    assert losses["true"] != losses["false"], "bf16 changed nothing: autocast never ran"
    assert abs(losses["true"] - losses["false"]) / losses["false"] < 0.02, losses


def test_a_onednn_held_to_avx2_turns_bf16_off_whatever_the_cpu_flags_say():
    """bf16 in oneDNN's AVX2 reference kernels is ~40x slower than fp32: `bf16: null` must not pick it there."""
    import subprocess
    import sys

    probe = "from codetune.core.precision import cpu_has_bf16; print(cpu_has_bf16())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    held = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert held.stdout.strip() == "False"


def test_out_of_memory_retries_at_half_the_micro_batch_with_the_same_effective_batch(
    trained_run, tiny_overrides, tmp_path, monkeypatch, caplog
):
    """A device that holds 8 examples until step 6, then only 4: training resumes from checkpoint-6 at 4 x 2."""
    from transformers import Trainer

    cfg, data, uninterrupted = trained_run
    step = Trainer.training_step
    micro_batches = []

    def filling_device(trainer, model, inputs, *args, **kwargs):
        rows = len(inputs["input_ids"])
        if rows > 4 and trainer.state.global_step >= 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        micro_batches.append((trainer.state.global_step, rows, trainer.args.gradient_accumulation_steps))
        return step(trainer, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", filling_device)
    squeezed = load_config(TWIN, tiny_overrides + [f"training.output_dir={tmp_path / 'squeezed'}"])
    with caplog.at_level(logging.WARNING):
        result = train_model(squeezed, data, family_of(squeezed.model))

    assert "retrying once at micro-batch 4 with gradient accumulation 2" in caplog.text
    assert result.global_step == 12 and result.resumed_from_step == 6 and result.micro_batch_size == 4
    assert {(rows, accumulation) for s, rows, accumulation in micro_batches if s < 6} == {(8, 1)}
    assert {(rows, accumulation) for s, rows, accumulation in micro_batches if s >= 6} == {(4, 2)}
    # Each optimiser step saw the same 8 examples, averaged per micro-batch of 4 and with other dropout masks.
    assert result.validation_loss == pytest.approx(uninterrupted.validation_loss, rel=0.01)
    # T5 ignores the Trainer's item count: unless told so, accumulation doubles the loss and gradients.
    assert result.train_loss == pytest.approx(uninterrupted.train_loss, rel=0.05)


def test_out_of_memory_at_an_odd_micro_batch_names_the_fix(tiny_overrides, tmp_path, monkeypatch):
    from transformers import Trainer

    from codetune.core.errors import ModelError

    def full_device(trainer, model, inputs, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "training_step", full_device)
    cfg = load_config(TWIN, tiny_overrides + ["training.per_device_train_batch_size=7"])
    with pytest.raises(ModelError, match="cannot be halved at the same effective batch"):
        train_model(cfg, prepare_data(cfg.data, Examples.pairs), family_of(cfg.model))


@pytest.mark.parametrize("config, honours", [("tiny-seq2seq", False), ("tiny-causal-lm", True)])
def test_which_losses_honour_the_trainers_item_count_is_measured(config, honours, tiny_overrides):
    """T5 averages per micro-batch whatever it is told; Qwen2's loss divides by the count the Trainer passes."""
    from codetune.core.families import family_of
    from codetune.core.model import load_model
    from codetune.core.training import loss_honours_item_count

    cfg = load_config(f"configs/{config}.yaml", tiny_overrides)
    rows = prepare_data(cfg.data, Examples.pairs).load("train")[:2]
    model, tokenizer = load_model(cfg.model, (r["code"] + "\n" + r["summary"] for r in rows), seed=0)
    batch = family_of(cfg.model).collator(tokenizer, model, None)(family_of(cfg.model).tokenize(rows, tokenizer, cfg))
    assert loss_honours_item_count(model, batch) is honours
    assert model.training  # restored


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_attend_to_themselves_alone(tiny_decoder_base, attention):
    """Packed into rows, positions restarting per example: each example's logits are its own, alone, and the loss of
    the packs, batched one to a row and padded, is the unpacked batch's. The same row with an attention mask of ones
    (examples attending to each other) is shown to differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.families.causal_lm import CausalLMCollator, causal_example
    from codetune.core.training import pack

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_base, attn_implementation=attention).eval()
    rows = [(f"def f{i}(x):\n    return x * {i} + {i % 3}", f"Multiply x by {i}.") for i in range(12)]
    examples = [causal_example(tokenizer, "{code}\n# Summary:", code, text, 48, 16) for code, text in rows]
    collator = CausalLMCollator(tokenizer.pad_token_id)
    packs = pack(examples, 256)
    assert len(packs) < len(examples) / 2 and max(len(p["input_ids"]) for p in packs) <= 256
    first = packs[0]
    starts = [i for i, position in enumerate(first["position_ids"]) if position == 0] + [len(first["input_ids"])]
    row = collator([first])
    row = {"input_ids": row["input_ids"], "position_ids": row["position_ids"], "use_cache": row["use_cache"]}
    with torch.no_grad():
        packed = model(**row).logits[0]
        leaking = model(**row, attention_mask=torch.ones_like(row["input_ids"])).logits[0]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([first["input_ids"][start:end]])).logits[0]
            assert torch.allclose(packed[start:end], alone, atol=1e-4)
        assert not torch.allclose(leaking[starts[1] :], packed[starts[1] :], atol=1e-3)
        apart = model(**collator(examples)).loss.item()
        together = model(**collator(packs)).loss.item()
    assert len(packs) > 1  # rows of unequal length: the shorter padded
    assert abs(together - apart) / apart < 0.005
