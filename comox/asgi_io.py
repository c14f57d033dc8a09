"""The raw ASGI I/O of one API request, in one place: reading the body with
its size limit, and a :class:`Responder` that knows whether the response has
started — so an error after the start ends the stream (or the connection),
never sends a second ``http.response.start``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .backends import BackendResponse
from .disconnects import ServerWatch, WatchedStream, watch_current
from .errors import BodyTooLarge, ComoxError, InvalidRequest, UpstreamError
from .http1_connection import UpstreamStream
from .request import first_header
from .server_cycle import ComoxResponseCycle

if TYPE_CHECKING:
    from .request import GatewayRequest

__all__ = ["Responder", "SentStream", "read_body", "route_path", "SSE_HEADERS"]

log = logging.getLogger("comox")
_sleep = asyncio.sleep

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
OVERHEAD = b"x-comox-overhead-ms"


def route_path(scope: MutableMapping[str, Any]) -> str:
    """The path relative to where the app is mounted (``scope["path"]`` minus
    ``root_path``), as Starlette routes it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    value = first_header(headers, b"content-length")
    if value is not None:
        try:
            declared = int(value)
        except ValueError:
            raise InvalidRequest("content-length is not a number", code="invalid_header") from None
        if declared > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
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


class SentStream(NamedTuple):
    """What :meth:`Responder.stream` sent: ``complete`` when the stream ran to
    its end; ``error`` sent to the client when the upstream broke off
    (``broke`` says how — also when another node finished the answer:
    :meth:`comox.resume.Splice.settle`); times (``time.perf_counter()``) of
    the first and last chunk, the last two chunks (``end``), and ``data:``
    lines (:attr:`events`)."""

    complete: bool
    error: Exception | None
    first: float
    last: float
    counted: int  # data: lines of the chunks before ``end`` (of all, when ``end`` is empty)
    end: bytes
    broke: str | None = None

    @property
    def events(self) -> int:
        """The ``data:`` lines sent. Counted in full only when asked: most
        streams report their usage, and a short one is all in ``end``."""
        return self.counted + self.end.count(b"data:")


