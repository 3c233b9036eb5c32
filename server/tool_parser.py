"""Hermes-style tool-call parsing: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

One incremental parser serves streaming and non-streaming responses (the non-streaming path
feeds the whole text at once), so streamed deltas always add up to the non-streamed message.
A block whose JSON does not parse is passed through as ordinary content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


@dataclass
class ParsedToolCall:
    """One complete tool call; `arguments` is a JSON string as OpenAI clients expect."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass
class ToolParseResult:
    content: str
    tool_calls: list[ParsedToolCall]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def parse_tool_call_json(block: str) -> tuple[str, str] | None:
    """(name, arguments-json) from a block's JSON, or None if it is not a tool call."""
    try:
        obj = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments already encoded
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class HermesToolParser:
    """Incremental parser. `feed(delta)` and `finish()` return (content_delta, new_tool_calls).

    Whitespace between content and tool calls is dropped, so content around calls is clean;
    a partial `<tool_call>` tag at the end of a delta is held back until it is decided.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._in_tool = False
        self._ws_hold = ""
        self._after_tool = False
        self._count = 0

    @property
    def num_tool_calls(self) -> int:
        return self._count

    def _emit_content(self, text: str) -> str:
        if self._after_tool:
            text = text.lstrip()
            if not text:
                return ""
            self._after_tool = False
        full = self._ws_hold + text
        body = full.rstrip()
        self._ws_hold = full[len(body):]
        return body

    def _close_block(self, block: str) -> tuple[str, ParsedToolCall | None]:
        parsed = parse_tool_call_json(block)
        if parsed is None:
            return self._emit_content(TOOL_OPEN + block + TOOL_CLOSE), None
        call = ParsedToolCall(self._count, new_tool_call_id(), parsed[0], parsed[1])
        self._count += 1
        self._ws_hold = ""
        self._after_tool = True
        return "", call

    def feed(self, delta: str) -> tuple[str, list[ParsedToolCall]]:
        self._pending += delta
        content, calls = "", []
        while True:
            if self._in_tool:
                end = self._pending.find(TOOL_CLOSE)
                if end < 0:
                    break
                text, call = self._close_block(self._pending[:end])
                content += text
                if call is not None:
                    calls.append(call)
                self._pending = self._pending[end + len(TOOL_CLOSE):]
                self._in_tool = False
                continue
            start = self._pending.find(TOOL_OPEN)
            if start >= 0:
                content += self._emit_content(self._pending[:start])
                self._ws_hold = ""
                self._pending = self._pending[start + len(TOOL_OPEN):]
                self._in_tool = True
                continue
            keep = _partial_prefix_len(self._pending, TOOL_OPEN)
            content += self._emit_content(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return content, calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """Flush at end of generation; an unterminated block still counts if its JSON parses."""
        pending, self._pending = self._pending, ""
        if self._in_tool:
            self._in_tool = False
            parsed = parse_tool_call_json(pending)
            if parsed is not None:
                _, call = self._close_block(pending)
                return "", [call] if call else []
            return self._emit_content(TOOL_OPEN + pending), []
        return self._emit_content(pending), []


def parse_tool_calls(text: str) -> ToolParseResult:
    """Non-streaming parse of a whole model output."""
    parser = HermesToolParser()
    c1, t1 = parser.feed(text)
    c2, t2 = parser.finish()
    return ToolParseResult(content=c1 + c2, tool_calls=t1 + t2)
