"""A stand-in for Anthropic's Messages API over real HTTP: ``POST /v1/messages``
(JSON, or SSE with ``message_start``, ``content_block_start/delta/stop``,
``ping``, ``message_delta``, ``message_stop``) and ``GET /v1/models``, with
bodies and events built from the official ``anthropic`` SDK's own types, so
their shapes are the real ones.

It checks what it receives as the real API does (the key in ``x-api-key``, or
as a bearer token as the SDK's 2.x releases send it; ``anthropic-version``; no
unknown fields; tool results answering the tool uses just before them, first
in their turn; no empty text; no trailing whitespace in a final assistant
turn; no whitespace-only stop sequence; temperature within 0-1), and more
strictly on one point (turns must alternate, starting with the user: the API
merges consecutive turns of one role, the translation must not rely on it). A
violation gets the API's 400 ``invalid_request_error``. ``requests`` records what
arrived; ``replies`` is a queue of :class:`Reply`: what to answer to each
request in turn (by default a text); ``sent`` the bytes of each answer to a
``POST /v1/messages``, as they went out.

``native=True`` makes it a local engine that speaks the Messages API itself
(llama.cpp's server, vLLM, Ollama), for pass-through tests: no key and no
``anthropic-version`` needed.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    SignatureDelta,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.model_info import ModelInfo
from anthropic.types.raw_message_delta_event import Delta
from anthropic.types.shared import (
    APIErrorObject,
    AuthenticationErrorObject,
    ErrorResponse,
    InvalidRequestErrorObject,
    NotFoundErrorObject,
    OverloadedErrorObject,
    PermissionErrorObject,
    RateLimitErrorObject,
)

from comox.testing import StandInUpstream

ERROR_OBJECTS: dict[int, tuple[Any, str]] = {
    400: (InvalidRequestErrorObject, "invalid_request_error"), 401: (AuthenticationErrorObject, "authentication_error"),
    403: (PermissionErrorObject, "permission_error"), 404: (NotFoundErrorObject, "not_found_error"),
    429: (RateLimitErrorObject, "rate_limit_error"), 500: (APIErrorObject, "api_error"),
    529: (OverloadedErrorObject, "overloaded_error"),
}
FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "metadata",
          "stream", "tools", "tool_choice", "cache_control", "thinking", "service_tier"}
MEDIA_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


def error_body(status: int, message: str) -> bytes:
    """The API's error body for ``status`` (413 comes from its proxy, which the SDK has no type for)."""
    if status == 413:
        return orjson.dumps({"type": "error", "error": {"type": "request_too_large", "message": message}})
    kind, name = ERROR_OBJECTS[status]
    error = kind(type=name, message=message)
    return ErrorResponse(type="error", error=error, request_id="req_standin").model_dump_json().encode()


def text(value: str) -> TextBlock:
    return TextBlock(type="text", text=value)


def tool_use(id: str, name: str, input: dict[str, Any]) -> ToolUseBlock:
    return ToolUseBlock(type="tool_use", id=id, name=name, input=input)


@dataclass
class Reply:
    """What the stand-in answers to one request."""

    content: list[TextBlock | ToolUseBlock | ThinkingBlock] = field(default_factory=lambda: [text("hello from claude")])
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=lambda: Usage(input_tokens=12, output_tokens=5))
    status: int | None = None
    """Answer this status with the API's error body instead."""
    headers: dict[str, str] = field(default_factory=dict)
    error_after_events: int | None = None
    """For a stream: an ``error`` event (``overloaded_error``) after this many events."""
    drop_after_events: int | None = None
    """For a stream: drop the connection after this many events."""
    gate: threading.Event | None = None
    """For a stream: before the error or the drop, wait until this is set
    (so a test can see the first events reach its client first)."""


