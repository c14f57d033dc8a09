#!/usr/bin/env python3
"""What the Anthropic Messages API's translation adds per request: the same
prompt sent as a chat completion and as a Messages request, through the
gateway to the stand-in upstream. See docs/anthropic_api.md.

    python bench/anthropic.py                    # 2000 requests of each kind
    python bench/anthropic.py -n 500 --max-seconds 20

Starts, on 127.0.0.1, the stand-in upstream and ``comox serve`` in front of it
(keys off, in-memory state), each a process of its own (bench/cache_hit.py's
helpers). One keep-alive connection sends, sequentially and in alternating
blocks, ``POST /v1/chat/completions`` and ``POST /v1/messages`` (checked,
translated, answered, translated back), then the same two streamed. Prints p50
and mean latency of each as the client saw them, and what a Messages request
adds to its chat completion. Streams are also measured in process: the cost
per chunk of turning a chat stream into Anthropic's events.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time

import orjson
from cache_hit import Connection, arguments, interleaved, running

SYSTEM = "You are a helpful assistant."
CHAT = {"model": "bench", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}],
        "max_tokens": 16}
MESSAGES = {"model": "bench", "system": SYSTEM, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
VERSION = b"anthropic-version: 2023-06-01\r\n"


def read_stream(connection: Connection, path: str, body: bytes, headers: bytes) -> bytes:
    """Send a streamed request and read its chunked answer to the end."""
    connection.sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                            + headers + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    while b"\r\n0\r\n\r\n" not in connection.buffer:
        connection.buffer += connection._recv()
    head, _, rest = connection.buffer.partition(b"\r\n0\r\n\r\n")
    connection.buffer = rest
    return head


def measure(port: int, count: int, max_seconds: float) -> dict[str, list[float]]:
    connection = Connection(port)
    kinds = {"chat": (False, "/v1/chat/completions", orjson.dumps(CHAT), b""),
             "messages": (False, "/v1/messages", orjson.dumps(MESSAGES), VERSION),
             "chat stream": (True, "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True}), b""),
             "messages stream": (True, "/v1/messages", orjson.dumps({**MESSAGES, "stream": True}), VERSION)}

    def send(streamed: bool, path: str, body: bytes, headers: bytes) -> bytes:
        return read_stream(connection, path, body, headers) if streamed else connection.post(path, body, headers)[0]

    return interleaved({kind: functools.partial(send, *request) for kind, request in kinds.items()}, count, max_seconds)


def stream_cost(chunks: int = 200, runs: int = 200) -> float:
    """Microseconds per chat chunk to translate a stream into Anthropic's events (in process)."""
    from comox_anthropic.inbound import Pending, translate_stream

    import comox

    def chunk(delta: dict[str, object]) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n"

    body = [chunk({"content": f" tok{i}"}) for i in range(chunks)] + [b"data: [DONE]\n\n"]
    pending = Pending("bench", (), 10)

    async def run() -> float:
        best = float("inf")
        for _ in range(runs):
            async def upstream():  # the chat stream, as the core hands it over
                for piece in body:
                    yield piece

            start = time.perf_counter()
            async for _ in translate_stream(comox.BackendResponse(200, stream=upstream()), pending):
                pass
            best = min(best, time.perf_counter() - start)
        return best

    return asyncio.run(run()) / chunks * 1e6


def main() -> None:
    args = arguments(__doc__ or "")
    with running(__file__) as (gateway_port, _):
        times = measure(gateway_port, args.n, args.max_seconds)
    print(f"{'':16} {'requests':>8} {'p50 ms':>8} {'mean ms':>8} {'p50 added ms':>13}")
    for kind, values in times.items():
        p50 = statistics.median(values) * 1000
        base = statistics.median(times["chat stream" if "stream" in kind else "chat"]) * 1000
        print(f"{kind:16} {len(values):8} {p50:8.3f} {statistics.fmean(values) * 1000:8.3f} {p50 - base:13.3f}")
    print(f"stream translation: {stream_cost():.1f} us per chat chunk (in process, best of 200 runs of 200 chunks)")


if __name__ == "__main__":
    main()
