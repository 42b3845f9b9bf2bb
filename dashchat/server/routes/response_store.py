"""Bounded in-memory store for /v1/responses (`store`, `previous_response_id`, GET/DELETE by id).

Each entry keeps the response object and the conversation that led to it, as chat messages
(previous turns + this input + this output, without `instructions`, which OpenAI does not
carry over), so a follow-up only prepends that list. Limits: at most `max_entries` responses and
`max_bytes` of conversation text in all; the least recently used go first. Nothing survives a
restart, and a follow-up whose predecessor was evicted gets the same 404 as an unknown id.
Each entry belongs to the tenant (API key) that made it: to any other it does not exist (the same
404), so ids tell one tenant nothing about another's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dashchat.server.plumbing.sse import dumps


@dataclass
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    size: int
    owner: str = ""  # the tenant that made it (plumbing/tenant.py)


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]], owner: str = "") -> None:
        if self.max_entries <= 0:
            return
        size = len(dumps(response)) + len(dumps(conversation))
        if size > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything else
        rid = response["id"]
        self._drop(rid)
        self._items[rid] = StoredResponse(response, conversation, size, owner)
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.size

    def get(self, rid: str, owner: str = "") -> StoredResponse | None:
        item = self._items.get(rid)
        if item is None or item.owner != owner:
            return None
        self._items.move_to_end(rid)
        return item

    def delete(self, rid: str, owner: str = "") -> bool:
        item = self._items.get(rid)
        if item is None or item.owner != owner:
            return False
        self._drop(rid)
        return True

    def _drop(self, rid: str) -> None:
        item = self._items.pop(rid, None)
        if item is not None:
            self._bytes -= item.size
