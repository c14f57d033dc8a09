"""The ``p2c_ewma`` routing policy: power of two choices over cost.

Two distinct backends are drawn at random; the cheaper one gets the request.
Cost (:meth:`comox.fleet.BackendState.cost`) = expected service time × (in
flight + reported queue + 1), where the service time comes from the backend's
measured prefill/decode tokens/s once known (so slower hardware gets
proportionally less work without hand-tuned weights), else from its peak-EWMA
latency; failures, fast ones included (429, 503 "Loading model"), add a
latency penalty that decays over ~10 s. O(1) per pick.
"""

from __future__ import annotations

import comox
from comox.fleet import power_of_two

__all__ = ["P2CEwma"]


class P2CEwma:
    def __init__(self, group):
        self.rng = group.rng

    def choose(self, request, candidates):
        return power_of_two(request, candidates, self.rng)


@comox.hookimpl
def comox_routing_policies():
    return {"p2c_ewma": P2CEwma}
