"""A chat completion stream as the Responses API's typed SSE events.

Each event is ``event: <type>`` and ``data: {"type", "sequence_number", …}``,
numbered from 0, in OpenAI's order: ``response.created``,
``response.in_progress``; per output item ``response.output_item.added``, its
``response.content_part.added``, deltas (``response.output_text.delta``,
``response.reasoning_text.delta``, ``response.function_call_arguments.delta``),
their ``.done`` events and ``response.output_item.done``; and last
``response.completed`` (``response.incomplete`` when the answer was cut short)
with the whole response. An item is done when the next one starts. A stream
the backend ends with an error event ends with ``error`` and
``response.failed``, and so does one that breaks off (the gateway asks for
them: ``ResponsesAPI.render_stream_error``), their sequence numbers going on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from .output import call_item, obj, message_item, reasoning_item, reasoning_of, response_object, status_of, usage_of
from .translate import Pending, new_id

__all__ = ["Translation", "translate_stream", "sse_data"]

log = logging.getLogger("comox.responses")


def sse_data(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The ``data`` of each complete SSE event in ``buffer``, and the rest."""
    buffer = buffer.replace(b"\r\n", b"\n")
    *events, rest = buffer.split(b"\n\n")
    datas = []
    for event in events:
        lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if lines:
            datas.append(b"\n".join(lines))
    return datas, rest


class _Item:
    __slots__ = ("kind", "index", "id", "pieces", "call_id", "name")

    def __init__(self, kind: str, index: int, item_id: str, call_id: str = "", name: str = ""):
        self.kind = kind
        self.index = index
        self.id = item_id
        self.pieces: list[str] = []
        self.call_id = call_id
        self.name = name


