"""A transport on ``pyreqwest`` (Rust's reqwest and hyper), behind the same
seam as :class:`comox.transport.AiohttpTransport`: ``transport = "pyreqwest"``
in a backend's settings.

It keeps what the aiohttp transport does: connect and read timeouts (the
first-byte timeout is the core's), a cap on connections in use, idle
keep-alive below the upstreams' own idle timeout, TLS verification (with
extra roots from ``ca_file``), no proxy unless ``trust_env`` (then reqwest's
``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` handling), no cookie store, no
redirects, no decompression (bytes go through as the upstream sent them), and
a stream whose ``aclose()`` drops the response, so hyper closes the upstream
connection when the client leaves.

Known gap (why it is not the default): a request cancelled before its response
headers arrive (the core's first-byte timeout, a client that left while a node
hangs) does not close its upstream connection; pyreqwest 0.15 keeps the Rust
request running when the Python await is cancelled. The hung node never sees
the gateway go (``docs/benchmarks.md``, the pyreqwest transport).

OpenTelemetry: no instrumentation exists for pyreqwest, so this transport
makes its own client span (``POST``, kind CLIENT, ``http.request.method``,
``url.full``, ``server.address``/``server.port``,
``http.response.status_code``, ``error.type``; a stream's span ends when it
closes) and sends its W3C ``traceparent`` upstream. It does so after
:func:`instrument` (the counterpart of the aiohttp/httpx instrumentors, with
their ``tracer_provider``), or whenever the caller's current span is recording
(the otel plugin's attempt span is current around every backend call): then
with the global tracer provider, and if that is not the one recording (the
plugin's own ``otlp_endpoint`` provider), the HTTP span is not recorded but the
attempt span's ``traceparent`` still goes upstream, so the backend's spans join
the trace under Comox's client span of the attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import PyreqwestError
from pyreqwest.response import Response

from .backends import BackendResponse
from .transport import PoolTransport, UpstreamUnreachable, _is_sse, response_headers

__all__ = ["PyreqwestTransport", "instrument", "uninstrument"]

try:  # optional: spans only when OpenTelemetry is installed
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - comox[otel] not installed
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

_instrumented = False
_provider: Any = None


def instrument(tracer_provider: Any = None) -> None:
    """Client spans for every call, with ``tracer_provider`` (``None``: the
    global one), as ``AioHttpClientInstrumentor().instrument()`` does for aiohttp."""
    global _instrumented, _provider
    _instrumented, _provider = True, tracer_provider


def uninstrument() -> None:
    global _instrumented, _provider
    _instrumented, _provider = False, None


class PyreqwestTransport(PoolTransport):
    """One ``pyreqwest.Client`` (hyper connection pool), built lazily inside
    the running event loop on first use. ``default_headers`` go with every request."""

    _client: Client | None = None


    def _open(self) -> Client:
        builder = (
            ClientBuilder()
            .connect_timeout(timedelta(seconds=self.connect_timeout_s))
            .read_timeout(timedelta(seconds=self.timeout_s))
            .max_connections(self.max_connections)
            .pool_idle_timeout(timedelta(seconds=self.keepalive_s))
            .default_headers(self.default_headers)
            .default_cookie_store(False)
            .follow_redirects(False)
            .referer(False)
            .gzip(False).brotli(False).zstd(False).deflate(False)
            .http1_only()
        )
        if not self.trust_env:  # a gateway must not pick up HTTP_PROXY for its fleet
            builder = builder.no_proxy()
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                builder = builder.add_root_certificate_pem(f.read())
        self._client = builder.build()
        return self._client

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> BackendResponse:
        span = None
        if _trace is not None and (_instrumented or _trace.get_current_span().is_recording()):
            span, headers = _start_span(url, headers)
        client = self._client or self._open()
        builder = client.post(url).headers(dict(headers)).body_bytes(body)
        try:
            if b'"stream":true' not in body and b'"stream": true' not in body:
                return await self._whole(builder, span)
            # One chunk read ahead at most: with pyreqwest's default 64 KiB buffer
            # the body keeps being drained after the response is dropped, so a
            # client that left would not close the upstream connection.
            request = builder.streamed_read_buffer_limit(1).build_streamed()
            try:
                response = await request.__aenter__()
            except PyreqwestError as exc:
                raise UpstreamUnreachable("connect", exc) from exc
            headers_out = _head(response, span)
            if _is_sse(response.headers.get("content-type")):
                done = span
                span = None  # ended when the stream closes

                async def close() -> None:
                    await request.__aexit__(None, None, None)
                    if done is not None:
                        done.end()

                return BackendResponse(response.status, headers_out, stream=_chunks(response), close=close)
            try:
                data = bytes(await response.bytes())
            except PyreqwestError as exc:
                raise UpstreamUnreachable("body", exc) from exc
            finally:
                await request.__aexit__(None, None, None)
            return BackendResponse(response.status, headers_out, body=data)
        except UpstreamUnreachable as exc:
            if span is not None:
                span.set_attribute("error.type", type(exc.cause).__name__)
                span.set_status(_trace.StatusCode.ERROR)
            raise
        finally:
            if span is not None:
                span.end()

    async def _whole(self, builder: Any, span: Any) -> BackendResponse:
        """A request that asked for no stream: its answer read whole, in Rust
        (a stream all the same, as one chunk, if the upstream sent one)."""
        try:
            response = await builder.build().send()
        except PyreqwestError as exc:
            raise UpstreamUnreachable("connect", exc) from exc
        try:
            data = bytes(await response.bytes())
        except PyreqwestError as exc:
            raise UpstreamUnreachable("body", exc) from exc
        headers_out = _head(response, span)
        if _is_sse(response.headers.get("content-type")):
            return BackendResponse(response.status, headers_out, stream=_one(data))
        return BackendResponse(response.status, headers_out, body=data)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _head(response: Response, span: Any) -> list[tuple[bytes, bytes]]:
    """The response's headers for the gateway; its status on the span."""
    if span is not None:
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_attribute("error.type", str(response.status))
    return response_headers((name.encode(), value.encode()) for name, value in response.headers.items())


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _chunks(response: Response) -> AsyncIterator[bytes]:
    reader = response.body_reader
    try:
        while (chunk := await reader.read_chunk()) is not None:
            yield bytes(chunk)
    except PyreqwestError as exc:  # the stream broke midway: as aiohttp's reader raises
        raise ConnectionError(f"upstream stream broke: {type(exc).__name__}") from exc


def _start_span(url: str, headers: Mapping[str, str]) -> tuple[Any, Mapping[str, str]]:
    parts = urlsplit(url)
    tracer = _trace.get_tracer("comox.transport_reqwest", tracer_provider=_provider)
    span = tracer.start_span("POST", kind=_trace.SpanKind.CLIENT, attributes={
        "http.request.method": "POST", "url.full": url, "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
    })
    carrier = dict(headers)
    _propagate.inject(carrier, context=_trace.set_span_in_context(span))
    return span, carrier

