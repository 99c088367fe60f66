"""Metrics: smoothed BLEU-4 exactly as CodeXGLUE/CodeT5 compute it, corpus BLEU, ROUGE-L, exact match; classification
and retrieval scores."""

from __future__ import annotations

import math
import re
import sys
import xml.sax.saxutils
from collections import Counter

# Port of CodeXGLUE code-to-text evaluator/bleu.py (itself from the NIST mteval script): keep
# the regexes and the order of steps, or the numbers stop matching published ones.
_NORMALIZE1 = [("<skipped>", ""), (r"-\n", ""), (r"\n", " ")]
_NORMALIZE2 = [
    (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),
    (r"([^0-9])([\.,])", r"\1 \2 "),
    (r"([\.,])([^0-9])", r" \1 \2"),
    (r"([0-9])(-)", r"\1 \2 "),
]


def _nist_tokens(s: str) -> list[str]:
    for pattern, replace in _NORMALIZE1:
        s = re.sub(pattern, replace, s)
    s = xml.sax.saxutils.unescape(s, {"&quot;": '"'})
    s = f" {s} ".lower()
    for pattern, replace in _NORMALIZE2:
        s = re.sub(pattern, replace, s)
    return s.split()


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _split_puncts(line: str) -> str:
    """CodeXGLUE's pre-tokenisation of both sides: words and single punctuation marks."""
    return " ".join(re.findall(r"[\w]+|[^\s\w]", line.strip().lower()))


def sentence_bleu(reference: str, hypothesis: str, n: int = 4) -> float:
    """Smoothed sentence BLEU-4 in [0, 1]: add-one smoothing for n > 1, brevity penalty against the reference."""
    ref = _nist_tokens(_split_puncts(reference))
    hyp = _nist_tokens(_split_puncts(hypothesis))
    ref_counts, hyp_counts = _ngrams(ref, n), _ngrams(hyp, n)
    correct = [0] * n
    for gram, count in hyp_counts.items():
        correct[len(gram) - 1] += min(ref_counts.get(gram, 0), count)
    log_bleu = 0.0
    for k in range(n):
        guess = max(len(hyp) - k, 0)
        smooth = 1 if k > 0 else 0
        log_bleu += math.log(correct[k] + smooth + sys.float_info.min) - math.log(guess + smooth + sys.float_info.min)
    log_bleu /= n
    brevity = min(0.0, 1 - (len(ref) + 1) / (len(hyp) + 1))
    return math.exp(log_bleu + brevity)


def smoothed_bleu4(references: list[str], hypotheses: list[str]) -> float:
    """CodeXGLUE code-to-text BLEU: mean of per-example smoothed BLEU-4, x100."""
    if not references:
        return 0.0
    return 100 * sum(sentence_bleu(r, h) for r, h in zip(references, hypotheses, strict=True)) / len(references)


def corpus_bleu(references: list[str], hypotheses: list[str]) -> float:
    """sacreBLEU's corpus-level, case-sensitive BLEU: comparable across papers, not with smoothed BLEU-4."""
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def rouge_l(references: list[str], hypotheses: list[str]) -> float:
    """Mean ROUGE-L F1 x100 (Google's rouge-score, lower-cased alphanumeric tokens)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses, strict=True)]
    return 100 * sum(scores) / max(len(scores), 1)


def exact_match(references: list[str], hypotheses: list[str]) -> float:
    """Share (x100) of predictions equal to the reference after whitespace and case normalisation."""
    same = sum(
        " ".join(r.lower().split()) == " ".join(h.lower().split()) for r, h in zip(references, hypotheses, strict=True)
    )
    return 100 * same / max(len(references), 1)


def summary_metrics(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    return {
        "bleu4_smoothed": round(smoothed_bleu4(references, hypotheses), 2),
        "bleu_corpus": round(corpus_bleu(references, hypotheses), 2),
        "rouge_l": round(rouge_l(references, hypotheses), 2),
        "exact_match": round(exact_match(references, hypotheses), 2),
    }


_NAME = re.compile(r"\b(?:def|function|func|fn|sub)\s+([A-Za-z_][\w$]*)|([A-Za-z_][\w$]*)\s*\(")


def function_name_words(code: str) -> str:
    """The trivial baseline summary: the function's name split into words (get_fileSize -> 'get file size')."""
    match = _NAME.search(code)
    if not match:
        return ""
    name = match.group(1) or match.group(2)
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ")
    return " ".join(words.lower().split())


