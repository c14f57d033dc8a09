"""Upstreams that answer badly, under load (issue 16): bursts of 500, 503 and
429, and garbage — invalid JSON with 200, the wrong content type, a body
longer or shorter than announced, a stream cut in the middle of an event,
not HTTP at all, a body that stops coming. Each is retried on another node or
ends in a clear error; never a 500 of Comox's own, never a hang. The
malformed answers come from a raw-socket stand-in (no HTTP server library
would send them)."""

import json
import logging
import socket
import threading

import httpx
import pytest

from comox.testing import Fault, wait_until

from tests.faults import Load, Outcome, call

COMOX_500 = b"internal error in the gateway"

# -- the raw-socket stand-in ------------------------------------------------------------

CHAT_ANSWER = json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "raw"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
EVENT = b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"raw"},"finish_reason":null}]}\n\n'


def head(status: str, content_type: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type + b"\r\n" + b"".join(h + b"\r\n" for h in extra) + b"\r\n"


def sized(content_type: bytes, body: bytes, length: int | None = None) -> bytes:
    return head("200 OK", content_type, b"content-length: %d" % (len(body) if length is None else length)) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# What the raw stand-in sends for each kind of garbage, and whether the
# connection is kept afterwards. A request names its kind in its text.
GARBAGE = {
    # before anything reaches the client: the request moves, or a clear 503
    "invalid-json": (False, sized(b"application/json", b'{"id": "chatcmpl-raw", "choices": [oops]}'), True),
    "cut-json": (False, sized(b"application/json", CHAT_ANSWER[:40]), True),
    "html": (False, sized(b"text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"), True),
    "sse-as-text": (True, sized(b"text/plain", EVENT + b"data: [DONE]\n\n"), True),
    "longer-than-announced": (False, sized(b"application/json", CHAT_ANSWER, length=20), True),
    "shorter-than-announced": (False, sized(b"application/json", CHAT_ANSWER, length=len(CHAT_ANSWER) + 100), False),
    "not-http": (False, b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False),
    "body-stops": (False, head("200 OK", b"application/json", b"content-length: 500") + CHAT_ANSWER[:40], None),
    # after the first chunk: the stream ends with an error event
    "cut-stream": (True, head("200 OK", b"text/event-stream", b"transfer-encoding: chunked") + chunk(EVENT)
                   + chunk(EVENT[:30]), False),
    "cut-stream-at-close": (True, head("200 OK", b"text/event-stream", b"connection: close") + EVENT + EVENT[:30], False),
}
BEFORE_FIRST_BYTE = [kind for kind in GARBAGE if not kind.startswith("cut-stream")]
READ_TIMEOUT = 1.0  # the raw node's timeout_s: "body-stops" waits this long


class RawUpstream:
    """A TCP server speaking just enough HTTP/1.1 by hand: GETs (health checks)
    get a JSON 200; a POST whose body names a kind of :data:`GARBAGE`
    (``garbage:<kind>``) gets it, any other a good answer. One thread per
    connection, keep-alive as the garbage allows; stopped by :meth:`stop`."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sent: list[str] = []
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True, name="raw-upstream")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        reader = conn.makefile("rb")
        with conn:
            while True:
                try:
                    line = reader.readline()
                    if not line:
                        return
                    method = line.split(b" ", 1)[0]
                    length = 0
                    while (header := reader.readline()) not in (b"\r\n", b""):
                        name, _, value = header.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    body = reader.read(length)
                    if method != b"POST":
                        conn.sendall(sized(b"application/json", b'{"object": "list", "data": []}'))
                        continue
                    kind = body.split(b"garbage:", 1)[1].split(b'"', 1)[0].decode() if b"garbage:" in body else "good"
                    self.sent.append(kind)
                    if kind == "good":
                        stream = b'"stream":true' in body.replace(b" ", b"")
                        conn.sendall(head("200 OK", b"text/event-stream", b"content-length: %d" % (len(EVENT) + 14))
                                     + EVENT + b"data: [DONE]\n\n" if stream else sized(b"application/json", CHAT_ANSWER))
                        continue
                    _, data, keep = GARBAGE[kind]
                    conn.sendall(data)
                    if keep is None:  # the rest never comes, until the client gives up
                        self.stopping.wait()
                    if not keep:
                        return
                except OSError:
                    return

    def stop(self):
        self.stopping.set()
        self.sock.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def raw_upstream():
    upstream = RawUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def no_gateway_errors(caplog):
    """Fails the test if Comox or uvicorn logged an error (a traceback of ours)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("comox", "uvicorn")]
    assert errors == [], [r.getMessage() for r in errors]


def error_of(outcome: Outcome) -> dict:
    return json.loads(outcome.body)["error"]


