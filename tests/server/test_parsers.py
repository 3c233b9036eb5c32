"""Tool-call (Hermes) and reasoning (<think>) parsers on fixed model texts; streaming in
arbitrary chunks must reproduce the non-streaming parse."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.server.chat_output import ChatChoiceProcessor
from jaxllm.server.reasoning import split_reasoning
from jaxllm.server.tool_parser import HermesToolParser, parse_tool_calls

TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
             '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
             '</tool_call>')


def test_hermes_two_calls_with_content() -> None:
    r = parse_tool_calls(TWO_CALLS)
    assert r.content == "Let me check."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in r.tool_calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"tz": "CET"})]
    assert all(c.id.startswith("call_") for c in r.tool_calls)
    assert len({c.id for c in r.tool_calls}) == 2


def test_hermes_plain_text_untouched() -> None:
    text = "No tools here, just 1 < 2 and <tool text."
    r = parse_tool_calls(text)
    assert r.content == text and r.tool_calls == []


def test_hermes_invalid_json_stays_content() -> None:
    text = "<tool_call>{not json}</tool_call>"
    r = parse_tool_calls(text)
    assert r.tool_calls == [] and r.content == text


def test_hermes_unterminated_block() -> None:
    r = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("f", {"x": 1})]
    r = parse_tool_calls('<tool_call>{"name": "f", "argu')
    assert r.tool_calls == [] and r.content == '<tool_call>{"name": "f", "argu'


def test_hermes_arguments_as_string_and_parameters_key() -> None:
    r = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>'
                         '<tool_call>{"name": "g", "parameters": {"b": "é"}}</tool_call>')
    assert [json.loads(c.arguments) for c in r.tool_calls] == [{"a": [1, 2]}, {"b": "é"}]


def _stream(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    parser = HermesToolParser()
    content, calls = "", []
    bounds = sorted({min(c, len(text)) for c in cuts}) + [len(text)]
    prev = 0
    for b in bounds:
        c, t = parser.feed(text[prev:b])
        prev = b
        content += c
        calls += t
    c, t = parser.finish()
    return content + c, [(x.name, x.arguments) for x in calls + t]


def test_hermes_streaming_every_split_point() -> None:
    expected = parse_tool_calls(TWO_CALLS)
    want = (expected.content, [(c.name, c.arguments) for c in expected.tool_calls])
    for cut in range(len(TWO_CALLS) + 1):
        assert _stream(TWO_CALLS, [cut]) == want, cut


@settings(max_examples=60, deadline=None)
@given(pre=st.text(max_size=12), post=st.text(max_size=12),
       args=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
       cuts=st.lists(st.integers(0, 120), max_size=8))
def test_hermes_streaming_matches_whole_text(pre: str, post: str, args: dict, cuts: list[int]
                                             ) -> None:
    text = pre + "<tool_call>" + json.dumps({"name": "fn", "arguments": args}) + "</tool_call>" + post
    whole = parse_tool_calls(text)
    assert _stream(text, cuts) == (whole.content, [(c.name, c.arguments) for c in whole.tool_calls])
    if "<tool_call>" not in pre + post and "</tool_call>" not in pre + post:
        assert [json.loads(c.arguments) for c in whole.tool_calls] == [args]


def test_think_split() -> None:
    assert split_reasoning("<think>a b</think>\n\nanswer") == ("a b", "answer")
    assert split_reasoning("plain answer") == (None, "plain answer")
    assert split_reasoning("  <think>unfinished") == ("unfinished", "")


@settings(max_examples=60, deadline=None)
@given(reason=st.text(max_size=15).filter(lambda s: "</think>" not in s),
       answer=st.text(max_size=15), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_think_streaming_matches_whole_text(reason: str, answer: str, cuts: list[int]) -> None:
    text = f"<think>{reason}</think>{answer}"
    proc = ChatChoiceProcessor(reasoning=True, tools=False)
    r_all, c_all, prev = "", "", 0
    for b in sorted({min(c, len(text)) for c in cuts}) + [len(text)]:
        r, c, _ = proc.feed(text[prev:b])
        prev = b
        r_all, c_all = r_all + r, c_all + c
    r, c, _ = proc.finish()
    assert (r_all + r, c_all + c) == (reason, answer.lstrip())


def test_named_tool_prefix_completes_a_call() -> None:
    proc = ChatChoiceProcessor(reasoning=False, tools=True,
                               tool_prefix='<tool_call>\n{"name": "f", "arguments": ')
    _, content, calls = proc.feed('{"q": 1}}\n</tool_call>')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"q": 1})]
