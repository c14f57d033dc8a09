"""The fleet page (docs/dashboard.md): ``GET /dashboard``, one HTML page that
shows each model group and backend — state, in flight, latency and time to
first token over the last minutes, tokens/s, ejections — the recent fleet
events and cloud spend against the budgets, updated live over server-sent
events (:mod:`comox_dashboard.routes`).

* Behind the admin key: the environment variable ``[plugins.admin] key_env``
  names (``COMOX_ADMIN_KEY`` by default), as a bearer header or through a
  login form and a signed session cookie (:mod:`comox_dashboard.session`).
  Without that variable the page does not exist (404).
* The history is this process's (:mod:`comox_dashboard.history`): a sample
  of every backend each second, taken by a task that runs from
  ``comox_startup`` to ``comox_shutdown``; the time to first token of the
  streams each backend answered (``comox_request_done``); the fleet events
  logged to ``comox.events``, caught by a logging handler.
* Cloud spend is what the failover plugin's ``GET /admin/spend`` answers;
  without that route the page has no spend panel.
* Neither the page nor its stream ever holds a key or any request's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from typing import Any

from starlette.routing import Route

import comox
from comox import Gateway, GatewayRequest

from .history import EventRing, Samples
from .openapi import dashboard_openapi
from .routes import Dashboard

__all__ = ["Dashboard"]

EVENTS_LOGGER = "comox.events"


class _Running:
    """The page's state for one gateway."""

    def __init__(self, gateway: Gateway, key: str):
        self.samples = Samples(gateway)
        self.events = EventRing()
        self.dashboard = Dashboard(gateway, key, self.samples, self.events)
        self.sampler: asyncio.Task[None] | None = None


_gateways: weakref.WeakKeyDictionary[Gateway, _Running] = weakref.WeakKeyDictionary()


def admin_key(gateway: Gateway) -> str | None:
    env = getattr(gateway.plugin_settings("admin"), "key_env", None) or "COMOX_ADMIN_KEY"
    return os.environ.get(env) or None


@comox.hookimpl
def comox_active(gateway: Gateway) -> bool:
    """Without an admin key the page does not exist: nothing to record."""
    return admin_key(gateway) is not None


@comox.hookimpl
def comox_routes(gateway: Gateway) -> list[Route] | None:
    key = admin_key(gateway)
    if key is None:
        return None
    running = _gateways[gateway] = _Running(gateway, key)
    return running.dashboard.routes()


@comox.hookimpl
def comox_openapi(gateway: Gateway) -> dict[str, Any] | None:
    return dashboard_openapi() if admin_key(gateway) is not None else None


@comox.hookimpl
async def comox_startup(gateway: Gateway) -> None:
    running = _gateways.get(gateway)
    if running is None or running.sampler is not None:
        return
    logging.getLogger(EVENTS_LOGGER).addHandler(running.events)
    running.sampler = asyncio.create_task(running.samples.run(), name="comox-dashboard-sampler")


@comox.hookimpl
async def comox_shutdown(gateway: Gateway) -> None:
    running = _gateways.pop(gateway, None)
    if running is None:
        return
    logging.getLogger(EVENTS_LOGGER).removeHandler(running.events)
    if running.sampler is not None:
        running.sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.sampler


@comox.hookimpl
def comox_request_done(request: GatewayRequest, status: int, backend: str | None) -> None:
    """The time to first token of a stream a backend of the fleet answered."""
    running = _gateways.get(request.gateway) if request.gateway is not None else None
    if running is None or backend is None or status != 200 or not request.stream:
        return
    if request.sent_at and request.answered_at >= request.sent_at:
        running.samples.observe_ttft(backend, (request.answered_at - request.sent_at) * 1000.0)