class AnthropicStandIn(StandInUpstream):
    """Started and stopped as :class:`comox.testing.StandInUpstream`;
    ``requests`` holds each POST's ``headers`` and parsed ``body``,
    ``probe_headers`` the headers of each ``GET /v1/models``."""

    def __init__(self, *, api_key: str = "sk-ant-test", model: str = "claude-sonnet-4-5", native: bool = False):
        super().__init__("claude")
        self.api_key = api_key
        self.model = model
        self.native = native
        self.replies: deque[Reply] = deque()
        self.probe_headers: list[dict[str, str]] = []
        self.sent: list[bytearray] = []

    @property
    def last(self) -> dict[str, Any]:
        """The body of the last request."""
        return self.requests[-1]["body"]

    def _authorized(self, headers: dict[str, str]) -> bool:
        """The key as ``x-api-key`` (the documented header), or as a bearer
        token (which the official SDK sends since its 2.x releases)."""
        if self.native:
            return True
        return self.api_key in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))

    # -- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        more = True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            self.probes.append(scope["path"])
            self.probe_headers.append(headers)
            if not self._authorized(headers):
                return await self._json(send, 401, error_body(401, "invalid x-api-key"))
            page = {"data": [ModelInfo(id=self.model, type="model", display_name="Claude", created_at="2025-09-29T00:00:00Z",
                                       lifecycle="active").model_dump(mode="json")],
                    "has_more": False, "first_id": self.model, "last_id": self.model}
            return await self._json(send, 200, orjson.dumps(page))
        if scope["path"] != "/v1/messages" or scope["method"] != "POST":
            return await self._json(send, 404, error_body(404, f"no route {scope['path']}"))
        body = orjson.loads(raw)
        self.requests.append({"path": scope["path"], "headers": headers, "body": body, "raw": raw})
        sent = bytearray()
        self.sent.append(sent)
        send = _recording(send, sent)
        if not self._authorized(headers):
            return await self._json(send, 401, error_body(401, "invalid x-api-key"))
        problem = check_request(body, {"anthropic-version": "-", **headers} if self.native else headers)
        if problem:
            return await self._json(send, 400, error_body(400, problem))
        reply = self.replies.popleft() if self.replies else Reply()
        extra = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        if reply.status is not None:
            return await self._json(send, reply.status, error_body(reply.status, f"stand-in error {reply.status}"), extra)
        message = Message(id=f"msg_{len(self.requests):04d}", type="message", role="assistant", model=body["model"],
                          content=reply.content, stop_reason=reply.stop_reason, stop_sequence=reply.stop_sequence,
                          usage=reply.usage)
        if not body.get("stream"):
            return await self._json(send, 200, message.model_dump_json().encode(), extra)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), *extra]})
        fault_at = reply.error_after_events if reply.error_after_events is not None else reply.drop_after_events
        for i, (name, data) in enumerate(stream_events(message)):
            if i == fault_at and reply.gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, reply.gate.wait, 30)
            if reply.drop_after_events is not None and i >= reply.drop_after_events:
                raise ConnectionAbortedError("the stand-in drops the stream")
            if reply.error_after_events is not None and i >= reply.error_after_events:
                name, data = "error", error_body(529, "Overloaded")
            await send({"type": "http.response.body", "body": b"event: " + name.encode() + b"\ndata: " + data + b"\n\n",
                        "more_body": True})
            if name == "error":
                break
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _json(send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"request-id", b"req_standin"), *extra]})
        await send({"type": "http.response.body", "body": body})


