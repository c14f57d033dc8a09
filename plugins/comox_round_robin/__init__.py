"""The ``round_robin`` routing policy: each request to the next candidate.

An essential plugin: the default ``policy`` of a model group, so it is loaded
even when ``COMOX_LOAD_PLUGINS`` does not name it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import comox
from comox import BackendView, GatewayRequest, GroupView

__all__ = ["RoundRobin"]


class RoundRobin:
    def __init__(self, group: GroupView):
        self._next = itertools.count()

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        return candidates[next(self._next) % len(candidates)]


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"round_robin": RoundRobin}
