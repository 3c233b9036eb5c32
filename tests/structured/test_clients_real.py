"""Structured output through the server with the default model, driven by real clients: the
openai SDK's `chat.completions.parse` and `responses.parse` with a pydantic model, langchain-openai's
`with_structured_output(method="json_schema")`, litellm with `response_format`; vLLM's extra
body fields, the native /generate's SGLang names, forced tool calls, and a bad schema as a 400
before anything is queued. Slow: loads the 135M model (one in-process server for the file)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from jaxllm.config import EngineConfig
from jaxllm.server.app import build_app
from jaxllm.server.server_config import ServerConfig
from tests.server.conftest import start_server
from tests.structured.conftest import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow

KEY = "structured-key"
MODEL = DEFAULT_MODEL_NAME


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=50)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=10)


@pytest.fixture(scope="module")
def server(default_llm) -> Iterator[tuple[str, object]]:
    """The shared default-model engine behind an in-process server; its loop thread is
    stopped afterwards so other files can drive the engine directly again."""
    from jaxllm.async_engine import AsyncEngine

    engine = AsyncEngine(default_llm.engine)
    config = EngineConfig(served_model_name=MODEL, api_key=KEY)
    app = build_app(config, engine, ServerConfig(tool_call_parser="hermes"))
    uv, thread, url = start_server(app)
    try:
        yield url, engine
    finally:
        uv.should_exit = True
        thread.join(10)
        asyncio.run(engine.shutdown())


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_openai_sdk_parse_returns_the_pydantic_object(server):
    url, _ = server
    client = _client(url)
    completions = getattr(client.beta.chat, "completions", None) or client.chat.completions
    r = completions.parse(model=MODEL, messages=_ask("Describe Paris as JSON."),
                          response_format=City, temperature=0, max_tokens=80)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop"
    sampled = client.chat.completions.create(
        model=MODEL, messages=_ask("Is the sky green? Answer as JSON."), n=2, temperature=1.0,
        seed=7, max_tokens=60, response_format={"type": "json_schema", "json_schema": {
            "name": "verdict", "schema": Verdict.model_json_schema(), "strict": True}})
    for choice in sampled.choices:
        Verdict.model_validate_json(choice.message.content)


def test_openai_sdk_responses_parse(server):
    url, _ = server
    r = _client(url).responses.parse(model=MODEL, input="Describe Lima as JSON.",
                                     text_format=City, temperature=0, max_output_tokens=80)
    assert isinstance(r.output_parsed, City)


def test_langchain_with_structured_output(server):
    url, _ = server
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model=MODEL, base_url=url + "/v1", api_key=KEY, max_retries=0,
                        temperature=0, max_tokens=80)
    city = llm.with_structured_output(City, method="json_schema").invoke(
        "Describe Tokyo as JSON.")
    assert isinstance(city, City)


def test_litellm_response_format(server, monkeypatch):
    url, _ = server
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model=f"openai/{MODEL}", api_base=url + "/v1", api_key=KEY,
                           messages=_ask("Describe Rome as JSON."), response_format=City,
                           temperature=0, max_tokens=80)
    City.model_validate_json(r.choices[0].message.content)
    r = litellm.completion(model=f"openai/{MODEL}", api_base=url + "/v1", api_key=KEY,
                           messages=_ask("Is water wet? JSON please."), max_tokens=60,
                           response_format={"type": "json_schema", "json_schema": {
                               "name": "verdict", "schema": Verdict.model_json_schema()}},
                           temperature=1.0, seed=11)
    Verdict.model_validate_json(r.choices[0].message.content)


def test_extra_body_fields_and_native_generate(server):
    url, _ = server
    client = _client(url)
    r = client.chat.completions.create(model=MODEL, messages=_ask("Pick a fruit."),
                                       max_tokens=10, temperature=1.0, seed=3,
                                       extra_body={"guided_choice": ["apple", "pear"]})
    assert r.choices[0].message.content in ("apple", "pear")
    r = client.completions.create(model=MODEL, prompt="Phone: ", max_tokens=12, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="A JSON object: ", max_tokens=60,
                                  temperature=0, stream=True,
                                  extra_body={"guided_json": Verdict.model_json_schema()})
    Verdict.model_validate_json("".join(c.choices[0].text for c in r if c.choices))
    body = {"text": "The answer:", "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "ebnf": 'root ::= "yes" | "no" | "maybe"'}}
    out = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=300).json()
    assert out["text"] in ("yes", "no", "maybe")
    # More top logprobs than the grammar allows tokens: the excluded ones are -inf in the
    # constrained distribution, sent as -9999.0 (JSON has no -inf)
    body["return_logprob"], body["top_logprobs_num"] = True, 20
    r = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=300)
    assert r.status_code == 200, r.text
    tops = r.json()["meta_info"]["output_top_logprobs"]
    assert all(len(t) == 20 and -9999.0 < max(lp for lp, _, _ in t) <= 0.0 for t in tops)
    assert any(min(lp for lp, _, _ in t) == -9999.0 for t in tops)  # e.g. after "ye": only "s"


def test_forced_tool_calls_match_the_parameter_schema(server):
    url, _ = server
    client = _client(url)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
            "required": ["zone"], "additionalProperties": False}}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = client.chat.completions.create(model=MODEL, messages=_ask("Weather in Oslo?"),
                                           tools=tools, tool_choice=choice, max_tokens=60,
                                           temperature=0)
        calls = r.choices[0].message.tool_calls
        assert calls and r.choices[0].finish_reason == "tool_calls", r.choices[0]
        args = json.loads(calls[0].function.arguments)
        if calls[0].function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
        else:
            assert calls[0].function.name == "get_time" and set(args) == {"zone"}
        if isinstance(choice, dict):
            assert calls[0].function.name == "get_time"


def test_bad_specs_are_400_before_queueing(server):
    url, engine = server
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {
                  "name": "x", "schema": {"type": "object", "properties": {
                      "a": {"type": "string", "pattern": "(("}}}}}}, "regex"),
             ({"guided_regex": "a("}, "unclosed group"),
             ({"guided_grammar": "root ::= missing"}, "missing"),
             ({"guided_json": {"type": "nonsense"}}, "nonsense")]
    for extra, needle in cases:
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "messages": _ask("x"), "max_tokens": 5, **extra})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]
    stats = engine.engine.get_stats()
    assert stats.num_waiting == 0 and stats.num_running == 0
