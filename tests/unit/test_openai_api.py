"""The OpenAI routes' request checks and answer shapes (server/openai_api.py); the served routes are in
tests/e2e/test_serve_openai.py, through the openai client."""

import json

import pytest

from codetune.core.families.base import Completion, Sampling
from server.app import Limits
from server.openai_api import OpenAIError, chat_job, completion_job, events, response_body


def _job(parse=completion_job, **request):
    return parse(json.dumps(request).encode(), "completer", Limits())


def test_a_completion_request_is_prompt_and_suffix_with_openai_defaults():
    job = _job(model="completer", prompt="def f(", suffix="\n")
    assert job.prompts == [("def f(", "\n")] and job.sampling == Sampling(max_tokens=16) and not job.stream
    job = _job(prompt=["a", "b"], max_tokens=5, temperature=0.2, n=3, stop="\n", stream=True)
    assert job.prompts == [("a", ""), ("b", "")] and job.sampling == Sampling(5, 0.2, 3, ("\n",)) and job.stream


@pytest.mark.parametrize(
    "request_, status, param",
    [
        ({"model": "gpt-4o", "prompt": "x"}, 404, "model"),
        ({"prompt": 3}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "n": True}, 400, "n"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "x", "suffix": "y" * 100_001}, 400, "suffix"),
        ({"prompt": ["x"] * 100, "n": 3}, 400, "n"),
    ],
)
def test_a_bad_request_names_its_parameter_in_openai_error_shape(request_, status, param):
    with pytest.raises(OpenAIError) as refused:
        _job(**request_)
    body = refused.value.body()["error"]
    assert refused.value.status == status and body["param"] == param and body["type"] == "invalid_request_error"
    assert body["message"]


def test_chat_messages_need_roles_and_text():
    job = _job(chat_job, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7)
    assert job.prompts == [[{"role": "user", "content": "hi"}]] and job.sampling.max_tokens == 7
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": None}]):
        with pytest.raises(OpenAIError):
            _job(chat_job, messages=messages)


def test_answers_number_choices_count_usage_and_stream_the_same_text():
    job = _job(prompt=["a", "b"], n=2)
    answer = [
        [Completion("x = 1", 4, 3, "stop"), Completion("y\nz", 4, 2, "length")],
        [Completion("", 2, 1, "stop"), Completion("w", 2, 1, "stop")],
    ]
    body = response_body(job, answer, "completer", "3")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3] and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    chunks = [json.loads(e.removeprefix("data: ")) for e in list(events(job, body))[:-1]]
    streamed = {}
    for chunk in chunks:
        choice = chunk["choices"][0]
        streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert streamed == {0: "x = 1", 1: "y\nz", 2: "", 3: "w"}
    assert list(events(job, body))[-1] == "data: [DONE]\n\n"