class Translation:
    """The events for one stream; :meth:`data` takes each chat chunk."""

    def __init__(self, pending: Pending):
        self.pending = pending
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}  # chat tool call index → its item
        self.usage: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.failed = False

    def event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def start(self) -> list[bytes]:
        response = response_object(self.pending, status="in_progress", output=[])
        return [self.event("response.created", response=response), self.event("response.in_progress", response=response)]

    def data(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if isinstance(chunk.get("error"), dict) and not chunk.get("choices"):
            return self.fail(chunk["error"])
        if isinstance(chunk.get("usage"), dict):
            self.usage = usage_of(chunk)
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is None:
            return out
        delta = obj(choice.get("delta"))
        reasoning = reasoning_of(delta)
        if reasoning:
            out += self._piece("reasoning", reasoning)
        for key in ("content", "refusal"):  # a streamed refusal (a cloud model's) comes as text
            text = delta.get(key)
            if isinstance(text, str) and text:
                out += self._piece("message", text)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                out += self._call(call)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        return out

    def _open(self, item: _Item, added: dict[str, Any], part: dict[str, Any] | None) -> list[bytes]:
        out = self._close()
        self.open = item
        self.output.append(added)
        out.append(self.event("response.output_item.added", output_index=item.index, item=added))
        if part is not None:
            out.append(self.event("response.content_part.added", item_id=item.id, output_index=item.index,
                                  content_index=0, part=part))
        return out

    def _ensure(self, kind: str) -> tuple[_Item, list[bytes]]:
        """The open item of ``kind``, opened (and the one before closed) if need be."""
        item = self.open
        if item is not None and item.kind == kind:
            return item, []
        index = len(self.output)
        if kind == "message":
            item = _Item(kind, index, new_id("msg"))
            added = {**message_item(item.id, "", "in_progress"), "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = _Item(kind, index, new_id("rs"))
            added = {**reasoning_item(item.id, ""), "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        return item, self._open(item, added, part)

    def _piece(self, kind: str, text: str) -> list[bytes]:
        item, out = self._ensure(kind)
        item.pieces.append(text)
        delta_type = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        out.append(self.event(delta_type, item_id=item.id, output_index=item.index, content_index=0, delta=text, **extra))
        return out

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        function = obj(call.get("function"))
        arguments = function.get("arguments")
        item = self.calls.get(index)
        if item is None:
            item = _Item("function_call", len(self.output), new_id("fc"), str(call.get("id") or new_id("call")),
                         str(function.get("name") or ""))
            self.calls[index] = item
            out += self._open(item, call_item(item.id, item.call_id, item.name, "", "in_progress"), None)
        if isinstance(arguments, str) and arguments:
            item.pieces.append(arguments)
            if item is self.open:
                out.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=item.index, delta=arguments))
            else:  # an engine that went back to an earlier call: the final response has it all
                self.output[item.index]["arguments"] = "".join(item.pieces)
        return out

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        text = "".join(item.pieces)
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            done = call_item(item.id, item.call_id, item.name, text, "completed")
            out = [self.event("response.function_call_arguments.done", **at, arguments=text)]
        elif item.kind == "message":
            done = message_item(item.id, text, status)
            out = [self.event("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
                   self.event("response.content_part.done", **at, content_index=0, part=done["content"][0])]
        else:
            done = reasoning_item(item.id, text)
            out = [self.event("response.reasoning_text.done", **at, content_index=0, text=text),
                   self.event("response.content_part.done", **at, content_index=0, part=done["content"][0])]
        self.output[item.index] = done
        out.append(self.event("response.output_item.done", output_index=item.index, item=done))
        return out

    def finish(self) -> tuple[dict[str, Any], list[bytes]]:
        """The whole response, and the events that end the stream."""
        status, incomplete = status_of(self.finish_reason)
        item_status = "incomplete" if status == "incomplete" else "completed"
        out: list[bytes] = []
        if not self.output:  # an empty answer is still a message
            out += self._ensure("message")[1]
        out += self._close(item_status)
        response = response_object(self.pending, status=status, output=self.output, usage=self.usage, incomplete=incomplete)
        out.append(self.event("response.completed" if status == "completed" else "response.incomplete", response=response))
        return response, out

    def fail(self, error: dict[str, Any] | None = None) -> list[bytes]:
        self.failed = True
        message = str((error or {}).get("message") or "the backend failed in the middle of the response")
        out = []
        if error is not None:
            code = error.get("code")
            out.append(self.event("error", code=str(code) if code is not None else None, message=message,
                                  param=error.get("param") if isinstance(error.get("param"), str) else None))
        response = response_object(self.pending, status="failed", output=self.output, usage=self.usage,
                                   error={"code": "server_error", "message": message})
        out.append(self.event("response.failed", response=response))
        return out


async def translate_stream(translation: Translation, head: bytes | None, stream: AsyncIterator[bytes],
                           save: Callable[[dict[str, Any]], Awaitable[None]] | None) -> AsyncIterator[bytes]:
    """The Responses API's events for a chat completion stream (``head``: its
    first chunk, already read by the core), made by ``translation``. The
    finished response is passed to ``save`` before its last event is sent, so
    a client that has it can continue it at once, on any replica. A stream
    that breaks off raises, sending nothing more: the gateway ends it with
    ``translation.fail(…)`` (:meth:`ResponsesAPI.render_stream_error`)."""
    pending = translation.pending
    buffer = b""
    first = True
    async for chunk in _chunks(head, stream):
        out = translation.start() if first else []
        first = False
        datas, buffer = sse_data(buffer + chunk)
        ended = False
        for data in datas:
            if data == b"[DONE]":
                ended = True
                break
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                log.debug("not JSON in the stream answering %s: %r", pending.id, data[:200])
                continue
            if isinstance(parsed, dict):
                out += translation.data(parsed)
            if translation.failed:
                break
        if out:
            yield b"".join(out)
        if ended or translation.failed:
            break
    if translation.failed:
        return
    out = translation.start() if first else []  # an empty stream: still a whole response
    response, end = translation.finish()
    out += end
    if save is not None:
        await save(response)
    yield b"".join(out)


async def _chunks(head: bytes | None, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in stream:
        yield chunk
