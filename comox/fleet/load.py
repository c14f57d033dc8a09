"""Load a backend reports about itself (llama.cpp ``/slots`` and
``/metrics``, vLLM ``/metrics``), as returned by its health check."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoadReport", "HealthReport", "OK", "LOADING", "FAIL"]

OK = "ok"
LOADING = "loading"
FAIL = "fail"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a backend says about its own load; ``None`` where it says nothing.

    :param waiting: requests queued in the engine (any client's).
    :param running: requests being processed (any client's, ours included).
    :param busy_slots: slots processing a request (llama.cpp ``/slots``); the
        core counts those beyond the gateway's own in-flight requests as load.
    :param total_slots: slots of the server.
    :param kv_cache_usage: share of the KV cache in use, 0 to 1.
    """

    waiting: int | None = None
    running: int | None = None
    busy_slots: int | None = None
    total_slots: int | None = None
    kv_cache_usage: float | None = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The verdict of one active health check, applied to the fleet by the core.

    :param status: :data:`OK`, :data:`LOADING` (up but not ready, such as
        llama.cpp's ``/health`` 503 "Loading model": no traffic, but not a
        failure) or :data:`FAIL`.
    :param detail: a short reason, shown in ``/admin/backends`` and logs.
    :param load: load the backend reported, if any.
    """

    status: str
    detail: str = ""
    load: LoadReport | None = None