def _recording(send: Any, into: bytearray) -> Any:
    async def recording(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            into.extend(message.get("body", b""))
        await send(message)

    return recording


def stream_events(message: Message) -> list[tuple[str, bytes]]:
    """``message`` as the API streams it: text in pieces, tool input as
    ``input_json_delta`` pieces (the first one empty, as the API sends), a
    ``ping`` after the first block, usage split between ``message_start``
    (input and cache tokens) and ``message_delta`` (output tokens)."""
    start = message.model_copy(update={"content": [], "stop_reason": None, "stop_sequence": None,
                                       "usage": message.usage.model_copy(update={"output_tokens": 1})})
    events: list[Any] = [RawMessageStartEvent(type="message_start", message=start)]
    for i, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            events.append(RawContentBlockStartEvent(type="content_block_start", index=i, content_block=text("")))
            pieces = re.findall(r"\S*\s*", block.text)
            events += [RawContentBlockDeltaEvent(type="content_block_delta", index=i, delta=TextDelta(type="text_delta", text=piece))
                       for piece in pieces if piece]
        elif isinstance(block, ThinkingBlock):  # (a native engine's reasoning: pass-through tests)
            events.append(RawContentBlockStartEvent(type="content_block_start", index=i,
                                                    content_block=ThinkingBlock(type="thinking", thinking="", signature="")))
            events += [RawContentBlockDeltaEvent(type="content_block_delta", index=i, delta=ThinkingDelta(type="thinking_delta", thinking=piece))
                       for piece in re.findall(r"\S*\s*", block.thinking) if piece]
            events.append(RawContentBlockDeltaEvent(type="content_block_delta", index=i,
                                                    delta=SignatureDelta(type="signature_delta", signature=block.signature)))
        else:
            assert isinstance(block, ToolUseBlock)
            events.append(RawContentBlockStartEvent(type="content_block_start", index=i,
                                                    content_block=tool_use(block.id, block.name, {})))
            arguments = orjson.dumps(block.input).decode()
            third = max(1, len(arguments) // 3)
            pieces = [""] + [arguments[j:j + third] for j in range(0, len(arguments), third)]
            events += [RawContentBlockDeltaEvent(type="content_block_delta", index=i,
                                                 delta=InputJSONDelta(type="input_json_delta", partial_json=piece))
                       for piece in pieces]
        events.append(RawContentBlockStopEvent(type="content_block_stop", index=i))
        if i == 0:
            events.append("ping")
    events.append(RawMessageDeltaEvent(type="message_delta", delta=Delta(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence),
                                       usage=MessageDeltaUsage(output_tokens=message.usage.output_tokens)))
    events.append(RawMessageStopEvent(type="message_stop"))
    return [("ping", b'{"type": "ping"}') if event == "ping" else (event.type, event.model_dump_json().encode()) for event in events]


def check_request(body: dict[str, Any], headers: dict[str, str]) -> str | None:
    """What the real API would refuse in this request, or None."""
    if "anthropic-version" not in headers:
        return "anthropic-version: header is required"
    extra = sorted(set(body) - FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str) or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "model and max_tokens are required"
    if not 0 <= body.get("temperature", 0) <= 1:
        return "temperature: range: 0..1"
    if any(not s.strip() for s in body.get("stop_sequences", [])):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    system = body.get("system", "")
    if not isinstance(system, str) and any(b.get("type") != "text" or not b.get("text") for b in system):
        return "system: text content blocks must be non-empty"
    tools = {tool["name"] for tool in body.get("tools", [])}
    for tool in body.get("tools", []):
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,128}", tool["name"]) or tool["input_schema"].get("type") != "object":
            return f"tools: invalid tool {tool['name']!r}"
    choice = body.get("tool_choice")
    if choice is not None and (choice["type"] not in ("auto", "any", "none", "tool") or
                               (choice["type"] == "tool" and choice["name"] not in tools)):
        return f"tool_choice: invalid {choice}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    pending: set[str] = set()
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role != ("user" if i % 2 == 0 else "assistant"):
            return f"messages.{i}.role: roles must alternate between 'user' and 'assistant', starting with 'user'"
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
        if set(results) != pending:
            return f"messages.{i}: tool_use ids {sorted(pending)} need tool_result blocks immediately after, got {results}"
        if blocks[:len(results)] != [b for b in blocks if b["type"] == "tool_result"]:
            return f"messages.{i}: tool_result blocks must come first"
        pending = set()
        for block in blocks:
            kind = block.get("type")
            allowed = ("text", "tool_use") if role == "assistant" else ("text", "image", "document", "tool_result")
            if kind not in allowed:
                return f"messages.{i}.content: unexpected block type {kind!r}"
            if kind == "text" and not block.get("text"):
                return f"messages.{i}.content: text content blocks must be non-empty"
            if kind == "image" and not (block["source"].get("type") == "url" or block["source"].get("media_type") in MEDIA_TYPES):
                return f"messages.{i}.content: invalid image source"
            if kind == "tool_use":
                if not isinstance(block.get("input"), dict) or block.get("name") not in tools:
                    return f"messages.{i}.content: invalid tool_use"
                pending.add(block["id"])
    last = messages[-1]
    if last["role"] == "assistant":
        final = last["content"] if isinstance(last["content"], str) else last["content"][-1].get("text", "x")
        if final != final.rstrip():
            return "final assistant content cannot end with trailing whitespace"
    return None
