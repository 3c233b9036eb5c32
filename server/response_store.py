"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}`, within the
server's lifetime: a bounded LRU in memory (no persistence; the oldest are forgotten)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredResponse:
    """The conversation after this response (messages without instructions, as chat dicts
    ready for ChatMessage) and the response object as sent."""

    messages: list[dict[str, Any]]
    response: dict[str, Any]


@dataclass
class ResponseStore:
    capacity: int = 1024
    _items: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored
