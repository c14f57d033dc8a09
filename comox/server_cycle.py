"""One request of a :class:`comox.server_protocol.ComoxHttpProtocol`
connection: the app's run, its ASGI ``receive`` and ``send``.

It answers as uvicorn's own ``RequestResponseCycle`` does, byte for byte and
error for error (tests/test_server_protocol.py holds the two together), with
less work per request: no ``asyncio.Event`` per request (a receive whose body
has arrived, the usual case, waits for nothing), and the response head built
with a few whole-list operations instead of uvicorn's per-header loop (two
regex searches, a ``lower()``, three compares per header). Anything unusual
in a head, and every head while there is an access log, is uvicorn's own
``send`` to build; the app's run is uvicorn's own ``run_asgi``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle

if TYPE_CHECKING:
    from .disconnects import ServerWatch
    from .server_protocol import ComoxHttpProtocol

__all__ = ["ComoxResponseCycle"]

_sleep = asyncio.sleep
_DISCONNECT = "http.disconnect"
_uvicorn_send = RequestResponseCycle.send

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
# Names lists seen valid: names -> (their header lines with a %s for each
# value, the index of the first content-length when it is the only framing
# name, whether there is any). Only tuples of lower-case bytes get here (so a
# names list found here needs no other check, and a str is never found); at
# most 256 (then each is checked). A %-format of the values builds the lines
# in one call, a third of the time of a join per header.
_KNOWN_NAMES: dict[tuple[bytes, ...], tuple[bytes, int | None, bool]] = {}


class ComoxResponseCycle:
    """One request's ASGI ``receive`` and ``send``, and :meth:`run_asgi`, the
    task that runs the app for it. Its response state has uvicorn's names."""

    __slots__ = ("protocol", "scope", "transport", "flow", "on_response", "body", "more_body", "delivered",
                 "waiter", "watched", "disconnected", "keep_alive", "waiting_for_100_continue", "response_started",
                 "response_complete", "chunked_encoding", "expected_content_length")

    def __init__(self, protocol: ComoxHttpProtocol, scope: dict[str, Any], keep_alive: bool,
                 expect_100_continue: bool):
        self.protocol = protocol
        self.scope = scope
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.on_response = protocol.on_response_complete  # (uvicorn's run_asgi unsets it when the app returns)
        self.body = b""  # what has arrived and not been received
        self.more_body = True  # until the request's last byte has arrived
        self.delivered = False  # the request's last message has been received
        self.waiter: asyncio.Future[None] | None = None  # a receive waiting for the request
        self.watched: ServerWatch | None = None  # a task to cancel if the client leaves (comox.disconnects)
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0

    def wake(self) -> None:
        """Something for a waiting ``receive``: body, the request's end, the client's leaving."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def client_left(self) -> None:
        """The connection was lost before the answer ended."""
        self.disconnected = True
        if self.watched is not None:
            self.watched.client_left()

    # uvicorn's own, for the attributes it reads here and :meth:`send`'s head
    run_asgi = RequestResponseCycle.run_asgi
    send_500_response = RequestResponseCycle.send_500_response

    @property
    def logger(self) -> logging.Logger:
        return self.protocol.logger

    @property
    def access_log(self) -> bool:
        return self.protocol.access_log

    @property
    def access_logger(self) -> logging.Logger:
        return self.protocol.access_logger

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.protocol.server_state.default_headers

    async def receive(self) -> dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        # Wait only when nothing has arrived to give: a body not yet here, or
        # (the request given whole) the client's leaving or the answer's end.
        while not (self.disconnected or self.response_complete or self.body
                   or not (self.more_body or self.delivered)):
            self.flow.resume_reading()
            self.waiter = waiter = self.protocol.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        if self.disconnected or self.response_complete:
            return {"type": _DISCONNECT}
        body, self.body = self.body, b""
        if not self.more_body:
            self.delivered = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Any) -> None:
        flow = self.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
            head = self._fast_head(message) if _FAST_HEAD and not self.protocol.access_log else None
            if head is None:  # uvicorn builds it (and logs the request), or raises its error
                return await _uvicorn_send(self, message)  # type: ignore[arg-type]
            self.transport.write(head)
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
            if self._body(message.get("body", b""), message.get("more_body", False)):
                await _sleep(0)
        else:
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after response already completed.")

    def _body(self, body: bytes, more_body: bool) -> bool:
        """``send`` of an http.response.body message; True when the app should
        give the loop a turn (its answer has ended, and the transport holds bytes
        to the turn's end: they go out before what the app does after answering
        — logs, metrics, accounting — not after it)."""
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
        elif self.chunked_encoding:
            if body:
                self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if not more_body
                                     else b"%x\r\n%b\r\n" % (len(body), body))
            elif not more_body:
                self.transport.write(b"0\r\n\r\n")
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            self.transport.write(body)
        if more_body:
            return False
        if self.expected_content_length != 0:
            raise RuntimeError("Response content shorter than Content-Length")
        self.response_complete = True
        if self.waiter is not None:
            self.wake()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return getattr(self.transport, "held", None) is not None

    # The app's own answers (comox.asgi_io.Responder) are sent with these plain
    # calls, without the ASGI messages and a send coroutine for each.

    def send_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """``send`` of an http.response.start: False, and nothing sent, when
        ``send`` must send it (a response begun, a write paused, a client gone,
        uvicorn's access log, a head uvicorn builds)."""
        if self.response_started or self.disconnected or self.flow.write_paused or not _FAST_HEAD \
                or self.protocol.access_log:
            return False
        head = self._head(status, headers)
        if head is None:
            return False
        self.transport.write(head)
        return True

    def send_body(self, body: bytes, more_body: bool) -> bool | None:
        """``send`` of an http.response.body: None, and nothing sent, when
        ``send`` must send it (no response begun, or ended; a write paused, a
        client gone); else whether the app should give the loop a turn, as
        ``send`` takes one."""
        if not self.response_started or self.response_complete or self.disconnected or self.flow.write_paused:
            return None
        return self._body(body, more_body)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool | None:
        """:meth:`send_start` and :meth:`send_body` of a whole answer: None, and nothing
        sent, when ``send`` must send it. (Its body follows its head at once,
        as it is in memory already, also if the head's write paused writing.)"""
        if not self.send_start(status, headers):
            return None
        return self._body(body, False)

    def _fast_head(self, message: Any) -> bytes | None:
        """The head uvicorn's ``send`` would build, its state set as it sets it;
        None, and nothing changed, for uvicorn to build."""
        try:
            status = message["status"]
            headers = message.get("headers", ())
        except Exception:  # a malformed message: uvicorn raises its error for it
            return None
        return self._head(status, headers)

    def _head(self, status: Any, headers: Any) -> bytes | None:
        """:meth:`_fast_head` of a message's status and headers."""
        try:
            status_line = STATUS_LINE[status]
            if type(headers) is not list and type(headers) is not tuple:
                return None  # an iterator: uvicorn's list() must be the one to consume it
            default_headers = self.protocol.server_state.default_headers
            if default_headers:
                headers = [*default_headers, *headers]  # date (and --header ones), first as in uvicorn
            content = [status_line]
            chunked = self.chunked_encoding
            length = self.expected_content_length
            keep_alive = self.keep_alive
            has_connection_close = False
            if headers:
                names, values = zip(*headers, strict=True)  # ValueError unless every header has two items
                # An answer's names are most often the same list as before, checked then.
                known = _KNOWN_NAMES.get(names)  # (TypeError for a memoryview: uvicorn's turn)
                if known is None:
                    if not all(map(_IS_LOWER, names)):
                        return None  # uvicorn lowers an upper-case name (and raises for a str)
                    joined_names = b"".join(names)
                    if len(joined_names.translate(None, _NAME_REJECT)) != len(joined_names):
                        return None  # uvicorn raises "Invalid HTTP header name."
                    framing_names = _FRAMING.intersection(names)
                    length_at = names.index(b"content-length") if framing_names == _LENGTH_ONLY else None
                    lines_format = b"".join(name.replace(b"%", b"%%") + b": %s\r\n" for name in names)
                    known = (lines_format, length_at, bool(framing_names))
                    if len(_KNOWN_NAMES) < 256:
                        _KNOWN_NAMES[names] = known
                lines_format, length_at, any_framing = known
                joined_values = b"".join(values)
                if len(joined_values.translate(None, _VALUE_REJECT)) != len(joined_values):
                    return None  # uvicorn raises "Invalid HTTP header value."
                content.append(lines_format % values)
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
        except Exception:  # a malformed message: uvicorn raises its error for it
            return None
        self.response_started = True
        self.waiting_for_100_continue = False
        self.chunked_encoding = chunked
        self.expected_content_length = length
        self.keep_alive = keep_alive
        return head