def classification_metrics(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation (multi-class, Gorodkin's form), each x100."""
    n = len(references)
    labels = sorted(set(references) | set(predictions))
    correct = sum(r == p for r, p in zip(references, predictions, strict=True))
    true_counts, predicted_counts = Counter(references), Counter(predictions)
    f1s = []
    for label in labels:
        tp = sum(r == p == label for r, p in zip(references, predictions))
        denominator = true_counts[label] + predicted_counts[label]
        f1s.append(2 * tp / denominator if denominator else 0.0)
    covariance = correct * n - sum(true_counts[l] * predicted_counts[l] for l in labels)
    spread = math.sqrt(
        (n * n - sum(c * c for c in predicted_counts.values())) * (n * n - sum(c * c for c in true_counts.values()))
    )
    return {
        "accuracy": round(100 * correct / max(n, 1), 2),
        "f1_macro": round(100 * sum(f1s) / max(len(f1s), 1), 2),
        "mcc": round(100 * covariance / spread, 2) if spread else 0.0,
    }


def retrieval_metrics(ranks: list[float]) -> dict[str, float]:
    """MRR (CodeSearchNet's and CodeXGLUE's code-search metric) and recall at 1 and 10, each x100, from 1-based
    ranks."""
    n = max(len(ranks), 1)
    return {
        "mrr": round(100 * sum(1 / r for r in ranks) / n, 2),
        "recall_at_1": round(100 * sum(r <= 1 for r in ranks) / n, 2),
        "recall_at_10": round(100 * sum(r <= 10 for r in ranks) / n, 2),
    }


def code_metrics(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """CodeBLEU (equal weights: n-gram, keyword-weighted n-gram, syntax-tree and data-flow match) and exact match, x100.

    codebleu 0.7 parses with tree-sitter 0.22 and tree-sitter-python 0.21; a newer tree-sitter-python
    breaks it, which is why the codegen extra pins both.
    """
    from codebleu import calc_codebleu
    from codebleu.dataflow_match import corpus_dataflow_match

    scores = calc_codebleu(references, hypotheses, lang="python")
    dataflow = scores["dataflow_match_score"]
    # codebleu adds `dataflow or 1`: meant for references without any data flow, it also gives code that
    # matches none of the references' data flow (a stub) a free quarter. Only the first case earns it.
    if not dataflow and not corpus_dataflow_match([[r] for r in references], references, "python"):
        dataflow = 1.0
    codebleu = (
        scores["ngram_match_score"] + scores["weighted_ngram_match_score"] + scores["syntax_match_score"] + dataflow
    ) / 4
    same = sum(" ".join(r.split()) == " ".join(h.split()) for r, h in zip(references, hypotheses, strict=True))
    return {
        "codebleu": round(100 * codebleu, 2),
        "syntax_match": round(100 * scores["syntax_match_score"], 2),
        "dataflow_match": round(100 * scores["dataflow_match_score"], 2),
        "exact_match": round(100 * same / max(len(references), 1), 2),
    }


def stub_function(summary: str) -> str:
    """The trivial code-generation baseline: an empty function named from the summary's first words."""
    words = re.findall(r"[a-z0-9]+", summary.lower())[:3] or ["f"]
    return f"def {'_'.join(words)}():\n    pass"


def _edit_similarity(reference: str, hypothesis: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(hypothesis.strip(), reference.strip())


def line_completion_metrics(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """CodeXGLUE's line completion (code-completion-line evaluator): exact match of the whitespace-split tokens, and
    edit similarity, fuzz.ratio (100 x the normalised Indel similarity) of the stripped lines; both x100 means."""
    n = max(len(references), 1)
    return {
        "exact_match": 100 * sum(r.split() == h.split() for r, h in zip(references, hypotheses)) / n,
        "edit_similarity": sum(_edit_similarity(r, h) for r, h in zip(references, hypotheses)) / n,
    }


def block_completion_metrics(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """The same for multi-line middles: a block matches when every token of every line does."""
    return {f"block_{k}": v for k, v in line_completion_metrics(references, hypotheses).items()}
