"""Hypothesis fuzz of the request schemas: any JSON body, well-typed or not, must get a
non-5xx answer (bad input is a 4xx with an OpenAI error body, never a crash)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from .conftest import make_app

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
            | st.sampled_from(["fake-model", "SAY:<tool_call>{\"name\": \"f\"}</tool_call>",
                               "<think>x</think>y", "auto", "none", "required", "text",
                               "json_object", "user", "assistant", "tool"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

_small_int = st.integers(-3, 40)
_text = st.text(max_size=20) | st.sampled_from(
    ["SAY:hi", "SAY:<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
     "SAY:<think>a</think>b", "x" * 300])
_stop = st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]),
     "content": _text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                        "text": _text}), max_size=2)},
    optional={"name": st.text(max_size=5)})
_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g"])}, optional={"parameters": st.just({"type": "object"})})})
_sampling = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
             "top_k": st.integers(-1, 50), "seed": st.integers(-(2**64), 2**64),
             "stop": _stop, "stream": st.booleans(), "n": st.integers(1, 3),
             "presence_penalty": st.floats(-2, 2), "min_p": st.floats(0, 1)}

# path -> (required fields, optional fields), each a likely-valid value strategy
_FIELDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "/v1/completions": ({"prompt": _text | st.lists(st.integers(-5, 300), max_size=6)
                         | st.lists(_text, max_size=3)}, {
        **_sampling, "max_tokens": _small_int, "echo": st.booleans(),
        "logprobs": st.integers(-1, 25), "best_of": st.integers(0, 3),
        "stream_options": st.fixed_dictionaries({}, optional={
            "include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
        "model": st.sampled_from(["fake-model", "other"]), "suffix": st.none() | st.text()}),
    "/v1/chat/completions": ({"messages": st.lists(_message, max_size=3)}, {
        **_sampling, "max_tokens": _small_int, "max_completion_tokens": _small_int,
        "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 25),
        "tools": st.lists(_tool, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"])
        | st.just({"type": "function", "function": {"name": "f"}}),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                            {"type": "json_schema"}]),
        "chat_template_kwargs": st.dictionaries(st.text(max_size=5), _scalars, max_size=2)}),
    "/generate": ({"text": _text | st.lists(_text, max_size=3)}, {
        "sampling_params": st.fixed_dictionaries({}, optional={
            "max_new_tokens": _small_int, "temperature": st.floats(-1, 2),
            "n": st.integers(-1, 3), "stop": _stop, "top_k": st.integers(-2, 5)}),
        "return_logprob": st.booleans(), "top_logprobs_num": st.integers(-1, 25),
        "stream": st.booleans(), "logprob_start_len": st.integers(-2, 5)}),
    "/tokenize": ({}, {"prompt": _text, "messages": st.lists(_message, max_size=2),
                       "add_special_tokens": st.booleans()}),
    "/detokenize": ({"tokens": st.lists(st.integers(-3, 300), max_size=8)}, {}),
    "/abort_request": ({"rid": st.text(max_size=8)}, {}),
}


def _body(path: str) -> st.SearchStrategy[Any]:
    required, optional = _FIELDS[path]
    typed = st.fixed_dictionaries(required, optional=optional)
    all_names = sorted({*required, *optional}) or ["x"]
    one_junk = st.tuples(typed, st.sampled_from(all_names) | st.text(max_size=6), _json).map(
        lambda t: {**t[0], t[1]: t[2]})
    return typed | one_junk | _json


@pytest.fixture(scope="module")
def client() -> TestClient:
    app, _ = make_app()
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


@pytest.mark.parametrize("path", list(_FIELDS))
def test_no_5xx(client: TestClient, path: str) -> None:
    @settings(max_examples=80, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=_body(path))
    def run(body: Any) -> None:
        r = client.post(path, json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    run()
