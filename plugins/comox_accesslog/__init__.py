"""The access log (docs/telemetry.md): one line per API request — answered,
refused before its body was read, or left by its client — on the logger
``comox.access``, with ids, model group, endpoint, backend, status, times,
tokens, cache status, route and retries; never a key, never content.

Lines are records like the fleet events' (fields in ``extra={"comox_event":
…}``), so ``comox serve --log-format text|json`` writes them as
``key=value`` pairs or one JSON object per line. ``comox serve --access-log``
turns the logger on; in an app that mounts Comox, the host's logging config
does (``logging.getLogger("comox.access").setLevel(logging.INFO)``). While
it is off, a request costs one level check.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import comox
from comox import GatewayRequest

__all__ = ["LOGGER", "fields"]

LOGGER = "comox.access"
log = logging.getLogger(LOGGER)

_CACHE_STATUSES = frozenset({b"hit", b"miss", b"skip"})


@comox.hookimpl(trylast=True)
def comox_request_done(request: GatewayRequest, status: int, backend: str | None, error: Exception | None) -> None:
    # trylast: after the failover plugin settled the usage of its streams.
    if not log.isEnabledFor(logging.INFO):
        return
    line = fields(request, status, backend, error)
    log.info("%s %s %d in %.1f ms", request.method, line["endpoint"] or "unknown", status, line["latency_ms"],
             extra={"comox_event": line})


def fields(request: GatewayRequest, status: int, backend: str | None, error: Exception | None) -> dict[str, Any]:
    """The fields of one request's line. Times are milliseconds from the
    request's arrival: ``latency_ms`` until now (its last byte sent, or its
    client gone), ``ttft_ms`` until its answer started (a stream's first
    chunk; ``None`` when nothing was sent)."""
    start = request.received_at
    first = request.first_byte_at
    waited = request.answered_at - request.sent_at
    usage = request.usage
    cache = request.response_header(b"x-comox-cache")  # (only values the cache plugin sends are logged)
    return {
        "event": "request",
        "request_id": request.id,
        "key_id": request.principal.key_id,
        "method": request.method,
        "endpoint": request.api_endpoint or request.endpoint or None,
        "model": request.model_group or None,
        "stream": request.stream,
        "status": status,
        "route": request.route or None,
        "backend": backend,
        "cache": cache.decode() if cache in _CACHE_STATUSES else None,
        "retries": request.retries,
        "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        "ttft_ms": round((first - start) * 1000, 3) if first else None,
        "overhead_ms": round((first - start - (waited if waited > 0 else 0.0)) * 1000, 3) if first else None,
        "prompt_tokens": usage.prompt if usage is not None else None,
        "completion_tokens": usage.completion if usage is not None else None,
        "cached_tokens": usage.cached if usage is not None else None,
        "error": _error_code(error),
    }


def _error_code(error: Exception | None) -> str | None:
    """The error's code (``rate_limit_exceeded``), never its message: a
    message may quote what the client sent."""
    if error is None:
        return None
    if isinstance(error, comox.ComoxError):
        return error.code or error.type
    return type(error).__name__
