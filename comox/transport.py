"""How HTTP backends move bytes: a one-method transport, in the shape
of httpx's ``AsyncBaseTransport``.

``post(url, body, headers)`` sends one request and returns a
:class:`comox.backends.BackendResponse` once the status and headers are known:
the whole body for a JSON answer, or an unbuffered ``stream`` for
``text/event-stream`` whose ``aclose()`` closes the upstream connection (so an
upstream sees a client that went away). It raises :class:`UpstreamUnreachable`
when the upstream could not be reached or broke before its answer was complete.
Headers come back lower-cased and free of hop-by-hop ones.

Four transports ship:

* :class:`comox.transport_httptools.HttptoolsTransport` (the default, ``transport
  = "httptools"``): Comox's own HTTP/1.1 client on the event loop's sockets and
  httptools' C parser; a minimal proxy over it serves 2.7× the requests per
  second of one over aiohttp (``docs/benchmarks.md``).
* :class:`AiohttpTransport` (``transport = "aiohttp"``): one ``aiohttp``
  connection pool. On a 2-core box it proxies 2-4× more requests per second
  than stock httpx 0.28, whose pool and pure-Python parser collapse under
  concurrency.
* :class:`comox.transport_reqwest.PyreqwestTransport` (``transport =
  "pyreqwest"``, ``comox[reqwest]``): Rust's reqwest and hyper, with the same
  behaviour; not the default while it measures no faster through the whole
  gateway (``docs/benchmarks.md``).
* :class:`HttpxTransport`: any ``httpx.AsyncClient`` (any httpx transport, mocks,
  instrumentation), used when one is passed as ``OpenAIBackend(client=...)``.

OpenTelemetry's aiohttp-client and httpx instrumentations both see every
backend call, and the httptools and pyreqwest transports make their own span
(:mod:`comox.client_spans`), so each
transport gives one client span per call (docs/deployment.md). Wrappers compose by wrapping: an object with the same
``post``/``aclose`` that delegates.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import aiohttp
import httpx
from yarl import URL

from .backends import BackendResponse

__all__ = ["Transport", "AiohttpTransport", "HttpxTransport", "UpstreamUnreachable", "response_headers"]

# Never forwarded from an upstream response: hop-by-hop headers, and those the
# ASGI server or the gateway sets itself.
DROPPED_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length",
    b"x-request-id", b"server", b"date",
})


def response_headers(raw: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes] = DROPPED_RESPONSE_HEADERS) -> list[tuple[bytes, bytes]]:
    """Lower-cased ``(name, value)`` pairs without the dropped ones."""
    headers = []
    for name, value in raw:
        name = name.lower()
        if name not in dropped:
            headers.append((name, value))
    return headers


class UpstreamUnreachable(Exception):
    """The upstream could not be reached (``during="connect"``), or broke while
    sending a non-streaming body (``during="body"``)."""

    def __init__(self, during: str, cause: BaseException):
        super().__init__(f"{during}: {type(cause).__name__}")
        self.during = during
        self.cause = cause


@runtime_checkable
class Transport(Protocol):
    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> BackendResponse: ...

    async def aclose(self) -> None: ...


def _is_sse(content_type: str | None) -> bool:
    return content_type is not None and content_type.startswith("text/event-stream")


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    """The system's trusted CAs and those in ``ca_file`` (PEM)."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_file)
    return context


class PoolTransport:
    """What a transport with its own connection pool is configured with."""

    def __init__(self, *, timeout_s: float = 600.0, connect_timeout_s: float = 5.0, max_connections: int = 1024,
                 keepalive_s: float = 4.0, default_headers: Mapping[str, str] | None = None,
                 ca_file: str | None = None, trust_env: bool = False):
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        # Below the 5 s idle timeout of uvicorn (vLLM, SGLang) and llama.cpp's
        # server, so we close an idle connection before they do.
        self.keepalive_s = keepalive_s
        self.default_headers = dict(default_headers or {})
        self.ca_file = ca_file  # extra trusted CAs (PEM) for https:// upstreams
        self.trust_env = trust_env  # HTTP(S)_PROXY / NO_PROXY from the environment


class AiohttpTransport(PoolTransport):
    """One ``aiohttp.ClientSession`` (connection pool), opened lazily inside the
    running event loop on first use. ``default_headers`` go with every request."""

    _session: aiohttp.ClientSession | None = None
    _urls: dict[str, URL]

    def _open(self) -> aiohttp.ClientSession:
        self._urls = {}
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         keepalive_timeout=self.keepalive_s, enable_cleanup_closed=False,
                                         ssl=_ssl_context(self.ca_file) if self.ca_file else True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.default_headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s, sock_read=self.timeout_s),
            auto_decompress=False,  # bytes go through as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies must not follow other requests
            trust_env=self.trust_env,  # off by default: a gateway must not pick up HTTP_PROXY for its fleet
        )
        return self._session

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = URL(url)
        return parsed

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> BackendResponse:
        session = self._session
        if session is None or session.closed:
            session = self._open()
        try:
            response = await session.request("POST", self._url(url), data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamUnreachable("connect", exc) from exc
        headers_out = response_headers(response.raw_headers)
        if _is_sse(response.headers.get("Content-Type")):
            async def close() -> None:
                response.close()  # a no-op once the stream was read to its end (the connection went back to the pool)

            return BackendResponse(response.status, headers_out, stream=response.content.iter_any(), close=close)
        try:
            data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            response.close()
            raise UpstreamUnreachable("body", exc) from exc
        except BaseException:
            response.close()
            raise
        response.release()
        return BackendResponse(response.status, headers_out, body=data)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class HttpxTransport:
    """Bytes through an ``httpx.AsyncClient``; ``default_headers`` go with every request."""

    def __init__(self, client: httpx.AsyncClient, *, default_headers: Mapping[str, str] | None = None):
        self.client = client
        self.default_headers = dict(default_headers or {})

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> BackendResponse:
        client = self.client
        request = client.build_request("POST", url, content=body, headers={**self.default_headers, **headers})
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnreachable("connect", exc) from exc
        headers_out = response_headers(response.headers.raw)
        if _is_sse(response.headers.get("content-type")):
            return BackendResponse(response.status_code, headers_out, stream=response.aiter_raw(), close=response.aclose)
        try:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
        except httpx.TransportError as exc:
            raise UpstreamUnreachable("body", exc) from exc
        finally:
            await response.aclose()
        return BackendResponse(response.status_code, headers_out, body=data)

    async def aclose(self) -> None:
        await self.client.aclose()

