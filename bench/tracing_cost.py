#!/usr/bin/env python3
"""What tracing costs per request (docs/benchmarks.md, "Tracing cost"):
``python bench/tracing_cost.py [-n N] [--rounds R] [--upstream memory|standin]``.

N chat completions (JSON, then SSE) through the Comox ASGI app in-process, in
interleaved rounds, CPU time per request (``time.process_time``, every
thread: the span processor's too), the fastest round of each mode:

* ``absent`` — the ``otel`` plugin not loaded (``COMOX_BLOCK_PLUGINS=otel``);
* ``off`` — loaded, tracing not configured (the default): must equal ``absent``;
* ``memory`` — on, the SDK's in-memory exporter (a simple span processor);
* ``otlp`` — on, a batch span processor and an exporter that encodes each batch
  to OTLP protobuf as the real one does, and drops it instead of sending it;
* ``unsampled`` — on, but the sampler keeps no request (what the requests a
  ratio sampler leaves out cost).

``--upstream memory`` (default): backends answer from memory, so the figure is
the pipeline's own (two spans per request: the request and its attempt).
``--upstream standin``: a real stand-in server on 127.0.0.1 in another thread
(its CPU counted alike in every mode), so the aiohttp client instrumentation's
HTTP span, and the ``traceparent`` it sends, are in the figure too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimal_proxy import JSON_BODY, SSE_BODY  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402

from comox.app import create_app  # noqa: E402
from comox.backends import BackendResponse  # noqa: E402
from comox.settings import Settings  # noqa: E402
from comox.testing import StandInUpstream  # noqa: E402

REQUEST = (
    b'{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0.7}'
)
REQUEST_SSE = REQUEST[:-1] + b',"stream":true}'
MODES = ("absent", "off", "memory", "otlp", "unsampled")


class MemoryTransport:
    async def post(self, url, body, headers):
        if b'"stream":true' in body:
            async def gen():
                yield SSE_BODY

            return BackendResponse(200, [(b"content-type", b"text/event-stream")], stream=gen())
        return BackendResponse(200, [(b"content-type", b"application/json")], body=JSON_BODY)

    async def aclose(self):
        pass


class EncodingExporter(SpanExporter):
    """The OTLP exporter's work without its network: each batch encoded to
    protobuf bytes, then dropped."""

    def __init__(self):
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def set_provider(mode: str) -> TracerProvider | None:
    """The process's tracer provider for ``mode`` (Comox uses one the process
    set, as under ``opentelemetry-instrument``), or none."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    if mode not in ("memory", "otlp", "unsampled"):
        return None
    provider = TracerProvider(sampler=sampling.ALWAYS_OFF if mode == "unsampled" else None)
    processor = SimpleSpanProcessor(InMemorySpanExporter()) if mode == "memory" else BatchSpanProcessor(EncodingExporter())
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


async def run(n: int, stream: bool, mode: str, upstream_url: str | None) -> float:
    if mode == "absent":
        os.environ["COMOX_BLOCK_PLUGINS"] = "otel"
    else:
        os.environ.pop("COMOX_BLOCK_PLUGINS", None)
    provider = set_provider(mode)
    url = upstream_url or "http://127.0.0.1:9"
    settings = Settings(auth="none", models=[{"name": "bench", "backends": [
        {"name": "a", "url": url, "health_check": {"enabled": False}}]}])
    app = create_app(settings)
    traced = app.gateway.plugin_settings("otel")
    assert (traced is not None and traced.active) == (mode not in ("absent", "off")), mode
    if upstream_url is None:
        for state in app.gateway.backends():
            state.backend.transport = MemoryTransport()
    await app.gateway.startup()
    body = REQUEST_SSE if stream else REQUEST
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    never = asyncio.get_running_loop().create_future()
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(min(200, n)):  # warm the pool (and the caches) before timing
        await app(dict(scope), _receive_once(body, never), send)
    t0 = time.process_time()
    for _ in range(n):
        await app(dict(scope), _receive_once(body, never), send)
    if provider is not None:
        provider.force_flush()  # the batch processor's encoding belongs to these requests
    elapsed = time.process_time() - t0
    await app.gateway.aclose()
    if provider is not None:
        provider.shutdown()
    assert set(statuses) == {200}, set(statuses)
    return elapsed / n * 1e6


def _receive_once(body: bytes, never: asyncio.Future[None]):
    calls = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if calls:
            return calls.pop()
        return await never

    return receive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000, help="requests per round and mode (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the fastest is kept (default: %(default)s)")
    parser.add_argument("--upstream", choices=("memory", "standin"), default="memory")
    args = parser.parse_args()
    logging.getLogger("comox").setLevel(logging.ERROR)  # one "auth = none" warning per gateway built
    standin = StandInUpstream("bench").start() if args.upstream == "standin" else None
    try:
        for stream in (False, True):
            best = {mode: float("inf") for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    us = asyncio.run(run(args.n, stream, mode, standin.url if standin else None))
                    best[mode] = min(best[mode], us)
            kind = "SSE" if stream else "JSON"
            print(f"{kind}, upstream {args.upstream}, {args.n} requests x {args.rounds} rounds, CPU µs per request: "
                  + ", ".join(f"{mode} {best[mode]:.1f}" for mode in MODES)
                  + f"; tracing on costs {best['memory'] - best['off']:+.1f} µs (memory), "
                  f"{best['otlp'] - best['off']:+.1f} µs (otlp), {best['unsampled'] - best['off']:+.1f} µs (unsampled); "
                  f"off vs absent {best['off'] - best['absent']:+.1f} µs")
    finally:
        if standin is not None:
            standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
