"""The ``least_inflight`` routing policy: the backend with the fewest requests
in flight (the gateway's own count, one per backend), ties broken at random.

Backends sit in buckets by in-flight count, moved as requests start and end,
so a pick is O(1) however large the group: a random member of the lowest
non-empty bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import comox
from comox import BackendView, GatewayRequest, GroupView

__all__ = ["LeastInflight"]


class LeastInflight:
    def __init__(self, group: GroupView) -> None:
        self.group = group
        self.rng = group.rng
        self._for: Sequence[BackendView] | None = None
        self._buckets: list[list[BackendView]] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(state) → (bucket, index)
        self._min = 0
        group.on_load_change(self._moved)

    def _rebuild(self, candidates: Sequence[BackendView]) -> None:
        self._buckets = []
        self._where = {}
        for state in candidates:
            self._put(state, state.inflight)
        self._min = next((i for i, bucket in enumerate(self._buckets) if bucket), 0)
        self._for = candidates

    def _put(self, state: BackendView, count: int) -> None:
        buckets = self._buckets
        while len(buckets) <= count:
            buckets.append([])
        bucket = buckets[count]
        self._where[id(state)] = (count, len(bucket))
        bucket.append(state)

    def _moved(self, state: BackendView, old: int) -> None:
        where = self._where.get(id(state))
        if where is None:
            return  # not a candidate right now
        count, index = where
        bucket = self._buckets[count]
        last = bucket.pop()
        if last is not state:
            bucket[index] = last
            self._where[id(last)] = (count, index)
        new = state.inflight
        if new < 0:
            new = 0
        self._put(state, new)
        if new < self._min:
            self._min = new
        elif count == self._min and not bucket:
            self._min = new

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        if not candidates:
            return None
        if candidates is self.group.available:
            if self._for is not candidates:
                self._rebuild(candidates)
            bucket = self._buckets[self._min]
            if len(bucket) == 1:
                return bucket[0]
            return bucket[self.rng.randrange(len(bucket))]
        # Slow path (retries, saturated backends): scan the allowed ones.
        low = min(state.inflight for state in candidates)
        ties = [state for state in candidates if state.inflight == low]
        return ties[self.rng.randrange(len(ties))]


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"least_inflight": LeastInflight}
