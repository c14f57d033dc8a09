"""What a backend is: one async method that turns a request into a response,
plus ``aclose()`` — the shape of an httpx transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .request import GatewayRequest
    from .settings import BackendSettings

__all__ = ["Backend", "BackendResponse"]


class BackendResponse:
    """A backend's answer: status, headers, and either ``body`` (bytes) or
    ``stream`` (an async iterator of bytes, e.g. SSE, forwarded as it comes).

    ``headers`` are ``(name, value)`` byte pairs with lower-case names, already
    free of hop-by-hop headers. ``close`` releases the upstream connection; it
    is called once the response was sent or abandoned.
    """

    __slots__ = ("status", "headers", "body", "stream", "_close")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        body: bytes | None = None,
        stream: AsyncIterator[bytes] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if (body is None) == (stream is None):
            raise ValueError("a BackendResponse has either a body or a stream")
        self.status = status
        self.headers = headers if headers is not None else [(b"content-type", b"application/json")]
        self.body = body
        self.stream = stream
        self._close = close

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()


@runtime_checkable
class Backend(Protocol):
    """A backend type registered through ``comox_backend_types``.

    ``handle`` returns once the response status and headers are known. It raises
    :class:`comox.errors.BackendUnavailable` when the backend could not be
    reached (connection refused, timeout before the first byte): the request is
    then retried on another backend. A 5xx response is returned, not raised.
    """

    name: str
    settings_model: type[BackendSettings]

    async def handle(self, request: GatewayRequest) -> BackendResponse: ...

    async def aclose(self) -> None: ...
