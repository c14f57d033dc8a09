"""The ``round_robin`` routing policy: each request to the next candidate."""

from __future__ import annotations

import itertools

import comox


class RoundRobin:
    def __init__(self, group):
        self._next = itertools.count()

    def choose(self, request, candidates):
        return candidates[next(self._next) % len(candidates)]


@comox.hookimpl
def comox_routing_policies():
    return {"round_robin": RoundRobin}
