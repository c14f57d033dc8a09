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

__all__ = ["Tokens", "UsageTap", "counts_of", "tapped", "tokens_of", "usage_of_body"]


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


def counts_of(obj: Any) -> dict[str, int]:
    """The token counts of a response object's (or event's) ``usage``, with
    ``prompt_tokens_details.cached_tokens`` as ``cached_tokens``."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        message = obj.get("message") if isinstance(obj, dict) else None  # Anthropic's message_start
        usage = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(usage, dict):
            return {}
    counts = {key: n for key, value in usage.items() if (n := _count(value)) is not None}
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is not None:
        counts["cached_tokens"] = cached
    return counts


def tokens_of(counts: dict[str, int]) -> Tokens | None:
    """:class:`Tokens` from OpenAI-shaped counts (``prompt_tokens`` including
    cached tokens and, from the ``anthropic`` backend type,
    ``cache_creation_input_tokens``), or Anthropic's own (a native answer:
    ``input_tokens`` beside ``cache_read_input_tokens`` and
    ``cache_creation_input_tokens``)."""
    written = counts.get("cache_creation_input_tokens", 0)
    if "prompt_tokens" in counts or "completion_tokens" in counts:
        return Tokens(counts.get("prompt_tokens"), counts.get("completion_tokens"), counts.get("cached_tokens", 0), written)
    if "input_tokens" in counts or "output_tokens" in counts:
        read = counts.get("cache_read_input_tokens", 0)
        prompt = counts["input_tokens"] + read + written if "input_tokens" in counts else None
        return Tokens(prompt, counts.get("output_tokens"), read, written)
    return None


def usage_of_body(body: bytes) -> Tokens | None:
    try:
        return tokens_of(counts_of(orjson.loads(body)))
    except orjson.JSONDecodeError:
        return None


class UsageTap:
    """Passes SSE bytes through whole events at a time (a partial event waits
    for its end), noting the token counts reported (Anthropic's come in two
    events: the later ones win); with ``drop``, leaves out OpenAI's
    usage-only chunks."""

    __slots__ = ("drop", "counts", "pending")

    def __init__(self, *, drop: bool):
        self.drop = drop
        self.counts: dict[str, int] = {}
        self.pending = b""

    @property
    def usage(self) -> Tokens | None:
        return tokens_of(self.counts)

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
                counts = counts_of(obj)
                if counts:
                    self.counts.update(counts)
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
