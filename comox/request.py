"""The parsed API request that flows through the hook chain, and its validation."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .parse import FORBIDDEN_FIELDS, check_number, first_header, parse_body

if TYPE_CHECKING:
    from .gateway import Gateway
    from .inbound import InboundAPI
    from .usage import Usage

__all__ = ["GatewayRequest", "Principal", "ANONYMOUS", "ENDPOINTS", "DeferredBody", "check_number", "parse_body",
           "first_header", "FORBIDDEN_FIELDS"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as decided by ``comox_authenticate``.

    :param key_id: the caller's id (a key's ``id``, a token's subject): what
        logs, limits and cache keys use — never the secret itself.
    :param allowed_models: glob patterns (``fnmatch``) of the model groups the
        caller may use; None: every one. Other models are invisible to it (404).
    :param local_only: the caller's requests never leave for a cloud backend.
    :param limits: per-caller limits for admission plugins (``rpm``, ``tpm``,
        ``max_concurrency``, …).
    """

    key_id: str | None = None
    allowed_models: frozenset[str] | None = None
    local_only: bool = False
    limits: dict[str, Any] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        """Whether ``model`` matches one of ``allowed_models``."""
        patterns = self.allowed_models
        return patterns is None or any(fnmatchcase(model, pattern) for pattern in patterns)


ANONYMOUS = Principal()

# API path (relative to the mount point) → endpoint name used in hooks and upstream paths.
ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
}

# Request ids' own generator, seeded from os.urandom (and again in a forked
# worker): a library that seeds the shared one (random.seed(0)) must not make
# ids repeat from one run to the next.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_random_bits = _ids.getrandbits
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(header: bytes | None) -> str:
    """The client's ``x-request-id`` if it is sane, else a fresh one."""
    if header:
        try:
            value = header.decode("ascii")
        except UnicodeDecodeError:
            value = ""
        if _REQUEST_ID.match(value):
            return value
    # 128 random bits, as uuid4().hex has, from a Mersenne Twister of our own:
    # a correlation id, not a secret, so no getrandom() system call per
    # request (os.urandom: 3x the time).
    return _random_bits(128).to_bytes(16).hex()


class DeferredBody(NamedTuple):
    """What :meth:`comox.InboundAPI.parse` may return in place of the internal
    body: what routing needs now, the translation when it is first needed.

    A request passed through to a backend that speaks its API natively is
    never translated, unless a stage reads ``request.json`` or ``request.raw``
    (a chat-only backend, failover, a cache key): ``translate()`` is then
    called, once.
    """

    model: str
    """The model asked for (it picks the model group)."""
    stream: bool
    """Whether the client asked for a stream."""
    source: dict[str, Any]
    """The client's body as parsed: ``request.inbound_json``."""
    translate: Callable[[], dict[str, Any]]
    """The internal, OpenAI-shaped body."""


