#!/usr/bin/env python3
"""Comox's own per-request cost, without sockets: the ASGI app driven in-process
with a transport that answers from memory. ``python bench/pipeline.py [--profile]``.

The gap between this and the end-to-end figures of ``bench/perf.py`` is the
HTTP server (uvicorn) and the upstream client (aiohttp).
"""

from __future__ import annotations

import argparse
import hashlib
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimal_proxy import JSON_BODY, SSE_BODY  # noqa: E402

from comox.app import create_app  # noqa: E402
from comox.backends import BackendResponse  # noqa: E402
from comox.hookspecs import hookimpl  # noqa: E402

REQUEST = (
    b'{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0.7}'
)
REQUEST_SSE = REQUEST[:-1] + b',"stream":true}'
HEADERS = [(b"content-type", b"application/json")]
NO_AUTH = False  # --no-auth


class NoopPlugin:
    """Implements every per-request hook that runs on a successful request, and
    does nothing in them: what the hook path itself costs a plugin."""

    @hookimpl
    def comox_authenticate(self, request):
        return None

    @hookimpl
    def comox_admit(self, request, principal):
        return None

    @hookimpl
    def comox_cache_lookup(self, request):
        return None

    @hookimpl
    def comox_cache_store(self, request, response):
        return None

    @hookimpl
    def comox_request_done(self, request, status, backend, error):
        return None


class MemoryTransport:
    """Answers every request from memory: ``answers`` is (JSON body, SSE body)."""

    def __init__(self, answers=(JSON_BODY, SSE_BODY)):
        self.answers = answers

    async def post(self, url, body, headers):
        if b'"stream":true' in body:
            async def gen():
                yield self.answers[1]  # as nginx sends it: one piece

            return BackendResponse(200, [(b"content-type", b"text/event-stream")], stream=gen())
        return BackendResponse(200, [(b"content-type", b"application/json")], body=self.answers[0])

    async def aclose(self):
        pass


# As bench/perf.py runs Comox: a key with limits that are counted, never hit.
KEYS = [{"id": "bench", "key_sha256": hashlib.sha256(b"sk-bench").hexdigest(), "rpm": 1_000_000_000,
         "tpm": 1_000_000_000_000, "max_concurrency": 100_000}]


async def run(n: int, stream: bool, policy: str, plugins: tuple = ()) -> float:
    settings: dict = {"models": [{"name": "bench", "policy": policy, "backends": [
        {"name": "a", "url": "http://127.0.0.1:9"}, {"name": "b", "url": "http://127.0.0.1:10"}]}]}
    settings.update({"auth": "none"} if NO_AUTH else {"sections": {"keys": KEYS}})
    from comox.settings import Settings

    app = create_app(Settings(**settings), plugins=list(plugins))
    for state in app.gateway.backends():
        state.backend.transport = MemoryTransport()
    await app.gateway.startup()
    body = REQUEST_SSE if stream else REQUEST
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"authorization", b"Bearer sk-bench")]}
    message = {"type": "http.request", "body": body, "more_body": False}
    never = asyncio.get_running_loop().create_future()

    async def receive():
        if message is not None:
            return message
        return await never

    sent = []

    async def send(m):
        sent.append(m)

    t0 = time.process_time()
    for _ in range(n):
        calls = [message]

        async def receive_once():
            if calls:
                return calls.pop()
            return await never

        await app(dict(scope), receive_once, send)
        sent.clear()
    elapsed = time.process_time() - t0
    await app.gateway.aclose()
    return elapsed / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--policy", default="p2c_ewma")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the fastest is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the JSON run")
    parser.add_argument("--noop-plugin", action="store_true", help="also run with a plugin whose per-request hooks do nothing")
    parser.add_argument("--no-auth", action="store_true", help='auth = "none" instead of a key with limits')
    args = parser.parse_args()
    global NO_AUTH
    NO_AUTH = args.no_auth
    for stream in (False, True):
        kind = "SSE" if stream else "JSON"
        asyncio.run(run(2000, stream, args.policy))
        if args.noop_plugin:
            # Interleaved, so drift hits both alike; the fastest of each is kept.
            bare, hooked = [], []
            for _ in range(args.repeat):
                bare.append(asyncio.run(run(args.n, stream, args.policy)))
                hooked.append(asyncio.run(run(args.n, stream, args.policy, (NoopPlugin(),))))
            print(f"Comox pipeline, {kind}: {min(bare):.1f} µs per request; with a plugin implementing 5 per-request "
                  f"hooks as no-ops: {min(hooked):.1f} µs ({min(hooked) - min(bare):+.1f} µs)")
            continue
        us = min(asyncio.run(run(args.n, stream, args.policy)) for _ in range(args.repeat))
        print(f"Comox pipeline, {kind}: {us:.1f} µs per request (in-process, no sockets)")
    if args.profile:
        import cProfile
        import pstats

        for stream in (False, True):
            profiler = cProfile.Profile()
            profiler.runcall(asyncio.run, run(args.n, stream, args.policy))
            print(f"--- {'SSE' if stream else 'JSON'}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
