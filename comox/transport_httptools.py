"""An HTTP/1.1 client on the event loop's own transports and httptools' C
parser (llhttp, the parser uvicorn reads requests with): ``transport =
"httptools"``, behind the same seam as :class:`comox.transport.AiohttpTransport`.

A gateway's upstream calls are one shape: a ``POST`` with a body in memory to a
few fixed origins, answered with a JSON body or an SSE stream. aiohttp builds a
request object, a header multidict, a response object, a stream reader and
timer contexts for each; this client writes the request line and headers it
prepared once per URL, feeds what comes back to llhttp from the protocol's
``data_received``, and wakes the caller once per answer. The figures that
decided the default are in ``docs/benchmarks.md``.

It keeps what the aiohttp transport does: a connect timeout, a read timeout
(the longest wait for the next bytes), a pool of at most ``max_connections``
with idle connections closed after ``keepalive_s``, TLS verified against the
system's CAs and ``ca_file``, no cookies, no decompression, and a stream that
closes its upstream connection when the gateway closes it early (a client that
left). A cancelled call aborts its connection, so the upstream sees the client
go. Requests to an upstream that an HTTP proxy from the environment applies to
(``trust_env``) go through aiohttp, which speaks to proxies. With
OpenTelemetry tracing on, each call has its own client span.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import urlsplit

from . import client_spans
from .backends import BackendResponse
from .disconnects import running_loop
from .http1_connection import GONE, Call, Connection, ReadTimeouts, UpstreamStream
from .transport import (DROPPED_RESPONSE_HEADERS, AiohttpTransport, PoolTransport, UpstreamUnreachable,
                        _ssl_context)

__all__ = ["HttptoolsTransport"]


class _Origin:
    """Where one URL's requests go, and the start of each request to it."""

    __slots__ = ("key", "host", "port", "tls", "prefix", "idle", "proxy")

    def __init__(self, url: str, default_headers: Mapping[str, str], trust_env: bool,
                 pools: dict[tuple[str, str, int], deque[Connection]]):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (parts.scheme, self.host, self.port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        lines = [f"POST {target} HTTP/1.1", f"host: {host}"]
        lines += [f"{_checked(name)}: {_checked(value)}" for name, value in default_headers.items()]
        self.prefix = ("\r\n".join(lines) + "\r\n").encode()
        # Idle connections, shared by every URL of one scheme, host and port.
        self.idle = pools.setdefault(self.key, deque())
        self.proxy = trust_env and _proxied(parts.scheme, parts.netloc)


def _proxied(scheme: str, netloc: str) -> bool:
    """Whether the environment's HTTP(S)_PROXY / NO_PROXY route this origin through a proxy."""
    proxies = urllib.request.getproxies()
    return scheme in proxies and not urllib.request.proxy_bypass(netloc)


def _checked(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header name or value may not contain CR or LF")
    return value


class HttptoolsTransport(PoolTransport):
    """A pool of HTTP/1.1 connections per origin, opened lazily inside the
    running event loop; ``default_headers`` go with every request."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._origins: dict[str, _Origin] = {}
        self._pools: dict[tuple[str, str, int], deque[Connection]] = {}
        self._count = 0  # open connections, idle or busy
        self._slots: deque[asyncio.Future[None]] = deque()  # callers waiting for a free connection
        self._ssl: ssl.SSLContext | None = None
        self._timeouts = ReadTimeouts(self.timeout_s)
        self._sweeping = False
        self._fallback: AiohttpTransport | None = None
        self._closed = False

    def _origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = _Origin(url, self.default_headers, self.trust_env, self._pools)
        return origin

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Coroutine[Any, Any, BackendResponse]:
        # A plain function returning the coroutine that answers: no coroutine around it.
        origin = self._origins.get(url) or self._origin(url)
        if origin.proxy:
            return self._proxied(url, body, headers)  # aiohttp's instrumentation makes its span
        span, headers = client_spans.start(url, headers, __name__)
        if span is None:
            return self._post(origin, body, headers, None)
        return self._traced(origin, body, headers, span)

    async def _traced(self, origin: _Origin, body: bytes, headers: Mapping[str, str], span: Any) -> BackendResponse:
        try:
            response = await self._post(origin, body, headers, span)
        except UpstreamUnreachable as exc:
            client_spans.failed(span, exc.cause)
            span.end()
            raise
        except BaseException:
            span.end()
            raise
        client_spans.answered(span, response.status)
        if response.stream is None:
            span.end()  # a stream's ends when it closes
        return response

    async def _post(self, origin: _Origin, body: bytes, headers: Mapping[str, str], span: Any) -> BackendResponse:
        head = origin.prefix
        for name, value in headers.items():
            head += f"{_checked(name)}: {_checked(value)}\r\n".encode()
        head += b"content-length: %d\r\n\r\n" % len(body)
        loop = running_loop()
        for attempt in (0, 1):
            conn = self._idle(origin, loop) or await self._connect(origin, loop)
            reused = conn.idle_since > 0.0  # it answered before: fresh connections were never idle
            now = conn.last_read = loop.time()
            call = conn.call = Call(conn, now)
            conn.send(head + body)  # at the end of the loop's turn (comox.write_batch)
            self._timeouts.queue(call, loop)
            try:
                while not conn.head_done and conn.error is None:
                    await conn.wait()
            except BaseException:  # cancelled: the upstream sees its client leave
                self._drop(conn)
                raise
            if conn.head_done:
                break
            self._drop(conn)
            # An idle connection the upstream closed as we reused it: once more on a new one.
            if not (reused and not conn.received and attempt == 0):
                raise UpstreamUnreachable("connect", conn.error or ConnectionResetError())
        headers_out = [(n, v) for n, v in conn.headers if n not in DROPPED_RESPONSE_HEADERS]
        if conn.sse:
            return BackendResponse(conn.status, headers_out, stream=UpstreamStream(conn, call, self._done_with), close=self._closer(conn, call, span))
        try:
            while not conn.complete and conn.error is None:
                await conn.wait()
        except BaseException:
            self._drop(conn)
            raise
        if not conn.complete:
            self._drop(conn)
            raise UpstreamUnreachable("body", conn.error or ConnectionResetError())
        status, data = conn.status, conn.take()
        self._release(conn)  # resets conn
        return BackendResponse(status, headers_out, body=data)

    def _closer(self, conn: Connection, call: Call, span: Any) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            self._done_with(conn, call)
            if span is not None:
                span.end()
        return close

    def _done_with(self, conn: Connection, call: Call) -> None:
        """A stream's end or close: the connection back to the pool if its
        answer was read whole, else closed (the upstream sees its client
        leave). Once per call, whichever comes first."""
        if conn.call is not call or conn.owner is not self:
            return  # released or dropped already
        if conn.complete and not conn.chunks:
            self._release(conn)
        else:
            self._drop(conn)

    # -- the pool --

    def _idle(self, origin: _Origin, loop: asyncio.AbstractEventLoop) -> Connection | None:
        idle = origin.idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if conn.open and not conn.transport.is_closing() and loop.time() - conn.idle_since < self.keepalive_s:  # type: ignore[union-attr]
                return conn
            self._drop(conn)
        return None

    async def _connect(self, origin: _Origin, loop: asyncio.AbstractEventLoop) -> Connection:
        while self._count >= self.max_connections:
            spare = next((idle[0] for idle in self._pools.values() if idle), None)
            if spare is not None:  # idle, to another host: closed to make room
                self._drop(spare)
                continue
            slot = loop.create_future()
            self._slots.append(slot)
            try:
                await slot
            except asyncio.CancelledError:
                if not slot.cancelled():  # woken, then cancelled: the free connection goes to the next waiter
                    self._free_slot()
                raise
            idle = self._idle(origin, loop)
            if idle is not None:
                return idle
        self._count += 1
        made: list[Connection] = []

        def made_one() -> Connection:
            conn = Connection(self, origin, loop)
            made.append(conn)
            return conn

        try:
            if origin.tls and self._ssl is None:
                self._ssl = _ssl_context(self.ca_file) if self.ca_file else ssl.create_default_context()
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel (the
            # first-byte timer's, the client's) that arrives as the connect
            # finishes, and the call then waits on a hung node for ever.
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(made_one, origin.host, origin.port,
                                                       ssl=self._ssl if origin.tls else None)
        except BaseException as exc:
            for conn in made:  # connected as the cancel or the timeout came: closed, never pooled
                conn.owner = GONE
                conn.abort()
            self._count -= 1
            self._free_slot()
            if isinstance(exc, (OSError, ssl.SSLError)):  # TimeoutError is an OSError
                raise UpstreamUnreachable("connect", exc) from exc
            raise
        return conn

    def _release(self, conn: Connection) -> None:
        """Back to the pool after a complete answer, or closed if the upstream
        will not keep it open."""
        if not (conn.keep_alive and conn.open) or self._closed:
            self._drop(conn)
            return
        conn.reset()
        loop = conn.loop
        conn.idle_since = loop.time()
        conn.origin.idle.append(conn)
        if self._slots:
            self._free_slot()
        if not self._sweeping:
            self._sweeping = True
            loop.call_later(self.keepalive_s, self._sweep)

    def _drop(self, conn: Connection) -> None:
        conn.abort()
        self._lost(conn)

    def _lost(self, conn: Connection) -> None:
        """``conn`` is closed: it leaves the pool (once)."""
        if conn.owner is not self:
            return
        conn.owner = GONE
        self._count -= 1
        try:
            conn.origin.idle.remove(conn)
        except ValueError:
            pass
        self._free_slot()

    def _free_slot(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for ``keepalive_s``, oldest first."""
        self._sweeping = False
        now = asyncio.get_running_loop().time()
        left = False
        for idle in self._pools.values():
            while idle and now - idle[0].idle_since >= self.keepalive_s:
                self._drop(idle[0])
            left = left or bool(idle)
        if left and not self._closed:
            self._sweeping = True
            asyncio.get_running_loop().call_later(self.keepalive_s, self._sweep)

    async def _proxied(self, url: str, body: bytes, headers: Mapping[str, str]) -> BackendResponse:
        if self._fallback is None:
            self._fallback = AiohttpTransport(
                timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s,
                max_connections=self.max_connections, keepalive_s=self.keepalive_s,
                default_headers=self.default_headers, ca_file=self.ca_file, trust_env=True)
        return await self._fallback.post(url, body, headers)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._pools.values():
            while idle:
                self._drop(idle[0])
        if self._fallback is not None:
            await self._fallback.aclose()
