"""Anthropic's Messages API, both ways: the ``anthropic`` backend type
(Anthropic's API behind Comox's OpenAI-format ``/v1/chat/completions``), and
the inbound ``/v1/messages`` (:mod:`comox_anthropic.inbound`: Anthropic's
clients in front of any fleet), translated by :mod:`comox_anthropic.translate`.
docs/backends/anthropic.md and docs/anthropic_api.md say what maps to what.

The backend type:

* Requests go to ``<url>/v1/messages`` with ``x-api-key`` (from
  ``api_key_env``) and ``anthropic-version``, through a
  :class:`comox.AiohttpTransport`.
* A stream is translated event by event as it comes. Its first event is read
  before the answer starts, so an ``error`` event in its place (an overloaded
  API) is an error status the gateway can retry elsewhere or fail over; an
  ``error`` event later ends the stream with an OpenAI error event and no
  ``[DONE]``. The last chunk always carries ``usage`` (the gateway counts it).
* Errors keep their status (529 overloaded becomes 503) and ``retry-after``.
* A request to Comox's own ``/v1/messages`` (an Anthropic client) is not
  translated twice: it goes to Claude as the client's bytes (``native_apis``,
  ``["messages"]`` by default), only ``model`` replaced, and the answer comes
  back as Claude gave it.
* No active health check by default: a cloud API is not a node of ours to
  probe. Enabled (``health_check.enabled = true``), it is ``GET /v1/models``
  with the key, which costs no tokens.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from pydantic import Field

import comox

from .answers import error_json
from .inbound import MessagesAPI
from .translate import AnthropicStreamTranslator, SSEDecoder, anthropic_to_openai_error, anthropic_to_openai_response
from .translate import openai_sse, openai_to_anthropic_request

__all__ = ["AnthropicBackend", "AnthropicSettings", "MessagesAPI"]

JSON = (b"content-type", b"application/json")
OVERLOADED_RETRY_AFTER_S = 2
"""``retry-after`` of the 503 that stands for a 529 without one of its own."""


class AnthropicSettings(comox.HTTPBackendSettings):
    url: str = "https://api.anthropic.com"
    """Base URL of the Messages API, with or without ``/v1``."""
    anthropic_version: str = "2023-06-01"
    """Sent as the ``anthropic-version`` header."""
    default_max_tokens: int = Field(4096, ge=1, le=1_000_000)
    """``max_tokens`` for a request that sets neither ``max_tokens`` nor
    ``max_completion_tokens`` (Anthropic requires one)."""
    prompt_cache: bool = False
    """Ask Anthropic to cache each prompt (top-level ``cache_control``):
    cache writes cost more than input, reads far less."""
    native_apis: list[str] = ["messages"]
    """A request to Comox's own ``/v1/messages`` is sent as the client's
    bytes (only ``model`` replaced by ``model``), not translated twice: its
    thinking blocks, cache breakpoints and fields reach Claude as sent."""


class AnthropicBackend:
    """Chat completions through Anthropic's Messages API."""

    settings_model = AnthropicSettings
    health_check_default = False
    continues = frozenset({"chat/completions"})
    """Claude continues a final assistant message (a prefill), so a stream
    broken off on another node can be resumed here (``comox.SupportsContinuation``)."""

    def __init__(self, settings: AnthropicSettings, *, transport: comox.Transport | None = None) -> None:
        self.name = settings.name
        self.settings = settings
        root = settings.url.rstrip("/")
        self.root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.messages_url = f"{self.root}/v1/messages"
        self.headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "anthropic-version": settings.anthropic_version,
            "user-agent": f"comox/{comox.__version__}",
        }
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise comox.ConfigError(f"api_key_env: the environment variable {settings.api_key_env!r} is not set")
            self.headers["x-api-key"] = key
        self.native_apis = frozenset(settings.native_apis)
        self.transport = transport or comox.AiohttpTransport(
            timeout_s=settings.timeout_s, connect_timeout_s=settings.connect_timeout_s,
            max_connections=settings.max_concurrency or 1024, default_headers=self.headers,
        )

    async def handle(self, request: comox.GatewayRequest) -> comox.BackendResponse:
        if request.api is not None and request.api_endpoint in self.native_apis:
            return await self._native(request)
        if request.endpoint != "chat/completions":
            return _error(comox.InvalidRequest(
                f"the anthropic backend {self.name!r} serves chat completions only: the Anthropic API has no "
                f"{request.endpoint} endpoint", code="unsupported_endpoint"))
        try:
            body, json_tool, space = openai_to_anthropic_request(request.json, model=self.settings.model,
                                                                 default_max_tokens=self.settings.default_max_tokens)
        except comox.InvalidRequest as exc:
            return _error(exc)
        if self.settings.prompt_cache:
            body["cache_control"] = {"type": "ephemeral"}
        upstream = await self._post(orjson.dumps(body), request)
        if upstream.status != 200:
            return await _upstream_error(upstream)
        if request.stream and upstream.stream is not None:
            options = request.json.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            translator = AnthropicStreamTranslator(json_tool=json_tool, prefill_space=space, include_usage=include_usage)
            return await self._stream(upstream, translator)
        if request.stream or upstream.body is None:
            await upstream.aclose()
            return _error(comox.UpstreamError(f"backend {self.name!r}: the Anthropic API answered "
                                              f"{'JSON to a stream' if request.stream else 'a stream to a JSON'} request"))
        try:
            message = orjson.loads(upstream.body)
        except orjson.JSONDecodeError:
            return _error(comox.UpstreamError(f"backend {self.name!r}: the Anthropic API answered invalid JSON"))
        answer = anthropic_to_openai_response(message, json_tool=json_tool, prefill_space=space)
        return comox.BackendResponse(200, [JSON], body=orjson.dumps(answer))

    async def _native(self, request: comox.GatewayRequest) -> comox.BackendResponse:
        """A Messages request as the client sent it, and Anthropic's answer as it comes."""
        body = request.inbound_raw or b""
        if self.settings.model is not None:
            body = orjson.dumps({**orjson.loads(body), "model": self.settings.model})
        upstream = await self._post(body, request)
        upstream.native = True
        return upstream

    async def _post(self, body: bytes, request: comox.GatewayRequest) -> comox.BackendResponse:
        try:
            return await self.transport.post(self.messages_url, body, {"x-request-id": request.id})
        except comox.UpstreamUnreachable as exc:
            raise comox.BackendUnavailable(f"backend {self.name!r} unreachable ({exc.during}): "
                                           f"{type(exc.cause).__name__}") from exc.cause

    async def _stream(self, upstream: comox.BackendResponse, translator: AnthropicStreamTranslator) -> comox.BackendResponse:
        assert upstream.stream is not None
        batches = _events(upstream.stream)
        try:  # up to the first chunk: an error here is a status, retried before the client sees a byte
            head: list[dict[str, Any]] = []
            while not head:
                try:
                    batch = await anext(batches, None)
                except Exception as exc:  # the connection broke: nothing was sent, so it may go elsewhere
                    raise comox.BackendUnavailable(f"backend {self.name!r}: the Anthropic stream broke before "
                                                   f"its first event: {type(exc).__name__}") from exc
                if batch is None:
                    await upstream.aclose()
                    return _error(comox.UpstreamError(f"backend {self.name!r}: the Anthropic stream ended before it began"))
                head = [chunk for event in batch for chunk in translator.feed(event)]
                if translator.error is not None:
                    await upstream.aclose()
                    status, error = translator.error
                    headers = [JSON] + ([(b"retry-after", str(OVERLOADED_RETRY_AFTER_S).encode())] if status == 503 else [])
                    return comox.BackendResponse(status, headers, body=orjson.dumps(error))
        except BaseException:
            await upstream.aclose()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            yield openai_sse(head, done=translator.finished)
            async for batch in batches:
                if translator.finished:
                    continue  # read to the end, so the connection goes back to the pool
                out = [chunk for event in batch for chunk in translator.feed(event)]
                if out:
                    yield openai_sse(out, done=translator.finished)
                if translator.error is not None:
                    return  # the error event ends the stream: no [DONE]
            if not translator.finished:
                raise comox.UpstreamError(f"backend {self.name!r}: the Anthropic stream ended before message_stop")

        return comox.BackendResponse(200, [(b"content-type", b"text/event-stream")], stream=chunks(), close=upstream.aclose)

    async def health_check(self, http: httpx.AsyncClient) -> comox.HealthReport:
        """``GET /v1/models`` with the key: the API is up and the key valid."""
        headers = {name: value for name, value in self.headers.items() if name in ("x-api-key", "anthropic-version")}
        response = await http.get(f"{self.root}/v1/models", headers=headers)
        if response.status_code == 200:
            return comox.HealthReport(comox.OK, "ok")
        return comox.HealthReport(comox.FAIL, f"GET /v1/models: HTTP {response.status_code}")

    async def aclose(self) -> None:
        await self.transport.aclose()


