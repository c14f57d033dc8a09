"""Anthropic's Messages API served by Comox (:class:`MessagesAPI`, a
:class:`comox.InboundAPI`), in front of the same model groups, keys, limits,
routing, cache and failover as the OpenAI endpoints. docs/anthropic_api.md
says what maps to what.

* ``POST /v1/messages`` — checked in the API's own terms
  (:mod:`.checks`), translated to a chat completion request
  (:func:`~.translate.anthropic_to_openai_request`) and the answer back: a
  Message, or its SSE events (``message_start``, ``content_block_start``,
  ``ping``, ``content_block_delta``, ``content_block_stop``,
  ``message_delta``, ``message_stop``). A backend with ``native_apis =
  ["messages"]`` gets the client's bytes instead, and its answer goes back
  untranslated (the core does that).
* ``POST /v1/messages/count_tokens`` — answered here, without a backend: an
  estimate (:func:`~.checks.estimate_input_tokens`).
* ``GET /v1/models`` and ``GET /v1/models/{id}`` from a client that sends
  ``anthropic-version`` (the Anthropic SDK always does): the model list in
  Anthropic's shape, paginated as the API does; other clients get the core's
  OpenAI list.
* Errors as ``{"type": "error", "error": {"type", "message"}}``, the type
  following the status; an error in the middle of a stream is an ``error``
  event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

import comox
from comox import BackendResponse, ComoxError, GatewayRequest, InvalidRequest, MethodNotAllowed, ModelNotFound

from .answers import error_json
from .checks import check_body, check_request, check_routing, estimate_input_tokens, parse_body
from .openapi import fragment
from .translate import (
    OpenAIStreamTranslator,
    SSEDecoder,
    anthropic_sse,
    anthropic_to_openai_request,
    openai_to_anthropic_error,
    openai_to_anthropic_response,
)

__all__ = ["MessagesAPI", "Pending"]

PATHS = {"/v1/messages": "messages", "/v1/messages/count_tokens": "messages/count_tokens"}
MODELS = "/v1/models"
JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream")
# Upstream headers a translated answer does not keep: it has a body of its own.
NOT_KEPT = frozenset({b"content-type", b"content-length", b"content-encoding", b"etag", b"transfer-encoding"})
PING = {"type": "ping"}
MAX_PAGE = 1000

Json = dict[str, Any]


class Pending(NamedTuple):
    """What translating a request's answer back needs, from its Messages body."""

    model: str
    """The model the client named (an alias stays an alias)."""
    stop_sequences: tuple[str, ...]
    input_tokens: int
    """The estimate, for ``message_start`` (the real count comes at the end)."""


