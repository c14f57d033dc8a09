"""The openai backend's transports: the default httptools client, the aiohttp
pool (``transport = "aiohttp"``), the pyreqwest one (``transport =
"pyreqwest"``) and an injected httpx client behave the same against a real
stand-in upstream."""

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time

import httpx
import orjson
import pytest

from comox.asgi_io import read_body
from comox.errors import BackendUnavailable
from comox.request import GatewayRequest
from comox.testing import Fault, ServerThread, StandInUpstream
from comox_openai import OpenAIBackend, OpenAIBackendSettings
from comox import AiohttpTransport, HttpxTransport, Transport


def make_request(stream: bool = False, request_id: str = "rid-1") -> GatewayRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return GatewayRequest(id=request_id, endpoint="chat/completions", path="/v1/chat/completions",
                          headers=[], raw=orjson.dumps(body), json=body)


TRANSPORTS = ["httptools", "aiohttp", "pyreqwest", "httpx"]


def make_backend(kind: str, url: str, **settings) -> OpenAIBackend:
    if kind != "httpx":
        settings["transport"] = kind
    return OpenAIBackend(OpenAIBackendSettings(name="u", url=url, **settings),
                         client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=settings["ca_file"]) if "ca_file" in settings else True)
                         if kind == "httpx" else None)


@pytest.fixture
def upstream():
    up = StandInUpstream("up").start()
    yield up
    up.stop()


@pytest.fixture(params=TRANSPORTS)
def kind(request):
    return request.param


def test_default_is_httptools_and_httpx_client_is_wrapped(upstream, monkeypatch):
    from comox.transport_httptools import HttptoolsTransport
    from comox.transport_reqwest import PyreqwestTransport

    monkeypatch.delenv("COMOX_TEST_TRANSPORT", raising=False)
    assert isinstance(OpenAIBackend(OpenAIBackendSettings(name="u", url=upstream.url)).transport, HttptoolsTransport)
    assert isinstance(make_backend("aiohttp", upstream.url).transport, AiohttpTransport)
    assert isinstance(make_backend("pyreqwest", upstream.url).transport, PyreqwestTransport)
    assert isinstance(make_backend("pyreqwest", upstream.url).transport, Transport)
    monkeypatch.setenv("COMOX_TEST_TRANSPORT", "pyreqwest")  # the suite run against another transport
    assert isinstance(OpenAIBackend(OpenAIBackendSettings(name="u", url=upstream.url)).transport, PyreqwestTransport)
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
            if kind != "httpx":  # no cookie jar: one upstream's cookies never follow other requests
                assert "cookie" not in upstream.requests[-1]["headers"]
                assert "referer" not in upstream.requests[-1]["headers"]
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


def test_read_timeout_is_backend_unavailable(upstream, kind):
    async def go():
        backend = make_backend(kind, upstream.url, timeout_s=0.3)
        if kind == "httpx":
            backend = OpenAIBackend(OpenAIBackendSettings(name="u", url=upstream.url), client=httpx.AsyncClient(timeout=0.3))
        try:
            upstream.faults.append(Fault(delay=2.0))
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.handle(make_request())
            assert time.monotonic() - started < 1.5
        finally:
            await backend.aclose()

    asyncio.run(go())