def _error(exc: comox.ComoxError) -> comox.BackendResponse:
    return comox.BackendResponse(exc.status, exc.headers(), body=exc.to_bytes())


async def _upstream_error(upstream: comox.BackendResponse) -> comox.BackendResponse:
    """An Anthropic error answer as an OpenAI one, with the upstream's ``retry-after``."""
    status, body = anthropic_to_openai_error(upstream.status, await error_json(upstream))
    headers = [JSON] + [(name, value) for name, value in upstream.headers if name == b"retry-after"]
    if status == 503 and len(headers) == 1:
        headers.append((b"retry-after", str(OVERLOADED_RETRY_AFTER_S).encode()))
    return comox.BackendResponse(status, headers, body=orjson.dumps(body))


async def _events(stream: AsyncIterator[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """The parsed events of an Anthropic stream, a list per chunk read."""
    decoder = SSEDecoder()
    async for data in stream:
        batch = []
        for _, text in decoder.feed(data):
            try:
                event = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                batch.append(event)
        if batch:
            yield batch


@comox.hookimpl
def comox_backend_types() -> dict[str, type]:
    return {"anthropic": AnthropicBackend}


@comox.hookimpl
def comox_inbound_apis(gateway: comox.Gateway) -> list[comox.InboundAPI]:
    """Anthropic's Messages API, inbound: ``/v1/messages`` and its model list
    (:mod:`comox_anthropic.inbound`)."""
    return [MessagesAPI(auth_required=gateway.settings.auth != "none", native=gateway.settings.native_models("messages"))]
