"""model.direction=chat: conversations from files in every format and from a code tree, trained through the chat
template on the assistant's turns, exported to stop where the assistant's turn ends, and scored turn by turn."""

import json

import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.errors import DataError
from codetune.core.families.chat import fenced_code
from tests.conftest import write_jsonl

CHAT = "configs/tiny-chat.yaml"


def _files_cfg(tiny_overrides, path, *more):
    return load_config(CHAT, tiny_overrides + ["data.source=files", f"data.path={path}", *more])


def test_rows_in_any_format_are_read_as_conversations_and_split(tmp_path, tiny_overrides):
    rows = []
    for i in range(60):
        ask, answer = f"Write f{i}.", f"```python\ndef f{i}(x):\n    return x + {i}\n```"
        rows += [
            {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]},
            {"conversations": [{"from": "human", "value": ask + " "}, {"from": "gpt", "value": answer + "\n"}]},
            {"instruction": ask, "input": f"x={i}", "output": answer},
            {"prompt": ask + "!", "completion": answer},
        ]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    data = prepare_data(_files_cfg(tiny_overrides, path).data, Examples.conversations)
    kept = [r for s in ("train", "validation", "test") for r in data.load(s)]
    # The ShareGPT rows differ from the messages rows by whitespace only: the same conversation, deduplicated.
    assert len(kept) + data.counts["dropped"].get("test_code_in_train", 0) == 180
    assert data.counts["dropped"]["duplicate"] == 60
    assert all(r["messages"][-1]["role"] == "assistant" for r in kept)


def test_a_malformed_conversation_names_its_file_and_line_or_is_skipped_and_counted(tmp_path, tiny_overrides):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}]}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"chats.jsonl:2: turn 2 has the unknown role 'critic'.*data.skip_invalid"):
        prepare_data(_files_cfg(tiny_overrides, path).data, Examples.conversations)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(200)] + [bad]  # fmt: skip
    path = write_jsonl(tmp_path / "more.jsonl", rows)
    data = prepare_data(_files_cfg(tiny_overrides, path, "data.skip_invalid=true").data, Examples.conversations)
    assert data.counts["dropped"]["invalid_conversation"] == 1


def test_the_stdlib_gives_conversations_about_its_functions(tiny_overrides):
    data = prepare_data(load_config(CHAT, tiny_overrides).data, Examples.conversations)
    rows = data.load("train")
    asked = {r["messages"][0]["content"].split(maxsplit=1)[0] for r in rows}
    assert asked == {"What", "Write", "Complete"}  # shown one, asked what it does; asked for one by two prompts
    shown = next(r for r in rows if len(r["messages"]) == 4)
    assert shown["messages"][3]["content"].count('"""') + shown["messages"][3]["content"].count("'''") >= 2
    # Completing a signature and docstring, as HumanEval asks a chat model: answered with the function, its
    # docstring (which the user gave) not repeated.
    stub = next(r["messages"] for r in rows if r["messages"][0]["content"].startswith("Complete"))
    given, answer = fenced_code(stub[0]["content"]), fenced_code(stub[1]["content"])
    assert given.rstrip().endswith(('"""', "'''")) and '"""' not in answer and "'''" not in answer
    assert answer.startswith(given.partition(":\n")[0]) and len(answer.splitlines()) > 1


@pytest.mark.parametrize("packing", [False, True])
def test_a_chat_model_trains_on_the_assistant_and_its_export_stops_at_the_end_of_turn(tiny_overrides, packing):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.pipeline import run_pipeline

    outcome = run_pipeline(load_config(CHAT, tiny_overrides + [f"training.packing={packing}"]))
    run_dir = outcome.trained.run_dir
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.chat_template and end in model.generation_config.eos_token_id  # ChatML given to a scratch model
    report = outcome.report
    assert {"bleu4_smoothed", "prose_bleu4_smoothed", "code_codebleu", "code_parses"} <= set(report.metrics)
    predictions = [json.loads(line) for line in open(f"{run_dir}/predictions.jsonl")]
    assert predictions and all("<|im_end|>" not in p["prediction"] for p in predictions)
    assert {p["turn"] for p in predictions} <= {1, 3}


def test_an_instruct_answer_is_run_as_the_whole_function_it_fences():
    """HumanEval in instruct mode (EvalPlus): the answer's fenced function, written after the prompt, is what runs."""
    from codetune.core.execution import benchmark_problems, functional_correctness, time_limits
    from codetune.core.families.chat import solution

    problem = benchmark_problems("humaneval")[0]
    answer = f"Here it is:\n\n```python\n{problem.prompt}{problem.reference}```\n\nIt compares every pair."
    wrong = f"```python\n{problem.prompt}    return False\n```"
    unfenced = "Check each pair of numbers against the threshold."
    answers = [[solution(answer)], [solution(wrong)], [solution(unfenced)]]
    result = functional_correctness([problem] * 3, answers, time_limits([problem]) * 3)
    assert [r["passed"] for r in result.records] == [1, 0, 0]


def test_a_chat_model_solves_a_benchmark_by_answering_it(tiny_decoder_base, tiny_overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.config import Benchmark, BenchmarkMode
    from codetune.core.evaluation import solve_benchmark

    cfg = load_config(
        CHAT, tiny_overrides + ["evaluation.max_benchmark_problems=2", "evaluation.benchmark_max_new_tokens=8"]
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_base)
    solved = solve_benchmark(cfg, model, tokenizer, Benchmark.humaneval, BenchmarkMode.instruct)
    assert set(solved["metrics"]) == {"humaneval_instruct_pass_at_1"} and len(solved["problems"]) == 2
    assert all(r["mode"] == "instruct" and r["completions"][0].startswith("\n") for r in solved["problems"])


def test_a_conversation_without_a_system_turn_is_answered_after_the_system_prompt_it_was_trained_with(
    tiny_decoder_base, tiny_overrides
):
    """chat.system_prompt travels with the model (inference.json): evaluation and `codetune serve` ask as training
    did; a conversation's own system turn is kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.core.families import InferenceSettings, family_of
    from codetune.core.families.base import Sampling

    system = "You are a Python expert."
    cfg = load_config(CHAT, tiny_overrides + [f"chat.system_prompt={system}"])
    settings = InferenceSettings.of(cfg)
    assert settings.system_prompt == system
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_base)
    family = family_of(cfg.model)
    asked = [{"role": "user", "content": "Write add(a, b)."}]
    own = [{"role": "system", "content": "Be brief."}, *asked]

    def prompt_tokens(conversation, settings):
        [[completion]] = family.chat(model, tokenizer, [conversation], settings, Sampling(1))
        return completion.prompt_tokens

    def rendered(conversation):
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
        return len(rendered["input_ids"])

    with_prompt = [{"role": "system", "content": system}, *asked]
    assert prompt_tokens(asked, settings) == rendered(with_prompt) != rendered(asked)
    assert prompt_tokens(own, settings) == rendered(own)
    assert prompt_tokens(asked, InferenceSettings.of(load_config(CHAT, tiny_overrides))) == rendered(asked)
