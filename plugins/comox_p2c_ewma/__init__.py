"""The ``p2c_ewma`` routing policy: power of two choices over cost.

Two distinct backends are drawn at random; the cheaper one gets the request.
Cost (:func:`comox.cheaper`) = expected service time × (in flight +
reported queue + 1), where the service time comes from the backend's
measured prefill/decode tokens/s once known (so slower hardware gets
proportionally less work without hand-tuned weights), else from its peak-EWMA
latency; failures, fast ones included (429, 503 "Loading model"), add a
latency penalty that decays over ~10 s. O(1) per pick.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import comox
from comox import BackendView, GatewayRequest, GroupView, power_of_two

__all__ = ["P2CEwma"]


class P2CEwma:
    def __init__(self, group: GroupView):
        self.rng: random.Random = group.rng

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        return power_of_two(request, candidates, self.rng)


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"p2c_ewma": P2CEwma}
