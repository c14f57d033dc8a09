"""OpenTelemetry traces (docs/telemetry.md, "Traces"; ``pip install 'comox[otel]'``).

* A server span per API request, started in ``comox_request_start`` from the
  client's W3C ``traceparent`` and made current for the whole request, and a
  client span per attempt — every backend tried, retries, the failover stage,
  a node continuing a broken stream — made current around the backend call,
  so the aiohttp and httpx instrumentations and the pyreqwest transport's own
  spans (turned on here) nest their HTTP spans under it and send its
  ``traceparent`` upstream. Attributes follow the
  OpenTelemetry GenAI conventions, plus Comox's own ``comox.*``.
* ``[telemetry]``: ``otlp_endpoint`` exports over OTLP/HTTP; without it, the
  standard ``OTEL_EXPORTER_OTLP_*`` variables, or a tracer provider the host
  process set, turn tracing on. Otherwise it is off, and the plugin's
  per-request hooks are left out of the gateway (``active``): no spans, no
  cost. The OpenTelemetry packages are imported only when tracing is on.
* No prompt or answer text in any span unless ``capture_content = true``.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

import comox
from comox import BackendResponse, Gateway, GatewayRequest

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = ["TelemetrySettings", "tracing_source"]

log = logging.getLogger("comox.otel")

INSTALL = "pip install 'comox[otel]'"


class TelemetrySettings(BaseModel):
    """``[telemetry]``: traces."""

    section: ClassVar[str] = "telemetry"
    model_config = ConfigDict(extra="forbid")

    otlp_endpoint: str | None = None
    """Export spans with OTLP over HTTP (protobuf) to this collector: its base
    URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it (``http://collector:4318``;
    spans go to ``<it>/v1/traces``). Unset: the ``OTEL_*`` variables decide."""
    capture_content: bool = False
    """Record prompts and answers on the server span (``gen_ai.input.messages``,
    ``gen_ai.output.messages``). Off: no content in any span."""

    _source: str = PrivateAttr("off")

    @field_validator("otlp_endpoint")
    @classmethod
    def _exporter(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL (the collector's OTLP/HTTP base, port 4318)")
        try:
            from . import tracing  # noqa: F401  # the OpenTelemetry packages are there
        except ImportError as exc:
            raise ValueError(f"exporting spans needs the OpenTelemetry packages ({INSTALL}): {exc}") from None
        return url

    @model_validator(mode="after")
    def _decide(self) -> TelemetrySettings:
        self._source = tracing_source(self.otlp_endpoint)
        return self

    @property
    def source(self) -> str:
        """Where spans go: ``"otlp"`` (``otlp_endpoint``), ``"global"`` (the
        process's tracer provider), ``"env"`` (``OTEL_EXPORTER_OTLP_*``) or
        ``"off"``."""
        return self._source

    @property
    def active(self) -> bool:
        """Whether this gateway traces at all (off: its per-request hooks are
        left out)."""
        return self._source != "off"


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def tracing_source(otlp_endpoint: str | None) -> str:
    """Where this gateway's spans go (see :attr:`TelemetrySettings.source`),
    from the config, the process and the environment, in that order.
    ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else says."""
    if _true("OTEL_SDK_DISABLED"):
        return "off"
    if otlp_endpoint is not None:
        return "otlp"  # (checked by TelemetrySettings: a URL, and the packages are installed)
    try:
        from opentelemetry import trace
    except ImportError:
        trace = None  # type: ignore[assignment]  # no OpenTelemetry at all: nothing set a provider
    if trace is not None and not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        source = "global"
    else:
        exporters = os.environ.get("OTEL_TRACES_EXPORTER")
        if exporters is not None and "otlp" not in exporters.split(","):
            return "off"
        if not (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            return "off"
        source = "env"
    try:
        from . import tracing  # noqa: F401
    except ImportError as exc:
        log.warning("OpenTelemetry is configured (%s) but Comox's tracing needs %s: %s; no spans",
                    "a tracer provider is set" if source == "global" else "OTEL_EXPORTER_OTLP_* is set", INSTALL, exc)
        return "off"
    return source


_gateways: weakref.WeakKeyDictionary[Gateway, Tracing] = weakref.WeakKeyDictionary()


def _of(request: GatewayRequest) -> Tracing | None:
    gateway = request.gateway
    return _gateways.get(gateway) if gateway is not None else None


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return TelemetrySettings


@comox.hookimpl
async def comox_startup(gateway: Gateway) -> None:
    settings: TelemetrySettings = gateway.plugin_settings("otel")
    if settings.active and gateway not in _gateways:
        from .tracing import Tracing

        _gateways[gateway] = tracing = Tracing(gateway, settings)
        tracing.start()


@comox.hookimpl
async def comox_shutdown(gateway: Gateway) -> None:
    tracing = _gateways.pop(gateway, None)
    if tracing is not None:
        await tracing.stop()


# The per-request hooks run only in gateways that trace (``active``).


@comox.hookimpl(tryfirst=True)
def comox_request_start(request: GatewayRequest) -> None:
    tracing = _of(request)
    if tracing is not None:
        tracing.request_start(request)


@comox.hookimpl(tryfirst=True)
def comox_attempt_start(request: GatewayRequest, backend: str | None, kind: str) -> None:
    tracing = _of(request)
    if tracing is not None:
        tracing.attempt_start(request, backend, kind)


@comox.hookimpl(trylast=True)
def comox_attempt_done(request: GatewayRequest, backend: str | None, kind: str, response: BackendResponse | None,
                       error: str | None) -> None:
    tracing = _of(request)
    if tracing is not None:
        tracing.attempt_done(request, backend, kind, response, error)


@comox.hookimpl(trylast=True)
def comox_request_done(request: GatewayRequest, status: int, backend: str | None, error: Exception | None) -> None:
    # trylast: after the failover plugin settled the usage of its streams.
    tracing = _of(request)
    if tracing is not None:
        tracing.request_done(request, status, backend, error)
