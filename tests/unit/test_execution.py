"""pass@k and the harness: HumanEval's canonical solutions pass, empty and wrong ones fail, limits scale with the
reference, a dataset's own tests judge whole functions."""

import logging

import pytest

from codetune.core.execution import (
    MIN_TIMEOUT,
    Problem,
    function_only,
    functional_correctness,
    humaneval,
    pass_at_k,
    rows_as_problems,
    time_limits,
    truncate,
)


def test_pass_at_k_matches_the_hand_computed_estimator():
    # n=5 samples, c=2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0  # any 10 of 10 include the correct one
    assert pass_at_k(20, 3, 10) == pytest.approx(
        1 - (17 * 16 * 15 * 14 * 13 * 12 * 11 * 10 * 9 * 8) / (20 * 19 * 18 * 17 * 16 * 15 * 14 * 13 * 12 * 11)
    )


SQUARE = Problem("square", "def square(x):\n", "assert square(3) == 9\nassert square(-2) == 4", "    return x * x")
HALF = Problem("half", "def half(x):\n", "assert half(4) == 2", "    return x / 2")


def test_pass_at_k_over_problems_and_samples():
    limits = time_limits([SQUARE, HALF])
    completions = [["    return x * x", "    return x + x"], ["    return x - 1", "    return 3"]]
    result = functional_correctness([SQUARE, HALF], completions, limits, prefix="toy_")
    assert result.metrics == {"toy_pass_at_1": 25.0}  # (1/2 + 0/2) / 2
    assert [r["passed"] for r in result.records] == [1, 0]
    assert result.records[0]["failures"] == ["AssertionError"]
    ten = functional_correctness([SQUARE], [["    return x * x"] + ["    return 0"] * 9], limits[:1])
    assert ten.metrics == {"pass_at_1": 10.0, "pass_at_10": 100.0}


def test_a_problem_whose_reference_fails_is_not_scored(caplog):
    broken = Problem("broken", "def f():\n", "assert f() == 1", "    return 2")
    with caplog.at_level(logging.WARNING):
        limits = time_limits([broken, SQUARE])
    assert limits[0] is None and "1 of 2 problems not scored" in caplog.text and "broken" in caplog.text
    result = functional_correctness([broken, SQUARE], [["    return 1"], ["    return x * x"]], limits)
    assert result.excluded == ["broken"] and result.metrics == {"pass_at_1": 100.0}


def test_time_limits_scale_with_the_reference():
    """A slow but correct completion passes where its reference is slow too: 4x the reference's time."""
    slow = Problem("slow", "import time\ndef f():\n", "assert f() == 1", "    time.sleep(1.0)\n    return 1")
    (limit,) = time_limits([slow])
    assert limit.timeout >= 4.0 > MIN_TIMEOUT
    slower = functional_correctness([slow], [["    time.sleep(3.3)\n    return 1"]], [limit])
    endless = functional_correctness([slow], [["    while True:\n        pass"]], [limit])
    assert slower.metrics["pass_at_1"] == 100.0
    assert endless.metrics["pass_at_1"] == 0.0 and "timed out" in endless.records[0]["failures"][0]


def test_the_164_canonical_humaneval_solutions_pass_and_empty_ones_fail():
    problems = humaneval()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    limits = time_limits(problems)
    assert all(limits), "every canonical solution passes its tests"
    assert functional_correctness(problems, [["    pass"]] * 164, limits).metrics == {"pass_at_1": 0.0}
    wrong = functional_correctness(problems[:20], [["    return None"]] * 20, limits[:20])
    assert wrong.metrics["pass_at_1"] == 0.0


def test_generation_is_cut_where_the_function_ends():
    completion = "    return x * x\n\n\ndef another():\n    pass\n\nprint(square(2))"
    assert truncate(completion) == "    return x * x"
    assert truncate("    if x:\n        return 1\n    return 2\nif __name__ == '__main__':\n    main()") == (
        "    if x:\n        return 1\n    return 2"
    )
    # After a prompt that ends its line (HumanEval's docstring), a new top-level `def` ends the function at once.
    assert truncate("def truncate_number(x):\n    return x", after_newline=True) == ""
    assert truncate("    return x\ndef g():", after_newline=True) == "    return x"
    predicted = "def square(x):\n    return x * x\n\n\ndef unrelated():\n    pass"
    assert function_only(predicted) == "def square(x):\n    return x * x"
    assert function_only("@cache\ndef f():\n    return 1\n# done") == "@cache\ndef f():\n    return 1"


def test_a_dataset_row_with_tests_judges_the_whole_predicted_function():
    rows = [{"code": "def add(a, b):\n    return a + b", "tests": "assert add(1, 2) == 3", "origin": "mbpp.jsonl:1"}]
    problems = rows_as_problems(rows)
    limits = time_limits(problems)
    right = functional_correctness(problems, [["def add(a, b):\n    return b + a"]], limits)
    wrong = functional_correctness(problems, [["def add(a, b):\n    return a - b"]], limits)
    assert (right.metrics, wrong.metrics) == ({"pass_at_1": 100.0}, {"pass_at_1": 0.0})
    assert right.records[0]["task_id"] == "mbpp.jsonl:1"
