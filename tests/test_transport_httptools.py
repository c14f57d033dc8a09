"""The httptools transport's own pool (``comox/transport_httptools.py``) and
its connections' parsing (``comox/http1_connection.py``), against raw HTTP/1.1 servers
on 127.0.0.1 that the tests script byte by byte: keep-alive and its limits,
the one retry of a stale idle connection, how bodies are delimited,
informational answers, read timeouts, backpressure, header checks, garbage,
``aclose`` and the proxy fallback. The behaviour every transport shares is in
``tests/test_openai_transport.py``.

Each test runs on asyncio's default loop and on uvloop (uvicorn's loop when it
is installed)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import orjson
import pytest

from comox.transport import UpstreamUnreachable
from comox.transport_httptools import HttptoolsTransport

uvloop = pytest.importorskip("uvloop")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run(main, timeout: float = 20.0):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(main(), timeout))

    return run


# -- a raw upstream, in the test's own event loop --

class Conn:
    """One accepted connection, as the upstream's script sees it."""

    def __init__(self, server: Upstream, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.number = number
        self.reader = reader
        self.writer = writer
        self.eof = asyncio.Event()  # the client closed its end
        self.eof_at = 0.0

    async def request(self) -> dict | None:
        """The next request, or None at EOF (or a reset)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self._eof()
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        request = {"conn": self.number, "line": lines[0], "headers": headers, "body": body}
        self.server.requests.append(request)
        return request

    async def until_eof(self) -> None:
        """Read (and discard) until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self._eof()

    def _eof(self) -> None:
        if not self.eof.is_set():
            self.eof_at = time.monotonic()
            self.eof.set()

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


class Upstream:
    """``script(conn)`` speaks for each accepted connection; the server counts
    accepted and open connections and records every request."""

    def __init__(self, script):
        self.script = script
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.conns: list[Conn] = []
        self.requests: list[dict] = []
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5)

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _accept(self, reader, writer) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = Conn(self, self.accepted, reader, writer)
        self.conns.append(conn)
        self.tasks.append(asyncio.current_task())
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went, or the test is over
        except RuntimeError as exc:  # uvloop: a write after the client closed the connection
            if "closed" not in str(exc):
                raise
        finally:
            self.open -= 1
            if reader.at_eof():
                conn._eof()
            try:
                writer.close()
            except RuntimeError:  # uvloop: already closed
                pass


def answer(body: bytes = b'{"ok":true}', status: str = "200 OK", extra: str = "",
           content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n" + trailer + b"\r\n"


async def keep_answering(conn: Conn) -> None:
    """A well-behaved keep-alive upstream: each request gets a JSON answer naming it."""
    while (request := await conn.request()) is not None:
        conn.write(answer(orjson.dumps({"conn": conn.number, "path": request["line"].split()[1]})))


async def call(transport: HttptoolsTransport, url: str, body: bytes = b"{}", headers=None):
    return await asyncio.wait_for(transport.post(url, body, headers or {"content-type": "application/json"}), 5)


async def read_stream(response) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.stream])
    finally:
        await response.aclose()


async def within(awaitable, seconds: float = 5.0):
    return await asyncio.wait_for(awaitable, seconds)


@contextlib.asynccontextmanager
async def pool(script, **options):
    """An ``Upstream(script)`` and a ``HttptoolsTransport(**options)`` in front of
    it, as ``(up, transport)``; the transport is closed first, then the upstream."""
    async with Upstream(script) as up:
        transport = HttptoolsTransport(**options)
        try:
            yield up, transport
        finally:
            await transport.aclose()


# -- keep-alive --

def test_sequential_calls_reuse_one_connection(run):
    async def main():
        async with pool(keep_answering) as (up, transport):
            for _ in range(3):
                response = await call(transport, up.url())
                assert response.status == 200 and orjson.loads(response.body)["conn"] == 1
            assert up.accepted == 1
    run(main)


def test_two_urls_of_one_host_share_the_pool(run):
    async def main():
        async with pool(keep_answering) as (up, transport):
            a = await call(transport, up.url("/v1/chat/completions"))
            b = await call(transport, up.url("/v1/embeddings?x=1"))
            assert orjson.loads(a.body) == {"conn": 1, "path": "/v1/chat/completions"}
            assert orjson.loads(b.body) == {"conn": 1, "path": "/v1/embeddings?x=1"}
            assert up.accepted == 1
            assert [r["headers"]["host"] for r in up.requests] == [f"127.0.0.1:{up.port}"] * 2
    run(main)


