"""Conversations rendered by the model's own chat template: which tokens are the assistant's.

Which tokens are the assistant's comes from the template itself. A template with {% generation %} markers says so
(transformers' assistant mask). One without them, as most ship (SmolLM2's and Qwen2.5's ChatML among them), is
rendered up to each assistant turn with the generation prompt and through that turn: the assistant's text is what
the second adds to the first, up to and including its end-of-turn token (the whitespace a template writes after it
is not the assistant's). A template whose renderings are not prefixes of one another, or whose tokens straddle a
turn's boundary, cannot be split cleanly and is refused, naming why: a mask that silently covers nothing, or covers
the user, is worse than no run.
"""

from __future__ import annotations

from codetune.core.config import TrainedTurns

# A tokenizer without a chat template gets ChatML, the format of SmolLM2, Qwen2.5 and many others.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class TemplateError(ValueError):
    """The chat template cannot be split into the assistant's tokens and the rest."""


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation with the system message chat.system_prompt gives one that has none: in training, in
    evaluation and where the model is served alike."""
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it, its end-of-turn included."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError(
                f"the chat template renders turn {i + 1} differently once later turns follow (not prefix-preserving, "
                "as templates that drop earlier reasoning do): its assistant tokens cannot be found; give the "
                "tokenizer a template with {% generation %} markers"
            )
        end = len(through.rstrip())
        if end <= len(before) or not through[len(before) : end].strip():
            raise TemplateError(f"the chat template renders assistant turn {i + 1} as nothing")
        spans.append((len(before), end))
    return text, spans


def chat_example(tokenizer, messages: list[dict], trained: TrainedTurns, max_length: int) -> dict:
    """input_ids, attention_mask and labels of a conversation: labels are the assistant's tokens (every assistant
    turn, or only the last) and -100 elsewhere; cut to max_length tokens."""
    if getattr(tokenizer, "chat_template", None) and "{% generation %}" in tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = rendered["input_ids"], rendered["assistant_masks"]
        if trained is TrainedTurns.last:
            mask = _last_run_only(mask)
    else:
        text, spans = assistant_spans(tokenizer, messages)
        if trained is TrainedTurns.last:
            spans = spans[-1:]
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask = encoded["input_ids"], _mask(encoded["offset_mapping"], spans)
    if not any(mask):
        raise TemplateError("no token of the conversation is the assistant's: the mask would cover nothing")
    ids, mask = ids[:max_length], mask[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else -100 for t, m in zip(ids, mask)],
    }


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token inside an assistant span; a token across a span's edge has no clean answer and is refused."""
    mask = []
    for start, end in offsets:
        inside = any(s <= start and end <= e for s, e in spans)
        across = any(start < s < end or start < e < end for s, e in spans)
        if across:
            raise TemplateError(
                f"a token spans characters {start}-{end}, across an assistant turn's boundary: the template's "
                "tokens cannot be split between the assistant and the rest"
            )
        mask.append(int(inside and end > start))
    return mask


def _last_run_only(mask: list[int]) -> list[int]:
    """The last contiguous run of 1s in mask: the last assistant turn."""
    last = max(i for i, m in enumerate(mask) if m)
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    return [int(first <= i <= last) for i in range(len(mask))]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: the tokenizer's EOS, and the last token of a rendered assistant turn where
    the template ends turns with another (ChatML's <|im_end|> on a model whose EOS is <|endoftext|>). A template that
    cannot be split (refused for training) ends turns at EOS alone."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        text, spans = assistant_spans(tokenizer, probe)
    except TemplateError:
        return [tokenizer.eos_token_id]
    ids = tokenizer(text[: spans[-1][1]], add_special_tokens=False)["input_ids"]
    return sorted({i for i in (tokenizer.eos_token_id, ids[-1]) if i is not None})
