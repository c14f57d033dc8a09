"""The ``llamacpp`` backend type: an OpenAI-compatible llama.cpp server
(``llama-server``, or ``python -m llama_cpp.server``), plus what llama.cpp
tells about itself:

* ``GET /health`` for the active health check: 200 ready; 503 (``"Loading
  model"``) means loading — not ready, not broken; a server that has never
  answered yet and refuses connections is counted as starting, not failed.
  A server without ``/health`` (llama-cpp-python, whose 404 answers it) is
  ready: it listens only once its model is loaded. (Its ``/v1/models`` would
  wait for the model's lock, behind every generation in progress.)
* ``GET /slots`` (when the server exposes it): total and idle slots. Busy slots
  that are not the gateway's own requests count as load that policies see.
* ``GET /metrics`` (``metrics = true``, the server run with ``--metrics``):
  ``llamacpp:requests_deferred`` (queued) adds to that load.
* With ``prefix_affinity``, requests carry ``id_slot`` so the slot that holds
  the prompt's cache serves it again (node, then slot).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from pydantic import Field

import comox
from comox import FAIL, LOADING, OK, GatewayRequest, HealthReport, LoadReport, parse_prometheus

__all__ = ["LlamaCppBackend", "LlamaCppSettings", "parse_prometheus"]

METRICS = ("llamacpp:requests_deferred", "llamacpp:requests_processing", "llamacpp:kv_cache_usage_ratio")
CONTINUES_CHAT = frozenset({"completions", "chat/completions"})


class LlamaCppSettings(comox.HTTPBackendSettings):
    slots: bool = True
    """Read ``/slots`` at each health check (skipped if the server lacks it)."""
    metrics: bool = False
    """Scrape ``/metrics`` (llama-server ``--metrics``) at each health check."""
    pin_slots: bool = True
    """Send ``id_slot`` chosen by ``prefix_affinity``."""
    slot_count: int | None = Field(None, ge=1)
    """Slots of the server (``--parallel``), when ``/slots`` is not available."""


class LlamaCppBackend(comox.HTTPBackend):
    settings_model = LlamaCppSettings
    health_check_default = True

    def __init__(self, settings: LlamaCppSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.settings: LlamaCppSettings = settings
        self.pins_slots = settings.pin_slots
        self._slots = settings.slots
        self._seen_up = False

    async def health_check(self, http: httpx.AsyncClient) -> HealthReport:
        try:
            report = await self._health(http)
        except httpx.ConnectError:
            if not self._seen_up:
                return HealthReport(LOADING, "not listening yet (starting)")
            raise
        if report.status != OK:
            return report
        self._seen_up = True
        busy = total = running = kv = None
        waiting = 0
        if self._slots:
            response = await http.get(f"{self.root}/slots")
            if response.status_code == 200:
                slots = response.json()
                if isinstance(slots, list) and slots:
                    busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
                    total = len(slots)
            elif response.status_code in (404, 501):
                self._slots = False  # not exposed by this server
        if self.settings.metrics:
            response = await http.get(f"{self.root}/metrics")
            if response.status_code == 200:
                values = parse_prometheus(response.text, METRICS)
                waiting = int(values.get("llamacpp:requests_deferred", 0))
                if "llamacpp:requests_processing" in values:
                    running = int(values["llamacpp:requests_processing"])
                kv = values.get("llamacpp:kv_cache_usage_ratio")
        return HealthReport(OK, "ok", LoadReport(waiting=waiting, running=running, busy_slots=busy,
                                                  total_slots=total, kv_cache_usage=kv))

    async def _health(self, http: httpx.AsyncClient) -> HealthReport:
        response = await http.get(f"{self.root}/health")
        if response.status_code == 200:
            # llama-server (llama-cpp-python has no /health): it continues a
            # final assistant message too (comox.SupportsContinuation).
            self.continues = CONTINUES_CHAT
            return HealthReport(OK, "ok")
        if response.status_code == 503:
            try:
                body = response.json()
                error = body.get("error") if isinstance(body, dict) else None
                message = (error or {}).get("message") if isinstance(error, dict) else body.get("status")
            except ValueError:
                message = response.text[:100]
            return HealthReport(LOADING, str(message or "503 from /health"))
        if response.status_code != 404:
            return HealthReport(FAIL, f"GET /health: HTTP {response.status_code}")
        # llama-cpp-python's server: up means loaded. Not /v1/models, which takes
        # the model's lock: a check would wait behind every generation (and a
        # busy node fail it), or with --interrupt_requests abort the one running.
        return HealthReport(OK, "ok")

    async def handle(self, request: GatewayRequest) -> comox.BackendResponse:
        pin = request.slot
        if pin is None or not self.pins_slots or pin[0] != self.name:
            return await super().handle(request)
        body = dict(request.json)
        body["id_slot"] = pin[1]
        if self.upstream_model is not None:
            body["model"] = self.upstream_model
        return await self.post(f"{self.base_url}/{request.endpoint}", orjson.dumps(body), request)


@comox.hookimpl
def comox_backend_types() -> dict[str, type]:
    return {"llamacpp": LlamaCppBackend}
