"""code_search: one encoder embeds natural-language queries and code into the same space.

A bi-encoder, not the CodeBERT paper's cross-encoder: ranking N queries against N candidates costs
2N encoder passes instead of N^2, so MRR over a whole test split is cheap, and a deployed model
embeds a code base once and answers each query with one pass. Sentence encoders such as
all-MiniLM-L6-v2 are pretrained for exactly this use. The negatives are sampled from the data: each
query is contrasted with the code of every other pair in its randomly drawn batch (InfoNCE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModel, RobertaModel

from codetune.core.config import Config, ModelTask
from codetune.core.families.base import Card, FamilyDefaults, InferenceSettings, Scored, in_length_order, roberta_config
from codetune.core.metrics import retrieval_metrics

# 1/temperature of the contrastive softmax: sentence-transformers' MultipleNegativesRankingLoss default.
SIMILARITY_SCALE = 20.0
SIDES = ("query", "code")


def embed(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens, unit length (sentence-transformers' pooling): cosine is a dot
    product."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


class BiEncoder(torch.nn.Module):
    """The training view of an encoder: a forward pass over a batch of (query, code) pairs returns the contrastive
    loss."""

    main_input_name = "code_input_ids"  # the tokens the Trainer counts for tokens/s

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(
        self, query_input_ids, query_attention_mask, code_input_ids, code_attention_mask, return_loss: bool = True
    ):
        # return_loss=True tells the Trainer this model computes its loss without a `labels` input.
        queries = embed(self.encoder, query_input_ids, query_attention_mask)
        codes = embed(self.encoder, code_input_ids, code_attention_mask)
        scores = SIMILARITY_SCALE * queries @ codes.T
        return {"loss": F.cross_entropy(scores, torch.arange(len(scores), device=scores.device)), "scores": scores}


def tokenize_pairs(rows: list[dict], tokenizer, max_query_length: int, max_code_length: int) -> list[dict]:
    """Each {code, summary} row as a (query, code) pair: the summary is the query."""
    queries = tokenizer([r["summary"] for r in rows], max_length=max_query_length, truncation=True)["input_ids"]
    codes = tokenizer([r["code"] for r in rows], max_length=max_code_length, truncation=True)["input_ids"]
    return [{"query_input_ids": q, "code_input_ids": c} for q, c in zip(queries, codes)]


@dataclass
class PairCollator:
    """Pads the query and the code side of a batch separately, each to its longest (rounded up to
    pad_to_multiple_of)."""

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for side in SIDES:
            padded = self.tokenizer.pad(
                [{"input_ids": f[f"{side}_input_ids"]} for f in features],
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = padded["input_ids"], padded["attention_mask"]
        return batch


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
    """Unit-length embeddings of texts, in their order."""

    @torch.inference_mode()
    def embed_batch(batch_texts: list[str]) -> torch.Tensor:
        batch = tokenizer(batch_texts, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
        batch = batch.to(model.device)
        return embed(model, batch["input_ids"], batch["attention_mask"]).float().cpu()

    if not texts:
        return torch.empty(0, model.config.hidden_size)
    return torch.stack(in_length_order(texts, batch_size, embed_batch))


def _embed_distinct(
    model, tokenizer, texts: list[str], batch_size: int, max_length: int
) -> tuple[torch.Tensor, list[int]]:
    """(embeddings of the distinct texts, the row of each text): repeated texts are embedded once."""
    distinct = sorted(set(texts))
    row = {t: i for i, t in enumerate(distinct)}
    return embed_texts(model, tokenizer, distinct, batch_size, max_length), [row[t] for t in texts]


def pair_similarity(
    model, tokenizer, queries: list[str], codes: list[str], batch_size: int, max_query_length: int, max_code_length: int
) -> list[float]:
    """The cosine similarity of each (query, code) pair; all-pairs input costs one pass per distinct text."""
    q, q_rows = _embed_distinct(model, tokenizer, queries, batch_size, max_query_length)
    c, c_rows = _embed_distinct(model, tokenizer, codes, batch_size, max_code_length)
    q_rows, c_rows = torch.tensor(q_rows), torch.tensor(c_rows)
    chunk = 1 << 16  # bounds memory when a consumer scores every query against every code
    return torch.cat(
        [(q[q_rows[i : i + chunk]] * c[c_rows[i : i + chunk]]).sum(1) for i in range(0, len(q_rows), chunk)]
    ).tolist()


_WORD = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|\d+")


def _words(text: str) -> set[str]:
    """Lower-cased words, identifiers split at underscores and camelCase humps."""
    return {w.lower() for w in _WORD.findall(text)}


def _word_matrix(words: list[set[str]], vocabulary: dict[str, int]) -> torch.Tensor:
    """[len(words), len(vocabulary)], sparse: 1 where a text has the word."""
    cells = [(row, vocabulary[w]) for row, text in enumerate(words) for w in text if w in vocabulary]
    indices = torch.tensor(cells, dtype=torch.long).T.reshape(2, len(cells))
    return torch.sparse_coo_tensor(indices, torch.ones(len(cells), dtype=torch.float64), (len(words), len(vocabulary)))


def lexical_similarity(queries: list[str], codes: list[str]) -> torch.Tensor:
    """The baseline a search model must beat: the cosine of the query's words and the code's identifier words as
    sets, as one sparse product (a Python loop over every pair took minutes on a CodeSearchNet test split)."""
    query_words, code_words = [_words(q) for q in queries], [_words(c) for c in codes]
    vocabulary = {w: i for i, w in enumerate(sorted(set().union(*code_words)))}
    if not vocabulary:
        return torch.zeros(len(queries), len(codes))
    overlap = torch.sparse.mm(_word_matrix(code_words, vocabulary), _word_matrix(query_words, vocabulary).to_dense().T)
    sizes = torch.tensor([len(q) for q in query_words], dtype=torch.float64)[:, None] * torch.tensor(
        [len(c) for c in code_words], dtype=torch.float64
    )
    return torch.where(sizes > 0, overlap.T / sizes.clamp(min=1).sqrt(), 0.0).float()


def match_ranks(scores: torch.Tensor, first_query: int = 0) -> tuple[list[float], list[int]]:
    """(rank of each query's own code, index of the top-scored code) for scores[query first_query + i, code j],
    code k matching query k.

    A tie counts half, the expected rank under random tie-breaking, so a baseline that scores
    everything alike is not rewarded for it.
    """
    rows = torch.arange(len(scores))
    own = scores[rows, rows + first_query].unsqueeze(1)
    above = (scores > own).sum(1)
    tied = (scores == own).sum(1) - 1
    ranks = (1 + above + tied / 2).tolist()
    return ranks, scores.argmax(1).tolist()


# Queries ranked at once: RANK_CHUNK x n scores at a time, where all n x n would take n^2 floats
# (900 MB for a 15k-row test split).
RANK_CHUNK = 1024


def ranks_in_chunks(scores_of: Callable[[int, int], torch.Tensor], n: int) -> tuple[list[float], list[int]]:
    """match_ranks over queries [start, stop) at a time; scores_of(start, stop) gives their scores against all codes."""
    ranks: list[float] = []
    top: list[int] = []
    for start in range(0, n, RANK_CHUNK):
        chunk_ranks, chunk_top = match_ranks(scores_of(start, min(start + RANK_CHUNK, n)), start)
        ranks += chunk_ranks
        top += chunk_top
    return ranks, top


def _first_line(code: str) -> str:
    return code.split("\n", 1)[0]


class CodeSearch(FamilyDefaults):
    task = ModelTask.code_search
    architecture = "RoBERTa"
    peft_task_type = "FEATURE_EXTRACTION"
    auto_class = AutoModel
    primary_metric = "mrr"
    registered_name = "codetune-code-search"
    card = Card(
        "sentence-similarity",
        "Embeds natural-language queries and function source code in one space "
        "(mean of the token states, unit length): "
        "a query's cosine similarity with a function scores how well the query describes it.",
        "each test summary is a query ranked against every test function; MRR and recall at 1 and 10, x100",
    )
    scores_untuned = False
    # A code-search batch is its own negatives: batches of look-alike code would be a different, harder task.
    batches_by_length = False
    rows_independent = False  # a row's rank depends on the other candidates

    def build_scratch(self, arch, tokenizer, labels=None):
        return RobertaModel(roberta_config(arch, tokenizer, arch.num_layers), add_pooling_layer=False)

    def load_base(self, name, tokenizer, labels=None, **hub):
        """The bare encoder: embeddings are mean-pooled, so BERT's pooler would sit untrained."""
        return AutoModel.from_pretrained(name, add_pooling_layer=False, **hub)

    def load_export(self, model_dir):
        return AutoModel.from_pretrained(model_dir, add_pooling_layer=False)

    def tokenize(self, rows, tokenizer, cfg: Config, label2id=None):
        return tokenize_pairs(rows, tokenizer, cfg.training.max_target_length, cfg.training.max_source_length)

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return PairCollator(tokenizer, pad_to_multiple_of)

    def trainable(self, model):
        return BiEncoder(model)

    def probe_inputs(self, batch: dict) -> dict:
        """The encoder alone, on the code side."""
        return {"input_ids": batch["code_input_ids"], "attention_mask": batch["code_attention_mask"]}

    def predict(self, model, tokenizer, model_input, settings: InferenceSettings) -> list[dict]:
        """Each (query, code) row of a DataFrame: its cosine similarity, and the code's rank among the rows with the
        same query (1: the best match). A query with its candidate functions comes back ranked."""
        if not hasattr(model_input, "columns") or not {"query", "code"} <= set(model_input.columns):
            raise ValueError("a code-search model scores pairs: pass a DataFrame with 'query' and 'code' columns")
        queries, codes = model_input["query"].astype(str).tolist(), model_input["code"].astype(str).tolist()
        batch, query_length, code_length = (
            settings.batch_size,
            settings.max_target_length,
            settings.max_source_length,
        )
        scores = pair_similarity(model, tokenizer, queries, codes, batch, query_length, code_length)
        by_query: dict[str, list[int]] = {}
        for row, query in enumerate(queries):
            by_query.setdefault(query, []).append(row)
        ranks = [0] * len(scores)
        for rows in by_query.values():
            for rank, row in enumerate(sorted(rows, key=lambda r: -scores[r]), 1):
                ranks[row] = rank
        return [{"score": score, "rank": rank} for score, rank in zip(scores, ranks)]

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored:
        """Each row's summary as a query over all the rows' code; MRR of the row's own code, beside lexical matching."""
        queries, codes = [r["summary"] for r in rows], [r["code"] for r in rows]
        batch, query_length, code_length = (
            settings.batch_size,
            settings.max_target_length,
            settings.max_source_length,
        )
        q, q_rows = _embed_distinct(model, tokenizer, queries, batch, query_length)
        c, c_rows = _embed_distinct(model, tokenizer, codes, batch, code_length)
        codes_embedded = c[c_rows]
        ranks, top = ranks_in_chunks(lambda start, stop: q[q_rows[start:stop]] @ codes_embedded.T, len(rows))
        baseline_ranks, _ = ranks_in_chunks(
            lambda start, stop: lexical_similarity(queries[start:stop], codes), len(rows)
        )
        return Scored(
            metrics=retrieval_metrics(ranks),
            baseline=retrieval_metrics(baseline_ranks),
            baseline_name="identifier overlap (query words found in the code's names)",
            records=[
                {"id": r.get("id"), "query": q, "rank": rank, "baseline_rank": base, "top_id": rows[j].get("id")}
                for r, q, rank, base, j in zip(rows, queries, ranks, baseline_ranks, top)
            ],
            examples=[
                {"input": q, "reference": _first_line(code), "prediction": _first_line(codes[j])}
                for q, code, j in zip(queries, codes, top)
            ],
        )
