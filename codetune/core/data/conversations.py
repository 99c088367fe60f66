"""Conversations from the formats teams keep them in, read into OpenAI-style messages.

Four formats, recognised by their fields or named by data.conversation_format:

- messages (OpenAI): {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
- sharegpt: {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
- alpaca: {"instruction": "...", "input": "..." (may be empty or absent), "output": "..."}
- prompt_completion: {"prompt": "...", "completion": "..."}, or each a list of messages (TRL's conversational form)

Every conversation comes out as [system?, user, assistant, user, assistant, ...]: an optional system turn first,
then user and assistant in turn, ending with the assistant, whose turns are never empty. A row that is not so
raises ValueError naming what is wrong, which the data stage reports with the row's file:line.
"""

from __future__ import annotations

import ast
import hashlib
from collections import Counter
from typing import Any, Iterable, Iterator

from codetune.core.config import ConversationFormat
from codetune.core.data.records import read_rows

# The fields that name each format, checked in this order by auto.
SIGNATURES = {
    ConversationFormat.messages: ("messages",),
    ConversationFormat.sharegpt: ("conversations",),
    ConversationFormat.alpaca: ("instruction", "output"),
    ConversationFormat.prompt_completion: ("prompt", "completion"),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


def recognise(row: dict) -> ConversationFormat:
    for fmt, fields in SIGNATURES.items():
        if all(f in row for f in fields):
            return fmt
    known = "; ".join(f"{fmt.value}: {', '.join(fields)}" for fmt, fields in SIGNATURES.items())
    raise ValueError(
        f"not a conversation in a known format (row has {', '.join(map(repr, row)) or 'no fields'}; known: {known})"
    )


def to_messages(row: Any, fmt: ConversationFormat, system: str | None = None) -> list[dict]:
    """The row's conversation as checked messages; `system` is the system turn of a row that has none."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with fields, got {type(row).__name__}")
    if fmt is ConversationFormat.auto:
        fmt = recognise(row)
    missing = [f for f in SIGNATURES[fmt] if f not in row]
    if missing:
        raise ValueError(f"missing field {', '.join(map(repr, missing))} of data.conversation_format={fmt.value}")
    messages = READERS[fmt](row)
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    check_turns(messages)
    return messages


def _messages(row: dict) -> list[dict]:
    turns = row["messages"]
    if not isinstance(turns, list):
        raise ValueError(f"field 'messages' must be a list of turns, got {type(turns).__name__}")
    return [_turn(t, "role", "content", i) for i, t in enumerate(turns)]


def _sharegpt(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise ValueError(f"field 'conversations' must be a list of turns, got {type(turns).__name__}")
    return [_turn(t, "from", "value", i, SHAREGPT_ROLES) for i, t in enumerate(turns)]


def _alpaca(row: dict) -> list[dict]:
    instruction, given, output = row["instruction"], row.get("input") or "", row["output"]
    for name, value in (("instruction", instruction), ("input", given), ("output", output)):
        if not isinstance(value, str):
            raise ValueError(f"field '{name}' must be text, got {type(value).__name__}")
    request = f"{instruction}\n\n{given}" if given.strip() else instruction
    return [{"role": "user", "content": request}, {"role": "assistant", "content": output}]


def _prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [_turn(t, "role", "content", i) for i, t in enumerate(prompt + completion)]
    raise ValueError("fields 'prompt' and 'completion' must both be text or both be lists of messages")


def _turn(turn: Any, role_key: str, content_key: str, index: int, roles: dict | None = None) -> dict:
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise ValueError(f"turn {index + 1} must be an object with '{role_key}' and '{content_key}', got {turn!r:.60}")
    role, content = turn[role_key], turn[content_key]
    named = (roles or {r: r for r in ROLES}).get(role)
    if named is None:
        known = ", ".join(roles or ROLES)
        raise ValueError(f"turn {index + 1} has the unknown role {role!r} (known: {known})")
    if not isinstance(content, str):
        raise ValueError(f"turn {index + 1} ({named}) must hold text, got {type(content).__name__}")
    return {"role": named, "content": content}


def check_turns(messages: list[dict]) -> None:
    """System first if at all, then user and assistant in turn, ending with a non-empty assistant turn."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("the conversation has no user or assistant turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            position = i + 1 + (len(messages) - len(turns))
            raise ValueError(f"turn {position} is {turn['role']} where {expected} was expected (turns out of order)")
        if expected == "assistant" and not turn["content"].strip():
            raise ValueError(f"turn {i + 1 + len(messages) - len(turns)}: an empty assistant turn")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the conversation ends with the user: it must end with the assistant's answer")


READERS = {
    ConversationFormat.messages: _messages,
    ConversationFormat.sharegpt: _sharegpt,
    ConversationFormat.alpaca: _alpaca,
    ConversationFormat.prompt_completion: _prompt_completion,
}


def read_conversations(
    rows: Iterable[tuple[str, str | None, Any]], fmt: ConversationFormat, skip_invalid: bool, dropped: Counter
) -> Iterator[dict]:
    """Examples {messages, origin} from (origin, published split, raw row) triples; a malformed row fails the run
    with its origin (file:line) and the reason or, with skip_invalid, is counted."""
    return read_rows(
        rows, lambda row: {"messages": to_messages(row, fmt)}, skip_invalid, dropped, "invalid_conversation"
    )


def signature(code: str) -> str:
    """A function's def line(s), up to the colon that opens its body."""
    return code.partition(":\n")[0] + ":"


def fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


COMPLETE_FUNCTION = "Complete the following Python function:\n```python\n{prompt}```"
"""How a function is asked for by its signature and docstring: a code benchmark's prompt put to a chat model, in
EvalPlus's words (HumanEval in instruct mode asks so too)."""


def stub(written: str) -> str | None:
    """A documented function up to the end of its docstring (its signature and docstring, as HumanEval's prompts
    are); None where it does not parse as one."""
    try:
        doc = ast.parse(written).body[0].body[0]
    except (SyntaxError, IndexError, AttributeError):
        return None
    return "\n".join(written.splitlines()[: doc.end_lineno]) + "\n"


def code_conversations(functions: Iterable[dict]) -> Iterator[dict]:
    """Conversations about real functions ({code, summary, written, origin}, as read_code_tree gives them), one per
    function, of a kind chosen by its content hash. Half: a user shows a function and asks what it does, then asks for
    its docstring, answered with the function as its authors documented it. A quarter: a user asks for a function by
    its signature and what it does. A quarter: a user gives the function's signature and docstring to complete, as a
    benchmark's prompt is asked; those two are answered with the function in a fenced block, without the docstring
    the user already has (copying it back, doctests and all, is where a small model's answer derails)."""
    for f in functions:
        code, summary, written = f["code"], f["summary"], f["written"]
        kind = hashlib.sha256(code.encode()).digest()[0] % 4
        given = stub(written)
        if kind == 3 and given:
            messages = [
                {"role": "user", "content": COMPLETE_FUNCTION.format(prompt=given)},
                {"role": "assistant", "content": fenced(code)},
            ]
        elif kind >= 2:
            messages = [
                {"role": "user", "content": f"Write a Python function `{signature(code)}` that does this: {summary}"},
                {"role": "assistant", "content": fenced(code)},
            ]
        else:
            messages = [
                {"role": "user", "content": f"What does this function do?\n\n{fenced(code)}"},
                {"role": "assistant", "content": summary},
                {"role": "user", "content": "Write it again with its docstring."},
                {"role": "assistant", "content": fenced(written)},
            ]
        yield {"messages": messages, "origin": f["origin"]}
