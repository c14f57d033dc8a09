"""The response cache: an exact-match cache of answers, kept in the gateway's
shared state (``gateway.shared_state``: this process's memory by default, Redis
with the ``redis`` plugin, so every replica shares it). See docs/cache.md.

* What is cached: embeddings, and chat and text completions that are
  deterministic (``temperature`` 0, or a ``seed``); with
  ``deterministic_only = false``, every one of them. The request header
  ``x-comox-cache: skip`` neither reads nor writes, ``refresh`` writes without
  reading.
* The key: SHA-256 of the caller's key id, the endpoint, the model group and
  the rest of the body in canonical JSON (sorted keys) without ``stream``,
  ``stream_options`` and ``user``, which do not change the answer. One tenant
  never sees another's answer; the secret key itself is never part of it.
* Every answer that reached admission says ``x-comox-cache: hit``, ``miss``
  or ``skip``; only an answer served from the cache says ``hit``.
* A stored JSON answer serves a streaming request as the chunks a stream of it
  holds; a stored stream serves a streaming request event for event, and a
  non-streaming one as the JSON answer it adds up to (:mod:`comox_cache.convert`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import orjson
from pydantic import BaseModel, ConfigDict, Field

import comox
from comox import BackendResponse, GatewayRequest, InvalidRequest

from .convert import assemble, chunks_of, split_events, sse, with_usage

__all__ = ["CacheSettings", "cache_key", "cacheable", "HEADER"]

log = logging.getLogger("comox.cache")

HEADER = b"x-comox-cache"
SKIP = (HEADER, b"skip")
ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})
"""Body fields that do not change the answer: ``stream`` (either shape is
served from either), ``stream_options`` (it asks only for the usage chunk, which
a replay adds or moves as asked) and ``user`` (an end-user label for abuse
monitoring)."""

# A stored entry: what it holds, then the bytes.
JSON_ENTRY = b"comox-cache/1 json\n"
SSE_ENTRY = b"comox-cache/1 sse\n"

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


class CacheSettings(BaseModel):
    """``[plugins.cache]``"""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Cache answers; false: the plugin does nothing (and sends no header)."""
    ttl_s: float = Field(3600.0, gt=0)
    """How long an answer is served from the cache."""
    max_entry_bytes: int = Field(4 * 1024 * 1024, ge=1)
    """Answers larger than this (JSON body, or all of a stream's events) are not stored."""
    max_bytes: int = Field(128 * 1024 * 1024, ge=1)
    """With the in-memory store: most bytes of answers kept, least recently used
    dropped first. A shared store (Redis) is bounded by its own memory policy."""
    deterministic_only: bool = True
    """Cache only deterministic requests (``temperature`` 0 or a ``seed``) and
    embeddings; false: every chat and text completion too."""


class Plan:
    """What the cache does for one request (``request.state["cache"]``)."""

    __slots__ = ("mode", "at", "key", "hit")

    def __init__(self, mode: str, at: int):
        self.mode = mode  # "use" (read and write) or "refresh" (write only); a skipped request has no plan
        self.at = at  # where the x-comox-cache header is in request.response_headers
        self.key: str | None = None  # the shared-state key, when the answer may be stored
        self.hit = False


class Ledger:
    """The bytes this plugin keeps in an in-memory store, least recently used
    first: the store bounds all its values together, the cache its own."""

    def __init__(self) -> None:
        self.sizes: OrderedDict[str, int] = OrderedDict()
        self.total = 0

    def touch(self, key: str) -> None:
        if key in self.sizes:
            self.sizes.move_to_end(key)

    def forget(self, key: str) -> None:
        self.total -= self.sizes.pop(key, 0)

    def add(self, key: str, size: int, limit: int) -> list[str]:
        """Record ``key``; the keys to drop to stay within ``limit`` bytes."""
        self.forget(key)
        self.sizes[key] = size
        self.total += size
        dropped = []
        while self.total > limit:
            old, old_size = self.sizes.popitem(last=False)
            self.total -= old_size
            dropped.append(old)
        return dropped


_ledgers: WeakKeyDictionary[comox.MemoryState, Ledger] = WeakKeyDictionary()


def _ledger(state: comox.SharedState) -> Ledger | None:
    if not isinstance(state, comox.MemoryState):
        return None
    ledger = _ledgers.get(state)
    if ledger is None:
        ledger = _ledgers[state] = Ledger()
    return ledger


def _settings(request: GatewayRequest) -> CacheSettings | None:
    gateway = request.gateway
    settings = gateway.plugin_settings("cache") if gateway is not None else None
    return settings if isinstance(settings, CacheSettings) and settings.enabled else None


def cacheable(request: GatewayRequest, deterministic_only: bool = True) -> bool:
    """Whether the cache may serve ``request``: an embeddings request, or a
    chat or text completion that is deterministic (``temperature`` 0 or an
    integer ``seed``) unless ``deterministic_only`` is false."""
    if request.endpoint == "embeddings":
        return True
    if request.endpoint not in ENDPOINTS:
        return False
    if not deterministic_only:
        return True
    # An inbound API's own body names these the same (and one passed through natively
    # is then never translated just to be found not cacheable).
    body = request.inbound_json
    if body is None:
        body = request.json
    temperature = body.get("temperature")
    seed = body.get("seed")
    return (type(temperature) in (int, float) and temperature == 0) or type(seed) is int


