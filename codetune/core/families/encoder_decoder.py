"""encoder_decoder: a pretrained encoder (CodeBERT, RoBERTa) warm-starts both halves of a seq2seq model.

The CodeXGLUE code-to-text baseline: the encoder twice, the copy used as decoder gaining
cross-attention. That cross-attention starts random, so it is trained whole beside the LoRA adapters.
"""

from __future__ import annotations

from transformers import EncoderDecoderConfig, EncoderDecoderModel

from codetune.core.config import ModelTask
from codetune.core.families.base import lora_layers, roberta_config
from codetune.core.families.seq2seq import Seq2Seq

CROSS_ATTENTION = "crossattention"


def with_special_ids(model: EncoderDecoderModel, tokenizer) -> EncoderDecoderModel:
    """An EncoderDecoderModel knows no start, end or padding token until told; RoBERTa's are <s>, </s>, <pad>."""
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return model


class EncoderDecoder(Seq2Seq):
    task = ModelTask.encoder_decoder
    architecture = "RoBERTa"

    def build_scratch(self, arch, tokenizer, labels=None):
        encoder = roberta_config(arch, tokenizer, arch.num_layers)
        decoder = roberta_config(arch, tokenizer, arch.num_decoder_layers, is_decoder=True, add_cross_attention=True)
        config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        return with_special_ids(EncoderDecoderModel(config=config), tokenizer)

    def load_base(self, name, tokenizer, labels=None, **hub):
        return with_special_ids(EncoderDecoderModel.from_encoder_decoder_pretrained(name, name, **hub), tokenizer)

    def lora_targets(self, model):
        """Self-attention only, typed by the encoder: the cross-attention is trained whole (modules_to_save)."""
        return rf"^(?!.*{CROSS_ATTENTION}).*\.({'|'.join(lora_layers(model.config.encoder.model_type))})$"

    def modules_to_save(self, model):
        return [CROSS_ATTENTION]
