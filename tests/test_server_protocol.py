"""``comox/server_protocol.py`` and ``comox/server_cycle.py``: Comox's HTTP/1.1
protocol for uvicorn, whose writes go out at the end of the event loop's turn,
a response's head with its body. The writes are counted on the transport under
the protocol; answers of every shape (a body, a stream whose first chunk comes
late, HEAD, 204, 100-continue, keep-alive, pipelining, a large body, requests it
cannot parse) are checked over real sockets against plain uvicorn's httptools
protocol on 127.0.0.1, byte for byte, and so are the scopes the app is given.
The fast response head (:class:`ComoxResponseCycle`) is checked byte for byte
and error for error against uvicorn's cycle in process."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import httpx
import pytest

from comox.disconnects import watch_current
from comox.server_protocol import SERVER_OPTIONS, BatchedTransport
from comox.testing import ServerThread

BIG = b"x" * (200 * 1024)


class Recorder(asyncio.Transport):
    """The socket's side of a transport: what was written, in how many writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def held(scenario) -> list[bytes]:
    async def main() -> list[bytes]:
        recorder = Recorder()
        await scenario(BatchedTransport(recorder, asyncio.get_running_loop()))
        return recorder.writes
    return asyncio.run(main())


def test_a_turns_writes_go_out_at_its_end_in_one_write():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"hi")
        assert t.transport.writes == [] and t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        await asyncio.sleep(0)
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        t.write(b"2\r\nhi\r\n")
        await asyncio.sleep(0)
        t.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
                              b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n", b"0\r\n\r\n"]


def test_every_connections_writes_of_a_turn_go_out_together_at_its_end():
    async def main():
        loop = asyncio.get_running_loop()
        one, other = Recorder(), Recorder()
        a, b = BatchedTransport(one, loop), BatchedTransport(other, loop)
        a.write(b"a1")
        b.write(b"b1")
        a.write(b"a2")
        assert one.writes == other.writes == []
        await asyncio.sleep(0)
        return one.writes, other.writes
    assert asyncio.run(main()) == ([b"a1a2"], [b"b1"])


def test_an_empty_write_holds_nothing():
    async def scenario(t):
        t.write(b"")
        assert t.held is None and t.batch.held == []
        await asyncio.sleep(0)
    assert held(scenario) == []


