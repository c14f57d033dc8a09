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

A request cancelled before pyreqwest handed back its response (before the
headers, or a stream's first chunk, or a JSON answer's end: the core's
first-byte timeout, a client that left while a node hangs) needs a workaround:
pyreqwest 0.15 runs each request in a tokio task and, when the Python await is
cancelled, drops only the task's JoinHandle, which in tokio detaches the task
rather than aborting it; no API (``Client.close()`` included) reaches it. It
would keep the connection open until the answer came or ``timeout_s`` passed.
So such a call is counted as orphaned, and once no call of this process to
that upstream is in progress any more, :func:`_reap` shuts down (``shutdown(2)``
on a duplicate of the descriptor) the sockets the Rust runtime holds to it:
hyper sees the connection end, the task fails, the upstream sees the gateway
go. While other calls to the same upstream are in progress it waits (their
sockets cannot be told from the orphan's): an orphan then lasts until its
answer's head comes (then it is dropped and closes), or until the traffic to
that node stops (a hung node's does: each call times out, the node is
ejected). Linux only (``/proc``); not through an HTTP proxy (the socket's peer
is the proxy).

OpenTelemetry: no instrumentation exists for pyreqwest, so this transport
makes its own client span (a stream's ends when it closes), as
:mod:`comox.client_spans` describes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import PyreqwestError
from pyreqwest.response import Response

from . import client_spans
from .backends import BackendResponse
from .transport import PoolTransport, UpstreamUnreachable, _is_sse, response_headers

__all__ = ["PyreqwestTransport", "instrument", "uninstrument", "is_instrumented"]

# The client spans' switch lives in comox.client_spans, shared with the
# httptools transport; these names stay for callers that used them.
instrument = client_spans.instrument
uninstrument = client_spans.uninstrument
is_instrumented = client_spans.is_instrumented


class PyreqwestTransport(PoolTransport):
    """One ``pyreqwest.Client`` (hyper connection pool), built lazily inside
    the running event loop on first use. ``default_headers`` go with every request."""

    _client: Client | None = None
    _keys: dict[str, tuple[str, int]]

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._keys = {}  # url -> (host, port), for _Lease

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
        span, headers = client_spans.start(url, headers, "comox.transport_reqwest")
        client = self._client or self._open()
        builder = client.post(url).headers(dict(headers)).body_bytes(body)
        held = _Lease(self._key(url))
        lease: _Lease | None = held  # None once a stream took it over
        try:
            if b'"stream":true' not in body and b'"stream": true' not in body:
                return await self._whole(builder, span, held)
            # One chunk read ahead at most: with pyreqwest's default 64 KiB buffer
            # the body keeps being drained after the response is dropped, so a
            # client that left would not close the upstream connection.
            request = builder.streamed_read_buffer_limit(1).build_streamed()
            try:
                response = await request.__aenter__()
            except PyreqwestError as exc:
                raise UpstreamUnreachable("connect", exc) from exc
            except asyncio.CancelledError:
                held.orphaned()
                raise
            headers_out = _head(response, span)
            if _is_sse(response.headers.get("content-type")):
                done = span
                span = None  # ended when the stream closes
                lease = None  # released when the stream ends or closes

                async def close() -> None:
                    try:
                        await request.__aexit__(None, None, None)
                    finally:
                        held.release()
                    if done is not None:
                        done.end()

                return BackendResponse(response.status, headers_out, stream=_chunks(response, held), close=close)
            try:
                data = bytes(await response.bytes())
            except PyreqwestError as exc:
                raise UpstreamUnreachable("body", exc) from exc
            finally:
                await request.__aexit__(None, None, None)
            return BackendResponse(response.status, headers_out, body=data)
        except UpstreamUnreachable as exc:
            if span is not None:
                client_spans.failed(span, exc.cause)
            raise
        finally:
            if lease is not None:
                lease.release()
            if span is not None:
                span.end()

    def _key(self, url: str) -> tuple[str, int]:
        key = self._keys.get(url)
        if key is None:
            parts = urlsplit(url)
            key = self._keys[url] = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        return key

    async def _whole(self, builder: Any, span: Any, lease: _Lease) -> BackendResponse:
        """A request that asked for no stream: its answer read whole, in Rust
        (a stream all the same, as one chunk, if the upstream sent one)."""
        try:
            response = await builder.build().send()
        except PyreqwestError as exc:
            raise UpstreamUnreachable("connect", exc) from exc
        except asyncio.CancelledError:
            lease.orphaned()
            raise
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
        client_spans.answered(span, response.status)
    return response_headers((name.encode(), value.encode()) for name, value in response.headers.items())


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _chunks(response: Response, lease: _Lease) -> AsyncIterator[bytes]:
    reader = response.body_reader
    try:
        while (chunk := await reader.read_chunk()) is not None:
            yield bytes(chunk)
    except PyreqwestError as exc:  # the stream broke midway: as aiohttp's reader raises
        raise ConnectionError(f"upstream stream broke: {type(exc).__name__}") from exc
    finally:
        lease.release()


# -- closing what a cancelled call left open (the module's docstring says why) --

_lock = threading.Lock()
_live: dict[tuple[str, int], int] = {}  # (host, port) -> calls in progress, in every transport of the process
_orphans: dict[tuple[str, int], int] = {}  # (host, port) -> calls cancelled while pyreqwest still ran them
_started: dict[tuple[str, int], int] = {}  # (host, port) -> calls started, ever


class _Lease:
    """One call to an upstream, from its start until the gateway is done with
    it (a stream: until it ended or was closed)."""

    __slots__ = ("key", "_held")

    def __init__(self, key: tuple[str, int]):
        self.key = key
        self._held = True
        with _lock:
            _live[key] = _live.get(key, 0) + 1
            _started[key] = _started.get(key, 0) + 1

    def orphaned(self) -> None:
        """Cancelled while pyreqwest still ran it: its socket is shut down
        once no other call to the upstream is in progress."""
        with _lock:
            _orphans[self.key] = _orphans.get(self.key, 0) + 1

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        key = self.key
        with _lock:
            live = _live[key] = _live[key] - 1
            reap = live == 0 and _orphans.pop(key, 0) > 0
        if reap:  # in a thread: it may resolve the host name
            threading.Thread(target=_reap, args=(key,), name="comox-reqwest-reap", daemon=True).start()


REAP_AGAIN_S = (0.5, 2.0)  # later sweeps: an orphan still connecting (a busy machine) has no peer at the first


def _reap(key: tuple[str, int]) -> None:
    """Shut down the Rust runtime's sockets to ``key``'s upstream (orphans'
    and idle pooled ones: no call to it is in progress), unless a call to it
    started meanwhile; then again after each of :data:`REAP_AGAIN_S`."""
    host, port = key
    try:
        addresses = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        return
    with _lock:
        started = _started.get(key)
    if not _sweep(key, port, addresses):
        return
    for delay in REAP_AGAIN_S:
        time.sleep(delay)
        with _lock:
            if _started.get(key) != started:  # calls since: their pooled sockets are theirs; the next orphan reaps
                return
        if not _sweep(key, port, addresses):
            return


def _sweep(key: tuple[str, int], port: int, addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    """One pass of :func:`_reap`; False when a call to the upstream started meanwhile."""
    for fd in _runtime_sockets():
        try:
            dup = os.dup(fd)  # a duplicate: the runtime keeps (and closes) its own
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=dup)
        except OSError:  # closed and reused meanwhile, by something that is no socket
            os.close(dup)
            continue
        try:
            peer = sock.getpeername()
            if not isinstance(peer, tuple) or peer[1] != port:
                continue
            address = ipaddress.ip_address(peer[0].split("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if address in addresses:
                with _lock:
                    if _live.get(key):  # a call started meanwhile: the next to end reaps again
                        _orphans[key] = _orphans.get(key, 0) + 1
                        return False
                    sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()
    return True


def _runtime_sockets() -> set[int]:
    """The sockets registered with a tokio (mio) runtime of this process: those
    of each epoll instance that also has an eventfd (mio's waker; asyncio's
    loops wake through a socket pair), so no asyncio socket (the aiohttp
    transport's, the health checks') is ever shut down. Empty without /proc."""
    targets: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    for name in names:
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except (OSError, ValueError):
            pass
    found: set[int] = set()
    for fd, target in targets.items():
        if target != "anon_inode:[eventpoll]":
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                registered = [int(line.split()[1]) for line in f if line.startswith("tfd:")]
        except (OSError, ValueError, IndexError):
            continue
        if any(targets.get(t) == "anon_inode:[eventfd]" for t in registered):
            found.update(t for t in registered if targets.get(t, "").startswith("socket:"))
    return found
