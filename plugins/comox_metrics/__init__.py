"""Prometheus metrics (docs/telemetry.md): ``GET /metrics`` in Prometheus'
text format (OpenMetrics when the scraper asks for it), from prometheus_client.

* Per API request, from ``comox_request_done`` (:mod:`comox_metrics.series`):
  requests by model group, backend, endpoint, status, route and cache status;
  latency, time to first token, inter-token latency and the gateway's own
  overhead as histograms; tokens; retries, failovers, rate-limit refusals.
* The fleet from ``gateway.snapshot()`` when scraped (and every few seconds in
  each worker): in flight, state, ejections and measured tokens/s per backend.
* Cloud spend and reservations from the failover plugin's budget counters.
* ``comox serve --workers N``: every worker records into files one scrape
  reads together (:mod:`comox_metrics.workers`).

``[plugins.metrics]``: ``require_admin_key`` (default false: ``/metrics`` is
open, like ``/healthz``), ``path``, ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import comox
from comox import AuthenticationFailed, Gateway, GatewayRequest

from .series import Metrics, ScrapeTime
from .workers import setup, sweep

__all__ = ["MetricsSettings", "exposition"]

log = logging.getLogger("comox.metrics")

_MULTIPROCESS_DIR = setup()  # before any metric is made: with workers, values go to shared files


class MetricsSettings(BaseModel):
    """``[plugins.metrics]``"""

    model_config = ConfigDict(extra="forbid")

    require_admin_key: bool = False
    """Serve ``/metrics`` only with ``Authorization: Bearer <admin key>`` (the
    key ``[plugins.admin] key_env`` names). Off: open to whoever reaches the
    port, like ``/healthz`` — the metrics hold no key, request id or content."""
    path: str = Field("/metrics", pattern=r"^/[A-Za-z0-9/_.-]*$")
    """Where the metrics are served (outside ``/v1/``)."""
    refresh_s: float = Field(2.0, gt=0)
    """With workers, how often each worker writes its view of the fleet
    (in flight, states, tokens/s) for the scrape; a single process reads it
    when scraped."""

    @field_validator("path")
    @classmethod
    def _not_comox_own(cls, path: str) -> str:
        if path == "/v1" or path.startswith("/v1/") or path in ("/healthz", "/readyz"):
            raise ValueError(f"{path} is served by Comox itself; choose another path")
        return path


class _State:
    """This plugin's metrics for one gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(self.registry, shared=_MULTIPROCESS_DIR is not None)
        self.scrape_time = ScrapeTime()
        if _MULTIPROCESS_DIR is None:
            self.registry.register(self.scrape_time)
        self.refresher: asyncio.Task[None] | None = None


# Keyed by a weak reference (as a WeakKeyDictionary, whose get is a Python call
# per request): a gateway's plain weakref.ref() finds the entry, in C.
_gateways: dict[weakref.ref[Gateway], _State] = {}
_ref = weakref.ref


def _of(gateway: Gateway) -> _State:
    found = _gateways.get(_ref(gateway))
    if found is None:
        found = _gateways[_ref(gateway, _forget)] = _State()
    return found


def _forget(gone: weakref.ref[Gateway]) -> None:
    _gateways.pop(gone, None)


def _settings(gateway: Gateway) -> MetricsSettings:
    settings = gateway.plugin_settings("metrics")
    return settings if isinstance(settings, MetricsSettings) else MetricsSettings()


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return MetricsSettings


@comox.hookimpl(trylast=True)
def comox_request_done(request: GatewayRequest, status: int, backend: str | None, error: Exception | None) -> None:
    # trylast: after the failover plugin settled the usage of its streams.
    try:
        state = _gateways[_ref(request.gateway)]  # type: ignore[arg-type]
    except (KeyError, TypeError):  # the gateway's first request, or no gateway (no weakref to None)
        if request.gateway is None:
            return
        state = _of(request.gateway)
    state.metrics.record(request, status, backend)


@comox.hookimpl
async def comox_startup(gateway: Gateway) -> None:
    state = _of(gateway)
    if _MULTIPROCESS_DIR is not None:
        state.refresher = asyncio.create_task(_refresh(gateway, state, _settings(gateway).refresh_s),
                                              name="comox-metrics-fleet")


