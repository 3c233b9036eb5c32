"""Turn one chat choice's generated text into reasoning / content / tool-call pieces.

The same processor serves streaming (feed deltas) and non-streaming (feed everything once),
so both paths agree by construction.
"""

from __future__ import annotations

from typing import Any

from .reasoning import ThinkParser
from .tool_parser import HermesToolParser, ParsedToolCall


class ChatChoiceProcessor:
    """Routes text through the reasoning parser (optional), then the tool parser (optional)."""

    def __init__(self, *, reasoning: bool, tools: bool, tool_prefix: str = "") -> None:
        self._think = ThinkParser() if reasoning else None
        self._tools = HermesToolParser() if tools else None
        if self._tools is not None and tool_prefix:
            self._tools.feed(tool_prefix)  # the forced opening of a named tool call
        self.tool_calls: list[ParsedToolCall] = []

    def _route(self, reasoning: str, content: str, final: bool
               ) -> tuple[str, str, list[ParsedToolCall]]:
        calls: list[ParsedToolCall] = []
        if self._tools is not None:
            c1, t1 = self._tools.feed(content)
            content, calls = c1, t1
            if final:
                c2, t2 = self._tools.finish()
                content, calls = content + c2, calls + t2
        self.tool_calls.extend(calls)
        return reasoning, content, calls

    def feed(self, delta: str) -> tuple[str, str, list[ParsedToolCall]]:
        reasoning, content = self._think.feed(delta) if self._think else ("", delta)
        return self._route(reasoning, content, final=False)

    def finish(self) -> tuple[str, str, list[ParsedToolCall]]:
        reasoning, content = self._think.finish() if self._think else ("", "")
        return self._route(reasoning, content, final=True)


def tool_call_json(call: ParsedToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta_json(call: ParsedToolCall) -> dict[str, Any]:
    return {"index": call.index, **tool_call_json(call)}


def chat_finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"
