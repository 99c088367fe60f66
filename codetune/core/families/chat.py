"""chat (model.direction=chat): a decoder-only LM fine-tuned on conversations through its own chat template.

The loss is on what the assistant says, its end-of-turn token included (templates.py finds those tokens), so the
model learns to stop; the export's generation config stops at that token, so the merged model, `codetune serve`
and plain transformers all end where the assistant's turn ends. Scored turn by turn on held-out conversations: each
assistant turn is generated from the conversation before it.
"""

from __future__ import annotations

import ast
import re

from codetune.core.config import BenchmarkMode, Config, Direction
from codetune.core.data import Examples
from codetune.core.data.conversations import COMPLETE_FUNCTION
from codetune.core.errors import ModelError
from codetune.core.families.base import (
    Card,
    InferenceSettings,
    Sampling,
    Scored,
    add_special_tokens,
    sample_completions,
)
from codetune.core.families.causal_lm import DecoderOnly
from codetune.core.families.templates import CHATML, CHATML_TOKENS, chat_example, end_of_turn_ids, with_system
from codetune.core.metrics import code_metrics, summary_metrics

FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.S)


def fenced_code(text: str) -> str | None:
    """The first fenced code block of a message, as EvalPlus takes a chat model's answer; None if there is none."""
    found = FENCE.search(text)
    return found.group(1) if found else None


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def instruct_code(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> list[list[str]]:
    """`samples` answers to each code prompt asked as a user's message (after system_prompt, where given) through the
    chat template, each answer's first fenced block as the completion: written after the prompt (a function whose
    body is its docstring), the whole function redefines it."""
    if not tokenizer.chat_template:
        raise ModelError("the model's tokenizer has no chat template: solve the benchmark in completion mode")
    ids = [
        tokenizer.apply_chat_template(
            with_system([{"role": "user", "content": COMPLETE_FUNCTION.format(prompt=p)}], system_prompt),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for p in prompts
    ]
    sampling = Sampling(max_new_tokens, temperature if samples > 1 else 0.0, samples)
    done = sample_completions(model, tokenizer, ids, sampling, end_of_turn_ids(tokenizer), batch_size)
    return [[solution(c.text) for c in row] for row in done]


def solution(answer: str) -> str:
    """What follows a benchmark's prompt: the answer's first fenced block (or the answer, where it has none) on lines
    of its own, the whole function redefining the prompt's."""
    return "\n" + (fenced_code(answer) or answer)


def turn_metrics(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Smoothed BLEU-4 and the rest over every assistant turn, and prose_* over the turns whose reference is prose
    (no fenced code); over the turns whose reference is fenced code, CodeBLEU of the fenced code and the share of
    answers whose fenced code parses (x100)."""
    metrics = summary_metrics(references, predictions)
    prose = [(r, p) for r, p in zip(references, predictions) if not fenced_code(r)]
    if prose:
        metrics |= {f"prose_{k}": v for k, v in summary_metrics(*map(list, zip(*prose))).items()}
    code = [(fenced_code(r), fenced_code(p) or p) for r, p in zip(references, predictions) if fenced_code(r)]
    if code:
        metrics |= {f"code_{k}": v for k, v in code_metrics([r for r, _ in code], [p for _, p in code]).items()}
        answered = [fenced_code(p) for r, p in zip(references, predictions) if fenced_code(r)]
        metrics["code_parses"] = 100 * sum(a is not None and parses(a) for a in answered) / len(code)
    if predictions:
        metrics["distinct_predictions"] = 100 * len(set(predictions)) / len(predictions)
    return metrics


class Chat(DecoderOnly):
    """Answers conversations through the tokenizer's chat template; trained on what the assistant says."""

    directions = (Direction.chat,)
    examples = Examples.conversations
    writes_code = False  # answers are prose and fenced code: scored turn by turn, not run as a program
    benchmark_mode = BenchmarkMode.instruct
    primary_metric = "bleu4_smoothed"
    registered_name = "codetune-code-assistant"
    card = Card(
        "text-generation",
        "Answers conversations about code (system, user and assistant turns) through its chat template.",
        "per assistant turn of held-out conversations: smoothed BLEU-4 as CodeXGLUE computes it, over every turn and "
        "over the turns that answer in prose; on the turns that answer with code, CodeBLEU of the fenced code and the "
        "share that parses; x100",
    )

    def __init__(self, direction: Direction = Direction.chat):
        super().__init__(direction)

    def config_errors(self, cfg: Config) -> list[str]:
        errors = []
        if cfg.model.prompt_template is not None:
            errors.append("model.prompt_template is not used by model.direction=chat (the chat template is): remove it")
        if cfg.training.max_source_length + cfg.training.max_target_length < 64:
            errors.append("model.direction=chat: training.max_source_length + max_target_length must be >= 64")
        return errors

    def gate_metric(self, cfg: Config, benchmarks: bool = True) -> str:
        return self.primary_metric

    def add_tokens(self, model, tokenizer) -> list[int]:
        """A tokenizer without a chat template gets ChatML, and the model embedding rows for its two tokens where the
        vocabulary lacks them; the export stops generating at the end of the assistant's turn."""
        added = []
        if not tokenizer.chat_template:
            missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
            added = add_special_tokens(model, tokenizer, missing) if missing else []
            tokenizer.chat_template = CHATML
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
        return added

    def tokenize(self, rows, tokenizer, cfg: Config, label2id=None):
        t, chat = cfg.training, cfg.chat
        length = t.max_source_length + t.max_target_length
        return [
            chat_example(tokenizer, with_system(r["messages"], chat.system_prompt), chat.trained_turns, length)
            for r in rows
        ]

    def answer(self, model, tokenizer, conversations: list[list[dict]], settings: InferenceSettings) -> list[str]:
        """The assistant's next message in each conversation, greedy, up to generation.max_new_tokens: what the
        OpenAI chat route answers (DecoderOnly.chat)."""
        done = self.chat(model, tokenizer, conversations, settings, Sampling(settings.generation.max_new_tokens))
        return [row[0].text for row in done]

    def predict(self, model, tokenizer, model_input, settings: InferenceSettings) -> list[str]:
        """A conversation (a list of {role, content}) or a list of them -> the assistant's next message for each."""
        if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
            model_input = [model_input]
        return self.answer(model, tokenizer, list(model_input), settings)

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored:
        turns = [(r, i) for r in rows for i, m in enumerate(r["messages"]) if m["role"] == "assistant"]
        before = [r["messages"][:i] for r, i in turns]
        references = [r["messages"][i]["content"] for r, i in turns]
        predictions = self.answer(model, tokenizer, before, settings)
        baseline = [b[-1]["content"] for b in before]  # the user's message, echoed
        return Scored(
            metrics=turn_metrics(references, predictions),
            baseline=turn_metrics(references, baseline),
            baseline_name="the user's message echoed",
            records=[
                {"id": r.get("id"), "turn": i, "reference": ref, "prediction": pred, "baseline": base}
                for (r, i), ref, pred, base in zip(turns, references, predictions, baseline)
            ],
            examples=[
                {"input": b[-1]["content"], "reference": ref, "prediction": pred}
                for b, ref, pred in zip(before, references, predictions)
            ],
        )
