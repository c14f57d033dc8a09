"""Fleet state: one record per backend, owned by the core, read by routing
policies, written by health checks and by the results of real requests.

Routing is on the hot path, so nothing here is proportional to the size of a
group per request: each :class:`ModelGroup` keeps the tuple of backends a
request may go to (``available``), rebuilt only when a backend's state changes
(ejected, drained, health check verdict, an ejection running out), and counts
its saturated backends so the common case (nobody saturated, nothing to
exclude) hands that tuple straight to the policy.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .backends import Backend
    from .request import GatewayRequest
    from .settings import BackendSettings

__all__ = ["BackendState", "FleetCounters", "ModelGroup", "RoutingPolicy", "cheaper", "power_of_two", "request_size"]

# Outlier ejection defaults (Envoy's): eject after this many consecutive failures,
# for EJECT_BASE_S × times ejected, at most EJECT_MAX_S.
EJECT_AFTER = 5
EJECT_BASE_S = 30.0
EJECT_MAX_S = 300.0
# Peak-EWMA latency (Finagle/Linkerd): a slower sample is taken at once, a faster
# one decays the estimate with time constant DECAY_S.
DECAY_S = 10.0
DEFAULT_LATENCY_MS = 1.0  # a backend never measured looks cheap, so it gets tried
# Fast failures (429, 503 "Loading model") look like this much latency, decaying
# with DECAY_S, so they don't attract traffic.
FAILURE_PENALTY_MS = 5000.0
TPS_ALPHA = 0.3  # EWMA weight of a new tokens/s sample
SLOW_START_MIN = 0.1  # share of traffic at the start of a slow-start window
FAST_FAILURE_STATUS = frozenset({429, 503})


class BackendState:
    """What the gateway knows about one backend right now.

    ``clock`` is any monotonic ``() -> seconds`` callable; tests pass a fake one
    so ejection times and decays are deterministic.
    """

    __slots__ = (
        "name", "backend", "settings", "weight", "max_concurrency", "inflight",
        "draining", "consecutive_failures", "times_ejected", "ejected_until",
        "ewma_ms", "ewma_at", "penalty_ms", "penalty_at", "last_error", "requests",
        "failures", "clock", "group", "routable", "slow_start_s", "recovered_at",
        "health_ok", "ready", "health_passes", "health_fails", "last_health",
        "prefill_tps", "decode_tps", "prompt_tokens", "cached_tokens",
        "ext_waiting", "ext_running", "kv_cache_usage", "idle_slots", "total_slots",
        "slot_state", "ejections",
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
        self.ejections = 0  # also counts ejections undone by a passing health check
        self.ejected_until = 0.0
        self.ewma_ms: float | None = None
        self.ewma_at = 0.0
        self.penalty_ms = 0.0
        self.penalty_at = 0.0
        self.last_error: str | None = None
        self.requests = 0
        self.failures = 0
        self.clock = clock
        self.group: ModelGroup | None = None
        self.routable = True  # maintained by the group: in ``group.available``
        self.slow_start_s = float(getattr(settings, "slow_start_s", 0.0) or 0.0)
        self.recovered_at: float | None = None
        # Active health checks: ``health_ok`` False after enough failed checks;
        # ``ready`` False while the backend says it is loading (not broken).
        self.health_ok = True
        self.ready = True
        self.health_passes = 0
        self.health_fails = 0
        self.last_health: str | None = None
        # Measured from real responses.
        self.prefill_tps: float | None = None
        self.decode_tps: float | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        # Load reported by the backend itself (vLLM /metrics, llama.cpp /slots).
        self.ext_waiting = 0
        self.ext_running = 0
        self.kv_cache_usage: float | None = None
        self.idle_slots: int | None = None
        self.total_slots: int | None = None
        self.slot_state: Any = None

    # -- state a policy reads -------------------------------------------------

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

    def penalty_now(self) -> float:
        """The fast-failure latency penalty, decayed to now."""
        if not self.penalty_ms:
            return 0.0
        penalty = self.penalty_ms * math.exp(-(self.clock() - self.penalty_at) / DECAY_S)
        if penalty < 1.0:
            self.penalty_ms = 0.0
            return 0.0
        return penalty

    def latency_ms(self) -> float:
        """Peak-EWMA latency plus the decaying fast-failure penalty."""
        ewma = self.ewma_ms if self.ewma_ms is not None else DEFAULT_LATENCY_MS
        return ewma + self.penalty_now() if self.penalty_ms else ewma

    def service_ms(self, prompt_tokens: float, output_tokens: float) -> float | None:
        """Expected service time of a request here, or None if never measured:
        from measured tokens/s when known (so a slow node gets proportionally
        less work), else peak-EWMA latency; plus the decaying failure penalty."""
        decode = self.decode_tps
        if decode:
            prefill = self.prefill_tps or decode * 10.0
            base = 1000.0 * (prompt_tokens / prefill + output_tokens / decode)
        elif self.ewma_ms is not None:
            base = self.ewma_ms
        elif self.penalty_ms:
            base = DEFAULT_LATENCY_MS
        else:
            return None
        if self.penalty_ms:
            base += self.penalty_now()
        return base

    def cost(self, prompt_tokens: float, output_tokens: float) -> float:
        """Service time × (load + 1); see :func:`cheaper`."""
        base = self.service_ms(prompt_tokens, output_tokens)
        return (DEFAULT_LATENCY_MS if base is None else base) * (self.inflight + self.ext_waiting + 1)

    def slow_start_factor(self, now: float) -> float:
        """1.0, or the share of traffic this backend gets while warming up
        after a recovery (from SLOW_START_MIN up to 1 over ``slow_start_s``)."""
        since = self.recovered_at
        if since is None or now < since:
            return 1.0
        elapsed = now - since
        if elapsed >= self.slow_start_s:
            self.recovered_at = None
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

    def observe_latency(self, ms: float) -> None:
        now = self.clock()
        ewma = self.ewma_ms
        if ewma is None or ms >= ewma:
            self.ewma_ms = ms
        else:
            w = math.exp(-(now - self.ewma_at) / DECAY_S)
            self.ewma_ms = ewma * w + ms * (1.0 - w)
        self.ewma_at = now

    def record_success(self, latency_s: float) -> None:
        self.requests += 1
        self.consecutive_failures = 0
        self.observe_latency(latency_s * 1000.0)

    def record_failure(self, error: str, status: int | None = None) -> None:
        """A failed request: connection refused, timeout, 5xx, a stream cut short.
        Fast failures (429, 503) also carry a decaying latency penalty."""
        self.requests += 1
        self.failures += 1
        self.last_error = error
        # Every failure looks like FAILURE_PENALTY_MS of latency, decaying, so
        # a backend that fails fast (429, 503 "Loading model") attracts no traffic.
        self.penalty_ms = FAILURE_PENALTY_MS
        self.penalty_at = self.clock()
        if status == 429:
            return  # busy, not broken: no ejection
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER and not self.ejected:
            self.eject()

    def eject(self) -> None:
        self.times_ejected += 1
        self.ejections += 1
        self.ejected_until = self.clock() + min(EJECT_BASE_S * self.times_ejected, EJECT_MAX_S)
        self.consecutive_failures = 0
        if self.slow_start_s:
            self.recovered_at = self.ejected_until  # warm up once the ejection runs out
        if self.group is not None:
            self.group.invalidate()

    def record_tokens(self, prompt: int | None, cached: int | None, completion: int | None,
                      prefill_tps: float | None = None, decode_tps: float | None = None,
                      ttft_s: float | None = None, decode_s: float | None = None) -> None:
        """Measured throughput from one response. ``prefill_tps``/``decode_tps``
        when the backend reports them (llama.cpp ``timings``); otherwise derived
        from token counts and the times the gateway saw."""
        if prompt:
            self.prompt_tokens += prompt
            self.cached_tokens += cached or 0
        if prefill_tps is None and prompt and ttft_s and ttft_s > 0:
            uncached = prompt - (cached or 0)
            if uncached > 0:
                prefill_tps = uncached / ttft_s
        if decode_tps is None and completion and decode_s and decode_s > 0:
            decode_tps = completion / decode_s
        if prefill_tps:
            self.prefill_tps = prefill_tps if self.prefill_tps is None else self.prefill_tps + TPS_ALPHA * (prefill_tps - self.prefill_tps)
        if decode_tps:
            self.decode_tps = decode_tps if self.decode_tps is None else self.decode_tps + TPS_ALPHA * (decode_tps - self.decode_tps)

    # -- health checks and admin ----------------------------------------------

    def health_passed(self, *, healthy_threshold: int = 1) -> None:
        self.last_health = "ok"
        self.health_fails = 0
        self.health_passes += 1
        changed = not self.ready
        self.ready = True
        if self.health_passes >= healthy_threshold:
            if not self.health_ok or self.ejected_until > self.clock():
                # A passing active check un-ejects; the backend then warms up.
                self.health_ok = True
                self.ejected_until = 0.0
                self.consecutive_failures = 0
                if self.slow_start_s:
                    self.recovered_at = self.clock()
                changed = True
        if changed and self.group is not None:
            self.group.invalidate()

    def health_failed(self, detail: str, *, unhealthy_threshold: int = 1) -> None:
        self.last_health = detail
        self.health_passes = 0
        self.health_fails += 1
        if self.health_fails >= unhealthy_threshold and self.health_ok:
            self.health_ok = False
            self.last_error = f"health check: {detail}"
            if self.group is not None:
                self.group.invalidate()

    def not_ready(self, detail: str) -> None:
        """The backend is up but not ready (llama.cpp loading its model): no
        traffic, but not a failure either."""
        self.last_health = detail
        self.health_passes = 0
        if self.ready:
            self.ready = False
            if self.group is not None:
                self.group.invalidate()

    def set_draining(self, draining: bool) -> None:
        if self.draining != draining:
            self.draining = draining
            if self.group is not None:
                self.group.invalidate()

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

    def snapshot(self) -> dict:
        now = self.clock()
        return {
            "name": self.name,
            "type": self.settings.type,
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


class RoutingPolicy(Protocol):
    """A routing policy registered through ``comox_routing_policies``; built
    once per model group as ``cls(group)``.

    ``choose`` gets the backends the request may go to. In the common case that
    is ``group.available`` itself (the same tuple object until the group's
    state changes), so a policy may cache what it derives from it, keyed on its
    identity. Optional: ``observe(request, state, usage)`` is called with what
    the backend reported (:func:`comox.usage.parse_usage`) once a response has finished.
    """

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendState]) -> BackendState | None: ...


class FleetCounters:
    """Gateway-wide counts the retry budget needs."""

    __slots__ = ("inflight", "retries")

    def __init__(self) -> None:
        self.inflight = 0
        self.retries = 0


class ModelGroup:
    """A model name clients use, the backends that serve it, and its policy."""

    __slots__ = (
        "name", "backends", "policy", "settings", "available", "version", "saturated_count",
        "load_listeners", "waiters", "counters", "clock", "_expiry", "_dirty", "rng",
        "queue_timeout_s", "queue_size", "panic",
    )

    def __init__(self, name: str, backends: list[BackendState], *, settings: Any = None,
                 counters: FleetCounters | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, queue_timeout_s: float = 0.0, queue_size: int = 0):
        self.name = name
        self.backends = backends
        self.policy: RoutingPolicy | None = None
        self.settings = settings
        self.counters = counters if counters is not None else FleetCounters()
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.saturated_count = 0
        self.load_listeners: list[Callable[[BackendState, int], None]] = []
        self.waiters: deque[asyncio.Future] = deque()
        self.queue_timeout_s = queue_timeout_s
        self.queue_size = queue_size
        self.available: tuple[BackendState, ...] = ()
        self.version = 0
        self.panic = False
        self._expiry = math.inf
        self._dirty = True
        for state in backends:
            self.adopt(state)

    def adopt(self, state: BackendState) -> None:
        state.group = self
        if state.max_concurrency is not None and state.inflight >= state.max_concurrency:
            self.saturated_count += 1
        self._dirty = True

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
            elif b.health_ok and b.ready:
                ready.append(b)
        self.panic = not ready and bool(live)
        chosen = tuple(ready if ready else live)
        for b in self.backends:
            b.routable = False
        for b in chosen:
            b.routable = True
        self.available = chosen
        self._expiry = expiry
        self._dirty = False
        self.version += 1
        return chosen

    def candidates(self, exclude: Sequence[BackendState] = ()) -> Sequence[BackendState]:
        """Backends a request may go to now (``available`` minus saturated and
        excluded ones)."""
        available = self.available
        if self._dirty or self.clock() >= self._expiry:
            available = self.refresh()
        if not exclude and not self.saturated_count:
            return available
        return [b for b in available if not b.saturated and b not in exclude]

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
        pick = policy.choose(request, available)
        if pick is not None and (exclude or self.saturated_count):
            if pick.saturated or pick in exclude:
                rest = [b for b in available if not b.saturated and b not in exclude]
                pick = policy.choose(request, rest) if rest else None
        if pick is not None and pick.recovered_at is not None:
            # Slow start: a recovering backend takes only its share for now.
            factor = pick.slow_start_factor(self.clock())
            if factor < 1.0 and self.rng.random() > factor:
                rest = [b for b in available if b is not pick and not b.saturated and b not in exclude]
                if rest:
                    pick = policy.choose(request, rest) or pick
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


def cheaper(a: BackendState, b: BackendState, prompt_tokens: float, output_tokens: float) -> BackendState:
    """The cheaper of two backends by cost = expected service time × (in
    flight + reported queue + 1). A backend never measured is taken to be as
    fast as the other, so load alone decides until it has answered."""
    sa = a.service_ms(prompt_tokens, output_tokens)
    sb = b.service_ms(prompt_tokens, output_tokens)
    if sa is None:
        sa = sb if sb is not None else DEFAULT_LATENCY_MS
    if sb is None:
        sb = sa
    return a if sa * (a.inflight + a.ext_waiting + 1) <= sb * (b.inflight + b.ext_waiting + 1) else b


def power_of_two(request: GatewayRequest, candidates: Sequence[BackendState], rng: random.Random) -> BackendState | None:
    """Power of two choices: the :func:`cheaper` of two distinct backends drawn
    at random (None when there are no candidates)."""
    n = len(candidates)
    if n < 2:
        return candidates[0] if n else None
    draw = rng.random  # one C call per draw; randrange costs four Python calls
    i = int(draw() * n)
    j = int(draw() * (n - 1))
    if j >= i:
        j += 1
    prompt, output = request_size(request)
    return cheaper(candidates[i], candidates[j], prompt, output)


def request_size(request: GatewayRequest) -> tuple[float, float]:
    """Rough prompt and output token counts of a request, in O(1): body bytes
    / 4, and ``max_tokens`` (default 256, at most 4096)."""
    body = request.json
    out = body.get("max_tokens") or body.get("max_completion_tokens") or 256
    if not isinstance(out, int):
        out = 256
    return len(request.raw) / 4.0, float(min(out, 4096))
