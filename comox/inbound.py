"""APIs Comox serves besides OpenAI's (Anthropic's Messages, OpenAI's
Responses, rerank …): each an :class:`InboundAPI` registered by a plugin
through ``comox_inbound_apis``, served through the same stages as the OpenAI
endpoints (keys, limits, cache, routing, failover).

An inbound API translates its request to the internal, OpenAI-shaped one
(``request.endpoint`` and ``request.json``), and the answer back; errors are
rendered in its own format, also one that ends a stream already started. A
backend that speaks the API natively (:class:`comox.SupportsNativeAPI`) gets
the client's bytes unchanged and answers in the API's own format, which is
passed through untranslated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .backends import BackendResponse
    from .errors import ComoxError
    from .request import DeferredBody, GatewayRequest

__all__ = ["InboundAPI", "InboundAPIs"]


@runtime_checkable
class InboundAPI(Protocol):
    """One API served at paths of its own.

    ``name`` names the API (``"anthropic"``, ``"responses"``); endpoint names
    are its own (``"messages"``, ``"messages/count_tokens"``).

    Optional: ``openapi() -> dict``, the API's paths in ``GET /openapi.json``
    — an OpenAPI 3.1 fragment ``{"paths": {...}, "components": {...},
    "tags": [...]}`` (:mod:`comox.openapi`), its errors in its own format.
    """

    name: str

    def match(self, path: str, method: str) -> str | None:
        """The endpoint name ``path`` is for (whatever the method: a wrong
        method is the API's to refuse in :meth:`parse` or :meth:`serve`), or
        None when the path is not this API's.

        An API that shares a path with another and tells its own clients by
        their headers (the Anthropic SDK's ``GET /v1/models`` carries
        ``anthropic-version``) may define ``match_request(request) -> str |
        None`` as well: it is then called instead, with the request's
        ``path``, ``method``, ``headers`` and ``query`` (its body not read)."""

    async def serve(self, endpoint: str, request: GatewayRequest) -> BackendResponse | None:
        """Answer without a backend (``count_tokens``, ``GET
        /v1/responses/{id}``…), after authentication, with the body read
        (``request.inbound_raw``) but not parsed; None to go on. Raise a
        :class:`comox.ComoxError` to refuse."""

    def parse(self, endpoint: str, request: GatewayRequest, raw: bytes) -> tuple[str, dict[str, Any] | DeferredBody]:
        """Check the body in the API's own terms and translate it: the
        internal endpoint (``"chat/completions"``, ``"embeddings"`` …) and
        OpenAI-shaped body, whose ``model`` picks the model group. Raise
        :class:`comox.InvalidRequest` (rendered by :meth:`render_error`).

        In place of the body, a :class:`comox.DeferredBody` defers the
        translation until a stage reads ``request.json``: a request passed
        through to a native backend then costs none. :meth:`translate_response`
        may find it not yet made (a backend that never read the request)."""

    def translate_response(self, endpoint: str, request: GatewayRequest,
                           response: BackendResponse) -> BackendResponse | Awaitable[BackendResponse]:
        """The internal (OpenAI-shaped) answer in the API's own format: a JSON
        body, or a stream of the API's own SSE events. It may be ``async``
        (return a coroutine) to do I/O before the client is sent anything,
        such as storing the answer so a follow-up finds it."""

    def render_error(self, exc: ComoxError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """An error as this API's clients expect it: status, headers, body."""

    def render_stream_error(self, request: GatewayRequest, exc: ComoxError) -> bytes:
        """The SSE event(s) that end one of this API's streams, already
        started, with ``exc``: a stream that broke off midway (``exc`` the
        backend's :class:`comox.ComoxError`, else a 502 ``stream_interrupted``
        :class:`comox.UpstreamError`) or an error after its start. Whole
        events, each ending in a blank line; the core closes a partial event
        first. Called for translated and natively passed-through streams
        alike, so a translation that fails raises and sends no error of its
        own (it may keep what it needs in ``request.state``)."""


class InboundAPIs:
    """The inbound APIs of a gateway, asked in registration order."""

    __slots__ = ("apis", "_matchers")

    def __init__(self, apis: Iterable[InboundAPI]):
        self.apis: Sequence[InboundAPI] = tuple(apis)
        # Each API's matcher, looked up once: match_request if it has one (see InboundAPI.match).
        self._matchers = tuple((api, getattr(api, "match_request", None)) for api in self.apis)

    def match(self, request: GatewayRequest) -> tuple[InboundAPI, str] | None:
        for api, by_request in self._matchers:
            endpoint = by_request(request) if by_request is not None else api.match(request.path, request.method)
            if endpoint is not None:
                return api, endpoint
        return None
