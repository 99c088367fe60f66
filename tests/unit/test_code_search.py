import json
from pathlib import Path

import pytest
import torch

from codetune.core.config.loader import load_config
from codetune.core.evaluation import evaluate_model
from codetune.core.families import family_of
from codetune.core.families.code_search import (
    BiEncoder,
    PairCollator,
    _words,
    embed_texts,
    lexical_similarity,
    match_ranks,
    pair_similarity,
    ranks_in_chunks,
)
from codetune.core.model import load_exported
from codetune.core.rundir import METRICS_FILE

SEARCH = "configs/tiny-code-search.yaml"


def test_ranks_count_ties_as_half_so_a_constant_scorer_ranks_at_the_middle():
    assert match_ranks(torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.1], [0.0, 0.0, 0.0]]))[0] == [1.0, 2.0, 2.0]
    ranks, _ = match_ranks(torch.zeros(5, 5))
    assert ranks == [3.0] * 5  # not 1.0: scoring everything alike is no search at all


def test_lexical_baseline_matches_query_words_to_identifiers():
    queries = ["Return the file size.", "Parse a URL into parts."]
    codes = [
        "def parse_url(text):\n    return urlsplit(text)",
        "def getFileSize(path):\n    return os.stat(path).st_size",
    ]
    assert lexical_similarity(queries, codes).argmax(1).tolist() == [1, 0]


def test_pair_collator_pads_each_side_to_a_multiple_of_8(tiny_cfg):
    from codetune.core.model import train_tokenizer

    tokenizer = train_tokenizer(["def f(x): return x", "Return x."] * 20, vocab_size=300)
    batch = PairCollator(tokenizer, pad_to_multiple_of=8)(
        [
            {"query_input_ids": [1, 5, 2], "code_input_ids": list(range(3, 14))},
            {"query_input_ids": [1, 2], "code_input_ids": [1, 2]},
        ]
    )
    assert batch["query_input_ids"].shape == (2, 8) and batch["code_input_ids"].shape == (2, 16)
    assert batch["code_attention_mask"].sum().item() == 11 + 2


@pytest.fixture
def search_run(tiny_overrides):
    from codetune.core.data import prepare_data
    from codetune.core.training import train_model

    cfg = load_config(SEARCH, tiny_overrides)
    data = prepare_data(cfg.data, family_of(cfg.model).examples)
    return cfg, data, train_model(cfg, data, family_of(cfg.model))


def test_search_model_trains_with_in_batch_negatives_and_is_scored_by_mrr(search_run):
    cfg, data, trained = search_run
    report = evaluate_model(trained.run_dir, data.load("test"), cfg)
    assert set(report.metrics) == {"mrr", "recall_at_1", "recall_at_10"}
    assert 0 < report.metrics["mrr"] <= 100 and report.baseline["mrr"] > 0
    metrics = json.loads((Path(trained.run_dir) / METRICS_FILE).read_text())
    assert metrics["baseline_name"].startswith("identifier overlap")
    records = [json.loads(l) for l in (Path(trained.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == report.num_examples and {"query", "rank", "baseline_rank"} <= set(records[0])
    # The MRR is the mean reciprocal of the recorded ranks: nothing is scored twice in different ways.
    assert report.metrics["mrr"] == pytest.approx(100 * sum(1 / r["rank"] for r in records) / len(records), abs=0.01)


def similarity(model, tokenizer, queries, codes, batch_size, max_query_length, max_code_length) -> torch.Tensor:
    """Every query against every code, the reference the pairwise and chunked paths must equal."""
    return (
        embed_texts(model, tokenizer, queries, batch_size, max_query_length)
        @ embed_texts(model, tokenizer, codes, batch_size, max_code_length).T
    )


def test_ranks_in_chunks_equal_ranks_over_the_whole_table(monkeypatch):
    scores = torch.randn(7, 7).round(decimals=1)  # rounded: ties happen, and count half
    monkeypatch.setattr("codetune.core.families.code_search.RANK_CHUNK", 3)
    assert ranks_in_chunks(lambda start, stop: scores[start:stop], 7) == match_ranks(scores)


def test_lexical_similarity_is_the_cosine_of_the_word_sets():
    queries = ["Return the sum of a and b.", "Open the socket.", "", "zzz"]
    codes = ["def sum_of(a, b):\n    return a + b", "def open_socket(host):\n    pass", "x = 1"]
    expected = torch.tensor(
        [
            [len(q & c) / (len(q) * len(c)) ** 0.5 if q and c else 0.0 for c in map(_words, codes)]
            for q in map(_words, queries)
        ]
    )
    torch.testing.assert_close(lexical_similarity(queries, codes), expected)


def test_exported_search_encoder_reloads_with_plain_transformers_and_scores_pairs_alike(search_run):
    from transformers import AutoModel, AutoTokenizer

    cfg, data, trained = search_run
    rows = data.load("test")[:6]
    queries, codes = [r["summary"] for r in rows], [r["code"] for r in rows]
    model, tokenizer = load_exported(trained.run_dir)
    assert type(model).__name__ == "RobertaModel"
    plain = AutoModel.from_pretrained(trained.run_dir).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(trained.run_dir)
    full = similarity(model.eval(), tokenizer, queries, codes, 4, 32, 64)
    torch.testing.assert_close(similarity(plain, plain_tokenizer, queries, codes, 4, 32, 64), full)
    # Batching and padding do not move a score: every pair scored alone equals its cell in the matrix.
    pairs = pair_similarity(model, tokenizer, queries, codes, 1, 32, 64)
    torch.testing.assert_close(torch.tensor(pairs), full.diagonal(), atol=1e-5, rtol=1e-5)


def test_bi_encoder_loss_is_lower_when_queries_meet_their_own_code():
    from codetune.core.config import ModelConfig, ModelTask, ScratchArchitecture
    from codetune.core.model import build_scratch_model, train_tokenizer

    tokenizer = train_tokenizer(["def f(x): return x", "Return x."] * 20, vocab_size=300)
    encoder = build_scratch_model(
        ModelConfig(
            task=ModelTask.code_search, scratch=ScratchArchitecture(d_model=32, d_ff=64, num_layers=1, num_heads=2)
        ),
        tokenizer,
        seed=0,
    )
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 9, 10, 2]])
    mask = torch.ones_like(ids)
    model = BiEncoder(encoder).eval()
    matched = model(ids, mask, ids, mask)["loss"]  # each query is identical to its own code
    shuffled = model(ids, mask, ids[[1, 2, 0]], mask)["loss"]
    assert matched < shuffled
