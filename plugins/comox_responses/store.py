"""Stored responses, in ``gateway.shared_state`` (this process's memory, or
Redis with the ``redis`` plugin: then every replica sees them).

One value per response, under ``responses:<caller's key id>:<response id>``
(``-`` for a caller without a key id, as with ``auth = "none"``): another key
asks under another name, and finds nothing. It holds the ``response`` object
and ``input``, every item the model was given — the conversation of
``previous_response_id`` and this request's input — so a follow-up needs one
read to rebuild the whole conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

import comox

__all__ = ["Store"]

log = logging.getLogger("comox.responses")

VERSION = 1


class Store:
    def __init__(self, state: Callable[[], comox.SharedState], *, ttl_s: float, max_entry_bytes: int):
        self.state = state  # the gateway's, read at each use (a plugin may set it at startup)
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes

    @staticmethod
    def key(principal: comox.Principal, response_id: str) -> str:
        return f"responses:{principal.key_id or '-'}:{response_id}"

    async def save(self, principal: comox.Principal, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the input ``items`` it answered. Never raises: a
        store that fails is logged, and the client keeps its answer."""
        try:
            value = orjson.dumps({"v": VERSION, "response": response, "input": items})
            if len(value) > self.max_entry_bytes:
                log.warning("response %s not stored: %d bytes, over max_entry_bytes (%d)",
                            response["id"], len(value), self.max_entry_bytes)
                return
            await self.state().set(self.key(principal, response["id"]), value, ttl_s=self.ttl_s)
        except Exception:
            log.warning("could not store response %s", response.get("id"), exc_info=True)

    async def load(self, principal: comox.Principal, response_id: str) -> dict[str, Any] | None:
        """``{"response": ..., "input": [...]}``, or None when ``principal`` has
        no such response (never stored, expired, deleted, or another key's)."""
        value = await self.state().get(self.key(principal, response_id))
        if value is None:
            return None
        try:
            stored = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("stored response %s is not JSON; ignored", response_id)
            return None
        if not isinstance(stored, dict) or stored.get("v") != VERSION:
            return None
        return stored

    async def delete(self, principal: comox.Principal, response_id: str) -> None:
        await self.state().delete(self.key(principal, response_id))