# -- idle connections the upstream closed --

def test_an_idle_connection_the_upstream_closed_is_not_reused(run):
    async def main():
        async def answer_once_and_close(conn):
            if await conn.request() is not None:
                conn.write(answer(orjson.dumps({"conn": conn.number})))
                await conn.writer.drain()
                conn.close()  # no "connection: close": the client learns it from the FIN

        async with pool(answer_once_and_close) as (up, transport):
            first = await call(transport, up.url())
            await asyncio.sleep(0.05)  # the FIN reaches the client while its connection is idle
            second = await call(transport, up.url())
            assert orjson.loads(first.body)["conn"] == 1 and orjson.loads(second.body)["conn"] == 2
            assert up.accepted == 2
    run(main)


def test_an_idle_connection_closed_as_it_is_reused_is_retried_once_on_a_new_one(run):
    async def main():
        async def close_on_second_request(conn):
            if await conn.request() is not None:
                conn.write(answer(orjson.dumps({"conn": conn.number})))
                if await conn.request() is not None:
                    conn.close()  # closed as the client reused it: it wrote before it saw the FIN

        async with pool(close_on_second_request) as (up, transport):
            assert orjson.loads((await call(transport, up.url())).body)["conn"] == 1
            second = await call(transport, up.url(), b'{"n":2}')
            assert second.status == 200 and orjson.loads(second.body)["conn"] == 2
            assert up.accepted == 2
            assert [(r["conn"], r["body"]) for r in up.requests] == [(1, b"{}"), (1, b'{"n":2}'), (2, b'{"n":2}')]
    run(main)


def test_the_retry_is_only_once(run):
    async def main():
        async def answer_first_request_of_first_connection_only(conn):
            if conn.number == 1 and await conn.request() is not None:
                conn.write(answer())
            await conn.request()
            conn.close()  # every later request: closed unanswered

        async with pool(answer_first_request_of_first_connection_only) as (up, transport):
            await call(transport, up.url())
            with pytest.raises(UpstreamUnreachable):
                await call(transport, up.url())
            await asyncio.sleep(0.05)
            assert up.accepted == 2  # the reused one, and one retry
    run(main)


def test_a_fresh_connection_closed_unanswered_is_not_retried(run):
    async def main():
        async def close_unanswered(conn):
            await conn.request()
            conn.close()

        async with pool(close_unanswered) as (up, transport):
            with pytest.raises(UpstreamUnreachable):
                await call(transport, up.url())
            await asyncio.sleep(0.05)
            assert up.accepted == 1
    run(main)