class MessagesAPI:
    """``/v1/messages``, ``/v1/messages/count_tokens``, and the model list
    for Anthropic clients."""

    name = "anthropic"

    def __init__(self, *, auth_required: bool = True, native: dict[str, bool] | None = None):
        self.auth_required = auth_required
        self.native = native or {}
        """Model names whose backends all speak the Messages API (``Settings.native_models``)."""

    def openapi(self) -> Json:
        """Its paths in ``GET /openapi.json`` (:mod:`.openapi`)."""
        return fragment(auth_required=self.auth_required)

    # -- paths ---------------------------------------------------------------------

    def match(self, path: str, method: str) -> str | None:
        return PATHS.get(path)

    def match_request(self, request: GatewayRequest) -> str | None:
        """Also ``/v1/models`` and ``/v1/models/{id}``, from clients that send
        ``anthropic-version``."""
        path = request.path
        endpoint = PATHS.get(path)
        if endpoint is None and path.startswith(MODELS) and request.header(b"anthropic-version") is not None:
            if path == MODELS:
                return "models"
            if path.startswith(MODELS + "/") and len(path) > len(MODELS) + 1:
                return "models/{id}"
        return endpoint

    # -- answers without a backend -------------------------------------------------

    async def serve(self, endpoint: str, request: GatewayRequest) -> BackendResponse | None:
        method = request.method
        if endpoint.startswith("models"):
            if method != "GET":
                raise MethodNotAllowed(f"{method} is not allowed on {request.path}; use GET")
            if endpoint == "models":
                return _json(self.models_page(request))
            return _json(self.model(request, request.path[len(MODELS) + 1:]))
        if method != "POST":
            raise MethodNotAllowed(f"{method} is not allowed on {request.path}; use POST")
        if endpoint == "messages":
            return None
        body = check_request(request.inbound_raw or b"", count=True)
        self._group(request, body["model"])
        return _json({"input_tokens": estimate_input_tokens(body)})

    @staticmethod
    def _group(request: GatewayRequest, name: str) -> str:
        """The group ``name`` stands for, if the caller may use it; else 404."""
        gateway = request.gateway
        assert gateway is not None
        group = gateway.names.get(name)
        if group is None or not request.principal.may_use(group.name):
            raise ModelNotFound(f"model: {name}")
        return group.name

    @staticmethod
    def _names(request: GatewayRequest) -> list[str]:
        gateway = request.gateway
        assert gateway is not None
        principal = request.principal
        return [name for name, group in gateway.names.items() if principal.may_use(group.name)]

    def model(self, request: GatewayRequest, name: str) -> Json:
        self._group(request, name)
        gateway = request.gateway
        assert gateway is not None
        return _model_info(name, gateway.created)

    def models_page(self, request: GatewayRequest) -> Json:
        """One page of the models the caller may use, as the API pages them:
        ``limit`` (1–1000, default 20), after ``after_id`` or before
        ``before_id``."""
        query = {key: values[-1] for key, values in parse_qs(request.query.decode("latin-1")).items()}
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit: Input should be an integer from 1 to {MAX_PAGE}", param="limit")
        names = self._names(request)
        after, before = query.get("after_id"), query.get("before_id")
        if before is not None:
            end = names.index(before) if before in names else 0
            page, more = names[max(0, end - limit):end], end > limit
        else:
            start = names.index(after) + 1 if after in names else (len(names) if after is not None else 0)
            page, more = names[start:start + limit], start + limit < len(names)
        gateway = request.gateway
        assert gateway is not None
        return {"data": [_model_info(name, gateway.created) for name in page], "has_more": more,
                "first_id": page[0] if page else None, "last_id": page[-1] if page else None}

    # -- a Messages request --------------------------------------------------------

    def parse(self, endpoint: str, request: GatewayRequest, raw: bytes) -> tuple[str, comox.DeferredBody]:
        body = parse_body(raw)
        model = body.get("model")
        if type(model) is str and self.native.get(model):
            # Passed through: the backend judges what routing and limits do not read,
            # unless the request is translated after all (failover, a cache key).
            check_routing(body)
            translate = lambda: anthropic_to_openai_request(check_body(body))  # noqa: E731
        else:
            check_body(body)
            translate = lambda: anthropic_to_openai_request(body)  # noqa: E731
        return "chat/completions", comox.DeferredBody(body["model"], body.get("stream") is True, body, translate)

    async def translate_response(self, endpoint: str, request: GatewayRequest, response: BackendResponse) -> BackendResponse:
        body = request.inbound_json  # the client's Messages body (parse's DeferredBody)
        assert body is not None
        pending = Pending(body["model"], tuple(body.get("stop_sequences") or ()), estimate_input_tokens(body))
        headers = [(name, value) for name, value in response.headers if name not in NOT_KEPT]
        if response.status != 200:
            return await _error_answer(response, headers)
        if response.stream is None:
            assert response.body is not None
            try:
                completion = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                completion = None
            if request.stream and isinstance(completion, dict):  # a JSON answer (a cached one) to a stream request
                return BackendResponse(200, [SSE, *headers], stream=_events_of(completion, pending), close=response.aclose)
            message = _message_of(completion, pending)
            if message is None:
                await response.aclose()
                return _error(comox.UpstreamError("the backend answered something that is not a chat completion"))
            return BackendResponse(200, [JSON, *headers], body=orjson.dumps(message), close=response.aclose)
        return BackendResponse(200, [SSE, *headers], stream=translate_stream(response, pending), close=response.aclose)

    def render_error(self, exc: ComoxError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Anthropic's error body, its type following the status (503 is
        ``overloaded_error``, sent as 529 as the API does)."""
        status, body = openai_to_anthropic_error(exc.status, exc.body())
        return status, exc.headers(), orjson.dumps(body)

    def render_stream_error(self, request: GatewayRequest, exc: ComoxError) -> bytes:
        """The ``error`` event that ends a stream, translated or passed
        through, its type following the status as in :meth:`render_error`."""
        _, body = openai_to_anthropic_error(exc.status, exc.body())
        return _stream_error(body["error"]["message"], body["error"]["type"])


def _json(obj: Json) -> BackendResponse:
    return BackendResponse(200, [JSON], body=orjson.dumps(obj))


def _error(exc: ComoxError) -> BackendResponse:
    status, body = openai_to_anthropic_error(exc.status, exc.body())
    return BackendResponse(status, exc.headers(), body=orjson.dumps(body))


def _message_of(completion: Any, pending: Pending) -> Json | None:
    """The Message a chat completion answers, or None if it is not one."""
    if not isinstance(completion, dict):
        return None
    try:
        return openai_to_anthropic_response(completion, model=pending.model, stop_sequences=pending.stop_sequences)
    except (AttributeError, TypeError, KeyError, IndexError):  # a shape no chat completion has
        return None


def _model_info(name: str, created: int) -> Json:
    return {"type": "model", "id": name, "display_name": name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)), "lifecycle": "active"}


async def _error_answer(response: BackendResponse, headers: list[tuple[bytes, bytes]]) -> BackendResponse:
    """A backend's OpenAI error answer in Anthropic's format, its status and
    ``retry-after`` kept (503: 529 ``overloaded_error``)."""
    status, body = openai_to_anthropic_error(response.status, await error_json(response))
    return BackendResponse(status, [JSON, *headers], body=orjson.dumps(body))


def _stream_error(message: str, kind: str = "api_error") -> bytes:
    return anthropic_sse([{"type": "error", "error": {"type": kind, "message": message}}])


def _with_ping(events: list[Json], pinged: bool) -> tuple[list[Json], bool]:
    """``events`` with a ``ping`` after the first ``content_block_start``, where the API sends it."""
    if pinged:
        return events, True
    for i, event in enumerate(events):
        if event["type"] == "content_block_start":
            return [*events[:i + 1], PING, *events[i + 1:]], True
    return events, False


async def translate_stream(response: BackendResponse, pending: Pending) -> AsyncIterator[bytes]:
    """An OpenAI chunk stream (its first chunk in ``response.head``) as
    Anthropic's events, a batch per chunk read. The backend's own error event
    becomes an ``error`` event that ends the stream; a stream that breaks off,
    or ends before its ``[DONE]`` without a finish reason, raises, so the
    gateway counts the failure and ends the stream with the one ``error``
    event (:meth:`MessagesAPI.render_stream_error`)."""
    assert response.stream is not None
    translator = OpenAIStreamTranslator(model=pending.model, message_id="", input_tokens=pending.input_tokens,
                                        stop_sequences=pending.stop_sequences)
    decoder = SSEDecoder()
    pinged = done = False
    head = response.head

    async def reads() -> AsyncIterator[bytes]:
        if head:
            yield head
        async for piece in response.stream:  # type: ignore[union-attr]
            yield piece

    async for data in reads():
        events: list[Json] = []
        for _, text in decoder.feed(data):
            if text.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            if not translator.started:
                translator.id = str(chunk.get("id") or "msg_comox")
            events += translator.feed(chunk)
            if events and events[-1]["type"] == "error":
                yield anthropic_sse(events)
                return  # the backend's error ends the stream
        if events:
            events, pinged = _with_ping(events, pinged)
            yield anthropic_sse(events)
        if done:
            break
    if not done and not translator.finished:
        raise comox.UpstreamError("the backend's stream ended before its answer did", code="stream_interrupted")
    events, pinged = _with_ping(translator.finish(), pinged)
    yield anthropic_sse(events)


async def _events_of(completion: Json, pending: Pending) -> AsyncIterator[bytes]:
    """A chat completion as one stream chunk, translated to Anthropic's events."""
    choice = (completion.get("choices") or [{}])[0]
    message = dict(choice.get("message") or {})
    calls = message.get("tool_calls")
    if calls:
        message["tool_calls"] = [{**call, "index": i} for i, call in enumerate(calls)]
    chunk = {"id": completion.get("id"), "choices": [{"index": 0, "delta": message, "finish_reason": choice.get("finish_reason"),
                                                      **{k: choice[k] for k in ("stop_reason", "matched_stop") if k in choice}}],
             "usage": completion.get("usage")}
    translator = OpenAIStreamTranslator(model=pending.model, message_id=str(completion.get("id") or "msg_comox"),
                                        input_tokens=pending.input_tokens, stop_sequences=pending.stop_sequences)
    events, _ = _with_ping(translator.feed(chunk) + translator.finish(), False)
    yield anthropic_sse(events)
