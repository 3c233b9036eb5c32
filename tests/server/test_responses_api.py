"""POST /v1/responses with the official openai SDK (strict response validation) against a live
server over the fake engine: plain, streamed, function tools, previous_response_id."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import LiveServer

MODEL = "fake-model"
TOOLS = [{"type": "function", "name": "get_weather", "description": "weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.openai_url, api_key=live_server.api_key,
                         _strict_response_validation=True, max_retries=0, timeout=30)


def _tool_text(city: str) -> str:
    args = json.dumps({"city": city})
    return f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'


def test_plain_response_and_usage(client: openai.OpenAI, live_server: LiveServer) -> None:
    r = client.responses.create(model=MODEL, input="SAY:hello there", instructions="Be brief.")
    assert r.object == "response" and r.status == "completed" and r.output_text == "hello there"
    assert [o.type for o in r.output] == ["message"] and r.output[0].status == "completed"
    assert r.instructions == "Be brief." and r.tool_choice == "auto" and r.tools == []
    assert r.usage.output_tokens == len("hello there") + 1  # + EOS
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    seen = [p for rid, p in live_server.engine.params_seen.items() if rid.startswith("resp-")]
    assert seen and seen[-1].max_tokens == 1024 - r.usage.input_tokens  # no max_output_tokens
    # message items, developer role and max_output_tokens -> incomplete
    short = client.responses.create(
        model=MODEL, max_output_tokens=3, temperature=0,
        input=[{"role": "developer", "content": "sys"},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "SAY:abcdef"}]}])
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.output_text == "abc" and short.output[0].status == "incomplete"
    assert short.usage.output_tokens == 3


def test_streamed_events_add_up_to_the_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="SAY:streamed words", stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == "streamed words" == final.output_text
    assert events[0].response.status == "in_progress" and final.status == "completed"
    assert final.usage.output_tokens == len("streamed words") + 1
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == deltas and done.item_id == final.output[0].id


def test_function_tool_plain_and_streamed(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="SAY:" + _tool_text("Paris"), tools=TOOLS)
    assert [o.type for o in r.output] == ["message", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and r.output_text == "Let me check."
    assert r.tools[0].name == "get_weather"
    events = list(client.responses.create(model=MODEL, input="SAY:" + _tool_text("Oslo"),
                                          tools=TOOLS, stream=True))
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(args) == 1 and json.loads(args[0].arguments) == {"city": "Oslo"}
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == args[0].arguments
    # named tool_choice is accepted and echoed
    named = client.responses.create(model=MODEL, input="SAY:" + _tool_text("Rome"), tools=TOOLS,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert named.tool_choice.name == "get_weather"


def test_previous_response_id_replays_the_conversation(client: openai.OpenAI,
                                                       live_server: LiveServer) -> None:
    first = client.responses.create(model=MODEL, input="SAY:remembered")
    # the fake says whatever follows the last SAY: in its prompt: only the replayed history has it
    follow = client.responses.create(model=MODEL, input="and now?",
                                     previous_response_id=first.id)
    assert follow.output_text == "remembered" and follow.previous_response_id == first.id
    fresh = client.responses.create(model=MODEL, input="and now?", max_output_tokens=5)
    assert fresh.output_text != "remembered"
    # a tool round trip: the function_call_output item goes back as a tool message
    call = client.responses.create(model=MODEL, input="SAY:" + _tool_text("Lima"), tools=TOOLS)
    out = client.responses.create(model=MODEL, previous_response_id=call.id, tools=TOOLS,
                                  input=[{"type": "function_call_output",
                                          "call_id": call.output[-1].call_id, "output": "sunny"}])
    assert out.status == "completed"
    assert client.responses.retrieve(out.id).output_text == out.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")


def test_bad_requests_are_400(live_server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {live_server.api_key}"}
    for body in ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
                 {"input": "x", "text": {"format": {"type": "json_schema"}}},
                 {"input": []},
                 {"input": "x", "max_output_tokens": 0}):
        r = httpx.post(live_server.openai_url + "/responses", json={"model": MODEL, **body},
                       headers=headers, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_stream_events_validate_against_the_sdk_types(live_server: LiveServer) -> None:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    body = {"model": MODEL, "input": "SAY:" + _tool_text("Kyiv"), "tools": TOOLS, "stream": True,
            "max_output_tokens": 200}
    with httpx.stream("POST", live_server.openai_url + "/responses", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {live_server.api_key}"}) as r:
        blocks = r.read().decode().split("\n\n")
    events = []
    for block in filter(None, blocks):
        name, data = block.split("\n", 1)
        obj = json.loads(data.removeprefix("data: "))
        assert name == f"event: {obj['type']}"
        events.append(adapter.validate_python(obj, strict=False))
    kinds = {e.type for e in events}
    assert {"response.created", "response.output_text.delta", "response.output_item.added",
            "response.function_call_arguments.done", "response.completed"} <= kinds


def test_reasoning_item_plain_and_streamed() -> None:
    from jaxllm.server.server_config import ServerConfig

    from .conftest import make_app, start_server

    app, _ = make_app(server_config=ServerConfig(reasoning_parser="think"))
    server, thread, url = start_server(app)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30,
                          _strict_response_validation=True)
        said = "SAY:<think>two and two</think>It is 4."
        r = c.responses.create(model=MODEL, input=said)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "two and two" and r.output_text == "It is 4."
        events = list(c.responses.create(model=MODEL, input=said, stream=True))
        reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert (reasoning, text) == ("two and two", "It is 4.")
        final = events[-1].response
        assert [o.type for o in final.output] == ["reasoning", "message"]
        assert [o.status for o in final.output] == ["completed", "completed"]
    finally:
        server.should_exit = True
        thread.join(10)
