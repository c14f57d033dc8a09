"""The HTTP backend every OpenAI-compatible server shares (llama.cpp's
server, vLLM, SGLang, TGI, a cloud API): the ``openai`` backend type, and the
base class of the types that add what an engine tells about itself
(``llamacpp``, ``vllm``, a third party's).

One shared connection pool per backend, behind a one-method transport
(:mod:`comox.transport`). By default that is Comox's own HTTP/1.1 client on
httptools' C parser (:mod:`comox.transport_httptools`), the fastest measured
through the whole gateway (``docs/benchmarks.md``); ``transport = "aiohttp"``
picks an aiohttp pool and ``transport = "pyreqwest"`` Rust's reqwest/hyper
(:mod:`comox.transport_reqwest`). The pool is the seam: pass
your own ``httpx.AsyncClient`` (any httpx transport) as ``client=``, or any
object with the transport's ``post()``/``aclose()``, to swap how bytes move
without touching the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import httpx
import orjson
from pydantic import ConfigDict, Field, field_validator

from .backends import BackendResponse
from .errors import BackendUnavailable, ConfigError
from .fleet.load import FAIL, OK, HealthReport
from .request import GatewayRequest
from .settings import BackendSettings
from . import client_spans
from .transport import AiohttpTransport, HttpxTransport, Transport, UpstreamUnreachable
from .usage import WHOLE_PARSE_MAX
from .version import __version__

__all__ = ["HTTPBackend", "HTTPBackendSettings", "instrument_transports", "instrument_pyreqwest"]


class HTTPBackendSettings(BackendSettings):
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
    transport: Literal["aiohttp", "httptools", "pyreqwest"] = Field(
        default_factory=lambda: os.environ.get("COMOX_TEST_TRANSPORT", "httptools"))  # type: ignore[arg-type]
    """How bytes move upstream: ``httptools`` (the default: Comox's HTTP/1.1
    client on httptools' C parser), ``aiohttp`` or ``pyreqwest`` (Rust's
    reqwest/hyper; ``pip install 'comox[reqwest]'``). An httpx client passed
    as ``client=`` is used whatever this says. ``COMOX_TEST_TRANSPORT``
    changes the default (for running the test suite against a transport)."""
    ca_file: str | None = None
    """A PEM file of CA certificates trusted (besides the system's) for an
    ``https://`` url: a fleet behind a private CA."""
    trust_env: bool = False
    """Use ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` from the environment
    (off by default: a gateway's fleet is reached directly)."""
    native_apis: list[str] = []
    """Endpoints of inbound APIs the server speaks itself (``["messages"]``
    for llama.cpp's server, vLLM or Ollama: Anthropic's Messages API), sent
    the client's bytes unchanged at ``<url>/v1/<endpoint>``."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


def _parsed_json(body: bytes) -> tuple[bool, object]:
    """Whether a 200 answer is JSON, and the parsed object when it was small
    enough to parse whole (as most are; :func:`comox.usage.record_body` then
    reads its usage from it); of a larger one (embeddings) only the first and
    last bytes are looked at."""
    if len(body) <= WHOLE_PARSE_MAX:
        try:
            return True, orjson.loads(body)
        except orjson.JSONDecodeError:
            return False, None
    return (body[:64].lstrip()[:1], body[-64:].rstrip()[-1:]) in ((b"{", b"}"), (b"[", b"]")), None


class HTTPBackend:
    """An OpenAI-compatible server over HTTP. Subclass it (with a
    ``settings_model`` subclassing :class:`HTTPBackendSettings`) to add an
    engine's own health check or request rewriting."""

    settings_model: type[BackendSettings] = HTTPBackendSettings
    health_check_default = True
    # Any OpenAI-compatible server continues a prompt; continuing a chat
    # message needs an engine that says so (comox.SupportsContinuation).
    continues: frozenset[str] = frozenset({"completions"})

    def __init__(self, settings: HTTPBackendSettings, *, client: httpx.AsyncClient | Transport | None = None):
        self.name = settings.name
        self.settings = settings
        base = settings.url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.base_url = base
        self.root = base[: -len("/v1")]
        self.upstream_model = settings.model
        self._headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": f"comox/{__version__}",
        }
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ConfigError(f"api_key_env: the environment variable {settings.api_key_env!r} is not set")
            self._headers["authorization"] = f"Bearer {key}"
        self.transport: Transport
        if client is None:
            options: dict[str, Any] = dict(
                timeout_s=settings.timeout_s,
                connect_timeout_s=settings.connect_timeout_s,
                max_connections=settings.max_concurrency or 1024,
                default_headers=self._headers,
                ca_file=settings.ca_file,
                trust_env=settings.trust_env,
            )
            if settings.transport == "pyreqwest":
                try:
                    from .transport_reqwest import PyreqwestTransport
                except ImportError as exc:
                    raise ConfigError("transport = \"pyreqwest\" needs pyreqwest: pip install 'comox[reqwest]'") from exc
                self.transport = PyreqwestTransport(**options)
            elif settings.transport == "httptools":
                from .transport_httptools import HttptoolsTransport

                self.transport = HttptoolsTransport(**options)
            else:
                self.transport = AiohttpTransport(**options)
        elif isinstance(client, httpx.AsyncClient):
            self.transport = HttpxTransport(client, default_headers=self._headers)
        elif isinstance(client, Transport):
            self.transport = client
        else:
            raise TypeError(f"client must be an httpx.AsyncClient or a transport with post() and aclose(), got {client!r}")
        self.client: Any = client if client is not None else self.transport
        self.native_apis = frozenset(settings.native_apis)
        self._urls: dict[str, str] = {}  # endpoint → upstream URL, built once

    def handle(self, request: GatewayRequest) -> Coroutine[Any, Any, BackendResponse]:
        # A plain function returning the coroutine that answers: no coroutine around it.
        if request.api is not None and request.api_endpoint in self.native_apis:
            return self._native(request)
        endpoint = request.endpoint
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = f"{self.base_url}/{endpoint}"
        return self.post(url, request.body_for(self.upstream_model), request)

    async def _native(self, request: GatewayRequest) -> BackendResponse:
        """The client's own bytes to the server's own endpoint of the inbound API."""
        body = request.inbound_raw or b""
        if self.upstream_model is not None:
            body = orjson.dumps({**orjson.loads(body), "model": self.upstream_model})
        response = await self.post(f"{self.base_url}/{request.api_endpoint}", body, request)
        response.native = True
        return response

    async def post(self, url: str, body: bytes, request: GatewayRequest) -> BackendResponse:
        """Send ``body`` to ``url``; an unreachable upstream raises
        :class:`~comox.BackendUnavailable` (so the request moves elsewhere)."""
        try:
            response = await self.transport.post(url, body, {"x-request-id": request.id})
        except UpstreamUnreachable as exc:
            if exc.during == "connect":
                raise BackendUnavailable(f"backend {self.name!r} unreachable: {type(exc.cause).__name__}") from exc.cause
            raise BackendUnavailable(
                f"backend {self.name!r} failed while sending its body: {type(exc.cause).__name__}"
            ) from exc.cause
        if response.status == 200 and response.body is not None:
            ok, response.parsed = _parsed_json(response.body)
            if not ok:
                # Garbage (a proxy's HTML page, a cut body) is the node's failure, not an answer:
                # the request moves, and nothing caches it.
                raise BackendUnavailable(f"backend {self.name!r} answered 200 with a body that is not JSON")
        return response

    async def health_check(self, http: httpx.AsyncClient) -> HealthReport:
        """``GET <url>/v1/models``: any OpenAI-compatible server answers it."""
        response = await http.get(f"{self.base_url}/models")
        if response.status_code == 200:
            return HealthReport(OK, "ok")
        return HealthReport(FAIL, f"GET /v1/models: HTTP {response.status_code}")

    async def aclose(self) -> None:
        await self.transport.aclose()


def instrument_transports(tracer_provider: Any = None) -> Callable[[], None] | None:
    """Turn on the HTTP client spans of the transports that make their own
    (httptools and pyreqwest: OpenTelemetry has no instrumentation for them),
    with ``tracer_provider`` (``None``: the global one), as an OpenTelemetry
    instrumentor does for aiohttp. Returns what turns them off again, or
    ``None`` if they were on already."""
    if client_spans.is_instrumented():
        return None
    client_spans.instrument(tracer_provider)
    return client_spans.uninstrument


instrument_pyreqwest = instrument_transports  # its name before the httptools transport shared it
