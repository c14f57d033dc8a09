"""Token usage of a cloud answer: from a JSON body, or read from a stream's
SSE events as they pass to the client.

A stream sent to the cloud asks for usage (``stream_options.include_usage``);
when the client did not ask for it itself, the usage-only chunk (``"choices":
[]``) is taken out of what the client receives, so it sees the stream it
asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson

from comox import Usage

__all__ = ["Tokens", "UsageTap", "tapped", "usage_of", "usage_of_body"]


class Tokens(NamedTuple):
    """What an answer reports about its tokens: ``prompt`` includes those read
    from the provider's cache (``cached``) and written to it (``written``)."""

    prompt: int | None
    completion: int | None
    cached: int = 0
    written: int = 0

    def usage(self) -> Usage:
        return Usage(prompt=self.prompt, completion=self.completion, cached=self.cached)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_of(obj: Any) -> Tokens | None:
    """The usage an OpenAI-format response object (or chunk) reports:
    ``prompt_tokens`` including ``prompt_tokens_details.cached_tokens`` and,
    from the ``anthropic`` backend type, ``cache_creation_input_tokens``."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Tokens(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), cached or 0,
                  _count(usage.get("cache_creation_input_tokens")) or 0)


def usage_of_body(body: bytes) -> Tokens | None:
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


class UsageTap:
    """Passes SSE bytes through whole events at a time (a partial event waits
    for its end), noting the last usage reported; with ``drop``, leaves out
    usage-only chunks."""

    __slots__ = ("drop", "usage", "pending")

    def __init__(self, *, drop: bool):
        self.drop = drop
        self.usage: Tokens | None = None
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        self.pending = data[end:]
        ready = data[:end]
        return self._read(ready) if b'"usage"' in ready else ready

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return self._read(rest) if b'"usage"' in rest else rest

    def _read(self, events: bytes) -> bytes:
        kept = []
        dropped = False
        for line in events.split(b"\n"):
            if dropped and not line.strip():
                dropped = False  # the blank line that ended the dropped event
                continue
            dropped = False
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    obj = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    obj = None
                usage = usage_of(obj)
                if usage is not None:
                    self.usage = usage
                    if self.drop and isinstance(obj, dict) and obj.get("choices") == []:
                        dropped = True
                        continue
            kept.append(line)
        return b"\n".join(kept)


async def tapped(stream: AsyncIterator[bytes], tap: UsageTap) -> AsyncIterator[bytes]:
    async for chunk in stream:
        out = tap.feed(chunk)
        if out:
            yield out
    rest = tap.flush()
    if rest:
        yield rest