class GatewayRequest:
    """One API request, as every stage and hook sees it.

    Attributes a plugin reads (``comox_authenticate``, ``comox_admit``, …):

    * ``id`` — the request id (the client's ``x-request-id`` when sane, else a
      fresh one); sent back and upstream as ``x-request-id``.
    * ``method``, ``path`` — the HTTP method and the path relative to the
      mount point (``scope["path"]``; never rebuilt from the ``Host`` header).
    * ``query`` — the raw query string (``b"limit=5&order=asc"``; ``b""``
      when none), for inbound APIs that take parameters in the URL.
    * ``headers`` — the raw ASGI header pairs (lower-case byte names); see
      :meth:`header`.
    * ``endpoint`` — ``"chat/completions"``, ``"completions"``,
      ``"embeddings"`` or ``"models"``; ``""`` for a request refused before
      its path was known.
    * ``json`` — the parsed body (``{}`` before parsing, or for a ``GET``);
      ``raw`` — its bytes; ``model`` — the model group asked for (``""`` when
      none); ``stream`` — whether the client asked for SSE.
    * ``model_group`` — the name of the model group serving it (``model`` may
      be one of its aliases); ``""`` until the body was parsed.
    * ``local_only`` — the request must not leave for a cloud backend: its
      key is ``local_only``, its group ``sovereign``, or it said
      ``x-comox-local-only: true``. Failover and resumption honour it.
    * ``api``, ``api_endpoint``, ``inbound_raw`` — for a request to an
      inbound API (:class:`comox.InboundAPI`, such as Anthropic's Messages):
      the API, its own endpoint name (``"messages"``) and the client's body
      as sent; ``endpoint`` and ``json`` then hold the internal, OpenAI-shaped
      translation. None, ``""`` and None for an OpenAI request.
      ``inbound_json`` — that body as the API parsed it (its ``model``,
      ``messages``, ``temperature`` … in the API's own terms), when the API
      gave it (:class:`comox.DeferredBody`); else None. A stage that can
      read what it needs there spares a request passed through natively its
      translation, which ``json`` builds on first read.
    * ``principal`` — who is calling, once ``comox_authenticate`` decided.
    * ``gateway`` — the :class:`comox.Gateway` serving it (for
      ``gateway.plugin_settings(name)``, ``gateway.shared_state``), or None
      for a request built outside a gateway.
    * ``state`` — a dict of per-request scratch space for plugins (key by
      your plugin's name).
    * ``slot`` — ``(backend name, slot)`` chosen by a routing policy for
      backends that pin slots (:class:`comox.SupportsSlotPinning`), or None.
    * ``usage`` — the :class:`comox.Usage` of the answer, once it was sent
      (from a backend or a cache), for ``comox_request_done``; else None.
    * ``response_headers`` — headers a plugin adds to the answer, whatever it
      is (``x-ratelimit-*`` on a success and on a 429 alike): append
      ``(name, value)`` byte pairs with lower-case names.
    * ``keep_stream`` — set by a plugin (a response cache, on a miss) to the
      most bytes of a streamed answer it wants: the core then keeps the
      stream's bytes as it forwards them and, once it completed with 200,
      passes them to ``comox_cache_store`` as the response's ``body``.
      0 (the default): streams are not kept, and cost nothing more.
    * ``received_at``, ``first_byte_at``, ``last_byte_at`` — times
      (``time.perf_counter()``) the request reached the gateway, its response
      started (status and headers sent; a stream's first chunk follows at
      once) and its last byte was sent; 0.0 until then. With ``sent_at`` and
      ``answered_at`` (the answering backend was sent the request, and its
      status, headers and JSON body or first stream chunk came back), for
      ``comox_request_done``: latency, time to first token, overhead.
    * ``retries`` — how many times the request moved to another backend
      before its first byte (each a ``request_retried`` fleet event).
    * ``route`` — where the answer came from: ``"local"`` (a backend of the
      group), ``"failover"`` (``comox_failover``) or ``"cache"``
      (``comox_cache_lookup``); ``""`` for a request refused before.
    """

    __slots__ = (
        "id", "method", "endpoint", "gateway", "model_group", "local_only", "api", "api_endpoint", "inbound_raw", "inbound_json", "path", "query", "headers", "raw", "json", "model", "stream",
        "principal", "state", "slot", "usage", "response_headers", "keep_stream", "sent_at", "answered_at",
        "received_at", "first_byte_at", "last_byte_at", "retries", "route", "_upstream_cache", "_translate",
    )

    def __init__(self, *, id: str, endpoint: str, path: str, headers: list[tuple[bytes, bytes]],
                 raw: bytes = b"", json: dict[str, Any] | None = None, method: str = "POST",
                 gateway: Gateway | None = None, query: bytes = b""):
        self.id = id
        self.gateway = gateway
        self.method = method
        self.endpoint = endpoint
        self.path = path
        self.query = query
        self.headers = headers
        self.raw = raw
        self.json: dict[str, Any] = json if json is not None else {}
        self.model: str = self.json["model"] if json else ""
        self.model_group = ""
        self.local_only = False
        self.api: InboundAPI | None = None
        self.api_endpoint = ""
        self.inbound_raw: bytes | None = None
        self.inbound_json: dict[str, Any] | None = None
        self.stream: bool = bool(self.json.get("stream", False)) if json else False
        self.principal: Principal = ANONYMOUS
        self.state: dict[str, Any] = {}
        self.slot: tuple[str, int] | None = None
        self.usage: Usage | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.keep_stream = 0
        # time.perf_counter() when the backend that answered was sent the request,
        # and when its status and headers (and a JSON body) had come back.
        self.sent_at = 0.0
        self.answered_at = 0.0
        self.received_at = time.perf_counter()  # built by the core as the request arrives
        self.first_byte_at = 0.0
        self.last_byte_at = 0.0
        self.retries = 0
        self.route = ""
        self._upstream_cache: dict[str | None, bytes] | None = None
        self._translate: Callable[[], dict[str, Any]] | None = None

    def set_body(self, raw: bytes, body: dict[str, Any]) -> None:
        """The parsed body, once :func:`parse_body` accepted it (core only)."""
        self.raw = raw
        self.json = body
        self.model = body["model"]
        self.stream = bool(body.get("stream", False))

    def defer_body(self, body: DeferredBody) -> None:
        """An inbound API's :class:`DeferredBody` (core only): ``json`` and
        ``raw`` are made when first read, so a request every stage could judge
        from ``inbound_json`` costs no translation."""
        self.model, self.stream, self.inbound_json, self._translate = body
        self.__class__ = _Untranslated

    def body_made(self) -> bool:
        """Whether ``json`` and ``raw`` are made: False while an inbound API's
        body is deferred (:meth:`defer_body`), when reading either makes it."""
        return True

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or None."""
        return first_header(self.headers, name)

    def response_header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower-case bytes) among the
        :attr:`response_headers` stages added, or None."""
        return first_header(self.response_headers, name)

    def set_json(self, body: dict[str, Any]) -> None:
        """Replace the body; it will be re-serialised for the upstream."""
        self.json = body
        self.raw = orjson.dumps(body)
        self.stream = bool(body.get("stream", False))
        self._upstream_cache = None

    def body_for(self, upstream_model: str | None) -> bytes:
        """The bytes to send to a backend that calls the model ``upstream_model``
        (``None``: keep the client's name). Re-serialised only when it differs."""
        if upstream_model is None or upstream_model == self.model:
            return self.raw
        cache = self._upstream_cache
        if cache is None:
            cache = self._upstream_cache = {}
        body = cache.get(upstream_model)
        if body is None:
            body = cache[upstream_model] = orjson.dumps({**self.json, "model": upstream_model})
        return body


class _Untranslated(GatewayRequest):
    """A request whose ``json`` and ``raw`` are not made yet
    (:meth:`GatewayRequest.defer_body`): the first read (or write) of either
    makes both, and makes it a plain :class:`GatewayRequest` again. A class of
    its own because a property or ``__getattr__`` on GatewayRequest would slow
    every attribute read of every request (CPython then stops specialising them)."""

    __slots__ = ()

    def body_made(self) -> bool:
        return False

    def _settle(self) -> None:
        translate = self._translate
        assert translate is not None
        body = translate()  # (one that raises is raised again by the next read)
        self.__class__ = GatewayRequest  # type: ignore[assignment]
        self.json, self.raw, self._translate = body, orjson.dumps(body), None

    @property
    def json(self) -> dict[str, Any]:
        self._settle()
        return self.json

    @json.setter
    def json(self, body: dict[str, Any]) -> None:
        self._settle()
        self.json = body

    @property
    def raw(self) -> bytes:
        self._settle()
        return self.raw

    @raw.setter
    def raw(self, raw: bytes) -> None:
        self._settle()
        self.raw = raw
