"""One upstream HTTP/1.1 connection of :mod:`comox.transport_httptools`: an
:class:`asyncio.Protocol` that feeds what arrives to httptools' C parser and
keeps the answer being read (status, headers, body chunks, errors), and the
read timeout armed for calls that last (:class:`ReadTimeouts`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import httptools

from .late import LateQueue
from .transport import _is_sse
from .write_batch import batch_for

if TYPE_CHECKING:
    from .transport_httptools import _Origin

__all__ = ["Connection", "Call", "ReadTimeouts", "Pool", "GONE", "UpstreamStream"]


class Pool(Protocol):
    """What owns a connection: told once when it closes."""

    def _lost(self, conn: Connection) -> None: ...


# A stream's unread chunks past which the connection stops reading (the
# client reads slower than the upstream writes); it reads again once they are taken.
_HIGH_WATER = 64


class Connection(asyncio.Protocol):
    """One upstream connection and the answer it is reading."""

    def __init__(self, owner: Pool, origin: _Origin, loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.batch = batch_for(loop)
        self.outgoing: bytes | None = None  # a request, held to the end of the loop's turn
        self.parser = httptools.HttpResponseParser(self)
        self.open = True
        self.idle_since = 0.0
        self.paused = False
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational = False
        self.status = 0
        self.head_done = False
        self.sse = False
        self.delimited = False  # the body's end is known (a length, chunks, or no body)
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.received = False
        self.last_read = 0.0  # loop time
        self.call: Call | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.call is None:  # bytes nobody asked for, on an idle connection: not to be trusted
            self.abort()
            return
        self.received = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # garbage (HttpParserError) or an answer nobody asked for
            self.fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.owner._lost(self)
        if self.head_done and not self.complete and not self.delimited:
            self.on_message_complete()  # a body that ends when the connection does
        elif not self.complete:
            self._wake(exc or ConnectionResetError("the upstream closed the connection"))

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer after this one, in the same read: the connection is out of step
            raise ConnectionError("an answer no request asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked body's trailer fields
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational (103 Early Hints): the answer follows
            self.informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        for name, value in self.headers:
            if name == b"content-type":
                self.sse = _is_sse(value.decode("latin-1"))
            elif name == b"content-length" or name == b"transfer-encoding":
                self.delimited = True
        if status in (204, 304):
            self.delimited = True
        if self.sse:
            self._wake(None)  # the caller returns a stream; chunks follow

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        if self.sse:
            if len(self.chunks) >= _HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            self._wake(None)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        if self.call is not None:
            self.call.finished = True
        self.keep_alive = self.open and self.parser.should_keep_alive()
        self._wake(None)

    # -- the caller's side --

    def send(self, request: bytes) -> None:
        """Write ``request`` at the end of the loop's turn, beside the other
        connections' writes (:mod:`comox.write_batch`)."""
        self.outgoing = request
        self.batch.hold(self)

    def flush(self) -> None:
        request, self.outgoing = self.outgoing, None
        if request is None or not self.open or self.transport is None:
            return  # dropped meanwhile (its caller was cancelled)
        try:
            self.transport.write(request)
        except (RuntimeError, OSError) as exc:  # closed before connection_lost reached us
            self.fail(exc)

    def _wake(self, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Give up on this connection: the caller sees ``error``."""
        self._wake(error)
        self.abort()

    def abort(self) -> None:
        if self.call is not None:
            self.call.finished = True
        if self.open:
            self.open = False
            if self.transport is not None:
                self.transport.abort()

    async def wait(self) -> None:
        """Until something new arrived (or the connection broke)."""
        waiter = self.waiter = self.loop.create_future()
        await waiter

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self.paused and self.open and self.transport is not None:
            self.paused = False
            self.last_read = self.loop.time()  # the quiet clock starts again when reading does
            self.transport.resume_reading()
        return data


class Call:
    """One request on a connection, as the read-timeout queue tracks it."""

    __slots__ = ("conn", "started", "finished")

    def __init__(self, conn: Connection, started: float):
        self.conn = conn
        self.started = started
        self.finished = False


class UpstreamStream:
    """A streamed answer's body, chunk by chunk as its connection reads it;
    ``done(conn, call)`` is told once it ended, broke or was left.
    :meth:`drained` lets the core send the last chunk with the response's end
    (one write to the client instead of two: :meth:`comox.asgi_io.Responder.stream`)."""

    __slots__ = ("conn", "call", "done")

    def __init__(self, conn: Connection, call: Call, done: Callable[[Connection, Call], None]):
        self.conn = conn
        self.call = call
        self.done = done

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        conn = self.conn
        while True:
            if conn.call is not self.call:  # closed, or read to its end before
                raise StopAsyncIteration
            if conn.chunks:
                return conn.take()
            if conn.complete:
                self.done(conn, self.call)
                raise StopAsyncIteration
            if conn.error is not None:
                self.done(conn, self.call)
                raise ConnectionError(f"upstream stream broke: {type(conn.error).__name__}") from conn.error
            try:
                await conn.wait()
            except BaseException:  # cancelled: the upstream sees its reader leave
                self.done(conn, self.call)
                raise

    def drained(self) -> bool:
        """Whether the answer was read whole and every chunk taken."""
        conn = self.conn
        return conn.complete and not conn.chunks and conn.call is self.call

    async def aclose(self) -> None:
        self.done(self.conn, self.call)


class ReadTimeouts(LateQueue[Call]):
    """Connections whose answer is taking a while get a timer that aborts them
    once nothing arrived for ``timeout_s``; the quick rest never get one.
    Checked every 20 ms, as the other queues are: a check every second held a
    second of calls alive (9,000 at c=16), old enough for the garbage
    collector's older generations, and dropped them in one go."""

    def __init__(self, timeout_s: float):
        super().__init__(after_s=min(0.02, timeout_s))
        self.timeout_s = timeout_s

    def promote(self, entry: Call, loop: asyncio.AbstractEventLoop) -> None:
        self._check(entry, loop)

    def _check(self, call: Call, loop: asyncio.AbstractEventLoop) -> None:
        if call.finished:
            return
        conn = call.conn
        if conn.paused:  # held back for a slow reader: not the upstream's silence
            conn.last_read = loop.time()
        quiet = loop.time() - conn.last_read
        if quiet >= self.timeout_s:
            conn.fail(TimeoutError(f"no bytes from the upstream for {self.timeout_s:g} s"))
        else:
            loop.call_later(self.timeout_s - quiet, self._check, call, loop)


class _Gone:
    """The owner of a connection that already left its pool."""

    def _lost(self, conn: Connection) -> None:
        pass


GONE = _Gone()