def test_a_close_sends_what_is_held_first():
    async def scenario(t):
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()
        assert t.transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
        await asyncio.sleep(0)  # the turn's end finds nothing more to send
    assert held(scenario) == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_any_bytes_like_object_is_held_as_it_was_when_written():
    async def scenario(t):
        buffer = bytearray(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(buffer)
        buffer[:] = b"changed"  # after the write: not what goes out
        t.write(memoryview(b"abc"))
        t.write(bytearray(b"de"))
        await asyncio.sleep(0)
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\n\r\nabcde"]


def test_large_bytes_go_out_at_once_after_what_was_held_not_copied_into_it():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(BIG)
        t.write(BIG)
        t.write(b"tail")
        await asyncio.sleep(0)
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\n\r\n", BIG, BIG, b"tail"]


def test_an_abort_drops_what_is_held_and_a_closed_transport_is_not_written():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.abort()
        await asyncio.sleep(0)
        t.transport.closed = False
        t.write(b"late")
        t.transport.closed = True  # closed by the peer before the turn ended
        await asyncio.sleep(0)
    assert held(scenario) == []



def test_writelines_and_write_eof_keep_the_order_of_what_is_held():
    class EofRecorder(Recorder):
        def write_eof(self) -> None:
            self.writes.append(b"<eof>")

    async def main() -> list[bytes]:
        recorder = EofRecorder()
        t = BatchedTransport(recorder, asyncio.get_running_loop())
        t.write(b"head ")
        t.writelines([b"a", b"b"])
        assert recorder.writes == []  # held with the rest, not written ahead of it
        t.write_eof()
        return recorder.writes
    assert asyncio.run(main()) == [b"head ab", b"<eof>"]


def test_the_rest_of_the_transport_interface_reaches_the_socket_transport():
    # Written out, not through __getattr__ (which slows every attribute read):
    # each public method of asyncio.Transport must still be there.
    calls: list[tuple[str, tuple[object, ...]]] = []

    class Everything(Recorder):
        pass

    for name in ("can_write_eof", "get_protocol", "set_protocol", "is_reading", "pause_reading", "resume_reading",
                 "get_write_buffer_limits", "set_write_buffer_limits"):
        setattr(Everything, name, lambda self, *args, _name=name: calls.append((_name, args)) or _name)
    loop = asyncio.new_event_loop()
    try:
        t = BatchedTransport(Everything(), loop)
        missing = [name for name in dir(asyncio.Transport) if not name.startswith("_") and name not in vars(BatchedTransport)]
        assert missing == [] and not hasattr(BatchedTransport, "__getattr__")
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        assert [t.can_write_eof(), t.get_protocol(), t.is_reading(), t.get_write_buffer_limits()] == \
            ["can_write_eof", "get_protocol", "is_reading", "get_write_buffer_limits"]
        t.set_protocol("p")  # type: ignore[arg-type]
        t.pause_reading()
        t.resume_reading()
        t.set_write_buffer_limits(10, 5)
    finally:
        loop.close()
    assert calls[-4:] == [("set_protocol", ("p",)), ("pause_reading", ()), ("resume_reading", ()),
                          ("set_write_buffer_limits", (10, 5))]


# -- over real sockets --

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/late":  # a stream whose first chunk takes a while: its head must not wait for it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(BIG))]})
        await send({"type": "http.response.body", "body": BIG})
    else:
        answer = b"echo:" + body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def server():  # no access log, as under comox serve (uvicorn's access log turns the fast head off)
    with ServerThread(app, lifespan="off", access_log=False, **SERVER_OPTIONS) as running:
        yield running


def test_answers_of_every_shape_arrive_whole_on_one_kept_alive_connection(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(3):
            response = client.post("/echo", content=b"n=%d" % n)
            assert response.status_code == 200 and response.content == b"echo:n=%d" % n
            assert "server" not in response.headers  # SERVER_OPTIONS: no server: uvicorn
        assert client.get("/empty").status_code == 204
        head = client.head("/echo")
        assert head.status_code == 200 and head.content == b""
        assert client.get("/big").content == BIG
        assert client.get("/echo").content == b"echo:"


def test_a_streams_head_arrives_before_its_late_first_chunk(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.monotonic()
        with client.stream("GET", "/late") as response:
            headed = time.monotonic() - started
            assert response.status_code == 200
            assert b"".join(response.iter_bytes()) == b"data: 1\n\n"
        assert headed < 0.4 <= time.monotonic() - started


def test_expect_100_continue_is_answered_before_the_body_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"ok")
        answer = b""
        while not answer.endswith(b"echo:ok"):
            chunk = sock.recv(1024)
            assert chunk
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


# -- the fast response head: the same bytes and state as uvicorn's --

COMOX_HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"3f2a9c1e5b7d4e8f"),
                 (b"x-comox-route", b"chat/gpt-4o-mini"), (b"x-ratelimit-limit-requests", b"600"),
                 (b"x-ratelimit-remaining-requests", b"599"), (b"x-ratelimit-reset-requests", b"100ms"),
                 (b"x-ratelimit-limit-tokens", b"150000"), (b"x-ratelimit-remaining-tokens", b"149800"),
                 (b"x-ratelimit-reset-tokens", b"80ms"), (b"x-comox-cache", b"miss"),
                 (b"x-comox-overhead-ms", b"0.412"), (b"content-length", b"11")]
SHAPES = {  # path: (status, headers, body chunks)
    "/comox": (200, COMOX_HEADERS, [b'{"ok":true}']),
    "/stream": (200, [(b"content-type", b"text/event-stream")], [b"data: 1\n\n", b"data: 2\n\n", b""]),
    "/chunked": (200, ((b"transfer-encoding", b"Chunked"),), [b"abc", b""]),  # a tuple, the app's own framing
    "/204": (204, [], [b""]),
    "/304": (304, [(b"etag", b'"x"')], [b""]),
    "/none": (200, None, [b"x", b""]),
    "/upper": (200, [(b"Content-Type", b"text/plain"), (b"X-Comox-Route", b"r"), (b"Content-Length", b"2")], [b"hi"]),
    "/close": (200, [(b"content-length", b"2"), (b"connection", b"keep-alive, Close")], [b"hi"]),
    "/lengths": (200, [(b"content-length", b"2"), (b"content-length", b"9")], [b"hi"]),  # the first one counts
    "/digits": (200, [(b"123", b"v"), (b"content-length", b"0")], [b""]),
    "/bad-name": (200, [(b"x bad", b"1")], [b""]),
    "/bad-value": (200, [(b"x-bad", b"a\nb")], [b""]),
}
errors: dict[tuple[int, str], str] = {}


