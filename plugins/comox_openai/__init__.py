"""The ``openai`` backend type: any OpenAI-compatible HTTP server (llama.cpp's
server, vLLM, SGLang, TGI, a cloud API).

One shared connection pool per backend. The pool is the seam: pass your own
``httpx.AsyncClient`` (any transport) as ``client=`` to swap how bytes move
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

__all__ = ["OpenAIBackend", "OpenAIBackendSettings", "response_headers"]

# Never forwarded from an upstream response: hop-by-hop headers, and those the
# ASGI server or the gateway sets itself.
DROPPED_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length",
    b"x-request-id", b"server", b"date",
})


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


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = []
    for name, value in raw:
        name = name.lower()
        if name not in DROPPED_RESPONSE_HEADERS:
            headers.append((name, value))
    return headers


class OpenAIBackend:
    settings_model = OpenAIBackendSettings

    def __init__(self, settings: OpenAIBackendSettings, *, client: httpx.AsyncClient | None = None):
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
        self.client = client if client is not None else httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_concurrency or 1024, max_keepalive_connections=256),
            trust_env=False,  # a gateway must not pick up HTTP_PROXY for its fleet
        )

    async def handle(self, request: GatewayRequest) -> BackendResponse:
        headers = dict(self._headers)
        headers["x-request-id"] = request.id
        upstream = self.client.build_request(
            "POST", f"{self.base_url}/{request.endpoint}", content=request.body_for(self.upstream_model), headers=headers
        )
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"backend {self.name!r} unreachable: {type(exc).__name__}") from exc
        headers = response_headers(response.headers.raw)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return BackendResponse(response.status_code, headers, stream=response.aiter_raw(), close=response.aclose)
        try:
            body = b"".join([chunk async for chunk in response.aiter_raw()])
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"backend {self.name!r} failed while sending its body: {type(exc).__name__}") from exc
        finally:
            await response.aclose()
        return BackendResponse(response.status_code, headers, body=body)

    async def aclose(self) -> None:
        await self.client.aclose()


@comox.hookimpl
def comox_backend_types():
    return {"openai": OpenAIBackend}
