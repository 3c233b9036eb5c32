"""Server inputs -> StructuredOutputsParams, and forced tool-call grammars checked against
llguidance on the exact text the Hermes parser reads (no model)."""

from __future__ import annotations

import json

import pytest

from jaxllm.server.errors import APIError
from jaxllm.server.openai_chat import _forced_tool_prefix
from jaxllm.server.protocol_openai import ChatCompletionRequest, ResponseFormat
from jaxllm.server.structured_output import structured_spec, tool_call_spec
from jaxllm.server.tool_parser import HermesToolParser
from jaxllm.structured.compiler import grammar_accepts
from jaxllm.structured.spec import StructuredOutputsParams as Spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_each_input_maps_to_one_spec():
    rf = ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": SCHEMA,
                                                         "strict": True})
    assert structured_spec(response_format=rf) == Spec(json=SCHEMA)
    assert structured_spec(response_format=ResponseFormat(type="json_object")) == \
        Spec(json_object=True)
    assert structured_spec(response_format=ResponseFormat(type="text")) is None
    assert structured_spec(structured_outputs={"choice": ["a", "b"]}) == Spec(choice=("a", "b"))
    assert structured_spec(guided_grammar='root ::= "x"') == Spec(grammar='root ::= "x"')
    assert structured_spec() is None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(response_format=ResponseFormat(type="json_schema", json_schema={"name": "x"})),
     "schema"),
    (dict(response_format=ResponseFormat(type="json_schema",
                                         json_schema={"name": "x", "schema": [1]})), "schema"),
    (dict(response_format=ResponseFormat(type="json_object"), guided_regex="a"), "one of"),
    (dict(structured_outputs={"regex": "a"}, guided_choice=["b"]), "one of"),
    (dict(structured_outputs={"json": "{bad"}), "not valid JSON"),
])
def test_malformed_inputs_are_400(kwargs, needle):
    with pytest.raises(APIError) as err:
        structured_spec(**kwargs)
    assert err.value.status == 400 and needle in err.value.message


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
              "type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now"}}]


@pytest.mark.parametrize("choice, completion, accepted", [
    ("required", 'get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', True),
    ("required", 'now", "arguments": {}}\n</tool_call>', True),
    ("required", 'get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>', False),
    ("required", 'other", "arguments": {}}\n</tool_call>', False),
    ({"type": "function", "function": {"name": "get_weather"}},
     '{"city": "Lima"}}\n</tool_call>', True),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": 3}}\n</tool_call>',
     False),
])
def test_forced_tool_calls(compiler, default_tokenizer, choice, completion, accepted):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                tool_choice=choice)
    prefix = _forced_tool_prefix(req)
    spec = tool_call_spec(req.tools, req.tool_choice, prefix)
    ids = default_tokenizer.encode(completion, add_special_tokens=False)
    assert grammar_accepts(compiler, spec, ids) is accepted
    if accepted:  # what the grammar lets through is what the Hermes parser reads as a call
        parser = HermesToolParser()
        calls = parser.feed(prefix + completion)[1] + parser.finish()[1]
        assert len(calls) == 1 and isinstance(json.loads(calls[0].arguments), dict)
    assert tool_call_spec(req.tools, "auto", "") is None
