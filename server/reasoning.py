"""Separate `<think>...</think>` reasoning from the answer (reasoning_content vs content).

Reasoning is recognised only when the output opens with `<think>` (leading whitespace
allowed); an output that does not start that way is all content. Incremental like the tool
parser, so streamed reasoning/content deltas add up to the non-streamed split.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ThinkParser:
    """`feed(delta)` / `finish()` return (reasoning_delta, content_delta)."""

    def __init__(self) -> None:
        self._state = "start"  # start -> reasoning -> content, or start -> content
        self._pending = ""
        self._strip_next = False

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning, content = "", ""
        if self._state == "start":
            head = self._pending.lstrip()
            if head.startswith(THINK_OPEN):
                self._state = "reasoning"
                self._pending = head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return "", ""  # undecided: maybe the opening tag is still arriving
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._pending.find(THINK_CLOSE)
            if end >= 0:
                reasoning += self._pending[:end]
                self._pending = self._pending[end + len(THINK_CLOSE):]
                self._state = "content"
                self._strip_next = True
            else:
                keep = _partial_suffix(self._pending, THINK_CLOSE)
                reasoning += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                return reasoning, ""
        if self._state == "content":
            text, self._pending = self._pending, ""
            if self._strip_next:
                text = text.lstrip()
                self._strip_next = not text
            content += text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            return pending, ""  # unterminated reasoning stays reasoning
        if self._strip_next:
            pending = pending.lstrip()
        return "", pending


def _partial_suffix(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Non-streaming split: (reasoning or None, content)."""
    parser = ThinkParser()
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    opened = parser._state != "content" or text.lstrip().startswith(THINK_OPEN)
    return (r1 + r2 if opened else None), c1 + c2