@comox.hookimpl
async def comox_shutdown(gateway: Gateway) -> None:
    state = _gateways.get(_ref(gateway))
    if state is not None and state.refresher is not None:
        state.refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.refresher
        state.refresher = None


async def _refresh(gateway: Gateway, state: _State, every_s: float) -> None:
    """A worker's view of the fleet, written for whichever worker is scraped."""
    while True:
        try:
            state.metrics.refresh_fleet(gateway)
        except Exception:
            log.exception("could not record the fleet's metrics")
        await asyncio.sleep(every_s)


@comox.hookimpl
def comox_routes(gateway: Gateway) -> list[Route]:
    settings = _settings(gateway)
    expected: bytes | None = None
    if settings.require_admin_key:
        env = getattr(gateway.plugin_settings("admin"), "key_env", None) or "COMOX_ADMIN_KEY"
        key = os.environ.get(env)
        if not key:  # fail closed, as the admin API does (and no worker of comox serve dies over it)
            log.warning("plugins.metrics.require_admin_key: the admin key's environment variable %s is not set, "
                        "so %s is not served", env, settings.path)
            return []
        expected = key.encode()

    async def metrics(request: Request) -> Response:
        if expected is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # Compare whatever came, so timing tells nothing about the scheme.
            if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), expected) or scheme.lower() != "bearer":
                error = AuthenticationFailed("a valid admin key is required (Authorization: Bearer <admin key>)")
                headers = {name.decode(): value.decode() for name, value in error.headers()}
                return Response(error.to_bytes(), status_code=401, headers={**headers, "www-authenticate": "Bearer"})
        body, content_type = await exposition(gateway, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    return [Route(settings.path, metrics, methods=["GET"])]


@comox.hookimpl
def comox_openapi(gateway: Gateway) -> dict[str, Any] | None:
    """``GET /metrics`` in ``GET /openapi.json``, when it is served."""
    settings = _settings(gateway)
    secured = settings.require_admin_key
    if secured and not os.environ.get(getattr(gateway.plugin_settings("admin"), "key_env", None) or "COMOX_ADMIN_KEY"):
        return None
    text = {"schema": {"type": "string"}}
    operation: dict[str, Any] = {
        "tags": ["Metrics"], "summary": "Prometheus metrics (OpenMetrics when the scraper asks for it)",
        "responses": {"200": {"description": "The metrics",
                              "content": {"text/plain": text, "application/openmetrics-text": text}}},
    }
    if secured:
        operation["security"] = [{"AdminKey": []}]
        operation["responses"]["401"] = {"$ref": "#/components/responses/Error"}
    return {"paths": {settings.path: {"get": operation}},
            "components": {"securitySchemes": {"AdminKey": {
                "type": "http", "scheme": "bearer",
                "description": "The admin key (the variable [plugins.admin] key_env names)."}}} if secured else {},
            "tags": [{"name": "Metrics", "description": "Prometheus metrics (the metrics plugin)"}]}


async def exposition(gateway: Gateway, accept: str | None = None) -> tuple[bytes, str]:
    """The metrics of ``gateway`` (with workers: of every worker), encoded for
    a scraper that sent ``accept``; and its content type."""
    state = _of(gateway)
    state.metrics.refresh_fleet(gateway)
    try:
        await state.scrape_time.read_spend(gateway)
    except Exception as exc:  # the shared state is down: the rest of the metrics still go
        log.warning("could not read the cloud budgets for /metrics: %r", exc)
        state.scrape_time.spend = []
    encoder, content_type = choose_encoder(accept or "")
    if _MULTIPROCESS_DIR is None:
        # Collected here, where the event loop records (no lock needed);
        # encoded in a thread, as it takes milliseconds.
        return await asyncio.to_thread(encoder, _Collected(list(state.registry.collect()))), content_type
    return await asyncio.to_thread(_gather, _MULTIPROCESS_DIR, state.scrape_time, encoder), content_type


class _Collected(Collector):
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def _gather(path: Path, scrape_time: ScrapeTime, encoder: Callable[[Collector], bytes]) -> bytes:
    """Every worker's values, from their files (in a thread: file I/O)."""
    sweep(path)
    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
    registry.register(scrape_time)
    return encoder(registry)
