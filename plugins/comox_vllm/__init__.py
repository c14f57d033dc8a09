"""The ``vllm`` backend type: vLLM's OpenAI-compatible server, plus its
``/health`` (active health check) and Prometheus ``/metrics``:

* ``vllm:num_requests_waiting`` — queued in the engine: the load policies see
  (added to the gateway's own in-flight count).
* ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc`` (older vLLM:
  ``vllm:gpu_cache_usage_perc``) — shown in ``/admin/backends``; a KV cache
  nearly full (≥ ``kv_cache_full``) also counts as one more waiting request
  per running one, since new requests will queue for memory.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import Field

import comox
from comox import FAIL, OK, HealthReport, LoadReport, parse_prometheus

__all__ = ["VLLMBackend", "VLLMSettings"]

METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class VLLMSettings(comox.HTTPBackendSettings):
    metrics: bool = True
    """Scrape ``/metrics`` at each health check."""
    kv_cache_full: float = Field(0.95, gt=0, le=1)


class VLLMBackend(comox.HTTPBackend):
    settings_model = VLLMSettings
    health_check_default = True
    continues = frozenset({"completions", "chat/completions"})  # continue_final_message

    def __init__(self, settings: VLLMSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.settings: VLLMSettings = settings

    async def health_check(self, http: httpx.AsyncClient) -> HealthReport:
        response = await http.get(f"{self.root}/health")
        if response.status_code != 200:
            return HealthReport(FAIL, f"GET /health: HTTP {response.status_code}")
        if not self.settings.metrics:
            return HealthReport(OK, "ok")
        response = await http.get(f"{self.root}/metrics")
        if response.status_code != 200:
            return HealthReport(OK, "ok")
        values = parse_prometheus(response.text, METRICS)
        waiting = int(values.get("vllm:num_requests_waiting", 0))
        running = int(values.get("vllm:num_requests_running", 0))
        usage = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc"))
        if usage is not None and usage >= self.settings.kv_cache_full:
            waiting += running  # new requests will queue for memory
        return HealthReport(OK, "ok", LoadReport(waiting=waiting, running=running, kv_cache_usage=usage))


@comox.hookimpl
def comox_backend_types() -> dict[str, type]:
    return {"vllm": VLLMBackend}