@pytest.mark.parametrize("partial", [b"HTTP/1.1 200 OK\r\ncontent-le",
                                     b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{\"par"],
                         ids=["in-the-head", "in-the-body"])
def test_a_reused_connection_that_broke_mid_answer_is_not_retried(run, partial):
    async def main():
        async def break_second_answer(conn):
            if await conn.request() is not None:
                conn.write(answer())
                if await conn.request() is not None:
                    conn.write(partial)
                    await conn.writer.drain()
                    await asyncio.sleep(0.02)
                    conn.close()

        async with pool(break_second_answer) as (up, transport):
            await call(transport, up.url())
            with pytest.raises(UpstreamUnreachable):
                await call(transport, up.url())
            await asyncio.sleep(0.05)
            assert up.accepted == 1 and len(up.requests) == 2  # the request was not sent again
    run(main)


@pytest.mark.parametrize("version, extra", [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")],
                         ids=["connection-close", "http-1.0"])
def test_an_answer_that_ends_the_connection_is_not_reused(run, version, extra):
    async def main():
        async def answer_and_wait(conn):
            if await conn.request() is not None:
                body = orjson.dumps({"conn": conn.number})
                conn.write(f"{version} 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
                           .encode() + body)
                await conn.until_eof()  # the upstream does not close it itself

        async with pool(answer_and_wait) as (up, transport):
            first = await call(transport, up.url())
            assert (b"connection", b"close") not in first.headers
            await within(up.conns[0].eof.wait(), 2)  # the client closed it
            second = await call(transport, up.url())
            assert orjson.loads(second.body)["conn"] == 2 and up.accepted == 2
    run(main)


# -- bodies --

def test_a_chunked_json_body_is_dechunked_and_the_connection_kept(run):
    async def main():
        async def chunked_json(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                await conn.writer.drain()
                await asyncio.sleep(0.01)
                conn.write(chunked(b'{"a":', b'"x' * 3000 + b'"', b"}"))

        async with pool(chunked_json) as (up, transport):
            for _ in range(2):
                response = await call(transport, up.url())
                assert response.body == b'{"a":' + b'"x' * 3000 + b'"}'
                assert b"transfer-encoding" not in dict(response.headers)
            assert up.accepted == 1
    run(main)


def test_a_chunked_sse_stream_is_dechunked(run):
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(20)]

    async def main():
        async def chunked_sse(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                           b"transfer-encoding: chunked\r\n\r\n")
                for event in events:
                    # each event split over two chunks, chunk-extension on one
                    conn.write(b"%x;ext=1\r\n%s\r\n" % (5, event[:5]) + b"%x\r\n%s\r\n" % (len(event) - 5, event[5:]))
                    await conn.writer.drain()
                    await asyncio.sleep(0.002)
                conn.write(b"0\r\n\r\n")

        async with pool(chunked_sse) as (up, transport):
            for _ in range(2):
                response = await call(transport, up.url())
                assert response.status == 200 and response.stream is not None
                assert await within(read_stream(response)) == b"".join(events)
            assert up.accepted == 1  # a stream read to its end leaves its connection to the pool
    run(main)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_body_delimited_by_the_connection_close_is_read_whole(run, content_type):
    body = b"[" + b",".join(b'"%d"' % i for i in range(3000)) + b"]"

    async def main():
        async def until_close(conn):
            if await conn.request() is not None:
                conn.write(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\r\n".encode())
                for i in range(0, len(body), 1000):
                    conn.write(body[i:i + 1000])
                    await conn.writer.drain()
                    await asyncio.sleep(0.002)
                conn.close()

        async with pool(until_close) as (up, transport):
            response = await call(transport, up.url())
            data = response.body if response.stream is None else await within(read_stream(response))
            assert (response.stream is None) == (content_type == "application/json")
            assert data == body
            again = await call(transport, up.url())  # a new connection
            assert up.accepted == 2
            data = again.body if again.stream is None else await within(read_stream(again))
            assert data == body
    run(main)


def test_a_204_has_an_empty_body_and_keeps_the_connection(run):
    async def main():
        async def no_content(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 204 No Content\r\nx-a: b\r\n\r\n")

        async with pool(no_content) as (up, transport):
            for _ in range(2):
                response = await call(transport, up.url())
                assert (response.status, response.body, response.headers) == (204, b"", [(b"x-a", b"b")])
            assert up.accepted == 1
    run(main)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("informational", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nX-Hint: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
], ids=["100", "103", "100+103"])
def test_informational_answers_before_the_real_one_are_skipped(run, informational, stream):
    async def main():
        async def hints_first(conn):
            while await conn.request() is not None:
                conn.write(informational)
                await conn.writer.drain()
                await asyncio.sleep(0.01)  # the final answer in another segment
                if stream:
                    conn.write(b"HTTP/1.1 201 Created\r\ncontent-type: text/event-stream\r\nx-final: yes\r\n"
                               b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: 1\n\n", b"data: [DONE]\n\n"))
                else:
                    conn.write(answer(b'{"final":true}', status="201 Created", extra="x-final: yes\r\n"))

        async with pool(hints_first) as (up, transport):
            for _ in range(2):
                response = await call(transport, up.url())
                assert response.status == 201
                names = [name for name, _ in response.headers]
                assert b"link" not in names and b"x-hint" not in names and (b"x-final", b"yes") in response.headers
                if stream:
                    assert await within(read_stream(response)) == b"data: 1\n\ndata: [DONE]\n\n"
                else:
                    assert response.body == b'{"final":true}'
            assert up.accepted == 1
    run(main)


def test_an_answer_fed_one_byte_at_a_time_is_parsed(run):
    async def main():
        async def byte_by_byte(conn):
            conn.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while await conn.request() is not None:
                data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long-Header-Name: some value\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b'{"a":', b"1}"))
                for i in range(len(data)):
                    conn.write(data[i:i + 1])
                    await conn.writer.drain()
                    await asyncio.sleep(0.001)

        async with pool(byte_by_byte) as (up, transport):
            response = await call(transport, up.url())
            assert response.body == b'{"a":1}'
            assert response.headers == [(b"content-type", b"application/json"), (b"x-long-header-name", b"some value")]
            assert orjson.loads((await call(transport, up.url())).body) == {"a": 1}
            assert up.accepted == 1
    run(main)


# -- the pool's limit --

def test_a_call_past_max_connections_waits_for_a_free_one(run):
    async def main():
        go = asyncio.Event()

        async def held(conn):
            while await conn.request() is not None:
                await go.wait()
                conn.write(answer(orjson.dumps({"conn": conn.number})))

        async with pool(held, max_connections=2) as (up, transport):
            calls = [asyncio.create_task(call(transport, up.url())) for _ in range(3)]
            await asyncio.sleep(0.2)
            assert up.accepted == 2 and len(up.requests) == 2  # the third waits for a connection
            assert not any(c.done() for c in calls)
            go.set()
            responses = await within(asyncio.gather(*calls))
            assert all(r.status == 200 for r in responses)
            assert up.max_open <= 2 and up.accepted == 2 and len(up.requests) == 3
    run(main)


def test_a_waiting_call_gets_the_slot_of_a_connection_that_broke(run):
    async def main():
        go = asyncio.Event()

        async def first_breaks(conn):
            while await conn.request() is not None:
                await go.wait()
                if conn.number == 1:
                    conn.close()
                    return
                conn.write(answer())

        async with pool(first_breaks, max_connections=1) as (up, transport):
            first = asyncio.create_task(call(transport, up.url()))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(call(transport, up.url()))
            await asyncio.sleep(0.1)
            assert up.accepted == 1
            go.set()
            with pytest.raises(UpstreamUnreachable):
                await first
            assert (await within(second)).status == 200
            assert up.accepted == 2 and up.max_open == 1
    run(main)


def test_a_call_cancelled_while_it_connects_ends_and_leaves_no_connection_open(run):
    # Cancelled (a first-byte timer, a client gone) at every loop turn of its
    # connect to a node that never answers: each call ends at once, and every
    # connection it made is closed. On 3.11, asyncio.wait_for around the connect
    # dropped a cancel that came as the connect finished: the call then waited
    # on the hung node for ever.
    async def main():
        async def hangs(conn):
            await conn.until_eof()

        async with pool(hangs) as (up, transport):
            for turns in range(12):
                task = asyncio.create_task(transport.post(up.url(), b"{}", {}))
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=1)
                assert done and task.cancelled(), f"cancelled after {turns} loop turns, the call went on"
            assert transport._count == 0
            await within(asyncio.gather(*(c.eof.wait() for c in up.conns)), 2)  # the node saw each leave
    run(main)


def test_a_waiter_cancelled_as_it_is_woken_passes_the_free_connection_on(run):
    async def main():
        go = asyncio.Event()

        async def held(conn):
            while await conn.request() is not None:
                await go.wait()
                conn.write(answer())

        async with pool(held, max_connections=1, keepalive_s=30) as (up, transport):
            async def first():
                response = await transport.post(up.url(), b"{}", {})
                second.cancel()  # in the step that woke it: its wake-up is already handed over
                return response

            first_call = asyncio.create_task(first())
            await asyncio.sleep(0.05)
            second = asyncio.create_task(transport.post(up.url(), b"{}", {}))
            await asyncio.sleep(0.02)
            third = asyncio.create_task(transport.post(up.url(), b"{}", {}))
            await asyncio.sleep(0.05)
            go.set()
            assert (await within(first_call, 2)).status == 200
            with pytest.raises(asyncio.CancelledError):
                await second
            assert (await within(third, 2)).status == 200  # the idle connection, not 30 s later
    run(main)


def test_an_idle_connection_handed_to_a_waiting_call_is_retried_if_stale(run):
    async def main():
        go = asyncio.Event()

        async def stale_after_first(conn):
            if await conn.request() is not None:
                await go.wait()
                conn.write(answer())
                if await conn.request() is not None:
                    conn.close()  # closed as the waiting call reused it

        async def script(conn):
            if conn.number == 1:
                await stale_after_first(conn)
            else:
                await keep_answering(conn)

        async with pool(script, max_connections=1, keepalive_s=30) as (up, transport):
            first = asyncio.create_task(call(transport, up.url()))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(call(transport, up.url()))
            await asyncio.sleep(0.05)
            go.set()
            assert (await first).status == 200
            assert orjson.loads((await within(second)).body)["conn"] == 2
    run(main)


def test_a_full_pool_closes_an_idle_connection_to_another_host_to_make_room(run):
    async def main():
        async with Upstream(keep_answering) as a, Upstream(keep_answering) as b:
            transport = HttptoolsTransport(max_connections=1, keepalive_s=30)
            try:
                await call(transport, a.url())
                assert (await within(transport.post(b.url(), b"{}", {}), 1)).status == 200  # no wait for a's to expire
                await within(a.conns[0].eof.wait(), 2)  # a's idle connection made room
                assert (await call(transport, a.url())).status == 200
                assert a.accepted == 2 and b.accepted == 1
            finally:
                await transport.aclose()
    run(main)


def test_many_concurrent_calls_of_every_kind_share_a_small_pool(run):
    """JSON answers, streams read whole, streams closed early, broken answers and
    cancelled calls, 60 at once through a pool of 3: each call ends, and the
    pool serves calls afterwards. (The server sees a closed connection go later
    than the client counts it gone, so its count of open ones is no bound here.)"""
    async def main():
        async def mixed(conn):
            while (request := await conn.request()) is not None:
                kind, n = request["body"].decode().split(":")
                await asyncio.sleep(int(n) % 5 * 0.005)
                if kind == "json":
                    conn.write(answer(request["body"]))
                elif kind in ("sse", "early"):
                    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for i in range(5):
                        conn.write(chunked(b"data: %d\n\n" % i)[:-5])  # one chunk, no last-chunk yet
                        await asyncio.sleep(0.002)
                    conn.write(b"0\r\n\r\n")
                elif kind == "broken":
                    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{")
                    await conn.writer.drain()
                    return
                elif kind == "garbage":
                    conn.write(b"NOT HTTP\r\n\r\n")
                    await conn.writer.drain()
                    return
                elif kind == "slow":
                    await asyncio.sleep(0.3)
                    conn.write(answer(request["body"]))

        async def one(transport, url, kind, n):
            body = b"%s:%d" % (kind.encode(), n)
            if kind in ("broken", "garbage"):
                with pytest.raises(UpstreamUnreachable):
                    await transport.post(url, body, {})
                return
            if kind == "slow":
                task = asyncio.create_task(transport.post(url, body, {}))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return
            response = await transport.post(url, body, {})
            if kind == "json":
                assert response.body == body
            elif kind == "sse":
                assert await read_stream(response) == b"".join(b"data: %d\n\n" % i for i in range(5))
            else:
                async for _ in response.stream:
                    break
                await response.aclose()

        async with pool(mixed, max_connections=3) as (up, transport):
            kinds = ["json", "sse", "early", "json", "broken", "json", "slow", "sse", "garbage"]
            await within(asyncio.gather(*(one(transport, up.url(), kinds[n % len(kinds)], n) for n in range(60))), 15)
            assert (await call(transport, up.url(), b"json:1")).body == b"json:1"
    run(main, timeout=30)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_stream_cut_before_its_end_raises_and_is_not_taken_for_a_clean_end(run, framing):
    async def main():
        async def cut(conn):
            if await conn.request() is not None:
                if framing == "chunked":
                    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                               + b"b\r\ndata: one\n\n\r\n")
                else:
                    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100\r\n\r\n"
                               + b"data: one\n\n")
                await conn.writer.drain()
                await asyncio.sleep(0.05)
                conn.close()
            return

        async with pool(cut, max_connections=1) as (up, transport):
            response = await call(transport, up.url())
            got = []
            with pytest.raises(ConnectionError):
                async for chunk in response.stream:
                    got.append(chunk)
            await response.aclose()
            assert got == [b"data: one\n\n"]
            again = await call(transport, up.url())  # the pool's one slot is free again
            assert again.status == 200 and up.accepted == 2
            await again.aclose()
    run(main)


