"""The official `openai` SDK with strict response validation against a live uvicorn server
running the app over the fake engine.

Strict validation is used everywhere except streamed *legacy completions*: the SDK types
`CompletionChoice.finish_reason` as non-null, while the wire format (OpenAI's and vLLM's)
sends null on every chunk but the last; those chunks are checked with a lenient client.
"""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import LiveServer

MODEL = "fake-model"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TEXT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>')


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.openai_url, api_key=live_server.api_key,
                         _strict_response_validation=True, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def lenient(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.openai_url, api_key=live_server.api_key,
                         max_retries=0, timeout=30)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_basic_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert len(r.choices[0].text) == 5 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == 10


def test_completion_batch_prompts_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["a", "bcd"], n=2, max_tokens=4,
                                  temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text  # independent samples
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == 4
    ids = client.completions.create(model=MODEL, prompt=[[70, 71], [72]], max_tokens=2)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 3


def test_completion_stop_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="SAY:one two three", max_tokens=30,
                                  stop=[" three", "zzz"])
    assert r.choices[0].text == "one two" and r.choices[0].finish_reason == "stop"
    a = client.completions.create(model=MODEL, prompt="p", max_tokens=8, temperature=0.9, seed=7)
    b = client.completions.create(model=MODEL, prompt="p", max_tokens=8, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="SAY:abc", max_tokens=10, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens[:3] == ["a", "b", "c"]
    assert lp.text_offset[:3] == [0, 1, 2]
    assert all(isinstance(x, float) for x in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_completion_echo(client: openai.OpenAI, live_server: LiveServer) -> None:
    r = client.completions.create(model=MODEL, prompt="SAY:xy", max_tokens=5, echo=True)
    assert r.choices[0].text == "SAY:xyxy"
    # echo + logprobs: prompt logprobs with a leading null (not valid for the SDK's types).
    import httpx
    raw = httpx.post(live_server.openai_url + "/completions", timeout=30,
                     headers={"Authorization": f"Bearer {live_server.api_key}"},
                     json={"model": MODEL, "prompt": "SAY:xy", "max_tokens": 5, "echo": True,
                           "logprobs": 1}).json()
    lp = raw["choices"][0]["logprobs"]
    assert raw["choices"][0]["text"] == "SAY:xyxy"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [*"SAY:xyxy", "<|endoftext|>"]  # the EOS that ended it is listed
    assert lp["text_offset"] == list(range(9))


def test_completion_stream_equals_non_stream(client: openai.OpenAI, lenient: openai.OpenAI
                                             ) -> None:
    kwargs = dict(model=MODEL, prompt="stream me", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(lenient.completions.create(**kwargs, stream=True,
                                             stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_basic(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "SAY:Hi there!"}]}])
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == "Hi there!" and m.tool_calls is None
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 10


def test_chat_stream_shape_and_equality(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "tell"}], n=2,
                  max_completion_tokens=9, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert deltas[0].delta.role == "assistant"
        assert all(d.delta.role is None for d in deltas[1:])
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
        assert "".join(d.delta.content or "" for d in deltas) == whole.choices[i].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 18


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "SAY:é!"}],
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [tuple(x.bytes) for x in content[:3]] == [(0xC3,), (0xA9,), (ord("!"),)]
    assert all(len(x.top_logprobs) == 3 for x in content)
    assert content[2].token == "!" and content[2].top_logprobs[0].token == "!"
    stream = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "SAY:ok"}], logprobs=True, top_logprobs=1, stream=True)
    tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert tokens[:2] == ["o", "k"]


def test_chat_tools(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "SAY:" + TOOL_TEXT}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # tool_choice="none": the text is returned as is
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == TOOL_TEXT and r.choices[0].finish_reason == "stop"
    # a follow-up turn carrying the assistant's tool call and the tool result renders fine
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
                     {"role": "user", "content": "SAY:It is sunny."}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny."


def test_chat_tools_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "SAY:" + TOOL_TEXT}], tools=TOOLS,
        stream=True)
    content, calls, finishes = "", {}, []
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert content == "Checking." and finishes == ["tool_calls"]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_chat_named_tool_choice_forces_the_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'SAY:{"city": "Oslo"}}</tool_call>'}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


def test_errors_have_the_right_types(client: openai.OpenAI, live_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-3)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x" * 1020, max_tokens=10)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    anonymous = openai.OpenAI(base_url=live_server.openai_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_mid_stream_error_raises_in_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "FAIL: please"}], stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_chat_required_tool_choice_and_no_parallel_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, tools=TOOLS, tool_choice="required", messages=[
            {"role": "user", "content": 'SAY:get_weather", "arguments": {"city": "Rome"}}'
                                        '</tool_call><tool_call>{"name": "get_weather", '
                                        '"arguments": {}}</tool_call>'}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in r.choices[0].message.tool_calls] == [
        {"city": "Rome"}, {}]
    r = client.chat.completions.create(
        model=MODEL, tools=TOOLS, messages=[{"role": "user", "content": "SAY:" + TOOL_TEXT * 2}],
        parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
