#!/usr/bin/env python3
"""What the Responses API's translation adds per request: the same prompt sent
as a chat completion and as a Responses request, through the gateway to the
stand-in upstream. See docs/responses.md.

    python bench/responses.py                    # 2000 requests of each kind
    python bench/responses.py -n 500 --max-seconds 20

Starts, on 127.0.0.1, the stand-in upstream and ``comox serve`` in front of it
(keys off, in-memory state), each a process of its own (as bench/cache_hit.py,
whose helpers it uses). One keep-alive connection sends, sequentially and in
alternating blocks: ``POST /v1/chat/completions``; ``POST /v1/responses`` with
``store: false`` (translation only); ``POST /v1/responses`` (translated and
stored); and a ``previous_response_id`` follow-up of one stored response (its
conversation read back and prepended). Prints p50 and mean latency of each as
the client saw them, and what each adds to the chat completion. Streams are
measured in process: the per-chunk cost of turning a chat stream into the
Responses API's events.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time

import orjson
from cache_hit import Connection, arguments, interleaved, running, status

SYSTEM = "You are a helpful assistant."
CHAT = orjson.dumps({"model": "bench", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}],
                     "max_tokens": 16})
RESPONSES = {"model": "bench", "instructions": SYSTEM, "input": "Say hello.", "max_output_tokens": 16}


def measure(port: int, count: int, max_seconds: float) -> dict[str, list[float]]:
    connection = Connection(port)
    head, body = connection.post("/v1/responses", orjson.dumps(RESPONSES))
    assert status(head) == b"200", head
    follow_up = orjson.dumps({**RESPONSES, "previous_response_id": orjson.loads(body)["id"], "store": False})
    kinds = {"chat": ("/v1/chat/completions", CHAT),
             "responses store=false": ("/v1/responses", orjson.dumps({**RESPONSES, "store": False})),
             "responses stored": ("/v1/responses", orjson.dumps(RESPONSES)),
             "responses follow-up": ("/v1/responses", follow_up)}
    sends = {kind: functools.partial(lambda p, r: connection.post(p, r)[0], path, request) for kind, (path, request) in kinds.items()}
    return interleaved(sends, count, max_seconds)


def stream_cost(chunks: int = 200, runs: int = 200) -> float:
    """Microseconds per chat chunk to translate a stream into events (in process)."""
    from comox_responses.stream import translate_stream
    from comox_responses.translate import parse_request

    def chunk(delta: dict[str, object]) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n"

    body = [chunk({"content": f" tok{i}"}) for i in range(chunks)] + [b"data: [DONE]\n\n"]

    async def run() -> float:
        best = float("inf")
        for _ in range(runs):
            pending, _ = parse_request(dict(RESPONSES), {})

            async def upstream():  # the chat stream, as the core hands it over
                for piece in body:
                    yield piece

            start = time.perf_counter()
            async for _ in translate_stream(pending, None, upstream(), None):
                pass
            best = min(best, time.perf_counter() - start)
        return best

    return asyncio.run(run()) / chunks * 1e6


def main() -> None:
    args = arguments(__doc__ or "")
    with running(__file__) as (gateway_port, _):
        times = measure(gateway_port, args.n, args.max_seconds)
    chat = statistics.median(times["chat"]) * 1000
    print(f"{'':22} {'requests':>8} {'p50 ms':>8} {'mean ms':>8} {'p50 added ms':>13}")
    for kind, values in times.items():
        p50 = statistics.median(values) * 1000
        print(f"{kind:22} {len(values):8} {p50:8.3f} {statistics.fmean(values) * 1000:8.3f} {p50 - chat:13.3f}")
    print(f"stream translation: {stream_cost():.1f} us per chat chunk (in process, best of 200 runs of 200 chunks)")


if __name__ == "__main__":
    main()
