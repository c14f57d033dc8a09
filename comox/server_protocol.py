"""The HTTP protocol ``comox serve`` runs uvicorn with: uvicorn's own
httptools protocol, whose response head waits for the response's first body
bytes and goes out with them in one write.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body with the next message: two writes (two
system calls, two TCP segments on loopback) for every answer that one write
could carry. :class:`HeldHeadTransport` holds a head until the connection's
next write, close, or the end of the event loop's turn, whichever comes first,
so nothing waits longer than that and the bytes keep their order.
Mounted in another server, Comox answers the same, with that server's writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ComoxHttpProtocol", "HeldHeadTransport", "SERVER_OPTIONS"]

_HEAD = b"HTTP/1."
_JOIN_BELOW = 64 * 1024  # a larger body is written after the head, not copied into one buffer with it


class HeldHeadTransport:
    """A connection's transport whose writes that start a response head are
    held until the next write (sent together), a close, or the loop's next turn."""

    __slots__ = ("transport", "loop", "held", "flush_handle")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None
        self.flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self.held
        if held is not None:
            self.held = None
            handle = self.flush_handle
            if handle is not None:
                self.flush_handle = None
                handle.cancel()
            if len(data) < _JOIN_BELOW:
                self.transport.write(b"".join((held, data)))  # data may be any bytes-like object
                return
            self.transport.write(held)
        elif data[:7] == _HEAD:  # a status line: its body, if any, comes in this loop turn
            self.held = bytes(data)
            self.flush_handle = self.loop.call_soon(self.flush)
            return
        self.transport.write(data)

    def flush(self) -> None:
        self.flush_handle = None
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


class ComoxHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`HeldHeadTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeldHeadTransport(transport, self.loop))  # type: ignore[arg-type]


# What ``comox serve`` (and each of its workers) passes to ``uvicorn.Config``:
# this protocol, and no ``server: uvicorn`` header (it tells a scanner what
# runs here, and costs every answer a header).
SERVER_OPTIONS: dict[str, Any] = {"http": ComoxHttpProtocol, "server_header": False}
