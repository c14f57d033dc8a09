"""The HTTP protocol ``comox serve`` runs uvicorn with: uvicorn's own
httptools protocol, whose writes wait for the end of the event loop's turn
and go out together.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body with the next message: two writes (two
system calls, two TCP segments on loopback) for every answer that one write
could carry, and each wakes the client if it sleeps. :class:`BatchedTransport`
holds a connection's writes to the end of the loop's turn
(:mod:`comox.write_batch`), so an answer goes out in one write, beside the
other answers of that turn, and the bytes keep their order.
:class:`ComoxResponseCycle` builds that head, the same bytes, in less time than uvicorn.
Mounted in another server, Comox answers the same, with that server's writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from uvicorn._types import ASGI3Application, ASGISendEvent
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from .write_batch import batch_for

__all__ = ["BatchedTransport", "ComoxHttpProtocol", "ComoxServeProtocol", "ComoxResponseCycle", "SERVER_OPTIONS",
           "forwarded_app"]

_JOIN_BELOW = 64 * 1024  # larger bytes are written at once (after what is held), not copied into one buffer


class BatchedTransport:
    """A connection's transport whose writes are held to the end of the event
    loop's turn (:mod:`comox.write_batch`), then sent in one write: a response's
    head with its body, a stream's chunks of that turn together. A close sends
    what is held first; an abort drops it; bytes past ``_JOIN_BELOW`` are
    written at once, after what was held, rather than copied."""

    __slots__ = ("transport", "batch", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self.batch = batch_for(loop)
        self.held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self.held
        if held is None:
            if not data:
                return  # (as the transport does with nothing to write)
            if len(data) < _JOIN_BELOW:
                self.held = bytes(data)  # a copy: a bytearray may change before the turn ends
                self.batch.hold(self)
                return
        elif len(held) + len(data) < _JOIN_BELOW:
            self.held = held + data  # (any bytes-like object)
            return
        else:
            self.flush()
        self.transport.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + len(self.held or b"")

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, set_protocol, …
        return getattr(self.transport, name)


# uvicorn checks each header name against HEADER_RE and each value against
# HEADER_VALUE_RE, one search per header. Both are one-character classes, so a
# byte of all the names (values) joined is rejected exactly when one name
# (value) is: the fast head checks the joined bytes once, with bytes.translate
# (a table lookup, a third of a regex search's time). The tables are read off
# the regexes themselves; a uvicorn whose patterns differ gets no fast head.
_UVICORN_PATTERNS = (b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]', b"[\x00-\x08\x0a-\x1f\x7f]")
_FAST_HEAD = (HEADER_RE.pattern, HEADER_VALUE_RE.pattern) == _UVICORN_PATTERNS
_VALUE_REJECT = bytes(c for c in range(256) if HEADER_VALUE_RE.search(bytes((c,))))
_NAME_REJECT = bytes(c for c in range(256) if HEADER_RE.search(bytes((c,))))
# True for a bytes name uvicorn's lower() leaves as it is (False, and uvicorn's
# turn, for one with no letter); TypeError for a name of another type.
_IS_LOWER = bytes.islower
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))  # the names uvicorn acts on
_LENGTH_ONLY = frozenset((b"content-length",))
# Names lists seen valid: names -> (their joined length, the index of the first
# content-length when it is the only framing name, whether there is any).
# Only tuples of lower-case bytes get here; at most 256 (then each is checked).
_KNOWN_NAMES: dict[tuple[bytes, ...], tuple[int, int | None, bool]] = {}
_LINE = b": ".join  # a (name, value) pair's header line, without its CRLF
_uvicorn_send = RequestResponseCycle.send


class ComoxResponseCycle(RequestResponseCycle):
    """uvicorn's request-response cycle whose ``http.response.start`` builds
    the head with a few whole-list operations instead of uvicorn's per-header
    loop (two regex searches, a ``lower()``, three compares per header): the
    same bytes, the same framing state. Anything else, or anything unusual,
    is uvicorn's own :meth:`RequestResponseCycle.send`, errors included.
    It adds no state, so a cycle uvicorn made can become one."""

    def send(self, message: ASGISendEvent) -> Coroutine[Any, Any, None]:
        # Not a coroutine function itself: once the response has started, a
        # message gets uvicorn's own coroutine, not one more around it (a
        # stream sends hundreds: ~20 ns more each, not ~100).
        if self.response_started:
            if message.get("more_body", False):
                return _uvicorn_send(self, message)
            return self._end(message)
        return self._start(message)

    async def _end(self, message: ASGISendEvent) -> None:
        """The response's last message: sent, then one turn of the loop for
        the app, if the transport holds bytes to the turn's end, so that the
        answer goes out before the app goes on to what it does after
        answering (logs, metrics, accounting), not after it."""
        await _uvicorn_send(self, message)
        if getattr(self.transport, "held", None) is not None:
            await asyncio.sleep(0)  # the batch's flush was queued before this step resumes

    async def _start(self, message: ASGISendEvent) -> None:
        head = None
        # checked when awaited, as uvicorn checks (another start may have run since send was called)
        if not (self.response_started or self.access_log or self.disconnected or self.flow.write_paused):
            head = self._fast_head(message)
        if head is None:
            return await _uvicorn_send(self, message)
        self.transport.write(head)

    def _fast_head(self, message: ASGISendEvent) -> bytes | None:
        """The head uvicorn would write for ``message``, its state set as
        uvicorn sets it; None, and nothing changed, for uvicorn to do it."""
        try:
            if message["type"] != "http.response.start":
                return None
            status = message["status"]
            status_line = STATUS_LINE[status]
            headers: Any = message.get("headers", ())
            if type(headers) is not list and type(headers) is not tuple:
                return None  # an iterator: uvicorn's list() must be the one to consume it
            if self.default_headers:
                headers = [*self.default_headers, *headers]  # date (and --header ones), first as in uvicorn
            content = [status_line]
            chunked = self.chunked_encoding
            length = self.expected_content_length
            keep_alive = self.keep_alive
            has_connection_close = False
            if headers:
                names, values = zip(*headers)  # ValueError if a header has fewer than two items
                if not all(map(_IS_LOWER, names)):
                    return None  # uvicorn lowers an upper-case name (and raises for a str or memoryview)
                known = _KNOWN_NAMES.get(names)  # an answer's names are most often the same list as before
                if known is None:
                    joined_names = b"".join(names)
                    if len(joined_names.translate(None, _NAME_REJECT)) != len(joined_names):
                        return None  # uvicorn raises "Invalid HTTP header name."
                    framing_names = _FRAMING.intersection(names)
                    length_at = names.index(b"content-length") if framing_names == _LENGTH_ONLY else None
                    known = (len(joined_names), length_at, bool(framing_names))
                    if len(_KNOWN_NAMES) < 256:
                        _KNOWN_NAMES[names] = known
                names_length, length_at, any_framing = known
                joined_values = b"".join(values)
                if len(joined_values.translate(None, _VALUE_REJECT)) != len(joined_values):
                    return None  # uvicorn raises "Invalid HTTP header value."
                lines = b"\r\n".join(map(_LINE, headers))
                if len(lines) != names_length + len(joined_values) + 4 * len(headers) - 2:
                    return None  # a header of three items or more: uvicorn's unpacking raises
                content += (lines, b"\r\n")
                if length_at is not None:  # the usual answer: only the first content-length counts
                    if chunked is None:
                        length = int(values[length_at].decode())
                        chunked = False
                elif any_framing:  # uvicorn's handling, for names already lower-case
                    for name, value in headers:
                        if name == b"content-length" and chunked is None:
                            length = int(value.decode())
                            chunked = False
                        elif name == b"transfer-encoding" and value.lower() == b"chunked":
                            length = 0
                            chunked = True
                        elif name == b"connection":
                            if b"close" in [token.lower().strip() for token in value.split(b",")]:
                                keep_alive = False
                                has_connection_close = True
            if not keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")
            if chunked is None and self.scope["method"] != "HEAD" and status not in (204, 304):
                chunked = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            head = b"".join(content)
        except Exception:  # a malformed message: uvicorn's send raises its own error for it
            return None
        self.response_started = True
        self.waiting_for_100_continue = False
        self.chunked_encoding = chunked
        self.expected_content_length = length
        self.keep_alive = keep_alive
        return head


_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")  # the headers uvicorn's proxy-headers middleware reads


class ComoxHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`BatchedTransport`, its
    cycles :class:`ComoxResponseCycle`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(BatchedTransport(transport, self.loop))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # Every cycle, pipelined ones included, starts here, before its app can send.
        # uvicorn builds the cycle inline in on_headers_complete; the subclass adds no
        # slots or state, so switching the class keeps every attribute uvicorn set.
        if _FAST_HEAD and type(cycle) is RequestResponseCycle:
            cycle.__class__ = ComoxResponseCycle
        super()._start_asgi_task(cycle, app)


class ComoxServeProtocol(ComoxHttpProtocol):
    """The protocol ``comox serve`` runs (:data:`SERVER_OPTIONS`): a
    :class:`ComoxHttpProtocol` that honours ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` as uvicorn does by default, from the addresses in
    ``FORWARDED_ALLOW_IPS`` (127.0.0.1 unless set), with uvicorn's own
    middleware, run only for a request that has one of them. uvicorn wraps
    every request in it (a coroutine more, a loop over the headers), so
    ``SERVER_OPTIONS`` turns uvicorn's off."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is self.app and self.config.proxy_headers is False:  # (not a 503 of limit_concurrency's)
            names = dict(cycle.scope["headers"])
            if _FORWARDED[0] in names or _FORWARDED[1] in names:
                app = forwarded_app(self.config)
        super()._start_asgi_task(cycle, app)


def forwarded_app(config: Config) -> ASGI3Application:
    """``config``'s app inside uvicorn's ProxyHeadersMiddleware, trusting
    ``config.forwarded_allow_ips`` (``FORWARDED_ALLOW_IPS``), as uvicorn
    itself would wrap it: made once per config."""
    app: ASGI3Application | None = getattr(config, "_comox_forwarded_app", None)
    if app is None:
        app = ProxyHeadersMiddleware(config.loaded_app, trusted_hosts=config.forwarded_allow_ips)
        config._comox_forwarded_app = app  # type: ignore[attr-defined]
    return app


# What ``comox serve`` (and each of its workers) passes to ``uvicorn.Config``:
# this protocol, and no ``server: uvicorn`` header (it tells a scanner what
# runs here, and costs every answer a header).
# uvicorn's proxy-headers middleware is off: the protocol runs it for the
# requests that carry X-Forwarded-For or X-Forwarded-Proto.
SERVER_OPTIONS: dict[str, Any] = {"http": ComoxServeProtocol, "server_header": False, "proxy_headers": False}