async def shapes_app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/cycle":  # the cycle running the app: its run_asgi is the task's coroutine
        name = type(asyncio.current_task().get_coro().cr_frame.f_locals["self"]).__name__.encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(name))]})
        await send({"type": "http.response.body", "body": name})
        return
    if path == "/raise":
        raise RuntimeError("the app failed")  # uvicorn's 500, sent through the cycle's send
    if path in ("/echo", "/scope"):  # the request as the app is given it
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message["body"]
            if not message["more_body"]:
                break
        if path == "/scope":
            body = repr({name: scope.get(name) for name in ("method", "http_version", "path", "raw_path",
                                                             "query_string", "root_path", "scheme", "headers")}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    status, headers, chunks = SHAPES[path]
    start = {"type": "http.response.start", "status": status}
    if headers is not None:
        start["headers"] = headers
    try:
        await send(start)
    except Exception as exc:
        errors[scope["server"][1], path] = f"{type(exc).__name__}: {exc}"
        raise
    for n, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": n < len(chunks) - 1})


@pytest.fixture(scope="module")
def servers():
    """Comox's protocol and plain uvicorn httptools, the same app and options."""
    with ServerThread(shapes_app, lifespan="off", access_log=False, **SERVER_OPTIONS) as comox, \
            ServerThread(shapes_app, lifespan="off", access_log=False, http="httptools", server_header=False) as plain:
        yield comox, plain


def complete(data: bytes, head_request: bool, requests: int) -> bool:
    """Whether ``data`` holds ``requests`` whole answers (an answer framed by the connection's close never is)."""
    for _ in range(requests):
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, data = data[:end].lower(), data[end + 4:]
        while head.startswith(b"http/1.1 1"):  # an interim answer (100 Continue): the real one follows
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, data = data[:end].lower(), data[end + 4:]
        if head_request or head.startswith((b"http/1.1 204", b"http/1.1 304")):
            continue
        if length := re.search(rb"\r\ncontent-length: *(\d+)", head):
            if len(data) < int(length[1]):
                return False
            data = data[int(length[1]):]
        elif b"transfer-encoding: chunked" in head and b"0\r\n\r\n" in data:
            data = data[data.index(b"0\r\n\r\n") + 5:]
        else:
            return False
    return True


def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """What a server answers ``request`` (its date masked), and whether it then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while not complete(data, request.startswith(b"HEAD"), request.count(b" HTTP/1.")):
            chunk = sock.recv(65536)
            if not chunk:
                return re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", data), True
            data += chunk
        sock.settimeout(0.1)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", data), closed


def request(path: str, method: str = "GET", version: str = "1.1", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nhost: x\r\n{extra}\r\n".encode()


REQUESTS = [request(path) for path in SHAPES] + [
    request("/comox", "HEAD"), request("/stream", "HEAD"), request("/raise"),
    request("/comox", version="1.0"), request("/stream", version="1.0"), request("/none", extra="connection: close\r\n"),
    request("/comox") + request("/stream") + request("/upper", extra="connection: close\r\n"),  # pipelined
    request("/scope?q=1&r=%20"), request("/sc%6Fpe"), request("http://example.com/scope?q=1"),
    request("/scope", "DELETE", "1.0"), request("/scope#part"),
    request("/scope", extra="X-Padded: value \t\r\n"),  # a header value as uvicorn trims it
    request("/scope", extra="UPPER-Case: V \r\nX-Forwarded-For: 10.1.2.3\r\nEXPECT: 100-Continue\r\nContent-Length: 0\r\n"),
    request("/scope", "POST", extra="Transfer-Encoding: chunked\r\n")  # trailers join the headers, as uvicorn has them
    + b"3\r\nabc\r\n0\r\nX-Trailer: t \r\nX-Also: U\r\nX-Last: v\r\n\r\n",
    request("/echo", "POST", extra="content-length: 5\r\n") + b"hello",
    request("/echo", "POST", extra="content-length: 300000\r\n") + b"y" * 300_000,  # past the high-water mark
    request("/echo", "POST", extra="transfer-encoding: chunked\r\n") + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    request("/echo", "POST", extra="content-length: 1\r\n") + b"x" + request("/scope"),  # pipelined, a body first
    request("/scope", extra="content-length: x\r\n"), b"NOT HTTP\r\n\r\n",  # uvicorn's 400
]


@pytest.mark.parametrize("raw", REQUESTS, ids=[r.split(b"\r\n")[0].decode() + f" x{r.count(b'HTTP/')}" for r in REQUESTS])
def test_every_answer_is_on_the_wire_as_plain_uvicorn_sends_it(servers, raw):
    comox, plain = servers
    ours, theirs = exchange(comox.port, raw), exchange(plain.port, raw)
    assert ours == theirs
    assert b"\r\ndate: -" in ours[0] or ours[0] == b""  # the date default header goes through the fast head too


def test_a_header_uvicorn_refuses_fails_the_app_and_the_connection_as_under_uvicorn(servers):
    comox, plain = servers
    for path in ("/bad-name", "/bad-value"):
        # the start raised after uvicorn marked the response started: no 500, a closed connection
        assert exchange(comox.port, request(path)) == exchange(plain.port, request(path)) == (b"", True)
        assert errors.pop((comox.port, path)) == errors.pop((plain.port, path))
    assert errors == {}


def test_the_app_sends_through_the_comox_cycle(servers):
    comox, plain = servers
    assert exchange(comox.port, request("/cycle"))[0].endswith(b"\r\n\r\nComoxResponseCycle")
    assert exchange(plain.port, request("/cycle"))[0].endswith(b"\r\n\r\nRequestResponseCycle")


# -- proxy headers (ComoxServeProtocol) -----------------------------------------


async def whoami(scope, receive, send):
    client = scope.get("client")
    body = f'{{"client": "{client[0] if client else ""}", "scheme": "{scope["scheme"]}"}}'.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("headers", [
    {},
    {"x-forwarded-for": "203.0.113.7"},
    {"x-forwarded-proto": "https"},
    {"x-forwarded-for": "203.0.113.7, 198.51.100.2", "x-forwarded-proto": "https"},
    {"x-forwarded-proto": "gopher"},  # not a scheme uvicorn takes
])
def test_proxy_headers_are_honoured_as_uvicorn_does_and_read_only_when_present(monkeypatch, headers):
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    calls = []
    original = ProxyHeadersMiddleware.__call__

    async def counted(self, scope, receive, send):
        calls.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(ProxyHeadersMiddleware, "__call__", counted)
    with ServerThread(whoami, lifespan="off", access_log=False, **SERVER_OPTIONS) as comox, \
            ServerThread(whoami, lifespan="off", access_log=False, http="httptools") as plain:
        answers = [httpx.get(f"http://127.0.0.1:{server.port}/{name}", headers=headers).json()
                   for name, server in (("comox", comox), ("plain", plain))]
    assert answers[0] == answers[1]  # the same client and scheme as under plain uvicorn
    if "x-forwarded-proto" in headers and headers["x-forwarded-proto"] == "https":
        assert answers[0]["scheme"] == "https"
    if "x-forwarded-for" in headers:
        assert answers[0]["client"] == headers["x-forwarded-for"].split(",")[-1].strip()
    # Plain uvicorn runs the middleware for every request; comox serve's protocol
    # only for one with a header it reads.
    assert calls.count("/plain") == 1
    assert calls.count("/comox") == (1 if headers else 0)


# -- the connection: its body in pieces, the client leaving, keep-alive, limits --


def test_a_body_sent_in_pieces_is_received_whole_as_it_arrives(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nabc")
        time.sleep(0.2)  # the app is waiting in receive() for the rest
        sock.sendall(b"def")
        answer = b""
        while not answer.endswith(b"echo:abcdef"):
            chunk = sock.recv(1024)
            assert chunk, answer
            answer += chunk


left: list[dict] = []


def post_and_leave(app, protocol: dict, seen: list, pause: float) -> None:
    """Serve ``app``, send it a POST and leave ``pause`` s later; wait (5 s
    at most) for the app to note something in ``seen``."""
    with ServerThread(app, lifespan="off", access_log=False, **protocol) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
            time.sleep(pause)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)


async def waits_for_the_client(scope, receive, send):
    if scope["type"] != "http":
        return
    first = await receive()
    second = await receive()  # the request is whole: the next message is the client's leaving
    left.append({"first": first, "second": second})


@pytest.mark.parametrize("protocol", [SERVER_OPTIONS, {"http": "httptools"}], ids=["comox", "uvicorn"])
def test_a_client_that_leaves_is_a_disconnect_for_the_waiting_app(protocol):
    left.clear()
    post_and_leave(waits_for_the_client, protocol, left, 0.2)
    assert left == [{"first": {"type": "http.request", "body": b"hi", "more_body": False},
                     "second": {"type": "http.disconnect"}}]


watches: list[tuple[str, bool, float]] = []


async def watches_its_client(scope, receive, send):
    """Waits on a long "upstream call" while comox.disconnects watches the client."""
    if scope["type"] != "http":
        return
    await receive()
    watched = watch_current(receive)
    started = time.monotonic()
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        watches.append((type(watched).__name__, watched.disconnected, time.monotonic() - started))
        raise
    finally:
        watched.close()


@pytest.mark.parametrize("protocol", [SERVER_OPTIONS, {"http": "httptools"}], ids=["comox", "uvicorn"])
def test_a_watched_task_is_cancelled_when_its_client_leaves(protocol):
    """Under comox serve's protocol the server itself cancels the watched task
    when the connection is lost (ServerWatch); under another, a watcher on
    ``receive()`` started once the wait has lasted WATCH_AFTER_S does."""
    watches.clear()
    post_and_leave(watches_its_client, protocol, watches, 0.1)
    kind = "ServerWatch" if protocol is SERVER_OPTIONS else "WatchedStream"
    assert len(watches) == 1 and watches[0][:2] == (kind, True)
    assert watches[0][2] < 2  # at once, not after the 30 s the task would have waited


def closed_after(port: int, pause: float, requests: int) -> float | None:
    """Seconds from a connection's last answer until the server closed it
    (None if it kept it open for 2 s), ``requests`` sent ``pause`` apart."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(requests):
            sock.sendall(request("/echo"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
            answered = time.monotonic()
            time.sleep(pause)
        sock.settimeout(2)
        try:
            data = sock.recv(1)
        except TimeoutError:
            return None
        assert data == b""
        return time.monotonic() - answered


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_a_busy_one_is_not():
    with ServerThread(app, lifespan="off", access_log=False, timeout_keep_alive=0.5, **SERVER_OPTIONS) as running:
        idle = closed_after(running.port, 0, 1)
        assert idle is not None and 0.4 < idle < 1.0
        # five requests 0.3 s apart: 1.5 s in all, each within the timeout of the last answer
        kept = closed_after(running.port, 0.3, 5)
        assert kept is not None and 0.4 < kept < 1.0


@pytest.mark.parametrize("options", [{"limit_concurrency": 1}, {"root_path": "/api"}], ids=["503", "root-path"])
def test_server_options_answer_as_under_uvicorn(options):
    with ServerThread(shapes_app, lifespan="off", access_log=False, **options, **SERVER_OPTIONS) as comox, \
            ServerThread(shapes_app, lifespan="off", access_log=False, http="httptools", server_header=False,
                         **options) as plain:
        for raw in (request("/scope?x=1"), request("/comox")):
            ours = exchange(comox.port, raw)
            assert ours == exchange(plain.port, raw)
            assert (b" 503 " in ours[0].split(b"\r\n")[0]) == ("limit_concurrency" in options)


def test_a_websocket_upgrade_is_handed_to_uvicorns_websocket_protocol(servers):
    comox, plain = servers
    upgrade = request("/ws", extra="connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
                                   "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    answers = []
    for port in (comox.port, plain.port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(upgrade)
            answers.append(re.sub(rb"\r\ndate: [^\r]*", b"", sock.recv(65536), flags=re.I))
    assert answers[0] == answers[1]
    # The app took no handshake: the WebSocket protocol's own 500 (its header names capitalised).
    assert answers[0].startswith(b"HTTP/1.1 500") and b"\r\nContent-Length: 21\r\n" in answers[0]
