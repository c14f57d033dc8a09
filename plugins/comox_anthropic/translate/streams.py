"""The two stream translators (Anthropic events → OpenAI chunks, OpenAI chunks
→ Anthropic events) and server-sent event framing."""

from __future__ import annotations

import time
from typing import Any

import orjson

from .messages import (
    anthropic_to_openai_error,
    anthropic_usage,
    drop_prefix,
    finish_reason,
    openai_to_anthropic_error,
    openai_usage,
    reasoning_of,
    stop_of,
)

__all__ = ["AnthropicStreamTranslator", "OpenAIStreamTranslator", "SSEDecoder", "openai_sse", "anthropic_sse"]

Json = dict[str, Any]


class AnthropicStreamTranslator:
    """Anthropic stream events (parsed ``data`` objects) → OpenAI
    ``chat.completion.chunk`` objects. :meth:`feed` returns the chunks an event
    makes (often none). After ``message_stop``, ``finished`` is set and the
    last chunk carries ``finish_reason`` and ``usage`` (in a chunk of its own,
    with no choices, when ``include_usage``); the caller then sends
    ``data: [DONE]``. An ``error`` event becomes an OpenAI error object
    (``{"error": …}``) and sets ``error`` to ``(status, body)``: the stream
    ends there, with no ``[DONE]``."""

    def __init__(self, *, json_tool: str | None = None, prefill_space: str = "", include_usage: bool = False,
                 created: int | None = None):
        self.json_tool = json_tool
        self.space = prefill_space  # (see Translated)
        self.include_usage = include_usage
        self.created = created or int(time.time())
        self.id = ""
        self.model = ""
        self.usage: Json = {}
        self.stop_reason: str | None = None
        self.started = False
        self.finished = False
        self.error: tuple[int, Json] | None = None
        self.calls = 0
        self.blocks: dict[int, int | None] = {}  # tool_use block → tool call index (None: the json tool)
        self.arguments: set[int] = set()  # tool_use blocks that had input

    def _chunk(self, delta: Json, finish: str | None = None) -> Json:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _text(self, text: str) -> list[Json]:
        if self.space:
            text, self.space = drop_prefix(self.space, text)
        return [self._chunk({"content": text})] if text else []

    def _input(self, index: int, partial: str) -> list[Json]:
        self.arguments.add(index)
        call = self.blocks[index]
        if call is None:
            return [self._chunk({"content": partial})]
        return [self._chunk({"tool_calls": [{"index": call, "function": {"arguments": partial}}]})]

    def feed(self, event: Json) -> list[Json]:
        kind = event.get("type")
        index = event.get("index", 0)
        if kind == "message_start":
            message = event.get("message") or {}
            self.id, self.model, self.started = message.get("id", ""), message.get("model", ""), True
            self.usage.update({k: v for k, v in (message.get("usage") or {}).items() if isinstance(v, int)})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                return self._text(block["text"])
            if block.get("type") != "tool_use":
                return []
            if block.get("name") == self.json_tool:
                self.blocks[index] = None
                return []
            self.blocks[index] = self.calls
            self.calls += 1
            call = {"index": self.calls - 1, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return self._text(delta["text"])
            if delta.get("type") == "input_json_delta" and delta.get("partial_json") and index in self.blocks:
                return self._input(index, delta["partial_json"])
            return []
        if kind == "content_block_stop" and index in self.blocks and index not in self.arguments:
            return self._input(index, "{}")  # a call without arguments: "{}", as OpenAI sends
        if kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if isinstance(v, int)})
            return []
        if kind == "message_stop":
            self.finished = True
            last = self._chunk({}, finish_reason(self.stop_reason, self.calls > 0))
            usage = openai_usage(self.usage)
            if not self.include_usage:
                return [{**last, "usage": usage}]  # so the gateway can count it, whatever the client asked
            return [last, {**self._chunk({}), "choices": [], "usage": usage}]
        if kind == "error":
            self.error = anthropic_to_openai_error(None, event)
            return [self.error[1]]
        return []  # ping, and events this version does not know