class Responder:
    """The response side of one request. ``status`` is what the client was
    sent (0 until the response starts); ``started`` and ``finished`` say how
    far it got. For an API request (``request`` given) it times the first and
    last byte on the request and adds ``x-comox-overhead-ms`` to the headers."""

    __slots__ = ("send", "status", "started", "finished", "streaming", "request", "cycle")

    def __init__(self, send: Send, request: GatewayRequest | None = None):
        self.send = send
        # The send of comox serve's own cycle, not wrapped by a middleware: a whole
        # answer goes to its answer() in one call, without the two ASGI messages.
        cycle = getattr(send, "__self__", None)
        self.cycle: ComoxResponseCycle | None = cycle if type(cycle) is ComoxResponseCycle else None
        self.status = 0
        self.started = False
        self.finished = False
        self.streaming = False
        self.request = request

    async def start(self, status: int, headers: Headers) -> None:
        """Send the status and ``headers`` (a list of the caller's own: the
        overhead header is appended to it)."""
        self._begin(status, headers)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    def _begin(self, status: int, headers: Headers) -> None:
        """The response marked started, and timed."""
        if self.started:
            raise RuntimeError("the response has already started")
        self.started = True
        self.status = status
        request = self.request
        if request is not None:
            # The time Comox added up to now: all of it since the request
            # arrived, less the answering backend's own time to its answer
            # (JSON) or first chunk (stream). docs/telemetry.md.
            now = request.first_byte_at = time.perf_counter()
            waited = request.answered_at - request.sent_at
            overhead = now - request.received_at - waited if waited > 0 else now - request.received_at
            headers.append((OVERHEAD, b"%.3f" % (overhead * 1000)))

    async def json(self, status: int, body: bytes, headers: Headers) -> None:
        """Send a whole answer (``headers``: a list of the caller's own, appended to)."""
        headers.append((b"content-length", b"%d" % len(body)))
        self._begin(status, headers)
        cycle = self.cycle
        turn = cycle.answer(status, headers, body) if cycle is not None else None
        if turn is None:
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
        elif turn:
            await _sleep(0)
        self.finished = True
        if self.request is not None:
            self.request.last_byte_at = time.perf_counter()

    async def error(self, exc: ComoxError, request_id: bytes, extra: Headers | None = None,
                    render: Callable[[ComoxError], tuple[int, Headers, bytes]] | None = None) -> None:
        """Send ``exc`` as an OpenAI-format error (``render``: in another
        API's format), or, when the response has already started, end it the
        only way left: an SSE error event for a stream (:meth:`stream_error`),
        else by raising so the server drops the connection."""
        if not self.started:
            status, headers, body = render(exc) if render is not None else (exc.status, exc.headers(), exc.to_bytes())
            headers = headers + [(b"x-request-id", request_id)]
            await self.json(status, body, headers + extra if extra else headers)
        elif self.finished:
            pass  # the client has its whole answer; the error is only logged
        elif self.streaming:
            await self.send({"type": "http.response.body", "body": b"\n\n" + self.stream_error(exc)})
            self.finished = True
        else:
            raise RuntimeError("error after the response started; dropping the connection") from exc

    def stream_error(self, exc: ComoxError) -> bytes:
        """The event(s) that end a started stream with ``exc``: in the
        request's inbound API's format (:meth:`comox.InboundAPI.render_stream_error`),
        else OpenAI's ``data: {"error": …}``."""
        request = self.request
        if request is not None and request.api is not None:
            try:
                return request.api.render_stream_error(request, exc)
            except Exception:  # a plugin's bug: the stream still ends with an error
                log.exception("%s's render_stream_error failed", request.api.name)
        return b"data: " + exc.to_bytes() + b"\n\n"

    async def stream(self, receive: Receive, response: BackendResponse, headers: Headers) -> SentStream:
        """Forward ``response.stream`` chunk by chunk. A client that goes away
        cancels the upstream read (:mod:`comox.disconnects`); an upstream that
        fails midway ends the stream with an error event (:meth:`stream_error`:
        the inbound API's, with the failure's own :class:`ComoxError` if it
        raised one), never a clean
        ``[DONE]``. Returns what was sent, for the fleet's measurements
        (measured in the loop itself: a wrapping generator per stream would
        cost more than the measuring)."""
        assert response.stream is not None
        watched = watch_current(receive)
        self.streaming = True
        self._begin(response.status, headers)
        cycle = self.cycle
        if cycle is None or not cycle.send_start(response.status, headers):
            await self.send({"type": "http.response.start", "status": response.status, "headers": headers})
        send = self.send
        first = last = 0.0
        events = 0
        prev = b""
        tail = b"\n\n"
        clock = time.perf_counter
        stream = response.stream
        # A stream read to its end already (a short answer, or its last
        # chunk): that chunk goes out with the response's end, in one write.
        drained = stream.drained if type(stream) is UpstreamStream else None
        next_chunk = aiter(stream).__anext__
        try:
            chunk = response.head  # the first chunk, if the core read it to time the first byte
            while True:
                if chunk:
                    last = clock()
                    if not first:
                        first = last
                    events += prev.count(b"data:")  # the chunk leaving the last two (those are ``end``)
                    prev, tail = tail, chunk
                    # (the end of an event is in the last 4 bytes: the last chunk alone, unless shorter)
                    if drained is not None and drained() and _ends_whole(tail if len(tail) >= 4 else prev + tail):
                        return await self._last(chunk, watched, first, last, events, prev + tail)
                    if cycle is None or cycle.send_body(chunk, True) is None:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    chunk = await next_chunk()
                except StopAsyncIteration:
                    break
            end = prev + tail
            if not _ends_whole(end):  # a clean close in the middle of an event
                raise EOFError("the stream ended in the middle of an event")
            watched.finished = True
            await self._end(b"")
            return SentStream(True, None, first, last, events, end)
        except asyncio.CancelledError:
            if watched.disconnected:
                watched.task.uncancel()
                return SentStream(False, None, first, last, events + (prev + tail).count(b"data:"), b"")
            raise
        except Exception as exc:
            watched.finished = True
            log.warning("stream from backend failed after the first byte: %r", exc)
            api = self.request.api if self.request is not None else None
            if api is not None and isinstance(exc, ComoxError):
                error = exc  # the backend's or the translation's own account of it
            else:
                error = UpstreamError("the backend failed in the middle of the response", code="stream_interrupted")
            event = self.stream_error(error)
            if not tail.endswith(b"\n\n"):
                event = b"\n\n" + event  # close the partial event first
            await send({"type": "http.response.body", "body": event})
            self.finished = True
            return SentStream(False, error, first, last, events + (prev + tail).count(b"data:"), b"",
                              f"stream broke off: {type(exc).__name__}")
        finally:
            if self.request is not None:
                self.request.last_byte_at = last
            watched.close()
            await response.aclose()

    async def _last(self, chunk: bytes, watched: WatchedStream | ServerWatch, first: float, last: float, events: int,
                    end: bytes) -> SentStream:
        watched.finished = True
        await self._end(chunk)
        return SentStream(True, None, first, last, events, end)

    async def _end(self, chunk: bytes) -> None:
        """A stream's last chunk, its end."""
        cycle = self.cycle
        turn = cycle.send_body(chunk, False) if cycle is not None else None
        if turn is None:
            await self.send({"type": "http.response.body", "body": chunk})
        elif turn:
            await _sleep(0)
        self.finished = True


def _ends_whole(end: bytes) -> bool:
    """Whether a stream's last bytes end an event (not a close in the middle of one)."""
    return end.endswith((b"\n\n", b"\r\r", b"\r\n\r\n"))
