import math

import pytest

from codetune.core.metrics import (
    classification_metrics,
    corpus_bleu,
    exact_match,
    function_name_words,
    rouge_l,
    sentence_bleu,
    smoothed_bleu4,
)


def test_sentence_bleu_matches_a_hand_computation():
    # ref 7 tokens (return the size of the file .), hyp 3: p1=2/3, p2=1/3, p3=1/2, p4=1/1 (add-one), BP=exp(1-8/4)
    expected = math.exp((math.log(2 / 3) + math.log(1 / 3) + math.log(1 / 2) + 0) / 4 + (1 - 8 / 4))
    assert sentence_bleu("Return the size of the file.", "get file size") == pytest.approx(expected)


def test_identical_summaries_score_100_even_when_short():
    assert smoothed_bleu4(["Return x."], ["Return x."]) == pytest.approx(100)


def test_bleu_is_case_and_punctuation_insensitive_like_codexglue():
    assert sentence_bleu("Returns the URL.", "returns the url .") == pytest.approx(1.0)


def test_no_unigram_overlap_scores_zero():
    assert smoothed_bleu4(["Open the file."], ["compute sums"]) < 1e-6


def test_corpus_bleu_and_rouge_are_not_zero_for_partial_overlap():
    refs, hyps = ["Return the size of the file in bytes."], ["Return the size of the file."]
    assert 0 < corpus_bleu(refs, hyps) < 100
    assert 0 < rouge_l(refs, hyps) < 100
    assert exact_match(refs + ["A b."], hyps + ["a  B."]) == 50


@pytest.mark.parametrize(
    "code, words",
    [
        ("def get_file_size(path):\n    pass", "get file size"),
        ("async def fetchURL(self):", "fetch url"),
        ("public int getFileSize(String p) {", "get file size"),
        ("x = 1", ""),
    ],
)
def test_function_name_baseline(code, words):
    assert function_name_words(code) == words


def test_classification_metrics_match_hand_computed_values():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    got = classification_metrics(refs, preds)
    assert got["accuracy"] == pytest.approx(100 * 4 / 6, abs=0.01)
    # per-class F1: a 2*2/(3+2)=0.8, b 2*1/(2+2)=0.5, c 2*1/(1+2)=0.667
    assert got["f1_macro"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3, abs=0.01)
    # Gorodkin MCC: (c*s - sum t_k p_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) with c=4, s=6
    expected = (4 * 6 - (3 * 2 + 2 * 2 + 1 * 2)) / math.sqrt((36 - (4 + 4 + 4)) * (36 - (9 + 4 + 1)))
    assert got["mcc"] == pytest.approx(100 * expected, abs=0.01)
    assert classification_metrics(["a", "b"], ["a", "a"])["mcc"] == 0.0  # a constant prediction has no correlation


def test_retrieval_metrics_from_ranks():
    from codetune.core.metrics import retrieval_metrics

    assert retrieval_metrics([1, 2, 4, 20]) == {
        "mrr": round(100 * (1 + 0.5 + 0.25 + 0.05) / 4, 2),
        "recall_at_1": 25.0,
        "recall_at_10": 75.0,
    }


def test_codebleu_parses_python_with_the_pinned_tree_sitter():
    """CodeBLEU's syntax and data-flow parts need tree-sitter; a version mismatch shows here, not as a 0.0 in a run."""
    from codetune.core.metrics import code_metrics, stub_function

    reference = "def area(width, height):\n    return width * height\n"
    same = code_metrics([reference], [reference])
    assert same == {"codebleu": 100.0, "syntax_match": 100.0, "dataflow_match": 100.0, "exact_match": 100.0}
    renamed = code_metrics([reference], ["def area(w, h):\n    return w * h\n"])
    assert renamed["syntax_match"] == 100.0 and renamed["dataflow_match"] == 100.0 and 0 < renamed["codebleu"] < 100
    stub = code_metrics([reference], [stub_function("Return the area of a rectangle.")])
    assert stub["codebleu"] < renamed["codebleu"] and stub["exact_match"] == 0.0
    # codebleu itself scores a data-flow miss as a full match (`dataflow or 1`): a stub would get 25 for free.
    assert stub["dataflow_match"] == 0.0 and stub["codebleu"] < 10
    # References with no data flow at all keep codebleu's convention: that quarter is not held against anyone.
    from codebleu import calc_codebleu

    no_flow = ["def f():\n    pass"]
    assert code_metrics(no_flow, no_flow)["codebleu"] == round(
        100 * calc_codebleu(no_flow, no_flow, lang="python")["codebleu"], 2
    )
