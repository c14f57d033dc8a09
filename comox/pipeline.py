"""The request path, top to bottom: one API request through every stage.

::

    start        comox_request_start (telemetry: a timer, a trace span)
    route        endpoint and method from the path
    authenticate comox_authenticate → Principal, from the headers (401 when the
                 config requires keys and no plugin vouched for the caller)
    parse        body read (size limit) and checked; a model the caller may not use is 404
    admit        comox_admit (rate limits, budgets, policy)
    cache        comox_cache_lookup → a cached answer, or on to a backend
    route        Gateway.dispatch: a backend of the group by its policy, retries
                 before the first byte, comox_failover when local capacity is exhausted;
                 comox_attempt_start / comox_attempt_done around each try
    respond      the answer sent through unbuffered (asgi_io.Responder)
    measure      usage and timings recorded on the backend, after the client has its answer
    store        comox_cache_store
    done         comox_request_done, for every request, refused or answered

The raw ASGI I/O is in :mod:`comox.asgi_io`; routing and retries in
:mod:`comox.gateway`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import orjson

from .disconnects import watch_current
from .asgi_io import SSE_HEADERS, Receive, Responder, Send, read_body
from .backends import BackendResponse
from .errors import AuthenticationFailed, ComoxError, MethodNotAllowed, ModelNotFound, NotFound
from .fleet import BackendState, ModelGroup
from .gateway import Gateway
from .request import (ANONYMOUS, ENDPOINTS, DeferredBody, GatewayRequest, Principal, first_header, parse_body,
                      request_id_from)
from .resume import resumable
from .plugins import PENDING
from .usage import record_body, record_stream

__all__ = ["serve_api"]

log = logging.getLogger("comox")

JSON = [(b"content-type", b"application/json")]
ROUTE_LOCAL = (b"x-comox-route", b"local")
ROUTE_FAILOVER = (b"x-comox-route", b"failover")


class KeptStream:
    """The bytes of a backend's stream (its first chunk, read by the core, and
    the rest as they are forwarded), kept for ``comox_cache_store`` when a
    plugin asked (``request.keep_stream``): in the backend's OpenAI shape,
    also when the client is sent a translation. Only such streams pay for the
    extra step per chunk."""

    __slots__ = ("chunks", "room")

    def __init__(self, response: BackendResponse, limit: int):
        self.chunks: list[bytes] | None = [response.head] if response.head else []
        self.room = limit - len(response.head or b"")
        assert response.stream is not None
        response.stream = self._tee(response.stream)

    async def _tee(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            if self.chunks is not None:
                self.room -= len(chunk)
                if self.room < 0:
                    self.chunks = None  # too long to keep: forwarded all the same
                else:
                    self.chunks.append(chunk)
            yield chunk

    def body(self) -> bytes | None:
        return b"".join(self.chunks) if self.chunks is not None and self.room >= 0 else None


async def serve_api(gateway: Gateway, scope: MutableMapping[str, Any], receive: Receive, send: Send, path: str) -> None:
    """Serve one request to an API path (``/v1/...``)."""
    headers = scope["headers"]
    request = GatewayRequest(id=request_id_from(first_header(headers, b"x-request-id")), endpoint=ENDPOINTS.get(path, ""), path=path,
                             headers=headers, method=scope["method"], gateway=gateway, query=scope.get("query_string", b""))
    rid = request.id.encode()
    if not gateway.started:
        await gateway.startup()
    if gateway.hooks.comox_request_start and (pending := gateway.hooks.request_start(request=request)) is not None:
        await pending
    responder = Responder(send, request)  # times the response, adds x-comox-overhead-ms
    state: BackendState | None = None
    error: Exception | None = None
    try:
        state, error = await _serve(gateway, request, receive, responder, rid)
    except ComoxError as exc:
        error = exc
        await responder.error(exc, rid, request.response_headers, request.api.render_error if request.api else None)
    except ClientGone:
        pass  # left before its answer started: nothing to send, the upstream call is cancelled
    except asyncio.CancelledError:
        raise  # the client went away
    except Exception as exc:
        error = exc
        log.exception("unexpected error serving %s", path)
        await responder.error(ComoxError("internal error in the gateway"), rid)
        raise
    finally:
        Gateway.release(state)
        hooks = gateway.hooks
        if hooks.comox_request_done:
            status = responder.status or 499  # nothing sent: the client went away
            pending = hooks.request_done(request=request, status=status, backend=state.name if state is not None else None,
                                         error=error)
            if pending is not None:
                await pending


async def _serve(gateway: Gateway, request: GatewayRequest, receive: Receive, responder: Responder,
                 rid: bytes) -> tuple[BackendState | None, Exception | None]:
    """The stages; returns the backend that answered (to release) and the
    error a stream ended with, if any."""
    path = request.path
    endpoint = request.endpoint
    inbound = gateway.inbound.match(request) if not endpoint and gateway.inbound.apis else None
    if inbound is not None:
        request.api, request.api_endpoint = inbound
        return await _serve_inbound(gateway, request, receive, responder, rid)
    models = not endpoint and (path == "/v1/models" or path.startswith("/v1/models/"))
    if models:
        request.endpoint = "models"
        if request.method != "GET":
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}")
    elif not endpoint:
        raise NotFound(f"unknown endpoint {path}")
    elif request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use POST")
    principal = await _authenticate(gateway, request)
    if models:
        await responder.json(200, models_body(gateway, path, principal), JSON + [(b"x-request-id", rid)])
        return None, None
    raw = await read_body(receive, request.headers, gateway.max_body_bytes)
    request.set_body(raw, parse_body(endpoint, raw))
    return await _route_and_answer(gateway, request, receive, responder, rid)


async def _authenticate(gateway: Gateway, request: GatewayRequest) -> Principal:
    """Who is calling, from the headers alone: before the body is read, so an
    unknown caller learns nothing from how its body would have been judged."""
    hooks = gateway.hooks
    principal = hooks.authenticate(request=request) if hooks.comox_authenticate else None
    if type(principal) is PENDING:
        principal = await principal
    if principal is None and gateway.auth_required:
        raise AuthenticationFailed("a valid API key is required (Authorization: Bearer <key>)")
    request.principal = principal = principal or ANONYMOUS
    return principal


async def _serve_inbound(gateway: Gateway, request: GatewayRequest, receive: Receive, responder: Responder,
                         rid: bytes) -> tuple[BackendState | None, Exception | None]:
    """A request to an inbound API: its own answer without a backend, or
    translated to the internal request and answered through the same stages."""
    api, endpoint = request.api, request.api_endpoint
    assert api is not None
    await _authenticate(gateway, request)
    # Read before serve(): an answer without a backend may need it (count_tokens).
    raw = request.inbound_raw = await read_body(receive, request.headers, gateway.max_body_bytes)
    answer = await api.serve(endpoint, request)
    if answer is not None:
        assert answer.body is not None
        await responder.json(answer.status, answer.body, answer.headers + [(b"x-request-id", rid)] + request.response_headers)
        return None, None
    internal_endpoint, body = api.parse(endpoint, request, raw)
    request.endpoint = internal_endpoint
    if isinstance(body, DeferredBody):
        request.defer_body(body)  # translated if a stage needs it: not when passed through
    else:
        request.set_body(orjson.dumps(body), body)
    return await _route_and_answer(gateway, request, receive, responder, rid)


class ClientGone(Exception):
    """The client left while its request waited for a backend."""


async def _dispatch_watched(gateway: Gateway, request: GatewayRequest, group: ModelGroup,
                            receive: Receive) -> tuple[BackendResponse, BackendState | None]:
    """:meth:`Gateway.dispatch`, watching for the client leaving meanwhile (a
    long generation, the first-byte wait, the queue): the wait is cancelled,
    so the upstream call is closed and its slot freed at once."""
    watched = watch_current(receive)
    try:
        return await gateway.dispatch(request, group)
    except asyncio.CancelledError:
        if watched.disconnected:
            watched.task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        watched.close()


async def _route_and_answer(gateway: Gateway, request: GatewayRequest, receive: Receive, responder: Responder,
                            rid: bytes) -> tuple[BackendState | None, Exception | None]:
    hooks = gateway.hooks
    principal = request.principal
    group = gateway.names.get(request.model)
    if group is None or not principal.may_use(group.name):
        raise ModelNotFound(f"the model {request.model!r} does not exist; GET /v1/models lists them", param="model")
    request.model_group = group.name
    # Data that must stay home: the key's rule, the group's, or the request's
    # own (a request can add the restriction, never lift it).
    request.local_only = principal.local_only or group.sovereign or request.header(b"x-comox-local-only") == b"true"
    if hooks.comox_admit and (pending := hooks.admit(request=request, principal=principal)) is not None:
        await pending
    response: BackendResponse | None = None
    if hooks.comox_cache_lookup:
        response = hooks.cache_lookup(request=request)
        if type(response) is PENDING:
            response = await response
    cached = response is not None
    state: BackendState | None = None
    if response is None:
        response, state = await _dispatch_watched(gateway, request, group, receive)
    request.route = "cache" if cached else "local" if state is not None else "failover"
    # A stream another node may continue if its node dies (resume_streams).
    splice = resumable(gateway, request, group, state, response) if group.resume_streams else None
    if splice is not None:
        response = splice.response
    internal = response
    kept = None
    if request.keep_stream and response.stream is not None and response.status == 200 and not cached and not response.native:
        kept = KeptStream(response, request.keep_stream)
    if request.api is not None and not response.native:
        translated = request.api.translate_response(request.api_endpoint, request, response)
        # A coroutine when the API does I/O before its answer may go (storing it).
        response = await translated if inspect.isawaitable(translated) else translated
    out_headers = response.headers + [(b"x-request-id", rid), ROUTE_FAILOVER if state is None and not cached else ROUTE_LOCAL]
    if request.response_headers:
        out_headers += request.response_headers
    if state is not None and gateway.expose_backend_header:
        out_headers.append((b"x-comox-backend", state.name.encode()))
    status = response.status
    if response.stream is not None:
        sent = await responder.stream(receive, response, out_headers + SSE_HEADERS)
        if splice is not None:
            sent = splice.settle(sent)
        if state is not None and sent.broke is not None:
            state.record_failure(sent.broke)
        elif sent.complete and sent.first and status == 200:
            record_stream(request, state, sent.first, sent.last, sent.counted, sent.end)
            body = kept.body() if kept is not None else None
            if body is not None and hooks.comox_cache_store and (pending := hooks.cache_store(
                    request=request, response=BackendResponse(200, internal.headers, body=body))) is not None:
                await pending
        return state, sent.error
    assert response.body is not None
    try:
        await responder.json(status, response.body, out_headers)
    finally:
        await response.aclose()
    if status == 200:
        # Usage and the cache from the internal (OpenAI-shaped) answer, also
        # when the client was sent a translation of it.
        assert internal.body is not None
        record_body(request, state, internal.body, internal.parsed)
        if hooks.comox_cache_store and not cached and not internal.native \
                and (pending := hooks.cache_store(request=request, response=internal)) is not None:
            await pending
    return state, None


def models_body(gateway: Gateway, path: str, principal: Principal) -> bytes:
    """``GET /v1/models`` (only the models ``principal`` may use) or
    ``GET /v1/models/{id}``."""
    if path == "/v1/models":
        if principal.allowed_models is None:
            return gateway.models_body
        return gateway.models_list(principal)
    name = path[len("/v1/models/"):]
    group = gateway.names.get(name)
    if group is None or not principal.may_use(group.name):
        raise ModelNotFound(f"the model {name!r} does not exist", param="model")
    return orjson.dumps({"id": name, "object": "model", "created": gateway.created, "owned_by": "comox"})