# -- the keep-alive sweep --

def test_idle_connections_are_closed_after_keepalive_s(run):
    async def main():
        async with Upstream(keep_answering) as a, Upstream(keep_answering) as b:
            transport = HttptoolsTransport(keepalive_s=0.2)
            try:
                start = time.monotonic()
                await call(transport, a.url())
                await asyncio.sleep(0.1)
                await call(transport, b.url())  # idle 0.1 s later: left for the next sweep
                await within(a.conns[0].eof.wait(), 2)
                await within(b.conns[0].eof.wait(), 2)
                assert a.conns[0].eof_at - start >= 0.15
                assert b.conns[0].eof_at - start >= 0.25
                # a connection kept busy is not swept: the next call opens a new one
                assert (await call(transport, a.url())).status == 200 and a.accepted == 2
            finally:
                await transport.aclose()
    run(main)


# -- read timeouts --

def test_a_stream_whose_upstream_goes_quiet_is_cut_after_timeout_s(run):
    async def main():
        async def quiet_after_head(conn):
            if await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                           + b"b\r\ndata: one\n\n\r\n")
                await conn.until_eof()

        async with pool(quiet_after_head, timeout_s=0.3) as (up, transport):
            response = await call(transport, up.url())
            start = time.monotonic()
            got = []
            with pytest.raises(ConnectionError) as raised:
                async for chunk in response.stream:
                    got.append(chunk)
            elapsed = time.monotonic() - start
            await response.aclose()
            assert got == [b"data: one\n\n"] and isinstance(raised.value.__cause__, TimeoutError)
            assert 0.2 <= elapsed < 2.0, elapsed
            await within(up.conns[0].eof.wait(), 2)  # the upstream sees the connection go
    run(main)


