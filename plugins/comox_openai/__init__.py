"""The ``openai`` backend type: any OpenAI-compatible HTTP server (llama.cpp's
server, vLLM, SGLang, TGI, a cloud API).

One shared connection pool per backend, behind a one-method transport
(:mod:`comox_openai.transport`). By default that is an ``aiohttp`` pool, the
fastest Python client measured (``docs/benchmarks.md``). The pool is the seam:
pass your own ``httpx.AsyncClient`` (any httpx transport) as ``client=``, or any
object with the transport's ``post()``/``aclose()``, to swap how bytes move
without touching the rest.
"""

from __future__ import annotations

import os

import httpx
from pydantic import ConfigDict, Field, field_validator

import comox
from comox.backends import BackendResponse
from comox.errors import BackendUnavailable, ConfigError
from comox.request import GatewayRequest
from comox.settings import BackendSettings

from .transport import (
    DROPPED_RESPONSE_HEADERS,
    AiohttpTransport,
    HttpxTransport,
    Transport,
    UpstreamUnreachable,
    response_headers,
)

__all__ = ["OpenAIBackend", "OpenAIBackendSettings", "response_headers"]

assert DROPPED_RESPONSE_HEADERS  # re-exported for plugins that used it from here


class OpenAIBackendSettings(BackendSettings):
    model_config = ConfigDict(extra="forbid")

    url: str
    """Base URL of an OpenAI-compatible server, with or without ``/v1``."""
    model: str | None = None
    """The model name sent upstream; by default the client's."""
    api_key_env: str | None = None
    """Environment variable holding the upstream's API key."""
    timeout_s: float = Field(600.0, gt=0)
    """Longest wait for any read from the upstream."""
    connect_timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


class OpenAIBackend:
    settings_model = OpenAIBackendSettings

    def __init__(self, settings: OpenAIBackendSettings, *, client: httpx.AsyncClient | Transport | None = None):
        self.name = settings.name
        self.settings = settings
        base = settings.url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.base_url = base
        self.upstream_model = settings.model
        self._headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": f"comox/{comox.__version__}",
        }
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ConfigError(f"api_key_env: the environment variable {settings.api_key_env!r} is not set")
            self._headers["authorization"] = f"Bearer {key}"
        if client is None:
            self.transport = AiohttpTransport(
                timeout_s=settings.timeout_s,
                connect_timeout_s=settings.connect_timeout_s,
                max_connections=settings.max_concurrency or 1024,
                default_headers=self._headers,
            )
        elif isinstance(client, httpx.AsyncClient):
            self.transport = HttpxTransport(client, default_headers=self._headers)
        elif isinstance(client, Transport):
            self.transport = client
        else:
            raise TypeError(f"client must be an httpx.AsyncClient or a transport with post() and aclose(), got {client!r}")
        self.client = client if client is not None else self.transport
        self._urls: dict[str, str] = {}  # endpoint → upstream URL, built once

    async def handle(self, request: GatewayRequest) -> BackendResponse:
        endpoint = request.endpoint
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = f"{self.base_url}/{endpoint}"
        try:
            return await self.transport.post(url, request.body_for(self.upstream_model), {"x-request-id": request.id})
        except UpstreamUnreachable as exc:
            if exc.during == "connect":
                raise BackendUnavailable(f"backend {self.name!r} unreachable: {type(exc.cause).__name__}") from exc.cause
            raise BackendUnavailable(
                f"backend {self.name!r} failed while sending its body: {type(exc.cause).__name__}"
            ) from exc.cause

    async def aclose(self) -> None:
        await self.transport.aclose()


@comox.hookimpl
def comox_backend_types():
    return {"openai": OpenAIBackend}
