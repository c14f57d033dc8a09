"""``comox/server_protocol.py``: uvicorn's httptools protocol whose response
head goes out with the first body bytes. The writes are counted on the
transport under the protocol; answers of every shape (a body, a stream whose
first chunk comes late, HEAD, 204, 100-continue, keep-alive, a large body)
are checked over real sockets against a uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from comox.server_protocol import SERVER_OPTIONS, HeldHeadTransport
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
        await scenario(HeldHeadTransport(recorder, asyncio.get_running_loop()))
        return recorder.writes
    return asyncio.run(main())


def test_a_head_goes_out_with_the_first_body_bytes_in_one_write():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"hi")
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        t.write(b"2\r\nhi\r\n")
        t.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
                              b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n", b"0\r\n\r\n"]


def test_a_head_with_no_body_in_its_loop_turn_goes_out_at_the_next_turn():
    async def scenario(t):
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert t.get_write_buffer_size() == len(b"HTTP/1.1 204 No Content\r\n\r\n")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert t.transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.close()  # a close sends what is held first
    assert held(scenario) == [b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]


def test_a_head_joins_any_bytes_like_body():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(memoryview(b"abc"))
        t.write(bytearray(b"HTTP/1.1 200 OK\r\n\r\n"))
        t.write(bytearray(b"de"))
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\n\r\nabc", b"HTTP/1.1 200 OK\r\n\r\nde"]


def test_a_large_body_is_written_after_its_head_not_copied_into_it():
    async def scenario(t):
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(BIG)
    assert held(scenario) == [b"HTTP/1.1 200 OK\r\n\r\n", BIG]


def test_bytes_that_are_not_a_head_are_written_at_once_and_an_abort_drops_what_is_held():
    async def scenario(t):
        t.write(b"data")
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.abort()
    assert held(scenario) == [b"data"]


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
def server():
    with ServerThread(app, lifespan="off", **SERVER_OPTIONS) as running:
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