def test_a_json_body_whose_upstream_goes_quiet_is_cut_after_timeout_s(run):
    async def main():
        async def quiet_in_body(conn):
            if await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\"")
                await conn.until_eof()

        async with pool(quiet_in_body, timeout_s=0.3) as (up, transport):
            start = time.monotonic()
            with pytest.raises(UpstreamUnreachable) as raised:
                await call(transport, up.url())
            assert raised.value.during == "body" and isinstance(raised.value.cause, TimeoutError)
            assert 0.2 <= time.monotonic() - start < 2.0
    run(main)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_upstream_that_trickles_faster_than_timeout_s_is_not_cut(run, stream):
    pieces = [b"data: %d\n\n" % i for i in range(12)]

    async def main():
        async def trickle(conn):
            while await conn.request() is not None:
                kind = "text/event-stream" if stream else "application/json"
                conn.write(f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
                for piece in pieces:  # 1.2 s in all, a byte every 0.1 s
                    await asyncio.sleep(0.1)
                    conn.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.write(b"0\r\n\r\n")

        async with pool(trickle, timeout_s=0.3) as (up, transport):
            response = await asyncio.wait_for(transport.post(up.url(), b"{}", {}), 5)
            data = response.body if not stream else await within(read_stream(response))
            assert data == b"".join(pieces)
    run(main)


# -- SSE backpressure --

EVENT = b"data: %08d " + b"x" * 1000 + b"\n\n"
TOTAL_EVENTS = 32 * 1024  # ~33 MB: more than the kernel's socket buffers on loopback


def sse_flood_script(state: dict):
    async def flood(conn):
        if await conn.request() is None:
            return
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(TOTAL_EVENTS):
            event = EVENT % i
            conn.write(b"%x\r\n%s\r\n" % (len(event), event))
            state["written"] = i + 1
            if i % 64 == 0:
                await conn.writer.drain()  # blocks once the client stops reading
        conn.write(b"0\r\n\r\n")
        await conn.writer.drain()
        state["done"] = True
        await conn.until_eof()
    return flood


async def check_in_order(response) -> None:
    data = await within(read_stream(response), 15)
    assert len(data) == TOTAL_EVENTS * len(EVENT % 0)
    expected = 0
    for event in data.split(b"\n\n")[:-1]:
        assert event[6:14] == b"%08d" % expected
        expected += 1
    assert expected == TOTAL_EVENTS


def test_a_stream_nobody_reads_pauses_the_upstream_and_resumes_when_read(run):
    async def main():
        state = {"written": 0, "done": False}
        async with pool(sse_flood_script(state)) as (up, transport):
            response = await call(transport, up.url())
            assert response.stream is not None
            await asyncio.sleep(0.5)  # nobody reads
            stalled = state["written"]
            await asyncio.sleep(0.2)
            assert not state["done"] and state["written"] == stalled < TOTAL_EVENTS  # the upstream's writes block
            await check_in_order(response)
            assert state["done"]
    run(main, timeout=40)


def test_a_stream_paused_for_its_slow_reader_is_not_cut_by_the_read_timeout(run):
    async def main():
        state = {"written": 0, "done": False}
        async with pool(sse_flood_script(state), timeout_s=0.3) as (up, transport):
            response = await call(transport, up.url())
            await asyncio.sleep(0.8)  # the reader is slow; the upstream is not quiet, it is held back
            await check_in_order(response)
    run(main, timeout=40)


# -- headers --

def test_a_header_value_with_cr_or_lf_raises_and_sends_nothing(run):
    async def main():
        async with Upstream(keep_answering) as up:
            transport = HttptoolsTransport()
            try:
                for value in ("a\r\nx-injected: 1", "a\nb", "a\rb"):
                    with pytest.raises(ValueError):
                        await call(transport, up.url(), headers={"x-ok": "1", "x-bad": value})
                await asyncio.sleep(0.05)
                assert up.accepted == 0
                await call(transport, up.url())  # a reused connection: nothing half-written on it before
                with pytest.raises(ValueError):
                    await call(transport, up.url(), headers={"x-bad": "v\r\n\r\nPOST / HTTP/1.1"})
                await call(transport, up.url())
                assert len(up.requests) == 2 and "x-bad" not in up.requests[-1]["headers"]
            finally:
                await transport.aclose()
            bad_default = HttptoolsTransport(default_headers={"authorization": "Bearer k\r\nx-injected: 1"})
            try:
                with pytest.raises(ValueError):
                    await call(bad_default, up.url())
                await asyncio.sleep(0.05)
                assert up.accepted == 1
            finally:
                await bad_default.aclose()
    run(main)


def test_a_header_name_with_cr_or_lf_raises_and_sends_nothing(run):
    async def main():
        async with pool(keep_answering) as (up, transport):
            with pytest.raises(ValueError):
                await call(transport, up.url(), headers={"x-a: 1\r\nx-injected": "1"})
            await asyncio.sleep(0.05)
            assert up.accepted == 0
    run(main)


def test_response_headers_are_lower_cased_without_hop_by_hop_ones(run):
    async def main():
        async def many_headers(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: Application/JSON\r\nConnection: keep-alive\r\n"
                           b"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
                           b"Server: up\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nX-Request-Id: theirs\r\n"
                           b"Proxy-Authenticate: Basic\r\nTE: trailers\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                           b"X-RateLimit-Remaining: 9\r\n\r\n" + chunked(b"{}"))

        async with pool(many_headers) as (up, transport):
            response = await call(transport, up.url())
            assert response.headers == [(b"content-type", b"Application/JSON"), (b"set-cookie", b"a=1"),
                                        (b"set-cookie", b"b=2"), (b"x-ratelimit-remaining", b"9")]
    run(main)


def test_trailer_fields_of_a_chunked_body_are_not_response_headers(run):
    async def main():
        async def with_trailer(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                           b"trailer: x-checksum\r\n\r\n" + chunked(b"{}", trailer=b"x-checksum: abc\r\n"))

        async with pool(with_trailer) as (up, transport):
            response = await call(transport, up.url())
            assert response.body == b"{}"
            assert response.headers == [(b"content-type", b"application/json")]
    run(main)


# -- garbage and desync --

@pytest.mark.parametrize("garbage", [b"HELLO THERE\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00",
                                     b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n"], ids=["text", "tls", "bad-length"])
def test_an_upstream_answering_garbage_is_unreachable_and_the_pool_recovers(run, garbage):
    async def main():
        async def garbage_then_good(conn):
            while await conn.request() is not None:
                if conn.server.accepted <= 3:
                    conn.write(garbage)
                    await conn.until_eof()
                    return
                conn.write(answer())

        async with pool(garbage_then_good, max_connections=1) as (up, transport):
            for _ in range(3):
                with pytest.raises(UpstreamUnreachable):
                    await call(transport, up.url())
            # the broken connections left the pool (of one): a later call gets a connection
            assert (await call(transport, up.url())).status == 200
            assert (await call(transport, up.url())).status == 200
            assert up.accepted == 4
            for conn in up.conns[:3]:
                await within(conn.eof.wait(), 2)
    run(main)


def test_an_unsolicited_answer_on_an_idle_connection_is_not_the_next_calls_answer(run):
    async def main():
        async def answers_twice(conn):
            while (request := await conn.request()) is not None:
                conn.write(answer(orjson.dumps({"body": orjson.loads(request["body"])})))
                if len(conn.server.requests) == 1:
                    await asyncio.sleep(0.02)
                    conn.write(answer(b'{"stale":true}'))  # unasked for

        async with pool(answers_twice) as (up, transport):
            await call(transport, up.url(), b'{"n":1}')
            await asyncio.sleep(0.1)
            for n in (2, 3):
                response = await call(transport, up.url(), b'{"n":%d}' % n)
                assert orjson.loads(response.body).get("body") == {"n": n}
    run(main)


def test_bytes_after_a_complete_answer_do_not_join_it(run):
    async def main():
        async def extra_after(conn):
            while (request := await conn.request()) is not None:
                conn.write(answer(request["body"]) + answer(b'{"stale":true}', extra="x-stale: 1\r\n"))

        async with pool(extra_after) as (up, transport):
            for n in (1, 2, 3):
                response = await call(transport, up.url(), b'{"n":%d}' % n)
                assert response.body == b'{"n":%d}' % n
                assert b"x-stale" not in dict(response.headers)
    run(main)


# -- aclose --

def test_aclose_closes_idle_connections(run):
    async def main():
        async with Upstream(keep_answering) as a, Upstream(keep_answering) as b:
            transport = HttptoolsTransport()
            await call(transport, a.url())
            await call(transport, b.url())
            await asyncio.sleep(0.05)
            assert not a.conns[0].eof.is_set()
            await transport.aclose()
            await within(a.conns[0].eof.wait(), 2)
            await within(b.conns[0].eof.wait(), 2)
    run(main)


def test_a_stream_that_ends_after_aclose_does_not_go_back_to_the_pool(run):
    async def main():
        go = asyncio.Event()

        async def slow_stream(conn):
            while await conn.request() is not None:
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                await go.wait()
                conn.write(chunked(b"data: 1\n\n"))

        async with Upstream(slow_stream) as up:
            transport = HttptoolsTransport()
            response = await call(transport, up.url())
            await transport.aclose()
            go.set()
            assert await within(read_stream(response)) == b"data: 1\n\n"
            await within(up.conns[0].eof.wait(), 2)
    run(main)


# -- HTTP_PROXY from the environment --

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def proxy_script(conn):
    """A forward proxy that answers itself (and names the request line it got)."""
    while (request := await conn.request()) is not None:
        conn.write(answer(orjson.dumps({"via": "proxy", "line": request["line"]})))


def test_trust_env_sends_calls_through_the_environments_http_proxy(run, clean_proxy_env):
    async def main():
        async with Upstream(keep_answering) as up, Upstream(proxy_script) as proxy:
            clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
            transport = HttptoolsTransport(trust_env=True)
            try:
                response = await call(transport, up.url("/v1/chat/completions"))
                assert orjson.loads(response.body) == {
                    "via": "proxy", "line": f"POST http://127.0.0.1:{up.port}/v1/chat/completions HTTP/1.1"}
                assert up.accepted == 0 and proxy.accepted == 1
            finally:
                await transport.aclose()

            untrusting = HttptoolsTransport(trust_env=False)  # the default: the environment is ignored
            try:
                assert orjson.loads((await call(untrusting, up.url())).body)["conn"] == 1
                assert up.accepted == 1 and proxy.accepted == 1
            finally:
                await untrusting.aclose()

            clean_proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
            direct = HttptoolsTransport(trust_env=True)
            try:
                assert orjson.loads((await call(direct, up.url())).body)["path"] == "/v1/chat/completions"
                assert up.accepted == 2 and proxy.accepted == 1
            finally:
                await direct.aclose()
    run(main)
