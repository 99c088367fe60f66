"""A split's profile: what the drift monitor (codetune.lifecycle.monitoring) measures a source against, stored
beside the prepared splits and carried by the champion's MLflow run."""

from __future__ import annotations

import hashlib
import heapq
import keyword
import re
from collections import Counter

PROFILE_VERSION = 1
IDENTIFIERS_KEPT = 2000
"""The reference's most frequent identifiers kept by name in the profile (the plot shows which moved)."""
SAMPLE_SIZE = 512
"""Training functions stored in the profile for the embedding check (monitor.sample_size takes up to this many)."""

_TOKEN = re.compile(r"\w+|[^\w\s]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def function_key(code: str) -> str:
    """What makes two functions the same, for deduplication, the leak filter and drift alike: their code with
    whitespace normalised, so reformatting is not a new function (64 bits of its SHA-256: profiles store them)."""
    return hashlib.sha256(" ".join(code.split()).encode()).hexdigest()[:16]


def example_text(example: dict) -> str:
    """What an example is known by: its code, or a conversation's turns."""
    if "messages" in example:
        return "\n".join(turn["content"] for turn in example["messages"])
    return example["code"]


def code_tokens(code: str) -> int:
    """Lexical tokens (words and punctuation): a tokenizer-free length that every model family shares."""
    return len(_TOKEN.findall(code))


def identifiers(examples: list[dict]) -> Counter:
    """Names in the code; keywords (if, None, ...) say nothing about what a code base is about."""
    names = (name for ex in examples for name in _IDENTIFIER.findall(example_text(ex)))
    return Counter(name for name in names if not keyword.iskeyword(name))


def sample(examples: list[dict], size: int) -> list[dict]:
    """The same functions every time: those whose content hash ranks lowest."""
    return heapq.nsmallest(size, examples, key=lambda ex: function_key(example_text(ex)))


def profile_splits(splits: dict[str, list[dict]]) -> dict:
    """What drift is measured against: every split's function hashes, the train split's distributions and a sample."""
    train = splits["train"]
    names = identifiers(train)
    return {
        "version": PROFILE_VERSION,
        "code_hashes": sorted({function_key(example_text(ex)) for rows in splits.values() for ex in rows}),
        "code_tokens": [code_tokens(example_text(ex)) for ex in train],
        "summary_words": [len(ex["summary"].split()) for ex in train if "summary" in ex],
        "identifiers": dict(names.most_common(IDENTIFIERS_KEPT)),
        "identifier_total": sum(names.values()),
        "sample": [{"code": example_text(ex)} for ex in sample(train, SAMPLE_SIZE)],
    }
