"""What a span may say about an answer without its content (the model that
answered), and, only with ``capture_content = true``, the prompt and the
answer in the GenAI conventions' message shapes (``gen_ai.input.messages``,
``gen_ai.output.messages``: role, parts, finish reason), as JSON strings."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

__all__ = ["response_model", "input_messages", "output_messages", "Tap", "MAX_KEPT"]

MAX_KEPT = 1 << 20
"""Most bytes of a streamed answer kept for ``gen_ai.output.messages``."""

_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_EDGE = 2048  # bytes searched at each end of a JSON body (embeddings put "model" after the vectors)


def response_model(body: bytes | None, head: bytes | None) -> str | None:
    """The ``model`` an answer names: from the start or the end of a JSON
    body, or from a stream's first chunk; never parses the whole body."""
    found = None
    if head:
        found = _MODEL.search(head, 0, _EDGE * 2)
    elif body:
        found = _MODEL.search(body, 0, _EDGE) or _MODEL.search(body, max(len(body) - _EDGE, 0))
    if found is None:
        return None
    try:
        name = orjson.loads(b'"' + found.group(1) + b'"')
    except orjson.JSONDecodeError:
        return None
    return name if isinstance(name, str) else None


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif isinstance(part, dict) and isinstance(part.get("type"), str):
            parts.append({"type": part["type"]})  # an image or audio part: its kind, not its bytes
    return parts


def input_messages(endpoint: str, body: dict[str, Any]) -> str | None:
    """``gen_ai.input.messages`` of a chat or text completion request."""
    messages: list[dict[str, Any]] = []
    if endpoint == "chat/completions":
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            parts = _text_parts(message.get("content"))
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    parts.append({"type": "tool_call", "id": call.get("id"), "name": call["function"].get("name"),
                                  "arguments": call["function"].get("arguments")})
            if role == "tool":
                parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"),
                          "response": message.get("content")}]
            messages.append({"role": role, "parts": parts})
    elif endpoint == "completions":
        prompt = body.get("prompt")
        for text in prompt if isinstance(prompt, list) else [prompt]:
            if isinstance(text, str):
                messages.append({"role": "user", "parts": [{"type": "text", "content": text}]})
    else:
        return None
    return orjson.dumps(messages).decode()


def output_messages(body: bytes | None, streams: list[bytes]) -> str | None:
    """``gen_ai.output.messages``: one per choice, from a JSON answer, or from
    the SSE bytes of a streamed one (whole events only; one item of ``streams``
    per node that sent part of it)."""
    choices: dict[int, dict[str, Any]] = {}
    if body is not None:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        for choice in answer.get("choices") or () if isinstance(answer, dict) else ():
            if isinstance(choice, dict):
                message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
                text = message.get("content") if message else choice.get("text")
                _add(choices, choice, text)
    else:
        for payload in (payload for data in streams for payload in _payloads(data)):
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
                if isinstance(choice, dict):
                    delta = choice.get("delta")
                    _add(choices, choice, delta.get("content") if isinstance(delta, dict) else choice.get("text"))
    if not choices:
        return None
    out = [{"role": "assistant", "parts": [{"type": "text", "content": "".join(c["text"])}],
            "finish_reason": c["finish"] or "stop"} for _, c in sorted(choices.items())]
    return orjson.dumps(out).decode()


def _add(choices: dict[int, dict[str, Any]], choice: dict[str, Any], text: Any) -> None:
    index = choice.get("index", 0)
    kept = choices.setdefault(index if isinstance(index, int) else 0, {"text": [], "finish": None})
    if isinstance(text, str):
        kept["text"].append(text)
    if isinstance(choice.get("finish_reason"), str):
        kept["finish"] = choice["finish_reason"]


def _payloads(data: bytes) -> list[bytes]:
    """The ``data`` of each whole SSE event (a half event at the end, from a
    node that broke off, is left out); ``[DONE]`` and comments too."""
    out = []
    events = re.split(rb"\r\n\r\n|\n\n|\r\r", data)
    for event in events[:-1]:
        lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
        if lines and lines != [b"[DONE]"]:
            out.append(b"\n".join(lines))
    return out


class Tap:
    """Keeps the bytes of a stream as they pass (up to :data:`MAX_KEPT`)."""

    __slots__ = ("chunks", "room")

    def __init__(self, head: bytes | None):
        self.chunks: list[bytes] = [head] if head else []
        self.room = MAX_KEPT - len(head or b"")

    async def tee(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            if self.room > 0:
                self.chunks.append(chunk)
                self.room -= len(chunk)
            yield chunk
