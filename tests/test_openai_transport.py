"""The openai backend's transports: the default aiohttp pool and an injected
httpx client behave the same against a real stand-in upstream."""

import asyncio
import socket
import time

import httpx
import orjson
import pytest

from comox.errors import BackendUnavailable
from comox.request import GatewayRequest
from comox.testing import Fault, StandInUpstream
from comox_openai import OpenAIBackend, OpenAIBackendSettings
from comox import AiohttpTransport, HttpxTransport, Transport


def make_request(stream: bool = False, request_id: str = "rid-1") -> GatewayRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return GatewayRequest(id=request_id, endpoint="chat/completions", path="/v1/chat/completions",
                          headers=[], raw=orjson.dumps(body), json=body)


def make_backend(kind: str, url: str) -> OpenAIBackend:
    settings = OpenAIBackendSettings(name="u", url=url)
    return OpenAIBackend(settings, client=httpx.AsyncClient() if kind == "httpx" else None)


@pytest.fixture
def upstream():
    up = StandInUpstream("up").start()
    yield up
    up.stop()


@pytest.fixture(params=["aiohttp", "httpx"])
def kind(request):
    return request.param


def test_default_is_aiohttp_and_httpx_client_is_wrapped(upstream):
    assert isinstance(make_backend("aiohttp", upstream.url).transport, AiohttpTransport)
    backend = make_backend("httpx", upstream.url)
    assert isinstance(backend.transport, HttpxTransport) and isinstance(backend.client, httpx.AsyncClient)
    assert isinstance(backend.transport, Transport)
    with pytest.raises(TypeError):
        OpenAIBackend(OpenAIBackendSettings(name="u", url=upstream.url), client=object())


def test_json_and_stream(upstream, kind):
    async def go():
        backend = make_backend(kind, upstream.url)
        try:
            upstream.faults.append(Fault(headers={"x-upstream-extra": "kept", "keep-alive": "timeout=5", "set-cookie": "a=b"}))
            response = await backend.handle(make_request())
            assert response.status == 200
            assert orjson.loads(response.body)["choices"][0]["message"]["content"] == "hello from up"
            names = [name for name, _ in response.headers]
            assert (b"x-upstream-extra", b"kept") in response.headers
            assert all(name == name.lower() for name in names)
            for dropped in (b"keep-alive", b"content-length", b"server", b"date", b"connection"):
                assert dropped not in names
            await response.aclose()
            seen = upstream.requests[-1]["headers"]
            assert seen["x-request-id"] == "rid-1" and seen["user-agent"].startswith("comox/")
            assert seen["accept-encoding"] == "identity"

            stream = await backend.handle(make_request(stream=True, request_id="rid-2"))
            assert stream.stream is not None
            text = b"".join([chunk async for chunk in stream.stream])
            await stream.aclose()
            assert text.endswith(b"data: [DONE]\n\n") and b"tok2" in text
            if kind == "aiohttp":  # no cookie jar: one upstream's cookies never follow other requests
                assert "cookie" not in upstream.requests[-1]["headers"]
        finally:
            await backend.aclose()

    asyncio.run(go())


def test_closing_a_stream_closes_the_upstream_connection(kind):
    slow = StandInUpstream("slow", stream_chunks=50, chunk_delay=0.1).start()
    try:
        async def go():
            backend = make_backend(kind, slow.url)
            try:
                response = await backend.handle(make_request(stream=True))
                async for chunk in response.stream:
                    assert b"tok0" in chunk
                    break
                await response.aclose()
                deadline = time.monotonic() + 5
                while slow.disconnects == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert slow.disconnects == 1
                # the pool still works afterwards
                again = await backend.handle(make_request())
                assert again.status == 200
            finally:
                await backend.aclose()

        asyncio.run(go())
    finally:
        slow.stop()


def test_connection_refused_is_backend_unavailable(kind):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go():
        backend = make_backend(kind, f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(BackendUnavailable, match="unreachable"):
                await backend.handle(make_request())
        finally:
            await backend.aclose()

    asyncio.run(go())


def test_5xx_is_returned_not_raised(upstream, kind):
    async def go():
        backend = make_backend(kind, upstream.url)
        try:
            upstream.faults.append(Fault(status=503))
            response = await backend.handle(make_request())
            assert response.status == 503
            assert orjson.loads(response.body)["error"]["message"] == "up injected 503"
        finally:
            await backend.aclose()

    asyncio.run(go())


# -- OpenTelemetry: one client span per backend call, whichever transport ------


@pytest.fixture
def tracing():
    """An SDK tracer provider exporting to memory, with both HTTP client
    instrumentations on (each covers its own client); off again afterwards."""
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentors = [AioHttpClientInstrumentor(), HTTPXClientInstrumentor()]
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=provider)
    yield exporter
    for instrumentor in instrumentors:
        instrumentor.uninstrument()


def client_spans(exporter, *upstreams):
    """(url, status, span) of the client spans of calls to ``upstreams``. The
    instrumentation is process-wide, so calls other servers of this test run
    make meanwhile (module-scoped fixtures, health checks) are left out."""
    from opentelemetry.trace import SpanKind

    found = []
    for span in exporter.get_finished_spans():
        url = span.attributes.get("url.full") or span.attributes.get("http.url")
        if span.kind is SpanKind.CLIENT and url and url.startswith(tuple(f"{up.url}/" for up in upstreams)):
            found.append((url, span.attributes.get("http.response.status_code") or span.attributes.get("http.status_code"), span))
    return found


def test_each_transport_gives_one_client_span_per_backend_call(upstream, kind, tracing):
    async def go():
        backend = make_backend(kind, upstream.url)  # created after instrumenting, as at gateway startup
        try:
            for stream in (False, True):
                response = await backend.handle(make_request(stream=stream))
                if response.stream is not None:
                    assert b"[DONE]" in b"".join([chunk async for chunk in response.stream])
                await response.aclose()
        finally:
            await backend.aclose()

    asyncio.run(go())
    spans = client_spans(tracing, upstream)
    assert [(url, status) for url, status, _ in spans] == [(f"{upstream.url}/v1/chat/completions", 200)] * 2
    # The trace context goes upstream with each call, so backend spans join the trace.
    sent = [request["headers"].get("traceparent") for request in upstream.requests]
    assert all(sent) and [value.split("-")[2] for value in sent] == [format(s.context.span_id, "016x") for _, _, s in spans]


def test_gateway_backend_calls_are_spans_retries_included(comox_serve, upstreams, tracing):
    bad, good = upstreams("bad"), upstreams("good")
    bad.faults.extend([Fault(status=502)] * 3)
    server = comox_serve({"models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "bad", "url": bad.url}, {"name": "good", "url": good.url}]}]})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(4):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    # (the gateway's health checks of both make client spans of their own)
    spans = [(url, status) for url, status, _ in client_spans(tracing, bad, good) if url.endswith("/chat/completions")]
    assert sorted(spans) == sorted([(f"{bad.url}/v1/chat/completions", 502)] * 3 + [(f"{bad.url}/v1/chat/completions", 200)] * (len(bad.requests) - 3)
                                   + [(f"{good.url}/v1/chat/completions", 200)] * len(good.requests))
    assert len(spans) == 4 + 3  # every request once, plus a retry for each 502
