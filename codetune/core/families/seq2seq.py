"""seq2seq: an encoder-decoder such as CodeT5 reads the input and writes the output (model.task=seq2seq)."""

from __future__ import annotations

from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, T5Config, T5ForConditionalGeneration

from codetune.core.config import Config, ModelTask
from codetune.core.families.base import Card
from codetune.core.families.generative import SUMMARY_SCORING, Generative


class Seq2Seq(Generative):
    """The encoder reads the input, the decoder writes the output; labels are the output's tokens."""

    task = ModelTask.seq2seq
    architecture = "CodeT5"
    peft_task_type = "SEQ_2_SEQ_LM"
    summary_card = Card(
        "summarization", "Summarises a function's source code in one sentence (a docstring summary).", SUMMARY_SCORING
    )
    auto_class = AutoModelForSeq2SeqLM

    def build_scratch(self, arch, tokenizer, labels=None):
        """CodeT5's architecture: T5 with a byte-level BPE vocabulary."""
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=arch.d_model,
            d_kv=arch.d_model // arch.num_heads,
            d_ff=arch.d_ff,
            num_layers=arch.num_layers,
            num_decoder_layers=arch.num_decoder_layers,
            num_heads=arch.num_heads,
            feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,  # as CodeT5
            tie_word_embeddings=True,
        )
        return T5ForConditionalGeneration(config)

    def tokenize(self, rows, tokenizer, cfg: Config, label2id=None):
        source, target, t = self.objective.source, self.objective.target, cfg.training
        sources = tokenizer([r[source] for r in rows], max_length=t.max_source_length, truncation=True)
        targets = tokenizer(text_target=[r[target] for r in rows], max_length=t.max_target_length, truncation=True)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": labels}
            for ids, mask, labels in zip(sources["input_ids"], sources["attention_mask"], targets["input_ids"])
        ]

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of
        )
