"""The ``llamacpp`` backend type: an OpenAI-compatible llama.cpp server
(``llama-server``, or ``python -m llama_cpp.server``), plus what llama.cpp
tells about itself:

* ``GET /health`` for the active health check: 200 ready; 503 (``"Loading
  model"``) means loading — not ready, not broken; a server that has never
  answered yet and refuses connections is counted as starting, not failed.
  Servers without ``/health`` (llama-cpp-python) are checked with
  ``/v1/models``.
* ``GET /slots`` (when the server exposes it): total and idle slots. Busy slots
  that are not the gateway's own requests count as load that policies see.
* ``GET /metrics`` (``metrics = true``, the server run with ``--metrics``):
  ``llamacpp:requests_deferred`` (queued) adds to that load.
* With ``prefix_affinity``, requests carry ``id_slot`` so the slot that holds
  the prompt's cache serves it again (node, then slot).
"""

from __future__ import annotations

import orjson
from pydantic import Field

import comox
from comox.errors import BackendUnavailable
from comox.health import FAIL, LOADING, OK
from comox_openai import OpenAIBackend, OpenAIBackendSettings
from comox_openai.transport import UpstreamUnreachable

__all__ = ["LlamaCppBackend", "LlamaCppSettings", "parse_prometheus"]

SLOT_KEY = "comox.id_slot"


class LlamaCppSettings(OpenAIBackendSettings):
    slots: bool = True
    """Read ``/slots`` at each health check (skipped if the server lacks it)."""
    metrics: bool = False
    """Scrape ``/metrics`` (llama-server ``--metrics``) at each health check."""
    pin_slots: bool = True
    """Send ``id_slot`` chosen by ``prefix_affinity``."""
    slot_count: int | None = Field(None, ge=1)
    """Slots of the server (``--parallel``), when ``/slots`` is not available."""


def parse_prometheus(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named metric over its label sets, from Prometheus text."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        for name in names:
            if line.startswith(name) and len(line) > len(name) and line[len(name)] in "{ ":
                try:
                    value = float(line.rsplit(None, 1)[-1] if line[len(name)] == " " else line.rsplit("}", 1)[1].split()[0])
                except (ValueError, IndexError):
                    continue
                found[name] = found.get(name, 0.0) + value
    return found


class LlamaCppBackend(OpenAIBackend):
    settings_model = LlamaCppSettings
    health_check_default = True

    def __init__(self, settings: LlamaCppSettings, **kwargs):
        super().__init__(settings, **kwargs)
        self.root = self.base_url[: -len("/v1")]
        self.pins_slots = settings.pin_slots
        self._slots = settings.slots
        self._health_path: str | None = "/health"
        self._seen_up = False

    async def health_check(self, state, http) -> tuple[str, str]:
        if state.total_slots is None and self.settings.slot_count:
            state.total_slots = self.settings.slot_count
        try:
            verdict, detail = await self._health(http)
        except Exception as exc:
            if not self._seen_up and type(exc).__name__ == "ConnectError":
                return LOADING, "not listening yet (starting)"
            raise
        if verdict != OK:
            return verdict, detail
        self._seen_up = True
        others = 0
        if self._slots:
            response = await http.get(f"{self.root}/slots")
            if response.status_code == 200:
                slots = response.json()
                if isinstance(slots, list) and slots:
                    busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
                    state.total_slots = len(slots)
                    state.idle_slots = len(slots) - busy
                    others = max(0, busy - state.inflight)
            elif response.status_code in (404, 501):
                self._slots = False  # not exposed by this server
        if self.settings.metrics:
            response = await http.get(f"{self.root}/metrics")
            if response.status_code == 200:
                values = parse_prometheus(response.text, ("llamacpp:requests_deferred", "llamacpp:requests_processing", "llamacpp:kv_cache_usage_ratio"))
                others += int(values.get("llamacpp:requests_deferred", 0))
                if "llamacpp:requests_processing" in values:
                    state.ext_running = int(values["llamacpp:requests_processing"])
                if "llamacpp:kv_cache_usage_ratio" in values:
                    state.kv_cache_usage = values["llamacpp:kv_cache_usage_ratio"]
        state.ext_waiting = others
        return OK, "ok"

    async def _health(self, http) -> tuple[str, str]:
        if self._health_path == "/health":
            response = await http.get(f"{self.root}/health")
            if response.status_code == 200:
                return OK, "ok"
            if response.status_code == 503:
                try:
                    body = response.json()
                    error = body.get("error") if isinstance(body, dict) else None
                    message = (error or {}).get("message") if isinstance(error, dict) else body.get("status")
                except ValueError:
                    message = response.text[:100]
                return LOADING, str(message or "503 from /health")
            if response.status_code != 404:
                return FAIL, f"GET /health: HTTP {response.status_code}"
            self._health_path = "/v1/models"  # llama-cpp-python has no /health
        response = await http.get(f"{self.base_url}/models")
        if response.status_code == 200:
            return OK, "ok"
        return FAIL, f"GET /v1/models: HTTP {response.status_code}"

    async def handle(self, request):
        pin = request.state.get(SLOT_KEY)
        if pin is None or not self.pins_slots or pin[0] != self.name:
            return await super().handle(request)
        body = dict(request.json)
        body["id_slot"] = pin[1]
        if self.upstream_model is not None:
            body["model"] = self.upstream_model
        url = f"{self.base_url}/{request.endpoint}"
        try:
            return await self.transport.post(url, orjson.dumps(body), {"x-request-id": request.id})
        except UpstreamUnreachable as exc:
            raise BackendUnavailable(f"backend {self.name!r} unreachable: {type(exc.cause).__name__}") from exc.cause


@comox.hookimpl
def comox_backend_types():
    return {"llamacpp": LlamaCppBackend}
