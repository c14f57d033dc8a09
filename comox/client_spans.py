"""HTTP client spans for the upstream transports OpenTelemetry has no
instrumentation for (httptools, pyreqwest): ``POST``, kind CLIENT, with
``http.request.method``, ``url.full``, ``server.address``/``server.port``,
``http.response.status_code`` and ``error.type``, and the W3C
``traceparent`` sent upstream.

They are made after :func:`instrument` (the counterpart of the aiohttp/httpx
instrumentors, with their ``tracer_provider``; the otel plugin calls it
through ``comox.instrument_transports`` with its own provider), or whenever
the caller's current span is recording: then with the global tracer
provider, and if that is not the one recording, the HTTP span is not recorded
but the caller's ``traceparent`` still goes upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

try:  # optional: spans only when OpenTelemetry is installed
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - comox[otel] not installed
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

__all__ = ["instrument", "uninstrument", "is_instrumented", "start", "answered", "failed"]

_instrumented = False
_provider: Any = None


def instrument(tracer_provider: Any = None) -> None:
    """Client spans for every call, with ``tracer_provider`` (``None``: the global one)."""
    global _instrumented, _provider
    _instrumented, _provider = True, tracer_provider


def uninstrument() -> None:
    global _instrumented, _provider
    _instrumented, _provider = False, None


def is_instrumented() -> bool:
    return _instrumented


def start(url: str, headers: Mapping[str, str], tracer: str) -> tuple[Any, Mapping[str, str]]:
    """A started span for a call to ``url`` (``None`` when there is nothing
    to trace), and ``headers`` with its ``traceparent``."""
    if _trace is None or not (_instrumented or _trace.get_current_span().is_recording()):
        return None, headers
    parts = urlsplit(url)
    span = _trace.get_tracer(tracer, tracer_provider=_provider).start_span("POST", kind=_trace.SpanKind.CLIENT, attributes={
        "http.request.method": "POST", "url.full": url, "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
    })
    carrier = dict(headers)
    _propagate.inject(carrier, context=_trace.set_span_in_context(span))
    return span, carrier


def answered(span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))


def failed(span: Any, cause: BaseException) -> None:
    span.set_attribute("error.type", type(cause).__name__)
    span.set_status(_trace.StatusCode.ERROR)
