"""The HTTP protocol ``comox serve`` runs uvicorn with: an HTTP/1.1 protocol
on httptools that answers as uvicorn's own does, with less work per request,
and whose writes wait for the end of the event loop's turn and go out together.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body with the next message: two writes (two
system calls, two TCP segments on loopback) for every answer that one write
could carry, and each wakes the client if it sleeps. :class:`BatchedTransport`
holds a connection's writes to the end of the loop's turn
(:mod:`comox.write_batch`), so an answer goes out in one write, beside the
other answers of that turn, and the bytes keep their order.
:class:`ComoxHttpProtocol` parses requests as uvicorn's httptools protocol
does and runs each in a :class:`comox.server_cycle.ComoxResponseCycle`,
which builds the same answers in less time. It plugs into uvicorn's server
(``http=``), so uvicorn still runs the sockets, workers, lifespan, signals
and shutdown. Mounted in another server, Comox answers the same, with that
server's protocol.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from typing import Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .disconnects import SERVER_CYCLE
from .server_cycle import ComoxResponseCycle
from .write_batch import batch_for

__all__ = ["BatchedTransport", "ComoxHttpProtocol", "ComoxServeProtocol", "ComoxResponseCycle", "SERVER_OPTIONS",
           "forwarded_app"]

_JOIN_BELOW = 64 * 1024  # larger bytes are written at once (after what is held), not copied into one buffer


class BatchedTransport:
    """A connection's transport whose writes are held to the end of the event
    loop's turn (:mod:`comox.write_batch`), then sent in one write: a response's
    head with its body, a stream's chunks of that turn together. A close sends
    what is held first; an abort drops it; bytes past ``_JOIN_BELOW`` are
    written at once, after what was held, rather than copied."""

    __slots__ = ("transport", "batch", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self.batch = batch_for(loop)
        self.held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self.held
        if held is None:
            if not data:
                return  # (as the transport does with nothing to write)
            if len(data) < _JOIN_BELOW:
                self.held = bytes(data)  # a copy: a bytearray may change before the turn ends
                self.batch.hold(self)
                return
        elif len(held) + len(data) < _JOIN_BELOW:
            self.held = held + data  # (any bytes-like object)
            return
        else:
            self.flush()
        self.transport.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + len(self.held or b"")

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))  # after what is held, as write

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    # The rest of asyncio.Transport, each written out: a class with __getattr__
    # reads every attribute on a slow path (5x a slot's), a dozen per request here.

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)


_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")  # the headers uvicorn's proxy-headers middleware reads
_READ = frozenset((b"expect", *_FORWARDED))  # the request headers the protocol itself reads


def _uvicorn_trims_values() -> bool:
    """Whether this uvicorn's on_header drops a value's trailing whitespace, as
    RFC 9110 says (0.55 does; older ones keep it, as llhttp gives it)."""
    probe = type("Probe", (), {"headers": None, "expect_100_continue": False})()
    probe.headers = []
    HttpToolsProtocol.on_header(probe, b"x", b"v \t")
    return bool(probe.headers[0][1] == b"v")


_TRIMS = _uvicorn_trims_values()
_uvicorn_start_asgi_task = HttpToolsProtocol._start_asgi_task


class ComoxHttpProtocol(HttpToolsProtocol):
    """An HTTP/1.1 protocol for uvicorn (``http=`` in ``uvicorn.Config``): a
    subclass of uvicorn's own ``HttpToolsProtocol`` with less work per
    request. Its writes go through a :class:`BatchedTransport`, its requests
    are :class:`comox.server_cycle.ComoxResponseCycle`, and its keep-alive
    timeout is one timer per connection, re-armed only when it fires, instead
    of one armed and cancelled per request. Everything else is uvicorn's:
    pipelining, ``Expect: 100-continue``, flow control, ``limit_concurrency``,
    ``limit_max_requests``, graceful shutdown, the 400 for a request it cannot
    parse, the hand-over of a WebSocket upgrade to uvicorn's WebSocket
    protocol, and its error and access logs."""

    app: ASGI3Application
    cycle: ComoxResponseCycle | None  # type: ignore[assignment]
    pipeline: deque[tuple[ComoxResponseCycle, ASGI3Application]]  # type: ignore[assignment]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.idle_since: float | None = None  # when the connection's last answer ended, while nothing has come since
        self.idle_timer: asyncio.TimerHandle | None = None
        self.forwarded = False  # the request being parsed has X-Forwarded-For or -Proto

    # -- the connection --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = BatchedTransport(transport, self.loop)  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.client_left()
            cycle.wake()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.parser = None  # type: ignore[assignment]

    def _unset_keepalive_if_required(self) -> None:  # (uvicorn calls it when data arrives)
        self.idle_since = None

    def handle_websocket_upgrade(self) -> None:
        batched: BatchedTransport = self.transport  # type: ignore[assignment]
        batched.flush()
        self.transport = batched.transport  # the WebSocket protocol gets the socket's own transport
        super().handle_websocket_upgrade()

    # -- the parser's callbacks, for each request --

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header (the same pairs: tests/test_server_protocol.py holds
        # them to it), written here: once per header, a call into it costs more
        # than what it does.
        name = name.lower()
        if _TRIMS:
            value = value.rstrip(b" \t")
        if name in _READ:
            if name == b"expect":
                if value.lower() == b"100-continue":
                    self.expect_100_continue = True
            else:
                self.forwarded = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = self.url
        # Origin form, as nearly every request (parse_url makes an object). (0x23, "#",
        # as an int: a bytes operand is first tried as an int, a TypeError raised and cleared.)
        if url[:1] == b"/" and 0x23 not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.root_path
        scope["path"] = root_path + path if root_path else path
        scope["raw_path"] = root_path.encode("ascii") + raw_path if root_path else raw_path
        scope["query_string"] = query
        limit = self.limit_concurrency
        app: ASGI3Application
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app_for()
        self.forwarded = False
        existing = self.cycle
        self.cycle = cycle = ComoxResponseCycle(self, scope, http_version != "1.0" and parser.should_keep_alive(),
                                                self.expect_100_continue)
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, app)
        else:  # pipelined: started when the one before has answered
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def app_for(self) -> ASGI3Application:
        """The app for the request whose headers have just been parsed."""
        return self.app

    def _start_asgi_task(self, cycle: ComoxResponseCycle, app: ASGI3Application) -> None:  # type: ignore[override]
        # The task's context is a copy of this one: the cycle in it tells
        # comox.disconnects when the client leaves (uvicorn's reset_contextvars: not).
        token = SERVER_CYCLE.set(cycle)
        try:
            _uvicorn_start_asgi_task(self, cycle, app)  # type: ignore[arg-type]
        finally:
            SERVER_CYCLE.reset(token)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.body = cycle.body + body if cycle.body else body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        if cycle.waiter is not None:
            cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.more_body = False
        if cycle.waiter is not None:
            cycle.wake()

    # -- after each answer --

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.idle_since = self.loop.time()
            if self.idle_timer is None:
                self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        # Closes the connection once it has been idle for the keep-alive timeout;
        # a busy one gets a new timer when its answer ends.
        self.idle_timer = None
        since = self.idle_since
        if since is None or self.transport.is_closing():
            return
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self.transport.close()


class ComoxServeProtocol(ComoxHttpProtocol):
    """The protocol ``comox serve`` runs (:data:`SERVER_OPTIONS`): a
    :class:`ComoxHttpProtocol` that honours ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` as uvicorn does by default, from the addresses in
    ``FORWARDED_ALLOW_IPS`` (127.0.0.1 unless set), with uvicorn's own
    middleware, run only for a request that has one of them. uvicorn wraps
    every request in it (a coroutine more, a loop over the headers), so
    ``SERVER_OPTIONS`` turns uvicorn's off."""

    def app_for(self) -> ASGI3Application:
        if self.forwarded and self.config.proxy_headers is False:
            return forwarded_app(self.config)
        return self.app


def forwarded_app(config: Config) -> ASGI3Application:
    """``config``'s app inside uvicorn's ProxyHeadersMiddleware, trusting
    ``config.forwarded_allow_ips`` (``FORWARDED_ALLOW_IPS``), as uvicorn
    itself would wrap it: made once per config."""
    app: ASGI3Application | None = getattr(config, "_comox_forwarded_app", None)
    if app is None:
        app = ProxyHeadersMiddleware(config.loaded_app, trusted_hosts=config.forwarded_allow_ips)
        config._comox_forwarded_app = app  # type: ignore[attr-defined]
    return app


# What ``comox serve`` (and each of its workers) passes to ``uvicorn.Config``:
# this protocol, and no ``server: uvicorn`` header (it tells a scanner what
# runs here, and costs every answer a header).
# uvicorn's proxy-headers middleware is off: the protocol runs it for the
# requests that carry X-Forwarded-For or X-Forwarded-Proto.
SERVER_OPTIONS: dict[str, Any] = {"http": ComoxServeProtocol, "server_header": False, "proxy_headers": False}
