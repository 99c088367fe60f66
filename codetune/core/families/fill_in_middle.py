"""causal_lm, model.direction=fill_in_middle: complete code at a cursor from the code before and after it.

Trained on whole source files, as the FIM paper (Bavarian et al. 2022) and StarCoder train: a span (a line, the
rest of a line, a block) is cut from a file and the model learns prefix + suffix -> middle, in PSM or SPM order
(fill_in_middle.rate and spm_rate); the other windows learn left-to-right completion of the prefix. Scored as an editor
sees it: on held-out files, at cursors sampled at line starts, inside lines and before blocks, by exact match and
edit similarity of the completed line (CodeXGLUE's line completion) and of the completed block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from codetune.core.config import Config, DataSource, Direction
from codetune.core.data import Examples
from codetune.core.families.base import (
    Card,
    Completion,
    InferenceSettings,
    Sampling,
    Scored,
    add_special_tokens,
    sample_completions,
)
from codetune.core.families.causal_lm import DecoderOnly
from codetune.core.metrics import block_completion_metrics, line_completion_metrics


@dataclass(frozen=True)
class FimTokens:
    """The four tokens of a fill-in-the-middle prompt: prefix, suffix and middle markers, and the end of the middle."""

    prefix: str
    suffix: str
    middle: str
    end: str | None
    """None: the tokenizer's eos token."""