def cache_key(request: GatewayRequest) -> str:
    """The shared-state key of ``request``'s answer: SHA-256 of the caller's
    key id, the endpoint, the model group (an alias and its group share
    answers) and the rest of the body without :data:`NOT_IN_KEY`, as canonical
    JSON (sorted keys)."""
    body = {k: v for k, v in request.json.items() if k not in NOT_IN_KEY and k != "model"}
    group = request.model_group or request.model
    material = orjson.dumps(["comox-cache/1", request.principal.key_id, request.endpoint, group, body],
                            option=orjson.OPT_SORT_KEYS)
    return "cache:" + hashlib.sha256(material).hexdigest()


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return CacheSettings


@comox.hookimpl(tryfirst=True)
def comox_admit(request: GatewayRequest) -> None:
    """Read ``x-comox-cache`` and say ``skip`` until the lookup decides: an
    answer refused by a later admission check was not served from the cache."""
    settings = _settings(request)
    if settings is None:
        return
    asked = request.header(HEADER)
    mode = "use"
    if asked is not None:
        mode = asked.strip().lower().decode("latin-1")
        if mode not in ("skip", "refresh"):
            raise InvalidRequest("the x-comox-cache header must be 'skip' or 'refresh'", code="invalid_header")
    request.response_headers.append(SKIP)
    if mode != "skip" and cacheable(request, settings.deterministic_only):
        request.state["cache"] = Plan(mode, len(request.response_headers) - 1)
    # else: no plan, so the lookup and the store pass at once (most requests sample)


def _say(request: GatewayRequest, plan: Plan, value: bytes) -> None:
    request.response_headers[plan.at] = (HEADER, value)


def _keep_stream(request: GatewayRequest, settings: CacheSettings) -> None:
    """A streamed miss is stored too: ask the core to keep its bytes."""
    if request.stream:
        request.keep_stream = settings.max_entry_bytes


@comox.hookimpl
def comox_cache_lookup(request: GatewayRequest) -> Awaitable[BackendResponse | None] | None:
    # A plain function: a request the cache does not take costs no coroutine.
    plan = request.state.get("cache")
    if not isinstance(plan, Plan):
        return None
    return _lookup(request, plan)


async def _lookup(request: GatewayRequest, plan: Plan) -> BackendResponse | None:
    settings = _settings(request)
    if settings is None:
        return None
    plan.key = key = cache_key(request)
    _say(request, plan, b"miss")
    if plan.mode == "refresh":
        _keep_stream(request, settings)
        return None
    assert request.gateway is not None
    state = request.gateway.shared_state
    try:
        entry = await state.get(key)
    except comox.ComoxError:
        raise  # the store refuses requests while it is down (the redis plugin's on_failure = "closed")
    except Exception:
        log.warning("the response cache could not be read; answering without it", exc_info=True)
        return None
    ledger = _ledger(state)
    if entry is None:
        if ledger is not None:
            ledger.forget(key)  # expired, or dropped by the store
        _keep_stream(request, settings)
        return None
    try:
        response = _answer(request, entry)
    except Exception:  # an entry that does not parse is a miss, and is replaced
        log.warning("a cached answer could not be read; answering without it", exc_info=True)
        response = None
    if response is None:
        return None  # stored in a shape that cannot serve this request: its answer replaces it
    if ledger is not None:
        ledger.touch(key)
    plan.hit = True
    _say(request, plan, b"hit")
    return response


def _answer(request: GatewayRequest, entry: bytes) -> BackendResponse | None:
    """``entry`` in the shape ``request`` wants, or None if it cannot serve it."""
    streaming = request.stream and request.endpoint != "embeddings"
    options = request.json.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if entry.startswith(JSON_ENTRY):
        body = entry[len(JSON_ENTRY):]
        if not streaming:
            return BackendResponse(200, list(JSON_HEADERS), body=body)
        chunks = chunks_of(body, request.endpoint, include_usage)
        return _replay(sse(chunks)) if chunks is not None else None
    if entry.startswith(SSE_ENTRY):
        events = entry[len(SSE_ENTRY):].split(b"\n\n")
        if not streaming:
            whole = assemble(events, request.endpoint)
            return BackendResponse(200, list(JSON_HEADERS), body=whole) if whole is not None else None
        replayed = with_usage(events, include_usage)
        return _replay(sse(replayed)) if replayed is not None else None
    return None


def _replay(data: bytes) -> BackendResponse:
    async def stream() -> AsyncIterator[bytes]:
        yield data  # the whole answer at once: its events are all there already

    return BackendResponse(200, list(SSE_HEADERS), stream=stream())


@comox.hookimpl
def comox_cache_store(request: GatewayRequest, response: BackendResponse) -> Awaitable[None] | None:
    """Store a 200 answer the cache may serve: a JSON body, or the SSE bytes of
    a stream that ran to its ``[DONE]``."""
    plan = request.state.get("cache")
    if not isinstance(plan, Plan):
        return None
    return _store(request, response, plan)


async def _store(request: GatewayRequest, response: BackendResponse, plan: Plan) -> None:
    settings = _settings(request)
    body = response.body
    if plan.key is None or plan.hit or settings is None or body is None or response.status != 200 or request.gateway is None:
        return
    if len(body) > settings.max_entry_bytes:
        return
    if body.lstrip()[:1] == b"{":
        entry = JSON_ENTRY + body
    else:
        events = split_events(body)
        if events is None:
            return  # cut short, or ended with an error
        entry = SSE_ENTRY + b"\n\n".join(events)
    state = request.gateway.shared_state
    await state.set(plan.key, entry, ttl_s=settings.ttl_s)
    ledger = _ledger(state)
    if ledger is not None:
        for old in ledger.add(plan.key, len(entry), settings.max_bytes):
            await state.delete(old)
