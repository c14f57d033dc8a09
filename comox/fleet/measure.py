"""What real requests measured about a backend: peak-EWMA latency with a
decaying failure penalty, and prefill/decode tokens per second.

Estimates age: when a backend has not been measured for a while, its
estimates drift towards its group's typical values (time constant
``estimate_decay_s`` of the group) — to just better than typical
(:data:`IDLE_EDGE`), so that a node that was slow once, or has been idle, is
tried again instead of being avoided for good, and is then judged by what it
measures. (Finagle decays an idle node's cost towards zero for the same
reason; a target near typical keeps a long-idle node from drawing a burst.)"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .group import ModelGroup

__all__ = ["Measured", "DECAY_S", "DEFAULT_LATENCY_MS", "FAILURE_PENALTY_MS", "TPS_ALPHA"]

# Peak-EWMA latency (Finagle/Linkerd): a slower sample is taken at once, a faster
# one decays the estimate with time constant DECAY_S.
DECAY_S = 10.0
DEFAULT_LATENCY_MS = 1.0  # a backend never measured looks cheap, so it gets tried
# Failures look like this much latency, decaying with DECAY_S, so a backend that
# fails fast (429, 503 "Loading model") attracts no traffic.
FAILURE_PENALTY_MS = 5000.0
TPS_ALPHA = 0.3  # EWMA weight of a new tokens/s sample
IDLE_EDGE = 0.9  # an idle node ages to 90% of the typical latency (and 1/0.9 of its tokens/s)
TYPICAL_ALPHA = 0.1  # EWMA weight of one sample in a group's typical value
_exp = math.exp


class Measured:
    """Measurement half of :class:`comox.fleet.BackendState` (a mixin: the
    state declares the slots, so reading a measurement costs no indirection)."""

    if TYPE_CHECKING:  # the slots BackendState declares for this mixin (mypy checks assignments against them)
        __slots__ = ("ewma_ms", "ewma_at", "penalty_ms", "penalty_at", "prefill_tps", "decode_tps",
                     "prompt_tokens", "cached_tokens", "measured_at")
    else:
        __slots__ = ()

    clock: Callable[[], float]
    group: ModelGroup | None
    measured_at: float
    ewma_ms: float | None
    ewma_at: float
    penalty_ms: float
    penalty_at: float
    prefill_tps: float | None
    decode_tps: float | None
    prompt_tokens: int
    cached_tokens: int

    def _init_measured(self) -> None:
        self.ewma_ms = None
        self.ewma_at = 0.0
        self.measured_at = 0.0
        self.penalty_ms = 0.0
        self.penalty_at = 0.0
        self.prefill_tps = None
        self.decode_tps = None
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def penalty_now(self) -> float:
        """The failure latency penalty, decayed to now."""
        if not self.penalty_ms:
            return 0.0
        penalty = self.penalty_ms * math.exp(-(self.clock() - self.penalty_at) / DECAY_S)
        if penalty < 1.0:
            self.penalty_ms = 0.0
            return 0.0
        return penalty

    def freshness(self) -> float:
        """Weight of this backend's own estimates against its group's typical
        values: 1 just after a measurement, decaying towards 0 while none comes."""
        group = self.group
        if group is None or not self.measured_at:
            return 1.0
        age = self.clock() - self.measured_at
        return math.exp(-age / group.decay_s) if age > 0 else 1.0

    def estimates(self) -> tuple[float | None, float | None, float | None]:
        """Latency (ms), prefill and decode tokens/s, aged towards the group's
        typical values (see the module docstring)."""
        ewma, prefill, decode = self.ewma_ms, self.prefill_tps, self.decode_tps
        group = self.group
        if group is None or not self.measured_at:
            return ewma, prefill, decode
        w = self.freshness()
        if w > 0.999:
            return ewma, prefill, decode
        return (_aged(ewma, group.typical_ms, w, IDLE_EDGE), _aged(prefill, group.typical_prefill_tps, w, 1 / IDLE_EDGE),
                _aged(decode, group.typical_decode_tps, w, 1 / IDLE_EDGE))

    def latency_ms(self) -> float:
        """Peak-EWMA latency (aged) plus the decaying failure penalty."""
        ewma = self.estimates()[0]
        if ewma is None:
            ewma = DEFAULT_LATENCY_MS
        return ewma + self.penalty_now() if self.penalty_ms else ewma

    def service_ms(self, prompt_tokens: float, output_tokens: float) -> float | None:
        """Expected service time of a request here, or None if never measured:
        from measured tokens/s when known (so a slow node gets proportionally
        less work), else peak-EWMA latency, both aged; plus the decaying
        failure penalty."""
        ewma, prefill, decode = self.estimates()
        if decode:
            prefill = prefill or decode * 10.0
            base = 1000.0 * (prompt_tokens / prefill + output_tokens / decode)
        elif ewma is not None:
            base = ewma
        elif self.penalty_ms:
            base = DEFAULT_LATENCY_MS
        else:
            return None
        if self.penalty_ms:
            base += self.penalty_now()
        return base

    def observe_latency(self, ms: float) -> None:
        now = self.clock()
        ewma = self.ewma_ms
        group = self.group
        if ewma is None or ms >= ewma:
            self.ewma_ms = ms
        else:  # (ewma_at - now: exactly -(now - ewma_at), one opcode fewer)
            w = _exp((self.ewma_at - now) / (DECAY_S if group is None else group.decay_s))
            self.ewma_ms = ewma * w + ms * (1.0 - w)
        self.ewma_at = self.measured_at = now
        if group is not None:
            group.observe_typical(ms)

    def penalize(self) -> None:
        self.penalty_ms = FAILURE_PENALTY_MS
        self.penalty_at = self.clock()

    def record_tokens(self, prompt: int | None, cached: int | None, completion: int | None,
                      prefill_tps: float | None = None, decode_tps: float | None = None,
                      ttft_s: float | None = None, decode_s: float | None = None) -> None:
        """Measured throughput from one response. ``prefill_tps``/``decode_tps``
        when the backend reports them (llama.cpp ``timings``); otherwise derived
        from token counts and the times the gateway saw."""
        # Once per request: the checks ordered so that the usual call (a count, no rates) tests least.
        if prompt:
            self.prompt_tokens += prompt
            if cached:
                self.cached_tokens += cached
            if prefill_tps is None and ttft_s and ttft_s > 0:
                uncached = prompt - (cached or 0)
                if uncached > 0:
                    prefill_tps = uncached / ttft_s
        if decode_tps is None and completion and decode_s and decode_s > 0:
            decode_tps = completion / decode_s
        if not prefill_tps and not decode_tps:
            return
        group = self.group
        if prefill_tps:
            self.prefill_tps = _blend(self.prefill_tps, prefill_tps, TPS_ALPHA)
            if group is not None:
                group.typical_prefill_tps = _blend(group.typical_prefill_tps, prefill_tps)
        if decode_tps:
            self.decode_tps = _blend(self.decode_tps, decode_tps, TPS_ALPHA)
            if group is not None:
                group.typical_decode_tps = _blend(group.typical_decode_tps, decode_tps)
        self.measured_at = self.clock()


def _blend(old: float | None, sample: float, alpha: float = TYPICAL_ALPHA) -> float:
    return sample if old is None else old + alpha * (sample - old)


def _aged(own: float | None, typical: float | None, w: float, edge: float) -> float | None:
    if own is None or typical is None:
        return own
    return own * w + typical * edge * (1.0 - w)
