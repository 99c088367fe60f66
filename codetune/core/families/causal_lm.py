"""causal_lm: a decoder-only LM (SmolLM2, Qwen2.5-Coder, CodeLlama) continues a prompt with the output."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from codetune.core.config import BenchmarkMode, Config, ModelTask
from codetune.core.families.base import (
    Card,
    Completion,
    FamilyDefaults,
    InferenceSettings,
    Sampling,
    sample_completions,
)
from codetune.core.families.generative import SUMMARY_SCORING, Generative, encode_prompt
from codetune.core.families.templates import end_of_turn_ids, with_system


def causal_example(tokenizer, template: str, source: str, target: str, max_source: int, max_target: int) -> dict:
    """Prompt, target, EOS in one sequence; the loss sees only the target and EOS, never the prompt."""
    prompt = encode_prompt(tokenizer, template, source, max_source)
    # A prompt ending in a newline is followed by code as it is; a summary gets the space a word would have.
    lead = "" if template.endswith("\n") else " "
    output = tokenizer(lead + target, add_special_tokens=False)["input_ids"][: max_target - 1]
    output.append(tokenizer.eos_token_id)
    return {
        "input_ids": prompt + output,
        "attention_mask": [1] * (len(prompt) + len(output)),
        "labels": [-100] * len(prompt) + output,
    }


class CausalLMCollator:
    """Right-padded prompt+target batches whose LM head runs only where a next token carries loss.

    The prompt is masked from the loss, so projecting its positions onto a 49k vocabulary is wasted
    work; the model gets those positions as logits_to_keep and the matching labels already shifted.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in examples[0]
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples])

        labels = padded("labels", -100)
        next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
        batch = {"input_ids": padded("input_ids", self.pad_token_id)}
        if packed:
            batch |= self.packed_attention(examples, length)
        else:
            batch["attention_mask"] = padded("attention_mask", 0)
        return batch | {
            "logits_to_keep": keep,
            "labels": next_labels[:, keep],
            "shift_labels": next_labels[:, keep],  # already aligned: the loss must not shift again
        }

    @staticmethod
    def packed_attention(packs: list[dict], length: int) -> dict:
        """Packs (pack()) one to a row: position ids restart with each example, and transformers builds from them a
        block-diagonal causal mask, so no token attends across examples. It does so only without an attention mask
        and without a cache, which a model creates by default even in training: hence use_cache. A row's padding
        continues its last example's positions, after every real token, which therefore never sees it."""

        def positions(p: dict) -> list[int]:
            last = p["position_ids"][-1]
            return p["position_ids"] + list(range(last + 1, last + 1 + length - len(p["position_ids"])))

        return {"position_ids": torch.tensor([positions(p) for p in packs]), "use_cache": False}


class DecoderOnly(FamilyDefaults):
    """What every decoder-only family (causal_lm's directions, fill_in_middle) shares: the architecture, batches whose
    LM head runs only where a next token carries loss, and chat through the tokenizer's template."""

    task = ModelTask.causal_lm
    architecture = "Qwen2"
    peft_task_type = "CAUSAL_LM"
    auto_class = AutoModelForCausalLM
    decoder_only = True
    scores_untuned = True
    batches_by_length = True

    def build_scratch(self, arch, tokenizer, labels=None):
        """Qwen2: the Llama-style decoder today's small code LMs (Qwen2.5-Coder, CodeLlama) use."""
        return Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer),
                hidden_size=arch.d_model,
                intermediate_size=arch.d_ff,
                num_hidden_layers=arch.num_layers + arch.num_decoder_layers,
                num_attention_heads=arch.num_heads,
                num_key_value_heads=arch.num_heads,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=True,
            )
        )

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of)

    def chat(
        self, model, tokenizer, conversations: list[list[dict]], settings: InferenceSettings, sampling: Sampling
    ) -> list[list[Completion]]:
        """The assistant's next message in each conversation, through the tokenizer's chat template, after the system
        prompt it was trained with where the conversation has none."""
        if not tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template: use /v1/completions")
        conversations = [with_system(messages, settings.system_prompt) for messages in conversations]
        ids = [
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for messages in conversations
        ]
        return sample_completions(model, tokenizer, ids, sampling, end_of_turn_ids(tokenizer), settings.batch_size)


class CausalLM(DecoderOnly, Generative):
    """The output continues the prompt in one sequence: the loss sees only the output, the LM head runs
    only where a next token carries loss, and generation pads prompts on the left."""

    summary_card = Card(
        "text-generation",
        "Writes a one-sentence summary (a docstring summary) after a function's source code.",
        SUMMARY_SCORING,
    )

    @property
    def benchmark_mode(self) -> BenchmarkMode | None:
        return BenchmarkMode.completion if self.writes_code else None

    def config_errors(self, cfg: Config) -> list[str]:
        errors = super().config_errors(cfg)
        placeholder = "{" + self.objective.source + "}"
        if cfg.model.prompt.count(placeholder) != 1:
            errors.append(
                f"model.prompt_template must contain {placeholder} exactly once "
                f"(model.direction={self.direction.value})"
            )
        return errors

    def tokenize(self, rows, tokenizer, cfg: Config, label2id=None):
        source, target, t = self.objective.source, self.objective.target, cfg.training
        return [
            causal_example(tokenizer, cfg.model.prompt, r[source], r[target], t.max_source_length, t.max_target_length)
            for r in rows
        ]

    def complete(
        self, model, tokenizer, prompts: list[tuple[str, str]], settings: InferenceSettings, sampling: Sampling
    ) -> list[list[Completion]]:
        """Continuations of each (prompt, suffix) as a plain LM continues text; a suffix needs fill-in-the-middle."""
        if any(suffix for _, suffix in prompts):
            raise ValueError(
                "this model was not trained to fill in the middle: send no suffix, or fine-tune with "
                "model.direction=fill_in_middle"
            )
        ids = [
            tokenizer(prompt, add_special_tokens=False)["input_ids"][-settings.max_source_length :]
            for prompt, _ in prompts
        ]
        return sample_completions(model, tokenizer, ids, sampling, tokenizer.eos_token_id, settings.batch_size)