def test_garbage_answers_are_retried_elsewhere_or_end_in_a_clear_error(comox_serve, raw_upstream, upstreams,
                                                                        no_gateway_errors):
    good = upstreams("good")
    raw = {"name": "raw", "url": raw_upstream.url, "timeout_s": READ_TIMEOUT, "health_check": {"enabled": False}}
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [
        {"name": "solo", "backends": [raw]},  # nowhere else to go: a clear error
        {"name": "pair", "backends": [{**raw, "name": "raw-2"}, {"name": "good", "url": good.url}]},
    ]})
    kinds = list(GARBAGE)

    def request(client, i):
        kind = kinds[i % len(kinds)]
        group = ("solo", "pair")[i // len(kinds) % 2]
        body = {"model": group, "messages": [{"role": "user", "content": f"garbage:{kind}"}], "stream": GARBAGE[kind][0]}
        outcome = call(client, f"{server.url}/v1/chat/completions", body, f"{group}:{kind}")
        return outcome

    with Load(request, threads=6, limit=4 * len(kinds)) as load:
        load.wait(4 * len(kinds))
    outcomes = load.outcomes
    for o in outcomes:
        group, kind = o.group.split(":")
        assert o.status is not None and COMOX_500 not in o.body, (o.group, o.body)
        if o.backend == "good":  # retried on the good node (or sent there: raw-2 was ejected)
            assert group == "pair" and o.status == 200, (o.group, o.status, o.body[:200])
            assert (o.complete if o.stream else json.loads(o.body)["choices"][0]["message"]["content"] == "hello from good")
        elif o.status == 503:  # a clear error: what the node did wrong, and when to come back
            assert group == "solo" and o.headers["retry-after"] == "1", (o.group, o.body[:200])
            # the last error: what the node did, or that it was ejected for it (while this one waited)
            assert error_of(o)["code"] == "no_backend_available", error_of(o)
            assert "backend 'raw'" in error_of(o)["message"] or "backend ejected" in error_of(o)["message"]
        else:  # the first chunk was sent: the stream ends with an error event, never a clean [DONE]
            assert kind not in BEFORE_FIRST_BYTE and o.interrupted, (o.group, o.body)
            assert o.error_events[0]["code"] == "stream_interrupted"
        # nothing waits longer than the backend's read timeout
        assert o.elapsed < (READ_TIMEOUT if kind == "body-stops" else 0) + 0.75, (o.group, o.elapsed)
    assert {o.group.split(":")[1] for o in outcomes} == set(GARBAGE)
    assert {o.group.split(":")[1] for o in outcomes if o.interrupted} == {"cut-stream", "cut-stream-at-close"}
    assert {o.group.split(":")[1] for o in outcomes if o.status == 503} >= set(BEFORE_FIRST_BYTE)
    gateway = server.app.gateway
    assert gateway.backend("raw-2").failures >= 1  # the pair's garbage was retried on the good node
    # Every slot back: released just after an answer's last byte, which its client may see first.
    wait_until(lambda: all(s.inflight == 0 for s in gateway.backends()), timeout=5)
    # After all that the raw node still serves a good answer, and garbage was never cached.
    body = {"model": "solo", "messages": [{"role": "user", "content": "garbage:invalid-json"}], "temperature": 0}
    first = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert first.status_code == 503 and "not JSON" in first.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body).headers["x-comox-cache"] == "miss"


# -- bursts of 500, 503, 429 --------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_burst_of_errors_is_retried_and_a_fleet_wide_one_passed_through_as_the_upstreams(
        comox_serve, upstreams, status, no_gateway_errors):
    a, b = upstreams("a"), upstreams("b")
    off = {"enabled": False}
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "backends": [
        {"name": "a", "url": a.url, "health_check": off}, {"name": "b", "url": b.url, "health_check": off}]}]})
    fault = Fault(status=status, headers={"retry-after": "7"} if status == 429 else None)

    def request(client, i):
        return call(client, f"{server.url}/v1/chat/completions",
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": i % 3 == 0}, "m")

    # A burst on one node: every request answered, by the other.
    a.faults.extend([fault] * 20)
    with Load(request, threads=6, limit=40) as load:
        load.wait(40)
    assert [o.status for o in load.outcomes] == [200] * 40
    assert all(o.complete for o in load.outcomes if o.stream)
    assert len(a.requests) >= 1  # the burst was hit (at most EJECT_AFTER 5xx before a is ejected; 429s never eject)

    # A burst on every node: the upstream's own answer, passed through (never Comox's 500), at once.
    a.faults.clear()
    a.faults.extend([fault] * 100)
    b.faults.extend([fault] * 100)
    with Load(request, threads=6, limit=30) as load:
        load.wait(30)
    for o in load.outcomes:
        assert o.status == status and f"injected {status}".encode() in o.body and COMOX_500 not in o.body, o.body
        assert o.headers["retry-after"] == ("7" if status == 429 else "1") and o.elapsed < 1.0
    wait_until(lambda: all(s.inflight == 0 for s in server.app.gateway.backends()))
