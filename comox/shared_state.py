"""State that every replica of the gateway shares: rate-limit buckets,
capped counters (concurrency, budgets) and values with a time to live
(response cache, stored responses).

The core gives every gateway one :class:`SharedState`
(``gateway.shared_state``): :class:`MemoryState`, this process only, unless a
plugin's ``comox_shared_state`` returns another (the ``redis`` plugin, with
``[state] redis_url``). Every operation is atomic where it is kept.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

__all__ = ["SharedState", "MemoryState", "Bucket", "Take", "Add"]


class Bucket(NamedTuple):
    """The answer of :meth:`SharedState.take`.

    :param allowed: whether the amount was taken.
    :param remaining: what is left in the bucket now (whole units, never below 0).
    :param reset_s: seconds until the bucket is full again.
    :param retry_after_s: seconds until the refused amount would fit (0 when
        allowed; ``inf`` when it is more than the bucket holds).
    """

    allowed: bool
    remaining: float
    reset_s: float
    retry_after_s: float


class Take(NamedTuple):
    """:meth:`SharedState.take` as one step of :meth:`SharedState.apply`."""

    key: str
    amount: float
    capacity: float
    per_s: float
    force: bool = False


class Add(NamedTuple):
    """:meth:`SharedState.add` as one step of :meth:`SharedState.apply`."""

    key: str
    amount: float
    cap: float | None = None
    ttl_s: float | None = None


@runtime_checkable
class SharedState(Protocol):
    """What limits, budgets and caches keep across replicas."""

    async def take(self, key: str, amount: float, *, capacity: float, per_s: float, force: bool = False) -> Bucket:
        """Token bucket ``key`` (full at ``capacity``, refilling ``per_s`` per
        second): take ``amount`` if it holds that much; with ``force``, take it
        anyway (the bucket may go below zero: settling a usage that turned
        out larger than reserved). A negative amount gives back."""

    async def add(self, key: str, amount: float, *, cap: float | None = None, ttl_s: float | None = None) -> tuple[bool, float]:
        """Add ``amount`` (may be negative) to counter ``key`` unless the
        result would exceed ``cap``; ``(added, value now)``. ``ttl_s``: the
        counter is forgotten that long after its last change."""

    async def apply(self, ops: Sequence[Take | Add]) -> list[Bucket | tuple[bool, float]]:
        """Several takes and adds as one atomic step (one round trip to a
        shared store), all or nothing: each is judged on the state the ones
        before it leave, and if any is refused (a take that does not fit and
        is not forced, an add over its cap) none is applied. One result per
        op, as :meth:`take` or :meth:`add` gives it; in a batch that was not
        applied, an op judged to fit says allowed (it would have been)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    def readiness(self) -> dict[str, Any]:
        """For ``/readyz``: ``{"ready": bool, "state": "local" | "shared" |
        "degraded" | …, …}``."""

    async def aclose(self) -> None: ...


_new_bucket = tuple.__new__  # a NamedTuple's own __new__ is a Python call: this is the C one


class MemoryState:
    """:class:`SharedState` kept in this process (one replica, or the
    fallback of a shared store that is unreachable). ``clock`` is any
    monotonic ``() -> seconds``; tests pass a fake one. Values are kept in an
    LRU bounded by ``max_value_bytes`` in all."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_value_bytes: int = 256 * 1024 * 1024):
        self.clock = clock
        self.max_value_bytes = max_value_bytes
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self._counters: dict[str, tuple[float, float]] = {}  # key → (value, expires at)
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key → (value, expires at)
        self._value_bytes = 0

    async def take(self, key: str, amount: float, *, capacity: float, per_s: float, force: bool = False) -> Bucket:
        return self.take_now(key, amount, capacity=capacity, per_s=per_s, force=force)

    def take_now(self, key: str, amount: float, *, capacity: float, per_s: float, force: bool = False) -> Bucket:
        """:meth:`take` without awaiting (for callers outside the event loop)."""
        return cast(Bucket, self.apply_now((Take(key, amount, capacity, per_s, force),))[0])

    async def add(self, key: str, amount: float, *, cap: float | None = None, ttl_s: float | None = None) -> tuple[bool, float]:
        return cast(tuple[bool, float], self.apply_now((Add(key, amount, cap, ttl_s),))[0])

    async def apply(self, ops: Sequence[Take | Add]) -> list[Bucket | tuple[bool, float]]:
        return self.apply_now(ops)

    def apply_now(self, ops: Sequence[Take | Add]) -> list[Bucket | tuple[bool, float]]:
        """:meth:`apply` without awaiting. Nothing else runs meanwhile (one
        process, no await): the ops are applied one by one, all at one
        instant, and what they changed is put back if one was refused."""
        now = self.clock()
        buckets, counters = self._buckets, self._counters
        results: list[Bucket | tuple[bool, float]] = []
        undo: list[tuple[dict[str, tuple[float, float]], str, tuple[float, float] | None]] = []
        refused = False
        # Written out, no call per op: this runs twice per request of a key with limits.
        for op in ops:
            key = op[0]
            if type(op) is Take or isinstance(op, Take):
                _, amount, capacity, per_s, force = op
                held = buckets.get(key)
                undo.append((buckets, key, held))
                if held is None:
                    tokens = capacity
                else:
                    tokens = held[0] + (now - held[1]) * per_s
                    if tokens > capacity:
                        tokens = capacity
                allowed = force or amount <= tokens
                if allowed:
                    tokens -= amount
                    retry = 0.0
                else:
                    refused = True
                    retry = math.inf if amount > capacity or per_s <= 0 else (amount - tokens) / per_s
                buckets[key] = (tokens, now)
                reset = (capacity - tokens) / per_s if per_s > 0 else math.inf
                results.append(_new_bucket(Bucket, (allowed, math.floor(tokens) if tokens > 0 else 0.0,
                                                    reset if reset > 0 else 0.0, retry)))
            else:
                _, amount, cap, ttl_s = op
                held = counters.get(key)
                value = held[0] if held is not None and held[1] > now else 0.0
                new = value + amount
                if cap is not None and amount > 0 and new > cap:
                    refused = True
                    results.append((False, value))
                else:
                    undo.append((counters, key, held))
                    counters[key] = (new, now + ttl_s if ttl_s else math.inf)
                    results.append((True, new))
        if refused:  # undone last to first, so a key's first value is put back last
            for table, key, was in reversed(undo):
                if was is None:
                    table.pop(key, None)
                else:
                    table[key] = was
        return results

    async def get(self, key: str) -> bytes | None:
        item = self._values.get(key)
        if item is None:
            return None
        if item[1] <= self.clock():
            self._drop(key)
            return None
        self._values.move_to_end(key)
        return item[0]

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        if len(value) > self.max_value_bytes:
            return
        self._drop(key)
        self._values[key] = (value, self.clock() + ttl_s)
        self._value_bytes += len(value)
        while self._value_bytes > self.max_value_bytes:
            self._drop(next(iter(self._values)))

    async def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        item = self._values.pop(key, None)
        if item is not None:
            self._value_bytes -= len(item[0])

    def readiness(self) -> dict[str, Any]:
        return {"ready": True, "state": "local"}

    async def aclose(self) -> None:
        pass