def test_connect_timeout_is_backend_unavailable(kind):
    # A listening socket whose accept queue is full: the handshake never completes.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)

        async def go():
            backend = make_backend(kind, f"http://127.0.0.1:{port}", connect_timeout_s=0.3, timeout_s=0.5)
            if kind == "httpx":
                backend = OpenAIBackend(OpenAIBackendSettings(name="u", url=f"http://127.0.0.1:{port}"),
                                        client=httpx.AsyncClient(timeout=httpx.Timeout(0.5, connect=0.3)))
            try:
                started = time.monotonic()
                with pytest.raises(BackendUnavailable):
                    await backend.handle(make_request())
                assert time.monotonic() - started < 3
            finally:
                await backend.aclose()

        try:
            asyncio.run(go())
        finally:
            for filler in fillers:
                filler.close()


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    """The stand-in over TLS with a certificate for 127.0.0.1 from a
    self-signed CA: (upstream, https url, the CA's PEM file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    # A private CA and a server certificate it signed (rustls refuses a CA
    # certificate presented as the server's own).
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("comox-test-ca", ca_key, "comox-test-ca", ca_key, True)
    cert = certificate("127.0.0.1", key, "comox-test-ca", ca_key, False)
    folder = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    up = StandInUpstream("tls")
    up.server = ServerThread(up, lifespan="off", ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)).start()
    yield up, f"https://127.0.0.1:{up.server.port}", str(ca_file)
    up.stop()


def test_tls_with_a_custom_ca_file(tls_upstream, kind):
    up, url, ca_file = tls_upstream

    async def go():
        untrusted = make_backend(kind, url)
        try:  # verification is on: a private CA's certificate is refused without ca_file
            with pytest.raises(BackendUnavailable):
                await untrusted.handle(make_request())
        finally:
            await untrusted.aclose()
        backend = make_backend(kind, url, ca_file=ca_file)
        try:
            response = await backend.handle(make_request())
            assert response.status == 200 and b"hello from tls" in response.body
            stream = await backend.handle(make_request(stream=True))
            assert b"[DONE]" in b"".join([chunk async for chunk in stream.stream])
            await stream.aclose()
        finally:
            await backend.aclose()

    asyncio.run(go())


# -- OpenTelemetry: one client span per backend call, whichever transport ------


@pytest.fixture
def tracing():
    """An SDK tracer provider exporting to memory, with the HTTP client
    instrumentations on (aiohttp's, httpx's and the pyreqwest transport's own,
    each covering its own client); off again afterwards."""
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    from comox import transport_reqwest

    instrumentors = [AioHttpClientInstrumentor(), HTTPXClientInstrumentor(), transport_reqwest]
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


# -- cancellation closes the upstream connection, whatever the phase ------------------


class Hanging:
    """An upstream that answers a POST as far as ``phase`` and then sends
    nothing until the client leaves (counted in ``disconnects``): ``"none"``
    (not even the headers), ``"body"`` (the headers and part of a JSON body),
    ``"headers"`` (a stream's headers), ``"chunk"`` (a stream's headers and
    first event). A stream request with ``"chunk"`` in ``stream_phase`` gets
    that phase instead. With ``hang = False`` it answers in full."""

    def __init__(self, phase: str, stream_phase: str | None = None):
        self.phase, self.stream_phase = phase, stream_phase
        self.hang = True
        self.requests: list[bytes] = []
        self.disconnects = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = await read_body(receive, scope["headers"], 1 << 30)
        self.requests.append(body)
        if not self.hang:
            answer = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": answer})
            return
        phase = self.stream_phase if self.stream_phase and orjson.loads(body).get("stream") else self.phase
        if phase == "body":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]})
            await send({"type": "http.response.body", "body": b'{"id": "', "more_body": True})
        elif phase in ("headers", "chunk"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            if phase == "chunk":
                await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1


async def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def read_through(backend, stream: bool) -> None:
    """A client of the gateway: the answer read to its end, the stream closed
    however that ends (as the core does when its client leaves)."""
    response = await backend.handle(make_request(stream=stream))
    try:
        if response.stream is not None:
            async for _ in response.stream:
                pass
    finally:
        await response.aclose()


@pytest.mark.parametrize("phase,stream", [("none", False), ("none", True), ("body", False), ("headers", True), ("chunk", True)])
def test_a_cancelled_call_closes_its_upstream_connection_in_every_phase(kind, phase, stream):
    """The client left (or the first-byte timeout struck) before the headers,
    mid-body, after a stream's headers or mid-stream: the upstream sees the
    connection close, and the pool still serves the next call. (pyreqwest
    cannot abort a request before it hands back its response: the transport
    shuts the orphan's socket down, comox/transport_reqwest.py.)"""
    up = Hanging(phase)

    async def go(backend):
        call = asyncio.ensure_future(read_through(backend, stream))
        await until(lambda: len(up.requests) == 1)
        await asyncio.sleep(0.2)  # the answer's start (if any) reached the transport
        assert not call.done()
        await cancelled(call)
        await until(lambda: up.disconnects == 1)
        assert up.disconnects == 1
        up.hang = False
        again = await backend.handle(make_request())
        assert again.status == 200

    against(up, kind, go)


async def cancelled(call: asyncio.Future) -> None:
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


def against(up, kind: str, go) -> None:
    """``go(backend)`` with a backend over ``kind`` to the stand-in ``up``, served
    for the test; both closed after."""
    server = ServerThread(up, lifespan="off").start()

    async def main():
        backend = make_backend(kind, server.url)
        try:
            await go(backend)
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_cancelled_call_never_closes_another_call_to_the_same_upstream(kind):
    """A call cancelled before its answer came while a stream from the same
    upstream is being read: the stream goes on, and both connections are
    closed once the stream is (with pyreqwest the orphan's socket cannot be
    told from the stream's, so it is shut down only when no call is left)."""
    up = Hanging("none", stream_phase="chunk")

    async def go(backend):
        live = await backend.handle(make_request(stream=True))
        assert live.stream is not None
        first = await live.stream.__anext__()
        assert b"choices" in first
        orphan = asyncio.ensure_future(read_through(backend, False))
        await until(lambda: len(up.requests) == 2)
        await asyncio.sleep(0.1)
        await cancelled(orphan)
        await asyncio.sleep(0.5)
        assert up.disconnects <= 1  # the stream's connection was left alone ...
        pending = asyncio.ensure_future(live.stream.__anext__())
        await asyncio.sleep(0.2)
        assert not pending.done()  # ... and still waits for its next event
        pending.cancel()
        await live.aclose()
        await until(lambda: up.disconnects == 2)
        assert up.disconnects == 2

    against(up, kind, go)


def test_closing_pyreqwest_orphans_leaves_other_clients_sockets_alone():
    """A pyreqwest call cancelled before its answer, while an aiohttp backend
    streams from the same upstream: the orphan's connection is shut down at
    once (no pyreqwest call is left), the aiohttp stream's is not (only the
    Rust runtime's sockets are ever shut down)."""
    up = Hanging("none", stream_phase="chunk")
    server = ServerThread(up, lifespan="off").start()

    async def go():
        other, backend = make_backend("aiohttp", server.url), make_backend("pyreqwest", server.url)
        try:
            live = await other.handle(make_request(stream=True))
            assert live.stream is not None and b"choices" in await live.stream.__anext__()
            orphan = asyncio.ensure_future(read_through(backend, False))
            await until(lambda: len(up.requests) == 2)
            await asyncio.sleep(0.1)
            orphan.cancel()
            with pytest.raises(asyncio.CancelledError):
                await orphan
            await until(lambda: up.disconnects == 1)
            await asyncio.sleep(0.3)
            assert up.disconnects == 1
            pending = asyncio.ensure_future(live.stream.__anext__())
            await asyncio.sleep(0.2)
            assert not pending.done()  # the aiohttp stream still waits for its next event
            pending.cancel()
            await live.aclose()
            await until(lambda: up.disconnects == 2)
            assert up.disconnects == 2
        finally:
            await other.aclose()
            await backend.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()
