"""The OpenAI-compatible routes, as one pure-ASGI handler shared by the app and
the middleware. Per request: read and check the body, run the hook chain,
route, and send the backend's answer through without re-serialising it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import orjson

from .backends import BackendResponse
from .disconnects import watch_for
from .errors import (
    BodyTooLarge,
    ComoxError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    UpstreamError,
)
from .gateway import Gateway
from .plugins import HookChain
from .request import ANONYMOUS, ENDPOINTS, GatewayRequest, parse_body, request_id_from
from .usage import record_body, record_stream

__all__ = ["serve_api", "route_path"]

log = logging.getLogger("comox")

SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class SentStream(NamedTuple):
    """What :func:`send_stream` sent: ``complete`` when the stream ran to its
    end; ``error`` sent to the client when the upstream broke off (``broke``
    says how); times (``time.perf_counter()``) of the first and last chunk,
    ``data:`` lines, and the last two chunks."""

    complete: bool
    error: Exception | None
    first: float
    last: float
    events: int
    end: bytes
    broke: str | None = None


class MethodNotAllowed(ComoxError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


def route_path(scope: dict) -> str:
    """The path relative to where the app is mounted (``scope["path"]`` minus
    ``root_path``), as Starlette routes it."""
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


async def read_body(receive, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequest("content-length is not a number", code="invalid_header") from None
            if declared > limit:
                raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            break
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": headers + [(b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def send_error(send, exc: ComoxError, request_id: bytes) -> None:
    await send_json(send, exc.status, exc.to_bytes(), exc.headers() + [(b"x-request-id", request_id)])


async def send_stream(send, receive, response: BackendResponse, headers: list[tuple[bytes, bytes]]) -> SentStream:
    """Forward ``response.stream`` chunk by chunk. A client that goes away
    cancels the upstream read (noticed once the stream has lasted
    ``WATCH_AFTER_S``, :mod:`comox.disconnects`); an upstream that fails midway ends the stream with an
    error event, never a clean ``[DONE]``. Returns what was sent, for the
    fleet's measurements (in the loop itself: a wrapping generator per stream
    would cost more than the measuring)."""
    task = asyncio.current_task()
    watched = watch_for(asyncio.get_running_loop()).add(task, receive)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    first = last = 0.0
    events = 0
    prev = b""
    tail = b"\n\n"
    clock = time.perf_counter
    try:
        async for chunk in response.stream:
            if chunk:
                last = clock()
                if not first:
                    first = last
                events += chunk.count(b"data:")
                prev, tail = tail, chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        watched.finished = True
        await send({"type": "http.response.body", "body": b""})
        return SentStream(True, None, first, last, events, prev + tail)
    except asyncio.CancelledError:
        if watched.disconnected:
            task.uncancel()
            return SentStream(False, None, first, last, events, b"")
        raise
    except Exception as exc:
        watched.finished = True
        log.warning("stream from backend failed after the first byte: %r", exc)
        error = UpstreamError("the backend failed in the middle of the response", code="stream_interrupted")
        event = b"data: " + error.to_bytes() + b"\n\n"
        if not tail.endswith(b"\n\n"):
            event = b"\n\n" + event  # close the partial event first
        await send({"type": "http.response.body", "body": event})
        return SentStream(False, error, first, last, events, b"", f"stream broke off: {type(exc).__name__}")
    finally:
        watched.close()
        await response.aclose()


async def serve_api(gateway: Gateway, scope: dict, receive, send, path: str) -> None:
    """Serve one request to an API path (``/v1/...``)."""
    headers = scope["headers"]
    client_request_id = None
    for name, value in headers:
        if name == b"x-request-id":
            client_request_id = value
            break
    request_id = request_id_from(client_request_id)
    rid = request_id.encode()
    if not gateway.started:
        await gateway.startup()
    hooks = gateway.hooks
    request: GatewayRequest | None = None
    state = None
    status = 500
    error: Exception | None = None
    backend_name = None
    try:
        endpoint = ENDPOINTS.get(path)
        method = scope["method"]
        if endpoint is None:
            if path == "/v1/models" or path.startswith("/v1/models/"):
                if method != "GET":
                    raise MethodNotAllowed(f"{method} is not allowed on {path}")
                status = 200
                await send_json(send, 200, models_body(gateway, path), [(b"content-type", b"application/json"), (b"x-request-id", rid)])
                return
            raise NotFound(f"unknown endpoint {path}")
        if method != "POST":
            raise MethodNotAllowed(f"{method} is not allowed on {path}; use POST")
        raw = await read_body(receive, headers, gateway.settings.server.max_body_bytes)
        body = parse_body(endpoint, raw)
        request = GatewayRequest(id=request_id, endpoint=endpoint, path=path, headers=headers, raw=raw, json=body)
        group = gateway.groups.get(request.model)
        if group is None:
            raise ModelNotFound(f"the model {request.model!r} does not exist; GET /v1/models lists them", param="model")
        if hooks.comox_authenticate:
            request.principal = await HookChain.first(hooks.comox_authenticate, request) or ANONYMOUS
        if hooks.comox_admit:
            await HookChain.each(hooks.comox_admit, request, request.principal)
        response = None
        if hooks.comox_cache_lookup:
            response = await HookChain.first(hooks.comox_cache_lookup, request)
        if response is None:
            response, state = await gateway.dispatch(request, group)
            backend_name = state.name if state is not None else None
        out_headers = response.headers + [(b"x-request-id", rid)]
        if backend_name is not None and gateway.settings.server.expose_backend_header:
            out_headers.append((b"x-comox-backend", backend_name.encode()))
        status = response.status
        if response.stream is not None:
            sent = await send_stream(send, receive, response, out_headers + SSE_HEADERS)
            error = sent.error
            if state is not None:
                if sent.broke is not None:
                    state.record_failure(sent.broke)
                elif sent.complete and sent.first and status == 200:
                    record_stream(request, state, sent.first, sent.last, sent.events, sent.end)
        else:
            try:
                await send_json(send, status, response.body, out_headers)
            finally:
                await response.aclose()
            if state is not None and status == 200:
                record_body(request, state, response.body)
            if status == 200 and hooks.comox_cache_store:
                await HookChain.each(hooks.comox_cache_store, request, response)
    except ComoxError as exc:
        status, error = exc.status, exc
        await send_error(send, exc, rid)
    except asyncio.CancelledError:
        status, error = 499, None  # the client went away
        raise
    except Exception as exc:
        status, error = 500, exc
        log.exception("unexpected error serving %s", path)
        await send_error(send, ComoxError("internal error in the gateway"), rid)
        raise
    finally:
        Gateway.release(state)
        if hooks.comox_request_done and request is not None:
            try:
                await HookChain.each(hooks.comox_request_done, request, status, backend_name, error)
            except Exception:
                log.exception("comox_request_done hook failed")


def models_body(gateway: Gateway, path: str) -> bytes:
    if path == "/v1/models":
        return gateway.models_body
    name = path[len("/v1/models/"):]
    if name not in gateway.groups:
        raise ModelNotFound(f"the model {name!r} does not exist", param="model")
    return orjson.dumps({"id": name, "object": "model", "created": gateway.created, "owned_by": "comox"})