class OpenAIStreamTranslator:
    """OpenAI ``chat.completion.chunk`` objects → Anthropic stream events:
    :meth:`feed` each chunk, then :meth:`finish` at ``[DONE]`` for
    ``message_delta`` (stop reason, usage) and ``message_stop``. An OpenAI
    error object becomes an ``error`` event (the stream ends there).

    Reasoning deltas (``reasoning_content`` / ``reasoning``) make a
    ``thinking`` block with ``thinking_delta`` events. ``message_delta``
    carries the whole usage (``input_tokens`` too, so a reader of the last
    events has it all); a server that reported none gets ``input_tokens``
    (the estimate given) and ``output_tokens`` counted, one per delta that
    carried text, reasoning or tool arguments."""

    def __init__(self, *, model: str, message_id: str, input_tokens: int = 0, stop_sequences: Any = ()):
        self.model = model
        self.id = message_id
        self.input_tokens = input_tokens
        self.stop_sequences = stop_sequences
        self.started = False
        self.finished = False  # a choice gave its finish_reason
        self.index = -1  # the open content block
        self.open: Any = None  # "text", "thinking", or the OpenAI index of the tool call whose block is open
        self.tools: dict[int, int] = {}
        self.stop_reason = "end_turn"
        self.stop_sequence: str | None = None
        self.usage: Json | None = None
        self.deltas = 0  # deltas that carried text, reasoning or arguments (output_tokens, when no usage came)

    def _start(self) -> list[Json]:
        if self.started:
            return []
        self.started = True
        usage = {"input_tokens": self.input_tokens, "output_tokens": 0}
        return [{"type": "message_start", "message": {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                                                      "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}}]

    def _open(self, what: Any, block: Json) -> list[Json]:
        events = self._close()
        self.index += 1
        self.open = what
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[Json]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def feed(self, chunk: Json) -> list[Json]:
        if chunk.get("error"):
            return [openai_to_anthropic_error(None, chunk)[1]]
        events = self._start()
        if chunk.get("usage"):
            self.usage = anthropic_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # a Message is one choice
            delta = choice.get("delta") or {}
            reasoning = reasoning_of(delta)
            if reasoning:
                if self.open != "thinking":
                    events += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "thinking_delta", "thinking": reasoning}})
                self.deltas += 1
            content = delta.get("content")
            if content and isinstance(content, str):
                if self.open != "text":
                    events += self._open("text", {"type": "text", "text": ""})
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "text_delta", "text": content}})
                self.deltas += 1
            for call in delta.get("tool_calls") or []:
                n, function = call.get("index", 0), call.get("function") or {}
                if n not in self.tools:
                    events += self._open(n, {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": {}})
                    self.tools[n] = self.index
                if function.get("arguments"):
                    events.append({"type": "content_block_delta", "index": self.tools[n],
                                   "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}})
                    self.deltas += 1
            if choice.get("finish_reason"):
                self.finished = True
                self.stop_reason, self.stop_sequence = stop_of(choice, self.stop_sequences)
        return events

    def finish(self) -> list[Json]:
        usage = self.usage or {"input_tokens": self.input_tokens, "output_tokens": self.deltas}
        delta = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                 "usage": usage}
        return self._start() + self._close() + [delta, {"type": "message_stop"}]


# -- server-sent events -------------------------------------------------------------


class SSEDecoder:
    """Bytes of a server-sent event stream → ``(event name or None, data)``
    pairs, one per complete event; :meth:`feed` keeps a partial event for the
    next call."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[str | None, str]]:
        self.buffer = (self.buffer + data).replace(b"\r\n", b"\n")  # a CR may end one read, its LF start the next
        *complete, self.buffer = self.buffer.split(b"\n\n")
        events = []
        for raw in complete:
            name, lines = None, []
            for line in raw.decode().split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    name = value
                elif field == "data":
                    lines.append(value)
            if lines:
                events.append((name, "\n".join(lines)))
        return events


def openai_sse(chunks: list[Json], done: bool = False) -> bytes:
    """OpenAI chunks as ``data:`` events, and ``data: [DONE]`` when ``done``."""
    out = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    return out + b"data: [DONE]\n\n" if done else out


def anthropic_sse(events: list[Json]) -> bytes:
    """Anthropic events, each as ``event: <type>`` and its ``data:``."""
    return b"".join(b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
                    for event in events)
