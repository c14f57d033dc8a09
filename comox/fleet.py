"""Fleet state: one record per backend, owned by the core, read by routing
policies, written by the results of real requests (and, later, health checks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .backends import Backend
    from .request import GatewayRequest
    from .settings import BackendSettings

__all__ = ["BackendState", "ModelGroup", "RoutingPolicy"]

# Outlier ejection defaults (Envoy's): eject after this many consecutive failures,
# for EJECT_BASE_S × times ejected, at most EJECT_MAX_S.
EJECT_AFTER = 5
EJECT_BASE_S = 30.0
EJECT_MAX_S = 300.0
EWMA_ALPHA = 0.3


class BackendState:
    """What the gateway knows about one backend right now."""

    __slots__ = (
        "name", "backend", "settings", "weight", "max_concurrency", "inflight",
        "draining", "consecutive_failures", "times_ejected", "ejected_until",
        "ewma_ms", "last_error", "requests", "failures", "clock",
    )

    def __init__(self, backend: Backend, settings: BackendSettings, clock: Callable[[], float] = time.monotonic):
        self.name = settings.name
        self.backend = backend
        self.settings = settings
        self.weight = settings.weight
        self.max_concurrency = settings.max_concurrency
        self.inflight = 0
        self.draining = False
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejected_until = 0.0
        self.ewma_ms: float | None = None
        self.last_error: str | None = None
        self.requests = 0
        self.failures = 0
        self.clock = clock

    @property
    def ejected(self) -> bool:
        return self.ejected_until > self.clock()

    @property
    def saturated(self) -> bool:
        return self.max_concurrency is not None and self.inflight >= self.max_concurrency

    def record_success(self, latency_s: float) -> None:
        self.requests += 1
        self.consecutive_failures = 0
        ms = latency_s * 1000.0
        self.ewma_ms = ms if self.ewma_ms is None else self.ewma_ms + EWMA_ALPHA * (ms - self.ewma_ms)

    def record_failure(self, error: str) -> None:
        self.requests += 1
        self.failures += 1
        self.last_error = error
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER and not self.ejected:
            self.times_ejected += 1
            self.ejected_until = self.clock() + min(EJECT_BASE_S * self.times_ejected, EJECT_MAX_S)
            self.consecutive_failures = 0

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "type": self.settings.type,
            "state": "draining" if self.draining else "ejected" if self.ejected else "healthy",
            "inflight": self.inflight,
            "max_concurrency": self.max_concurrency,
            "ewma_latency_ms": None if self.ewma_ms is None else round(self.ewma_ms, 3),
            "requests": self.requests,
            "failures": self.failures,
            "times_ejected": self.times_ejected,
            "last_error": self.last_error,
        }


class RoutingPolicy(Protocol):
    """A routing policy registered through ``comox_routing_policies``; built
    once per model group as ``cls(group)``."""

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendState]) -> BackendState | None: ...


class ModelGroup:
    """A model name clients use, the backends that serve it, and its policy."""

    __slots__ = ("name", "backends", "policy")

    def __init__(self, name: str, backends: list[BackendState]):
        self.name = name
        self.backends = backends
        self.policy: RoutingPolicy | None = None

    def candidates(self, exclude: Sequence[BackendState] = ()) -> list[BackendState]:
        """Backends a request may go to now. When every live backend is ejected
        (panic mode) the ejected ones are tried too rather than none."""
        live = [b for b in self.backends if not b.draining and b not in exclude]
        ready = [b for b in live if not b.ejected]
        if not ready:
            ready = live  # panic: never eject so many that nothing is left
        return [b for b in ready if not b.saturated]

    def choose(self, request: GatewayRequest, exclude: Sequence[BackendState] = ()) -> BackendState | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        return self.policy.choose(request, candidates)
