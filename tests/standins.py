"""Stand-in servers for engines we cannot run here, speaking their real wire
formats over real HTTP: llama.cpp's ``llama-server`` (``/health`` with 503
"Loading model", ``/slots``, ``/metrics``, ``timings`` with ``cache_n``, and
``id_slot``) and vLLM (``/health``, Prometheus ``/metrics``)."""

from __future__ import annotations

import orjson

from comox.testing import StandInUpstream


async def _send(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LlamaServerStandIn(StandInUpstream):
    """llama-server: ``loading`` makes /health (and completions) answer 503
    Loading model; ``busy_slots`` of ``n_slots`` are processing other
    clients' work; each completion reports ``timings`` whose ``cache_n`` is
    ``cache_n`` (a callable of the request body, or a number)."""

    def __init__(self, name: str, *, n_slots: int = 2, **kwargs):
        super().__init__(name, **kwargs)
        self.loading = False
        self.n_slots = n_slots
        self.busy_slots = 0
        self.cache_n = 0
        self.deferred = 0
        self.health_checks = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        loading_error = orjson.dumps({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        if path == "/health":
            self.health_checks += 1
            if self.loading:
                await _send(send, 503, loading_error, b"application/json")
            else:
                await _send(send, 200, b'{"status":"ok"}', b"application/json")
            return
        if path == "/slots":
            slots = [{"id": i, "id_task": i if i < self.busy_slots else -1, "n_ctx": 4096, "speculative": False,
                      "is_processing": i < self.busy_slots} for i in range(self.n_slots)]
            await _send(send, 200, orjson.dumps(slots), b"application/json")
            return
        if path == "/metrics":
            text = (
                "# HELP llamacpp:requests_processing Number of requests processing.\n"
                "# TYPE llamacpp:requests_processing gauge\n"
                f"llamacpp:requests_processing {float(self.busy_slots)}\n"
                "# HELP llamacpp:requests_deferred Number of requests deferred.\n"
                "# TYPE llamacpp:requests_deferred gauge\n"
                f"llamacpp:requests_deferred {float(self.deferred)}\n"
            )
            await _send(send, 200, text.encode(), b"text/plain; version=0.0.4")
            return
        if self.loading and path.startswith("/v1/"):
            await _send(send, 503, loading_error, b"application/json")
            return
        await super().__call__(scope, receive, send)

    def _completion(self, payload: dict, chat: bool) -> dict:
        out = super()._completion(payload, chat)
        cache_n = self.cache_n(payload) if callable(self.cache_n) else self.cache_n
        prompt_n = 100
        out["usage"] = {"prompt_tokens": prompt_n + cache_n, "completion_tokens": 3, "total_tokens": prompt_n + cache_n + 3}
        out["timings"] = {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": 50.0, "prompt_per_second": 2000.0,
                          "predicted_n": 3, "predicted_ms": 30.0, "predicted_per_second": 100.0}
        return out


class VLLMStandIn(StandInUpstream):
    """vLLM: ``/health`` (200, or 500 when ``dead``) and Prometheus ``/metrics``
    with the engine's queue and KV-cache gauges."""

    def __init__(self, name: str, **kwargs):
        super().__init__(name, **kwargs)
        self.waiting = 0
        self.running = 0
        self.kv_cache = 0.1
        self.dead = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            await _send(send, 500 if self.dead else 200, b"", b"application/json")
            return
        if scope["type"] == "http" and scope["path"] == "/metrics":
            labels = 'engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"'
            text = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{{{labels}}} {float(self.running)}\n"
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{{{labels}}} {float(self.waiting)}\n"
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_cache}\n"
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
                "# TYPE vllm:prompt_tokens_total counter\n"
                f"vllm:prompt_tokens_total{{{labels}}} 1234.0\n"
            )
            await _send(send, 200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")
            return
        await super().__call__(scope, receive, send)