# The code LMs that were pretrained with fill-in-the-middle, by their tokens' names. A tokenizer's FIM tokens are
# found by name, never by position: additional_special_tokens[0:3] of a tokenizer without them is whatever it holds
# (SmolLM2: <|im_start|>, <|im_end|>, ...).
KNOWN_FIM_TOKENS = {
    "Qwen2.5-Coder": FimTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>"),
    "StarCoder, SantaCoder": FimTokens("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>"),
    "CodeLlama": FimTokens("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"),
    "DeepSeek-Coder": FimTokens("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None),
}
ADDED_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
"""What a tokenizer without FIM tokens gets: Qwen2.5-Coder's names, so a served model reads the prompts editors send
Qwen."""


def fim_tokens(tokenizer) -> FimTokens | None:
    """The tokenizer's own FIM tokens, found by name; None where it has none."""
    vocab = tokenizer.get_vocab()
    for tokens in KNOWN_FIM_TOKENS.values():
        if all(t in vocab for t in (tokens.prefix, tokens.suffix, tokens.middle)):
            end = tokens.end if tokens.end in vocab else None
            return FimTokens(tokens.prefix, tokens.suffix, tokens.middle, end)
    return None


@dataclass(frozen=True)
class FimIds:
    prefix: int
    suffix: int
    middle: int
    end: int

    @classmethod
    def of(cls, tokenizer) -> "FimIds | None":
        tokens = fim_tokens(tokenizer)
        if tokens is None:
            return None
        ids = tokenizer.convert_tokens_to_ids([tokens.prefix, tokens.suffix, tokens.middle])
        end = tokenizer.convert_tokens_to_ids(tokens.end) if tokens.end else tokenizer.eos_token_id
        return cls(*ids, end)


ORDER_KEY = "codetune_fim_order"
"""In config.json: the order a model completes in. A model that learned its FIM tokens here completes in SPM, where
the middle continues the prefix as in its pretraining (edit similarity 53.3 against 32.6 in PSM on the same weights,
150 steps trained on both; docs/completion.md); one pretrained with FIM tokens (Qwen2.5-Coder) in PSM, its
own order."""


def add_fim_tokens(model, tokenizer) -> list[int]:
    """Give a tokenizer without FIM tokens Qwen2.5-Coder's, and the model their embedding rows; the new rows' ids.

    The end of a middle is <|endoftext|> where the vocabulary has it (a document end the model already knows), else
    eos. A tokenizer with its own FIM tokens is left as it is.
    """
    if fim_tokens(tokenizer) is not None:
        return []
    added = add_special_tokens(model, tokenizer, ADDED_FIM_TOKENS)
    setattr(model.config, ORDER_KEY, "spm")
    return added


def end_token_id(tokenizer) -> int:
    ids = FimIds.of(tokenizer)
    return ids.end if ids else tokenizer.eos_token_id


# What a cursor completes, as an editor asks for it.
LINE, REST_OF_LINE, BLOCK = "line", "rest_of_line", "block"
CURSORS_PER_FILE = {LINE: 2, REST_OF_LINE: 2, BLOCK: 1}
"""Held-out cursors per test file."""
WINDOWS_PER_LINES = 40
"""A training file gives one window per this many lines, at most MAX_WINDOWS_PER_FILE."""
MAX_WINDOWS_PER_FILE = 16
MAX_BLOCK_LINES = 4
"""A block middle's most lines: a few lines, as editors suggest them, that fit a middle's tokens."""


@dataclass(frozen=True)
class Cut:
    """A file cut at a cursor: prefix + middle + suffix is the file."""

    prefix: str
    middle: str
    suffix: str
    kind: str


def _lines(code: str) -> list[str]:
    return code.splitlines(keepends=True)


def _code_lines(lines: list[str]) -> list[int]:
    """Indices of the lines worth completing: not blank, not only a comment or a bracket."""
    return [i for i, line in enumerate(lines) if len(line.strip()) > 3 and not line.lstrip().startswith("#")]


def cut(code: str, kind: str, rng: random.Random) -> Cut | None:
    """A random cursor of `kind` in code: a whole line (cursor at its indentation), the rest of a line (cursor inside
    it, after a word), or a block (the lines under a line ending in ':'). None where the file has no such place."""
    lines = _lines(code)
    if kind == BLOCK:
        heads = [i for i in _code_lines(lines) if lines[i].rstrip().endswith(":") and i + 1 < len(lines)]
        if not heads:
            return None
        head = rng.choice(heads)
        indent = len(lines[head]) - len(lines[head].lstrip())
        end = head + 1
        while end < len(lines) and end - head <= MAX_BLOCK_LINES:
            line = lines[end]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            end += 1
        body = "".join(lines[head + 1 : end]).rstrip("\n")
        if not body.strip():
            return None
        start_line = lines[head + 1]
        body_indent = start_line[: len(start_line) - len(start_line.lstrip())]
        prefix = "".join(lines[: head + 1]) + body_indent
        middle = body[len(body_indent) :]
        return Cut(prefix, middle, code[len(prefix) + len(middle) :], kind)
    candidates = _code_lines(lines)
    if not candidates:
        return None
    i = rng.choice(candidates)
    line = lines[i].rstrip("\n")
    indent = len(line) - len(line.lstrip())
    start = indent
    if kind == REST_OF_LINE:
        breaks = [j for j in range(indent + 1, len(line) - 1) if not line[j].isalnum() and line[j] != "_"]
        if not breaks:
            return None
        start = rng.choice(breaks)
    before = "".join(lines[:i])
    return Cut(before + line[:start], line[start:], code[len(before) + len(line) :], kind)


def cursors(row: dict) -> list[Cut]:
    """The held-out cursors of a test file: the same for every run and model (seeded by the file's content)."""
    rng = random.Random("cursors:" + row["code"])
    found = []
    for kind, count in CURSORS_PER_FILE.items():
        for _ in range(count):
            c = cut(row["code"], kind, rng)
            if c and c.middle.strip() and c not in found:
                found.append(c)
    return found


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def context_ids(tokenizer, prefix: str, suffix: str, budget: int) -> tuple[list[int], list[int]]:
    """The prefix's end and the suffix's start in `budget` tokens: the suffix takes up to a quarter, the prefix the
    rest (what is nearest the cursor counts most). Only text near the cursor is tokenised: 8 characters a token
    is more than any code needs."""
    suffix_ids = _tokens(tokenizer, suffix[: budget * 2])[: budget // 4]
    room = budget - len(suffix_ids)
    prefix_ids = _tokens(tokenizer, prefix[-room * 8 :])
    return prefix_ids[len(prefix_ids) - room :] if len(prefix_ids) > room else prefix_ids, suffix_ids


def fim_prompt(ids: FimIds, prefix_ids: list[int], suffix_ids: list[int], spm: bool = False) -> list[int]:
    """PSM: <prefix> prefix <suffix> suffix <middle>; SPM (StarCoder's variant): <prefix> <suffix> suffix <middle>
    prefix, the middle then continuing the prefix directly."""
    if spm:
        return [ids.prefix, ids.suffix, *suffix_ids, ids.middle, *prefix_ids]
    return [ids.prefix, *prefix_ids, ids.suffix, *suffix_ids, ids.middle]


def training_windows(row: dict, tokenizer, cfg: Config) -> list[dict]:
    """A training file's windows, each {input_ids, attention_mask, labels}: the loss sees the middle and its end token
    (FIM), or the last max_target_length tokens of a left-to-right window (the completion of its prefix), never the
    context. Seeded by the file and training.seed: the same windows every run."""
    ids, t, rates = FimIds.of(tokenizer), cfg.training, cfg.fill_in_middle
    rng = random.Random(f"windows:{t.seed}:" + row["code"])
    count = min(max(row["code"].count("\n") // WINDOWS_PER_LINES, 1), MAX_WINDOWS_PER_FILE)
    budget, room = t.max_source_length, t.max_target_length - 1
    windows = []
    for _ in range(count):
        c = cut(row["code"], rng.choice((LINE, REST_OF_LINE, BLOCK)), rng)
        if c is None:
            continue
        if rng.random() < rates.rate:
            middle = _tokens(tokenizer, c.middle)
            if not middle or len(middle) > room:
                continue
            prefix_ids, suffix_ids = context_ids(tokenizer, c.prefix, c.suffix, budget)
            prompt = fim_prompt(ids, prefix_ids, suffix_ids, spm=rng.random() < rates.spm_rate)
            target = [*middle, ids.end]
        else:
            text = _tokens(tokenizer, c.prefix[-(budget + room) * 8 :] + c.middle)[-(budget + room) :]
            prompt, target = text[:-room], text[-room:]
        windows.append(
            {
                "input_ids": prompt + target,
                "attention_mask": [1] * (len(prompt) + len(target)),
                "labels": [-100] * len(prompt) + target,
            }
        )
    return windows


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def prompt_ids(tokenizer, prefix: str, suffix: str, settings: InferenceSettings, spm: bool = False) -> list[int]:
    """The prompt of a cursor, in PSM or SPM order; for a tokenizer without FIM tokens (an untuned base whose tokens
    were added in tuning), the prefix's end alone, continued left to right."""
    ids = FimIds.of(tokenizer)
    if ids is None:
        return _tokens(tokenizer, prefix[-settings.max_source_length * 8 :])[-settings.max_source_length :]
    return fim_prompt(ids, *context_ids(tokenizer, prefix, suffix, settings.max_source_length), spm=spm)


def completes_in_spm(model) -> bool:
    return getattr(model.config, ORDER_KEY, "psm") == "spm"


def complete_at(
    model, tokenizer, pairs: list[tuple[str, str]], settings: InferenceSettings, sampling: Sampling
) -> list[list[Completion]]:
    """Completions of each (prefix, suffix): the middle, ending at the end token (or a stop sequence)."""
    spm = completes_in_spm(model)
    prompts = [prompt_ids(tokenizer, prefix, suffix, settings, spm) for prefix, suffix in pairs]
    return sample_completions(model, tokenizer, prompts, sampling, end_token_id(tokenizer), settings.batch_size)


def line_above(c: Cut) -> str:
    """The trivial baseline: repeat the nearest line above that has code (an editor's 'duplicate line')."""
    above = [line.strip() for line in c.prefix.splitlines()[:-1] if len(line.strip()) > 3]
    lines = [above[-1] if above else ""]
    if c.kind == BLOCK:
        lines *= c.middle.count("\n") + 1
    return "\n".join(lines)


def _as_long_as(prediction: str, reference: str) -> str:
    """A left-to-right completion of a block cut to the reference's lines: it has no end of its own to stop at."""
    return "\n".join(prediction.split("\n")[: reference.count("\n") + 1])


class FillInMiddle(DecoderOnly):
    """A decoder-only LM completing code at a cursor (prefix + suffix -> middle), trained on whole files."""

    directions = (Direction.fill_in_middle,)
    examples = Examples.whole_files
    writes_code = False  # completes at a cursor: no whole program to run against tests
    primary_metric = "edit_similarity"
    registered_name = "codetune-code-completion"
    card = Card(
        "text-generation",
        "Completes code at a cursor from the code before and after it (fill-in-the-middle), trained on a repository's "
        "files; served over the OpenAI completions API (prompt and suffix).",
        "exact match and edit similarity (rapidfuzz fuzz.ratio, as CodeXGLUE's line completion) of the completed line "
        "at cursors on held-out files; block exact match and edit similarity for the lines under a ':'; x100",
    )

    def __init__(self, direction: Direction = Direction.fill_in_middle):
        super().__init__(direction)

    def config_errors(self, cfg: Config) -> list[str]:
        errors = []
        if cfg.data.source is not DataSource.code_tree:
            errors.append(
                "model.direction=fill_in_middle trains on whole source files: data.source=code_tree with data.path "
                "the repository's directory"
            )
        if cfg.model.prompt_template is not None:
            errors.append("model.prompt_template is not used by model.direction=fill_in_middle: remove it")
        if not (0 <= cfg.fill_in_middle.rate <= 1 and 0 <= cfg.fill_in_middle.spm_rate <= 1):
            errors.append("fill_in_middle.rate and fill_in_middle.spm_rate must be between 0 and 1")
        if cfg.training.max_target_length < 2:
            errors.append("training.max_target_length must be >= 2 (the middle and its end token)")
        return errors

    def gate_metric(self, cfg: Config, benchmarks: bool = True) -> str:
        return self.primary_metric

    def add_tokens(self, model, tokenizer) -> list[int]:
        return add_fim_tokens(model, tokenizer)

    def tokenize(self, rows, tokenizer, cfg: Config, label2id=None):
        return [window for r in rows for window in training_windows(r, tokenizer, cfg)]

    def complete(
        self, model, tokenizer, prompts: list[tuple[str, str]], settings: InferenceSettings, sampling: Sampling
    ) -> list[list[Completion]]:
        return complete_at(model, tokenizer, prompts, settings, sampling)

    def predict(self, model, tokenizer, model_input, settings: InferenceSettings) -> list[str]:
        """{prefix, suffix} records (or a DataFrame with those columns, or bare prefixes) -> the middle of each."""
        if hasattr(model_input, "columns"):
            has_prefix = "prefix" in model_input.columns
            model_input = model_input.to_dict("records") if has_prefix else model_input.iloc[:, 0].tolist()
        if isinstance(model_input, (str, dict)):
            model_input = [model_input]
        if not all(isinstance(r, str) or (isinstance(r, dict) and "prefix" in r) for r in model_input):
            raise ValueError("a completion model takes {prefix, suffix} records, or prefixes as strings")
        pairs = [(r, "") if isinstance(r, str) else (r["prefix"], r.get("suffix") or "") for r in model_input]
        sampling = Sampling(settings.generation.max_new_tokens)
        return [c[0].text for c in complete_at(model, tokenizer, pairs, settings, sampling)]

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored:
        cuts = [(row, c) for row in rows for c in cursors(row)]
        line_cuts = [x for x in cuts if x[1].kind != BLOCK]
        block_cuts = [x for x in cuts if x[1].kind == BLOCK]
        fills = FimIds.of(tokenizer) is not None
        predictions = {}
        # A line is asked for up to its newline; a block up to the end token.
        line = Sampling(settings.max_target_length, stop=("\n",))
        for group, sampling in ((line_cuts, line), (block_cuts, Sampling(settings.generation.max_new_tokens))):
            done = complete_at(model, tokenizer, [(c.prefix, c.suffix) for _, c in group], settings, sampling)
            for (_, c), (completion,) in zip(group, done):
                text = completion.text
                predictions[c] = text if fills or c.kind != BLOCK else _as_long_as(text, c.middle)
        line_refs = [_first_line(c.middle) for _, c in line_cuts]
        block_refs = [c.middle for _, c in block_cuts]

        def metrics(predict) -> dict[str, float]:
            return line_completion_metrics(line_refs, [_first_line(predict(c)) for _, c in line_cuts]) | (
                block_completion_metrics(block_refs, [predict(c) for _, c in block_cuts])
            )

        records = [
            {
                "id": row.get("id"),
                "origin": row.get("origin"),
                "kind": c.kind,
                "prefix_end": c.prefix[-200:],
                "suffix_start": c.suffix[:200],
                "reference": c.middle,
                "prediction": predictions[c],
                "baseline": line_above(c),
            }
            for row, c in cuts
        ]
        return Scored(
            metrics=metrics(predictions.__getitem__),
            baseline=metrics(line_above),
            baseline_name="the line above, repeated",
            records=records,
            examples=[
                {
                    "input": c.prefix.rsplit("\n", 1)[-1] + "█" + _first_line(c.suffix),
                    "prefix_end": c.prefix[-120:],
                    "suffix_start": c.suffix[:120],
                    "reference": c.middle,
                    "prediction": predictions[c],
                }
                for _, c in line_cuts
            ],
        )
