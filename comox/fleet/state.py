"""One record per backend, owned by the core: requests in flight, outlier
ejection, health verdicts, draining, reported load; measurements come from
:class:`~comox.fleet.measure.Measured`.

Plugins read it through :class:`comox.BackendView`; only the core writes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..backends import SupportsSlotPinning
from ..events import emit
from .load import FAIL, LOADING, OK, HealthReport, LoadReport
from .measure import Measured

if TYPE_CHECKING:
    from ..backends import Backend
    from ..settings import BackendSettings
    from .group import ModelGroup

__all__ = ["BackendState", "EJECT_AFTER", "EJECT_BASE_S", "EJECT_MAX_S", "SLOW_START_MIN"]

# Outlier ejection defaults (Envoy's): eject after this many consecutive failures,
# for EJECT_BASE_S × times ejected, at most EJECT_MAX_S.
EJECT_AFTER = 5
EJECT_BASE_S = 30.0
EJECT_MAX_S = 300.0
SLOW_START_MIN = 0.1  # share of traffic at the start of a slow-start window


class BackendState(Measured):
    """What the gateway knows about one backend right now.

    ``clock`` is any monotonic ``() -> seconds`` callable; tests pass a fake one
    so ejection times and decays are deterministic.
    """

    __slots__ = (
        "name", "backend", "settings", "type", "weight", "max_concurrency", "first_byte_timeout_s", "inflight", "pins_slots",
        "draining", "consecutive_failures", "times_ejected", "ejected_until", "ejections",
        "last_error", "requests", "failures", "clock", "group", "routable", "slow_start_s", "recovered_at",
        "health_ok", "ready", "health_passes", "health_fails", "last_health",
        "ext_waiting", "ext_running", "kv_cache_usage", "idle_slots", "total_slots", "waiting",
        # Measured's
        "ewma_ms", "ewma_at", "penalty_ms", "penalty_at", "prefill_tps", "decode_tps",
        "prompt_tokens", "cached_tokens", "measured_at",
    )

    def __init__(self, backend: Backend, settings: BackendSettings, clock: Callable[[], float] = time.monotonic):
        self.name = settings.name
        self.backend = backend
        self.settings = settings
        self.type = settings.type
        self.weight = settings.weight
        self.max_concurrency = settings.max_concurrency
        self.first_byte_timeout_s = settings.first_byte_timeout_s
        self.pins_slots = isinstance(backend, SupportsSlotPinning) and bool(backend.pins_slots)
        self.inflight = 0
        self.draining = False
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejections = 0  # also counts ejections undone by a passing health check
        self.ejected_until = 0.0
        self.last_error: str | None = None
        self.requests = 0
        self.failures = 0
        self.clock = clock
        self.group: ModelGroup | None = None
        self.routable = True  # maintained by the group: in ``group.available``
        self.slow_start_s = float(settings.slow_start_s)
        self.recovered_at: float | None = None
        # Active health checks: ``health_ok`` False after enough failed checks;
        # ``ready`` False while the backend says it is loading (not broken).
        self.health_ok = True
        self.ready = True
        self.health_passes = 0
        self.health_fails = 0
        self.last_health: str | None = None
        # Load reported by the backend itself (vLLM /metrics, llama.cpp /slots).
        self.ext_waiting = 0
        self.ext_running = 0
        self.kv_cache_usage: float | None = None
        self.idle_slots: int | None = None
        self.total_slots: int | None = getattr(settings, "slot_count", None)
        # Requests sent here that have not had their first byte yet: task →
        # True once the backend left rotation and the request should move.
        self.waiting: dict[asyncio.Task[object], bool] = {}
        self._init_measured()

    # -- what a policy reads ---------------------------------------------------

    @property
    def ejected(self) -> bool:
        return self.ejected_until > self.clock()

    @property
    def saturated(self) -> bool:
        return self.max_concurrency is not None and self.inflight >= self.max_concurrency

    @property
    def load(self) -> int:
        """Requests in flight here plus those the backend reports queued that
        are not ours (another gateway's, or direct clients')."""
        return self.inflight + self.ext_waiting

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self.ejected:
            return "ejected"
        if not self.health_ok:
            return "unhealthy"
        if not self.ready:
            return "loading"
        return "healthy"

    def serves(self, endpoint: str) -> bool:
        """Whether this backend serves ``endpoint`` (its ``endpoints``
        setting; by default every one but ``rerank``)."""
        endpoints = self.settings.endpoints
        return endpoint != "rerank" if endpoints is None else endpoint in endpoints

    def slow_start_factor(self, now: float) -> float:
        """1.0, or the share of traffic this backend gets while warming up
        after a recovery (from SLOW_START_MIN up to 1 over ``slow_start_s``)."""
        since = self.recovered_at
        if since is None or now < since:
            return 1.0
        elapsed = now - since
        if elapsed >= self.slow_start_s:
            self.recovered_at = None
            emit("slow_start_finished", f"backend {self.name} finished its slow start", backend=self.name)
            return 1.0
        return max(SLOW_START_MIN, elapsed / self.slow_start_s)

    # -- in flight ----------------------------------------------------------

    def acquire(self) -> None:
        self.inflight += 1
        group = self.group
        if group is not None:
            group.counters.inflight += 1
            if self.max_concurrency is not None and self.inflight == self.max_concurrency:
                group.saturated_count += 1
            for listener in group.load_listeners:
                listener(self, self.inflight - 1)

    def release(self) -> None:
        self.inflight -= 1
        group = self.group
        if group is not None:
            group.counters.inflight -= 1
            if self.max_concurrency is not None and self.inflight == self.max_concurrency - 1:
                group.saturated_count -= 1
            for listener in group.load_listeners:
                listener(self, self.inflight + 1)
            if group.waiters:
                group.wake_one()

    # -- results of real requests -------------------------------------------

    def record_success(self, latency_s: float) -> None:
        self.requests += 1
        self.consecutive_failures = 0
        self.observe_latency(latency_s * 1000.0)

    def record_failure(self, error: str, status: int | None = None) -> None:
        """A failed request: connection refused, timeout, 5xx, a stream cut short.
        Every failure carries a decaying latency penalty; a 429 (busy, not
        broken) does not count towards ejection."""
        self.requests += 1
        self.failures += 1
        self.last_error = error
        self.penalize()
        if status == 429:
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER and not self.ejected:
            self.eject()

    def eject(self) -> None:
        self.times_ejected += 1
        self.ejections += 1
        seconds = min(EJECT_BASE_S * self.times_ejected, EJECT_MAX_S)
        self.ejected_until = self.clock() + seconds
        failures = self.consecutive_failures
        self.consecutive_failures = 0
        if self.slow_start_s:
            self.recovered_at = self.ejected_until  # warm up once the ejection runs out
        emit("backend_ejected", f"backend {self.name} ejected for {seconds:g} s after {failures} consecutive failures",
             level=logging.WARNING, backend=self.name, seconds=seconds, failures=failures, reason=self.last_error)
        self._left_rotation()

    # -- health checks and the admin ----------------------------------------

    def apply_health(self, report: HealthReport, *, healthy_threshold: int = 1, unhealthy_threshold: int = 1) -> None:
        """Apply one health check's verdict and the load it reported."""
        if report.status == OK:
            if report.load is not None:
                self.apply_load(report.load)
            self.health_passed(healthy_threshold=healthy_threshold)
        elif report.status == LOADING:
            self.not_ready(report.detail)
        elif report.status == FAIL:
            self.health_failed(report.detail, unhealthy_threshold=unhealthy_threshold)
        else:
            raise ValueError(f"unknown health status {report.status!r}")

    def apply_load(self, load: LoadReport) -> None:
        waiting = load.waiting or 0
        if load.busy_slots is not None:
            waiting += max(0, load.busy_slots - self.inflight)  # busy with others' requests
            if load.total_slots is not None:
                self.idle_slots = load.total_slots - load.busy_slots
        if load.total_slots is not None:
            self.total_slots = load.total_slots
        if load.running is not None:
            self.ext_running = load.running
        if load.kv_cache_usage is not None:
            self.kv_cache_usage = load.kv_cache_usage
        self.ext_waiting = waiting

    def health_passed(self, *, healthy_threshold: int = 1) -> None:
        self.last_health = "ok"
        self.health_fails = 0
        self.health_passes += 1
        changed = not self.ready
        self.ready = True
        if changed:
            emit("backend_ready", f"backend {self.name} is ready", backend=self.name)
        if self.health_passes >= healthy_threshold:
            if not self.health_ok or self.ejected_until > self.clock():
                # A passing active check un-ejects; the backend then warms up.
                emit("backend_recovered", f"backend {self.name} recovered: health check passed", backend=self.name,
                     was="unhealthy" if not self.health_ok else "ejected")
                self.health_ok = True
                self.ejected_until = 0.0
                self.consecutive_failures = 0
                if self.slow_start_s:
                    self.recovered_at = self.clock()
                changed = True
        if changed:
            self._changed()

    def health_failed(self, detail: str, *, unhealthy_threshold: int = 1) -> None:
        self.last_health = detail
        self.health_passes = 0
        self.health_fails += 1
        if self.health_fails >= unhealthy_threshold and self.health_ok:
            self.health_ok = False
            self.last_error = f"health check: {detail}"
            emit("backend_unhealthy", f"backend {self.name} is unhealthy: {detail}", level=logging.WARNING,
                 backend=self.name, reason=detail, failed_checks=self.health_fails)
            self._left_rotation()

    def not_ready(self, detail: str) -> None:
        """The backend is up but not ready (llama.cpp loading its model): no
        traffic, but not a failure either."""
        self.last_health = detail
        self.health_passes = 0
        if self.ready:
            self.ready = False
            emit("backend_loading", f"backend {self.name} is not ready: {detail}", backend=self.name, reason=detail)
            self._changed()

    def set_draining(self, draining: bool) -> None:
        if self.draining != draining:
            self.draining = draining
            emit("backend_drained" if draining else "backend_undrained",
                 f"backend {self.name} {'drained: no new requests' if draining else 'undrained'}", backend=self.name)
            self._changed()

    def _changed(self) -> None:
        if self.group is not None:
            self.group.invalidate()

    def _left_rotation(self) -> None:
        """Ejected or unhealthy: requests waiting here for their first byte
        move to another backend at once (:meth:`Gateway.dispatch`)."""
        self._changed()
        for task, moved in self.waiting.items():
            if not moved:
                self.waiting[task] = True
                task.cancel()

    def snapshot(self) -> dict[str, Any]:
        """What ``/admin/backends`` shows of this backend."""
        now = self.clock()
        return {
            "name": self.name,
            "type": self.type,
            "state": self.state,
            "inflight": self.inflight,
            "max_concurrency": self.max_concurrency,
            "weight": self.weight,
            "ewma_latency_ms": None if self.ewma_ms is None else round(self.ewma_ms, 3),
            "penalty_ms": round(self.penalty_now(), 3),
            "prefill_tokens_per_s": None if self.prefill_tps is None else round(self.prefill_tps, 2),
            "decode_tokens_per_s": None if self.decode_tps is None else round(self.decode_tps, 2),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "requests": self.requests,
            "failures": self.failures,
            "ejections": self.ejections,
            "times_ejected": self.times_ejected,
            "ejected_for_s": max(0.0, round(self.ejected_until - now, 3)),
            "slow_start_factor": round(self.slow_start_factor(now), 3),
            "last_error": self.last_error,
            "last_health_check": self.last_health,
            "reported_load": {
                "waiting": self.ext_waiting,
                "running": self.ext_running,
                "kv_cache_usage": self.kv_cache_usage,
                "idle_slots": self.idle_slots,
                "total_slots": self.total_slots,
            },
        }
