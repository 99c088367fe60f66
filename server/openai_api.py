"""The OpenAI API's completions and chat completions: requests parsed and checked, answers and errors shaped as the
`openai` client reads them. No Ray here: server/app.py batches the jobs."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from codetune.core.families.base import Completion, Sampling

MAX_STOP_SEQUENCES = 4  # as OpenAI allows
MAX_N = 16


class OpenAIError(Exception):
    """A request the server refuses: answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        }


@dataclass(frozen=True)
class CompletionJob:
    route: str
    """"completions" or "chat"."""
    prompts: list
    """(prefix, suffix) pairs, or conversations (lists of {role, content})."""
    sampling: Sampling
    stream: bool


def _request(body: bytes, model_name: str) -> dict:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise OpenAIError(400, f"the body is not JSON: {exc}", None) from None
    if not isinstance(request, dict):
        raise OpenAIError(400, "the body must be a JSON object", None)
    if request.get("model") not in (model_name, None):
        raise OpenAIError(
            404, f"model '{request['model']}' is not served here: this server serves '{model_name}'", "model",
            "model_not_found",
        )  # fmt: skip
    return request


def _number(request: dict, key: str, default, kind: type, low, high):
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise OpenAIError(400, f"'{key}' must be a number, got {value!r}", key)
    if not low <= value <= high:
        raise OpenAIError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return kind(value)


def _sampling(request: dict, max_tokens_default: int, max_tokens_keys: tuple[str, ...] = ("max_tokens",)) -> Sampling:
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    max_tokens_key = next((k for k in max_tokens_keys if request.get(k) is not None), max_tokens_keys[0])
    return Sampling(
        max_tokens=_number(request, max_tokens_key, max_tokens_default, int, 1, 4096),
        temperature=_number(request, "temperature", 0.0, float, 0, 2),
        n=_number(request, "n", 1, int, 1, MAX_N),
        stop=tuple(stop),
    )


def _text(value: Any, key: str, limit: int) -> str:
    if not isinstance(value, str):
        raise OpenAIError(400, f"'{key}' must be a string", key)
    if len(value) > limit:
        raise OpenAIError(400, f"'{key}' has {len(value)} characters: at most {limit}", key)
    return value


def completion_job(body: bytes, model_name: str, limits) -> CompletionJob:
    """/v1/completions: `prompt` (a string or a list of them) and `suffix`, the text before and after the cursor."""
    request = _request(body, model_name)
    prompts = request.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts:
        raise OpenAIError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
    suffix = _text(request.get("suffix") or "", "suffix", limits.input_chars)
    pairs = [(_text(p, "prompt", limits.input_chars), suffix) for p in prompts]
    sampling = _sampling(request, 16)  # OpenAI's default max_tokens
    if len(pairs) * sampling.n > limits.rows:
        raise OpenAIError(400, f"{len(pairs)} prompts x n={sampling.n}: at most {limits.rows} completions", "n")
    return CompletionJob("completions", pairs, sampling, bool(request.get("stream")))


def chat_job(body: bytes, model_name: str, limits) -> CompletionJob:
    """/v1/chat/completions: `messages`, each {role, content} with content a string."""
    request = _request(body, model_name)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise OpenAIError(400, "each message needs a role: system, user or assistant", "messages")
        _text(message.get("content"), "messages.content", limits.input_chars)
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    sampling = _sampling(request, 256, ("max_completion_tokens", "max_tokens"))  # the first is chat's newer name
    return CompletionJob("chat", [conversation], sampling, bool(request.get("stream")))


def response_body(job: CompletionJob, answer: list[list[Completion]], model_name: str, version: str) -> dict:
    """The answer as OpenAI's completion or chat.completion object; choices are numbered prompt by prompt."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for completions in answer:
        prompt_tokens += completions[0].prompt_tokens
        for c in completions:
            index = len(choices)
            completion_tokens += c.completion_tokens
            if job.route == "chat":
                message = {"role": "assistant", "content": c.text}
                choices.append({"index": index, "message": message, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None})
    return {
        "id": f"{'chatcmpl' if job.route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if job.route == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": f"{model_name}/{version}",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def events(job: CompletionJob, body: dict) -> Iterator[str]:
    """The answer as server-sent events: each choice's text line by line, then its finish reason, then [DONE].

    The text is sent once generated (the batch decides when), not token by token.
    """
    chat = job.route == "chat"
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish_reason: str | None) -> str:
        if chat:
            delta = {} if text is None else {"role": "assistant", "content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return f"data: {json.dumps(head | {'choices': [choice]})}\n\n"

    for choice in body["choices"]:
        text = choice["message"]["content"] if chat else choice["text"]
        for piece in text.splitlines(keepends=True) or [""]:
            yield chunk(choice["index"], piece, None)
        yield chunk(choice["index"], None, choice["finish_reason"])
    yield "data: [DONE]\n\n"
