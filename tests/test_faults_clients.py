"""Clients that read slowly or vanish (issue 16): nothing leaks. A client
reading one byte a second holds back its stream all the way to the upstream
(the gateway buffers a bounded amount, not the stream); clients that leave
mid-stream close their upstream calls; every slot (the backend's in-flight
count, the key's max_concurrency) is freed and the gateway's file descriptors
come back to where they were. Raw sockets play the clients."""

import asyncio
import concurrent.futures
import hashlib
import json
import socket
import struct
import threading
import time

import httpx
import orjson
import pytest

from comox.testing import Fault, StandInUpstream, wait_until

from tests.faults import open_fds
from tests.secrets_check import secret

KEY = secret("sk-client-faults")
CONCURRENCY = 6


class Firehose(StandInUpstream):
    """Streams ``stream_chunks`` events of ``size`` bytes of text as fast as its
    client takes them; ``sent`` holds, per stream, how many went out."""

    def __init__(self, name, *, size=16384, **kwargs):
        super().__init__(name, **kwargs)
        self.size = size
        self.sent: list[int] = []

    async def _stream(self, receive, send, payload, chat, fault, extra):
        gone = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        index = len(self.sent)
        self.sent.append(0)
        event = b"data: " + orjson.dumps({"id": "cmpl-firehose", "object": "text_completion", "created": 1, "model": "m",
                                          "choices": [{"index": 0, "text": "x" * self.size, "finish_reason": None}]}) + b"\n\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        try:
            for _ in range(self.stream_chunks):
                if gone.is_set():
                    self.disconnects += 1
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})  # waits while nobody reads
                self.sent[index] += 1
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()


def raw_request(port: int, body: dict, *, rcvbuf: int | None = None) -> socket.socket:
    """A connection that has sent one POST to the gateway (and read nothing)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def serve(comox_serve, *upstreams):
    keys = [{"id": "k", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), "max_concurrency": CONCURRENCY}]
    return comox_serve({"auth": "keys", "sections": {"keys": keys}, "models": [
        {"name": up.name, "backends": [{"name": up.name, "url": up.url, "health_check": {"enabled": False}}]}
        for up in upstreams]})


def warm(server, *models):
    for model in models:  # the pools and the key's state exist before the first count of descriptors
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1},
                           headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert reply.status_code == 200


def all_slots_free(server, upstream) -> bool:
    """``CONCURRENCY`` requests of the key at once (each held 0.3 s upstream)
    all get through: none of its slots is still held."""
    upstream.faults.extend([Fault(delay=0.3)] * CONCURRENCY)

    def one(_):
        body = {"model": upstream.name, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                          timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(CONCURRENCY))) == [200] * CONCURRENCY


@pytest.mark.transports
def test_slow_clients_hold_back_their_streams_without_buffering_them_and_leave_nothing_behind(comox_serve, upstreams):
    hose = upstreams("hose", kind=Firehose, stream_chunks=4000)  # 64 MB a stream, if anyone read it
    server = serve(comox_serve, hose)
    port = server.port
    warm(server, "hose")
    fds = open_fds()
    clients = 3
    seconds = 4
    got = [b""] * clients

    def slow(i):
        sock = raw_request(port, {"model": "hose", "prompt": "hi", "stream": True}, rcvbuf=4096)
        with sock:
            for _ in range(seconds):  # one byte a second
                got[i] += sock.recv(1)
                time.sleep(1)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(hose.sent) == clients, timeout=10)
    for thread in threads:
        thread.join(seconds + 10)
    sent_when_left = list(hose.sent)
    assert all(g == b"HTTP" for g in got)  # they did read, a byte a second
    # Back-pressure reached the upstream: what went out while they read 4 bytes is
    # what the sockets between hold (kernel buffers), not the stream (64 MB).
    assert all(0 < sent * hose.size < 24 * 2**20 for sent in sent_when_left), sent_when_left
    print(f"slow clients: the upstream got out {[round(n * hose.size / 2**20, 1) for n in sent_when_left]} MB of 64 each")
    gateway = server.app.gateway
    wait_until(lambda: hose.disconnects == clients, timeout=10)  # every upstream call closed
    assert gateway.backend("hose").inflight == 0
    assert all_slots_free(server, hose)  # the key's slots were given back
    wait_until(lambda: open_fds() <= fds + 2, timeout=15)  # idle pooled connections close after 4 s


@pytest.mark.transports
def test_clients_that_vanish_mid_stream_release_the_upstream_call_and_every_slot(comox_serve, upstreams):
    streamer = upstreams("streamer", stream_chunks=100, chunk_delay=0.05)  # a 5 s stream
    waiter = upstreams("waiter")
    server = serve(comox_serve, streamer, waiter)
    port = server.port
    warm(server, "streamer", "waiter")
    fds = open_fds()
    gateway = server.app.gateway

    socks = [raw_request(port, {"model": "streamer", "prompt": "hi", "stream": True}) for _ in range(CONCURRENCY)]
    for i, sock in enumerate(socks):
        data = b""
        while b"data:" not in data:  # the stream has started
            data += sock.recv(4096)
        if i % 2:  # half leave with a reset, half with a clean close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    left = time.monotonic()
    wait_until(lambda: streamer.disconnects == CONCURRENCY, timeout=5)  # each upstream call closed...
    assert time.monotonic() - left < 1.0  # ...at once, not when its 5 s stream would have ended
    wait_until(lambda: gateway.backend("streamer").inflight == 0, timeout=5)

    # A client that leaves a JSON request is noticed too (docs/limits.md): its
    # upstream call is cancelled (or never made) and everything freed at once,
    # not when the backend's 3 s answer would have come.
    waiter.faults.extend([Fault(delay=3.0)] * 2)
    for sock in [raw_request(port, {"model": "waiter", "messages": [{"role": "user", "content": "hi"}]}) for _ in range(2)]:
        sock.close()
    time.sleep(0.3)  # read, admitted, and their clients' leaving seen
    assert gateway.backend("waiter").inflight == 0
    assert all_slots_free(server, waiter)  # within the 3 s their answers would take: none holds a slot

    wait_until(lambda: open_fds() <= fds + 2, timeout=15)
