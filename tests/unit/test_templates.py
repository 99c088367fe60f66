"""Conversations in every format, rendered by the model's own chat template; which tokens carry loss, token by token
on SmolLM2's real tokenizer (ChatML without generation markers) and on other template shapes."""

import copy

import pytest

from codetune.core.config import ConversationFormat, TrainedTurns
from codetune.core.data.conversations import to_messages
from codetune.core.families.templates import TemplateError, chat_example, end_of_turn_ids
from codetune.core.weights import materialize
from tests.conftest import skip_module_without_default_weights

DEFAULT_WEIGHTS = skip_module_without_default_weights()

SYSTEM = "You write Python."
ASK, CODE = "Write add(a, b).", "def add(a, b):\n    return a + b"
FOLLOW_UP, DOCSTRING = "Its docstring?", "Return the sum of a and b."
MULTI = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": ASK},
    {"role": "assistant", "content": CODE},
    {"role": "user", "content": FOLLOW_UP},
    {"role": "assistant", "content": DOCSTRING},
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    folder, _ = materialize(DEFAULT_WEIGHTS)
    return AutoTokenizer.from_pretrained(folder)


def learned_runs(tokenizer, example: dict) -> list[str]:
    """The text of each contiguous run of tokens that carries loss."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_every_assistant_turn_and_its_end_of_turn_carry_loss_and_nothing_else(smollm2):
    """SmolLM2's ChatML has no {% generation %} markers: the mask comes from rendering the turns."""
    assert "{% generation %}" not in smollm2.chat_template
    example = chat_example(smollm2, MULTI, TrainedTurns.all, 512)
    assert learned_runs(smollm2, example) == [CODE + "<|im_end|>", DOCSTRING + "<|im_end|>"]
    labels = [t for t in example["labels"] if t != -100]
    end = smollm2.convert_tokens_to_ids("<|im_end|>")
    assert labels.count(end) == 2 and end in end_of_turn_ids(smollm2)
    # Every label is its own input token (the collator shifts), and the prompt side never carries loss.
    assert all(label in (-100, token) for token, label in zip(example["input_ids"], example["labels"]))
    prompt = smollm2.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
    assert SYSTEM in prompt and ASK in prompt and FOLLOW_UP in prompt and CODE not in prompt


def test_only_the_last_turn_when_asked(smollm2):
    example = chat_example(smollm2, MULTI, TrainedTurns.last, 512)
    assert learned_runs(smollm2, example) == [DOCSTRING + "<|im_end|>"]


def test_one_conversation_in_every_format_gives_the_same_tokens_and_masks(smollm2):
    single = {
        ConversationFormat.messages: {"messages": [{"role": "user", "content": ASK},
                                                   {"role": "assistant", "content": CODE}]},
        ConversationFormat.sharegpt: {"conversations": [{"from": "human", "value": ASK},
                                                        {"from": "gpt", "value": CODE}]},
        ConversationFormat.alpaca: {"instruction": ASK, "input": "", "output": CODE},
        ConversationFormat.prompt_completion: {"prompt": ASK, "completion": CODE},
    }  # fmt: skip
    multi = {
        ConversationFormat.messages: {"messages": MULTI},
        ConversationFormat.sharegpt: {
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in MULTI
            ]  # noqa: E501
        },
    }
    for rows in (single, multi):
        examples = [chat_example(smollm2, to_messages(r, f, SYSTEM), TrainedTurns.all, 512) for f, r in rows.items()]
        recognised = [chat_example(smollm2, to_messages(r, ConversationFormat.auto, SYSTEM), TrainedTurns.all, 512)
                      for r in rows.values()]  # fmt: skip
        assert all(e == examples[0] for e in examples + recognised)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "empty assistant"),
        ({"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}, "out of order"),
        ({"messages": [{"role": "user", "content": "a"}]}, "must end with the assistant"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]}, "must hold text"),
        ({"question": "a", "answer": "b"}, "not a conversation in a known format"),
    ],
)
def test_a_malformed_conversation_says_what_is_wrong(row, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(row, ConversationFormat.auto)


LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHATML_WITH_MARKERS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_another_template_shape_and_generation_markers_give_the_assistant_tokens(smollm2):
    llama = copy.deepcopy(smollm2)
    llama.chat_template = LLAMA2
    example = chat_example(llama, MULTI[1:], TrainedTurns.all, 512)
    assert [run.strip() for run in learned_runs(llama, example)] == [
        CODE + llama.eos_token,
        DOCSTRING + llama.eos_token,
    ]
    marked = copy.deepcopy(smollm2)
    marked.chat_template = CHATML_WITH_MARKERS
    with_markers = chat_example(marked, MULTI[1:], TrainedTurns.all, 512)
    plain = copy.deepcopy(smollm2)
    plain.chat_template = CHATML_WITH_MARKERS.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert with_markers == chat_example(plain, MULTI[1:], TrainedTurns.all, 512)
    assert learned_runs(marked, with_markers) == [CODE + "<|im_end|>", DOCSTRING + "<|im_end|>"]


def test_a_template_that_cannot_be_split_is_refused_with_the_reason(smollm2):
    forgetting = copy.deepcopy(smollm2)  # drops earlier assistant turns once a later one follows
    forgetting.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="not prefix-preserving"):
        chat_example(forgetting, MULTI, TrainedTurns.all, 512)
    glued = copy.deepcopy(smollm2)  # the assistant's text glued to the prompt: BPE merges across the boundary
    glued.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
        "{% else %}{{ ' =' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' =' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="across an assistant turn's boundary"):
        chat_example(
            glued, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "=b"}], TrainedTurns.all, 512
        )
