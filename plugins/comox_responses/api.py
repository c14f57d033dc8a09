"""The Responses API as a :class:`comox.InboundAPI`: its paths, the stored
responses it answers itself, and the translation of a create request and its
answer (JSON or the typed event stream)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

import comox
from comox import BackendResponse, ComoxError, GatewayRequest, InvalidRequest, MethodNotAllowed, NotFound, UpstreamError

from .openapi import responses_openapi
from .output import from_chat
from .store import Store
from .stream import Translation, translate_stream
from .translate import Pending, chat_messages, check_request, check_types, translate_request

__all__ = ["ResponsesAPI"]

log = logging.getLogger("comox.responses")

PATH = "/v1/responses"
ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]
# Upstream headers a translated answer does not keep: it has a body of its own.
NOT_KEPT = frozenset({b"content-type", b"content-length", b"content-encoding", b"etag"})
TRANSLATION = "responses.translation"  # request.state: a translated stream's Translation


class ResponsesAPI:
    """``/v1/responses`` and the stored responses under it."""

    name = "responses"

    def __init__(self, gateway: comox.Gateway, *, ttl_s: float, max_entry_bytes: int):
        self.store = Store(lambda: gateway.shared_state, ttl_s=ttl_s, max_entry_bytes=max_entry_bytes)
        self.native = gateway.settings.native_models("responses")
        self.secured = gateway.settings.auth != "none"

    def openapi(self) -> dict[str, Any]:
        """These paths in ``GET /openapi.json``."""
        return responses_openapi(secured=self.secured)

    # -- paths ---------------------------------------------------------------------

    def match(self, path: str, method: str) -> str | None:
        if path == PATH:
            return "responses"
        if not path.startswith(PATH + "/"):
            return None
        _, _, sub = path[len(PATH) + 1:].partition("/")
        if sub in ("", "cancel", "input_items"):
            return "responses/{id}" + (f"/{sub}" if sub else "")
        return None

    async def serve(self, endpoint: str, request: GatewayRequest) -> BackendResponse | None:
        method = request.method
        if endpoint == "responses":
            if method != "POST":
                raise MethodNotAllowed(f"{method} is not allowed on {PATH}; use POST")
            return None
        response_id = request.path[len(PATH) + 1:].partition("/")[0]
        allowed = {"responses/{id}": ("GET", "DELETE"), "responses/{id}/cancel": ("POST",),
                   "responses/{id}/input_items": ("GET",)}[endpoint]
        if method not in allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {request.path}; use {' or '.join(allowed)}")
        stored = await self.store.load(request.principal, response_id) if ID.match(response_id) else None
        if stored is None:
            raise NotFound(f"Response with id '{response_id}' not found.")
        if endpoint == "responses/{id}/input_items":
            return _json(input_items(stored["input"], _query(request)))
        if endpoint == "responses/{id}/cancel":
            raise InvalidRequest("Cannot cancel a synchronous response.")
        if method == "DELETE":
            await self.store.delete(request.principal, response_id)
            return _json({"id": response_id, "object": "response", "deleted": True})
        query = _query(request)
        if query.get("stream", "false") not in ("false", "0"):
            raise InvalidRequest("stream=true replays background responses; Comox runs none, so there is nothing to "
                                 "stream: retrieve it without stream", param="stream")
        return _json(stored["response"])

    # -- a create request ----------------------------------------------------------

    def parse(self, endpoint: str, request: GatewayRequest, raw: bytes) -> tuple[str, dict[str, Any] | comox.DeferredBody]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not check_request(body, self.native):
            request.state["responses"], chat = translate_request(body, False)
            return "chat/completions", chat

        state = request.state  # (not the request: the request keeps this function, and a cycle waits for the GC)

        def translate() -> dict[str, Any]:  # passed through natively, unless it fails over
            check_types(body)  # (a native request's were checked only as far as routing reads them)
            state["responses"], chat = translate_request(body, True)
            return chat

        return "chat/completions", comox.DeferredBody(body["model"], body.get("stream") is True, body, translate)

    async def admit(self, request: GatewayRequest) -> None:
        """Put the stored conversation of ``previous_response_id`` first."""
        pending = request.state.get("responses")
        if not isinstance(pending, Pending) or pending.native:
            return  # a native backend keeps its own conversations
        previous = pending.body.get("previous_response_id")
        if not previous:
            return
        stored = await self.store.load(request.principal, previous) if ID.match(previous) else None
        if stored is None:
            raise InvalidRequest(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                                 code="previous_response_not_found")
        pending.context = [*stored["input"], *stored["response"]["output"]]
        request.set_json({**request.json, "messages": chat_messages(pending)})

    def translate_response(self, endpoint: str, request: GatewayRequest,
                           response: BackendResponse) -> BackendResponse | Awaitable[BackendResponse]:
        pending = request.state.get("responses")
        if response.status != 200 or not isinstance(pending, Pending):
            return response  # an error: the Responses API's error body is chat's
        headers = [(name, value) for name, value in response.headers if name not in NOT_KEPT]
        principal = request.principal
        items = [*pending.context, *pending.items]

        async def save(answer: dict[str, Any]) -> None:
            await self.store.save(principal, answer, items)

        if response.stream is not None:
            # Kept for render_stream_error, should the stream break off.
            translation = request.state[TRANSLATION] = Translation(pending)
            stream = translate_stream(translation, response.head, response.stream, save if pending.store else None)
            return BackendResponse(200, SSE + headers, stream=stream, close=response.aclose)
        return self._answer(pending, response, headers, save)

    async def _answer(self, pending: Pending, response: BackendResponse, headers: list[tuple[bytes, bytes]],
                      save: Callable[[dict[str, Any]], Awaitable[None]]) -> BackendResponse:
        """A JSON answer, stored before the client is sent it: a follow-up
        the moment the client has it finds it, on any replica."""
        assert response.body is not None
        try:
            chat = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            chat = None
        if not isinstance(chat, dict):
            await response.aclose()
            raise UpstreamError("the backend's answer is not a chat completion")
        answer = from_chat(pending, chat)
        if pending.store:
            await save(answer)
        return BackendResponse(200, JSON + headers, body=orjson.dumps(answer), close=response.aclose)

    def render_error(self, exc: ComoxError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        # The Responses API answers errors as chat completions do.
        return exc.status, exc.headers(), exc.to_bytes()

    def render_stream_error(self, request: GatewayRequest, exc: ComoxError) -> bytes:
        """A translated stream ends with ``error`` and ``response.failed``,
        numbered on from its last event; a passed-through one (whose numbers
        Comox does not follow) with an ``error`` event without a number."""
        translation = request.state.get(TRANSLATION)
        if isinstance(translation, Translation):
            if translation.failed:  # (its response.failed already sent)
                return translation.event("error", code=exc.code, message=exc.message, param=exc.param)
            return b"".join(translation.fail({"code": exc.code, "message": exc.message, "param": exc.param}))
        error = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param}
        return b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"


def _json(obj: dict[str, Any]) -> BackendResponse:
    return BackendResponse(200, list(JSON), body=orjson.dumps(obj))


def _query(request: GatewayRequest) -> dict[str, str]:
    """The query parameters (the last of each name)."""
    try:
        parsed = parse_qs(request.query.decode("latin-1"), keep_blank_values=True)
    except ValueError:
        raise InvalidRequest("the query string is malformed") from None
    return {key: values[-1] for key, values in parsed.items()}


def input_items(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """A page of ``items`` as ``GET /v1/responses/{id}/input_items`` lists
    them: ``order`` (``desc`` by default), ``limit`` (1 to 100, 20 by
    default), ``after`` / ``before`` an item id."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': expected 'asc' or 'desc'.", param="order", code="invalid_value")
    limit_text = query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise InvalidRequest("Invalid value for 'limit': expected an integer from 1 to 100.", param="limit", code="invalid_value")
    ordered = items if order == "asc" else items[::-1]
    ids = [item.get("id") for item in ordered]
    start, end = 0, len(ordered)
    for key in ("after", "before"):
        if key in query:
            if query[key] not in ids:
                raise InvalidRequest(f"Invalid value for '{key}': no input item has the id '{query[key]}'.",
                                     param=key, code="invalid_value")
            at = ids.index(query[key])
            start, end = (at + 1, end) if key == "after" else (start, at)
    page = ordered[start:end][:int(limit_text)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < end}
