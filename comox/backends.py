"""What a backend is: one async method that turns a request into a response,
plus ``aclose()`` — the shape of an httpx transport — and the optional
capabilities the core looks for, each a protocol of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

    from .fleet.load import HealthReport
    from .request import GatewayRequest
    from .settings import BackendSettings

__all__ = ["Backend", "BackendResponse", "SupportsStartup", "SupportsHealthCheck", "SupportsSlotPinning",
           "SupportsNativeAPI", "SupportsContinuation"]


class BackendResponse:
    """A backend's answer: status, headers, and either ``body`` (bytes) or
    ``stream`` (an async iterator of bytes, e.g. SSE, forwarded as it comes).

    ``headers`` are ``(name, value)`` byte pairs with lower-case names, already
    free of hop-by-hop headers. ``close`` releases the upstream connection; it
    is called once the response was sent or abandoned.
    """

    __slots__ = ("status", "headers", "body", "stream", "head", "native", "parsed", "_close")

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
        # The stream's first chunk, once the core has read it (to time the
        # first byte and retry elsewhere before anything reached the client).
        self.head: bytes | None = None
        # In an inbound API's own format (a native backend answered it), not
        # OpenAI's: passed through untranslated.
        self.native = False
        # ``body`` parsed, when the backend already parsed it (to check it is
        # JSON): the core reads its usage from this instead of parsing again.
        self.parsed: object = None
        self._close = close

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()


@runtime_checkable
class Backend(Protocol):
    """A backend type registered through ``comox_backend_types``, built as
    ``cls(settings)`` with its validated settings (an instance of its
    ``settings_model``, a subclass of :class:`comox.BackendSettings`).

    ``handle`` returns once the response status and headers are known. It raises
    :class:`comox.BackendUnavailable` when the backend could not be reached
    (connection refused, timeout before the first byte): the request is then
    retried on another backend. An HTTP error answer is returned, not raised.
    """

    settings_model: type[BackendSettings]

    async def handle(self, request: GatewayRequest) -> BackendResponse: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class SupportsStartup(Protocol):
    """Optional: work to do once before the first request (load a model, open
    a pool). Awaited by the gateway's startup, in config order."""

    async def startup(self) -> None: ...


@runtime_checkable
class SupportsHealthCheck(Protocol):
    """Optional: an active health check, run every ``health_check.interval_s``
    (docs/routing.md). ``http`` is an ``httpx.AsyncClient`` shared by the
    checks. The core applies the returned report to the fleet; an exception
    or a timeout counts as a failed check. A class attribute
    ``health_check_default = False`` turns the checks off unless the backend's
    config asks for them (``health_check.enabled``); they are on by default."""

    async def health_check(self, http: httpx.AsyncClient) -> HealthReport: ...


@runtime_checkable
class SupportsSlotPinning(Protocol):
    """Optional: the backend sends a request to the server slot a policy chose
    (:attr:`GatewayRequest.slot <comox.GatewayRequest.slot>`), so the slot that
    holds the prompt's KV cache serves it again (llama.cpp's ``id_slot``)."""

    pins_slots: bool


@runtime_checkable
class SupportsNativeAPI(Protocol):
    """Optional: endpoints of an inbound API (:class:`comox.InboundAPI`) the
    backend serves itself, such as ``"messages"`` (llama.cpp's server, vLLM
    and Ollama speak Anthropic's Messages API). A request to one of them
    reaches such a backend as the client's own bytes, at ``native_path``, and
    its answer goes back untranslated, which keeps prompt-cache prefixes and
    thinking blocks intact."""

    native_apis: frozenset[str]


@runtime_checkable
class SupportsContinuation(Protocol):
    """Optional: the backend can continue a partial answer, so a stream that
    another node of its group broke off can be resumed on it
    (``resume_streams``, docs/failover.md). ``continues`` names the endpoints
    it can do that for: ``"completions"`` — it continues a prompt that ends
    with the partial text; ``"chat/completions"`` — it continues a final
    assistant message when asked with ``continue_final_message: true,
    add_generation_prompt: false`` (vLLM, SGLang, llama.cpp's llama-server)."""

    continues: frozenset[str]
