"""The ``weighted`` routing policy: smooth weighted round robin by ``weight``.

Each backend advances a virtual clock by ``1 / weight`` per pick, starting half
a step in; the backend with the earliest next deadline goes next (the EDF form
Envoy uses, kept in a heap). Over any window of ``sum(weights)`` picks each
backend gets its share, and picks of a heavy backend are spread out rather than
bunched: weights 5, 1, 1 give ``a a a b c a a``. O(log n) per pick.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import comox
from comox import BackendView, GatewayRequest, GroupView

__all__ = ["Weighted"]


class Weighted:
    def __init__(self, group: GroupView) -> None:
        self.group = group
        self._for: Sequence[BackendView] | None = None  # the candidates tuple the heap was built from
        self._heap: list[tuple[float, int, float, BackendView]] = []

    def _rebuild(self, candidates: Sequence[BackendView]) -> None:
        heap = []
        for i, state in enumerate(candidates):
            step = 1.0 / state.weight
            heap.append((step / 2.0, i, step, state))
        heapq.heapify(heap)
        self._heap = heap
        self._for = candidates

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        if not candidates:
            return None
        group = self.group
        heap = self._heap
        if candidates is group.available:
            if self._for is not candidates:
                self._rebuild(candidates)
                heap = self._heap
            deadline, i, step, state = heap[0]
            heapq.heapreplace(heap, (deadline + step, i, step, state))
            return state
        # Slow path (retries, saturated backends): the earliest deadline among
        # the allowed ones; the others keep their place.
        if self._for is not group.available:
            self._rebuild(group.available)
            heap = self._heap
        allowed = set(map(id, candidates))
        skipped = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            if id(entry[3]) in allowed:
                found = entry
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if found is None:
            return candidates[0]
        deadline, i, step, state = found
        heapq.heappush(heap, (deadline + step, i, step, state))
        return state


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"weighted": Weighted}
