"""A model group: the backends that serve one model name, its routing
policy, and the bounded queue for when all of them are saturated.

Routing is on the hot path, so nothing here is proportional to the size of a
group per request: each :class:`ModelGroup` keeps the tuple of backends a
request may go to (``available``), rebuilt only when a backend's state changes
(ejected, drained, health check verdict, an ejection running out), and counts
its saturated backends so the common case (nobody saturated, nothing to
exclude) hands that tuple straight to the policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..events import emit

if TYPE_CHECKING:
    from ..request import GatewayRequest
    from ..views import RoutingPolicy
    from .state import BackendState

__all__ = ["FleetCounters", "ModelGroup"]


class FleetCounters:
    """Gateway-wide counts the retry budget needs."""

    __slots__ = ("inflight", "retries")

    def __init__(self) -> None:
        self.inflight = 0
        self.retries = 0


class ModelGroup:
    """A model name clients use, the backends that serve it, and its policy."""

    __slots__ = (
        "name", "backends", "policy", "settings", "policy_options", "available", "saturated_count",
        "load_listeners", "waiters", "counters", "clock", "_expiry", "_dirty", "rng",
        "queue_timeout_s", "queue_size", "panic", "observer", "decay_s", "typical_ms", "typical_prefill_tps",
        "typical_decode_tps", "typical_at", "_unsupported", "sovereign", "resume_streams",
    )

    def __init__(self, name: str, backends: list[BackendState], *, settings: Any = None,
                 counters: FleetCounters | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, queue_timeout_s: float = 0.0, queue_size: int = 0,
                 decay_s: float = 10.0):
        self.name = name
        self.backends = backends
        self.policy: RoutingPolicy | None = None
        self.observer: Callable[..., None] | None = None  # the policy's observe, if it has one
        self.settings = settings
        # Read on every request: plain attributes (a pydantic model's attribute
        # read takes the slow path of a class with __getattr__, 5x a slot's).
        self.sovereign = bool(getattr(settings, "sovereign", False))
        self.resume_streams = bool(getattr(settings, "resume_streams", False))
        # A copy, so a policy that pops what it understands leaves the settings alone.
        self.policy_options: dict[str, Any] = dict(getattr(settings, "policy_options", None) or {})
        self.counters = counters if counters is not None else FleetCounters()
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.saturated_count = 0
        self.load_listeners: list[Callable[[BackendState, int], None]] = []
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.queue_timeout_s = queue_timeout_s
        self.queue_size = queue_size
        self.available: tuple[BackendState, ...] = ()
        self.panic = False
        # What the group's backends typically measure: where idle estimates age to.
        self.decay_s = decay_s
        self.typical_ms: float | None = None
        self.typical_prefill_tps: float | None = None
        self.typical_decode_tps: float | None = None
        self.typical_at = 0.0
        self._unsupported: dict[str, tuple[BackendState, ...]] = {}
        self._expiry = math.inf
        self._dirty = True
        for state in backends:
            self.adopt(state)

    def adopt(self, state: BackendState) -> None:
        state.group = self
        if state.max_concurrency is not None and state.inflight >= state.max_concurrency:
            self.saturated_count += 1
        self._dirty = True

    def unsupported(self, endpoint: str) -> tuple[BackendState, ...]:
        """The backends that do not serve ``endpoint`` (their ``endpoints``
        setting), computed once per endpoint."""
        found = self._unsupported.get(endpoint)
        if found is None:
            found = self._unsupported[endpoint] = tuple(b for b in self.backends if not b.serves(endpoint))
        return found

    def observe_typical(self, ms: float) -> None:
        """Fold one latency sample into the group's typical latency: an EWMA
        weighing each sample at least 10%, more when samples are sparse (so
        one outlier fades within ``decay_s`` whatever the request rate)."""
        now = self.clock()
        typical = self.typical_ms
        if typical is None:
            self.typical_ms = ms
        else:
            alpha = 1.0 - math.exp(-(now - self.typical_at) / self.decay_s)
            if alpha < 0.1:  # (not max(): a builtin call parses its arguments, 4x the comparison)
                alpha = 0.1
            self.typical_ms = typical + alpha * (ms - typical)
        self.typical_at = now

    def on_load_change(self, listener: Callable[[BackendState, int], None]) -> None:
        """Call ``listener(backend, previous_inflight)`` whenever a backend's
        in-flight count changes (for policies that index backends by load)."""
        self.load_listeners.append(listener)

    def invalidate(self) -> None:
        self._dirty = True
        if self.waiters:
            self.wake_one()

    def refresh(self) -> tuple[BackendState, ...]:
        """Recompute ``available``: live (not draining), not ejected, passing
        health checks and ready. When none is, panic mode: every live backend
        rather than none."""
        now = self.clock()
        expiry = math.inf
        live = [b for b in self.backends if not b.draining]
        ready = []
        for b in live:
            if b.ejected_until > now:
                expiry = min(expiry, b.ejected_until)
                continue
            if b.ejected_until:
                b.ejected_until = 0.0
                emit("backend_ejection_over", f"backend {b.name} is back in rotation: its ejection ran out",
                     backend=b.name, model=self.name)
            if b.health_ok and b.ready:
                ready.append(b)
        panic = not ready and bool(live)
        if panic != self.panic:
            self.panic = panic
            if panic:
                emit("panic_entered", f"model {self.name}: no backend is healthy; routing to all {len(live)} live ones (panic mode)",
                     level=logging.WARNING, model=self.name, backends=len(live))
            else:
                emit("panic_left", f"model {self.name}: healthy backends again; panic mode over", model=self.name)
        chosen = tuple(ready if ready else live)
        for b in self.backends:
            b.routable = False
        for b in chosen:
            b.routable = True
        self.available = chosen
        self._expiry = expiry
        self._dirty = False
        return chosen

    def current(self) -> tuple[BackendState, ...]:
        """``available`` as of now (rebuilt first if a backend changed state or
        an ejection ran out)."""
        if self._dirty or self.clock() >= self._expiry:
            return self.refresh()
        return self.available

    def is_candidate(self, state: BackendState, candidates: Sequence[BackendState]) -> bool:
        """O(1) when ``candidates`` is ``available`` (the common case)."""
        if candidates is self.available:
            return state.routable
        return state in candidates

    def choose(self, request: GatewayRequest, exclude: Sequence[BackendState] = ()) -> BackendState | None:
        available = self.available
        if self._dirty or self.clock() >= self._expiry:
            available = self.refresh()
        if not available:
            return None
        policy = self.policy
        assert policy is not None, "the gateway sets the policy when it builds the group"
        # A policy returns one of the candidates it was given: BackendState, seen as BackendView.
        pick: BackendState | None = policy.choose(request, available)  # type: ignore[assignment]
        if pick is not None and (exclude or self.saturated_count):
            if pick.saturated or pick in exclude:
                rest = [b for b in available if not b.saturated and b not in exclude]
                pick = cast("BackendState | None", policy.choose(request, rest)) if rest else None
        if pick is not None and pick.recovered_at is not None:
            # Slow start: a recovering backend takes only its share for now.
            factor = pick.slow_start_factor(self.clock())
            if factor < 1.0 and self.rng.random() > factor:
                rest = [b for b in available if b is not pick and not b.saturated and b not in exclude]
                if rest:
                    pick = cast("BackendState | None", policy.choose(request, rest)) or pick
        return pick

    def saturated_only(self, exclude: Sequence[BackendState] = ()) -> bool:
        """True when some backend could take the request but for its
        ``max_concurrency``: worth queueing for."""
        return self.saturated_count > 0 and any(b.saturated and b not in exclude for b in self.available)

    # -- the queue for saturated groups ---------------------------------------

    def wake_one(self) -> None:
        waiters = self.waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return

    async def wait_for_slot(self, request: GatewayRequest, exclude: Sequence[BackendState], deadline: float) -> BackendState | None:
        """Wait (in arrival order) until a backend can take the request, or the
        deadline (``time.monotonic()``) passes. None when the queue is full or
        time ran out."""
        loop = asyncio.get_running_loop()
        woken = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not woken and len(self.waiters) >= self.queue_size):
                return None
            future = loop.create_future()
            if woken:
                self.waiters.appendleft(future)  # woken but beaten to the slot: keep our place
            else:
                self.waiters.append(future)
            try:
                # asyncio.timeout, not wait_for, which on 3.11 drops a cancel
                # (client gone) that arrives as the slot is handed over
                async with asyncio.timeout(remaining):
                    await future
            except BaseException as exc:  # time ran out, or the client left
                if future.done() and not future.cancelled():
                    self.wake_one()  # handed a slot just as we leave: pass it on
                else:
                    future.cancel()
                    try:
                        self.waiters.remove(future)
                    except ValueError:
                        pass
                if isinstance(exc, TimeoutError):
                    return None
                raise
            state = self.choose(request, exclude)
            if state is not None:
                return state
            if not self.saturated_only(exclude):
                return None
            woken = True


