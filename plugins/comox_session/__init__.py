"""The ``session`` routing policy: requests of one session stick to one backend.

The session key is the ``x-session-id`` header (``policy_options.header`` to
use another) or else the body's ``user`` field. A request without one, or whose
pinned backend is out of rotation (ejected, unhealthy, draining), is balanced
like ``p2c_ewma`` and the session is re-pinned to where it went. A pinned
backend that is merely saturated or being retried around serves that one
request elsewhere without losing the pin. At most ``policy_options.max_sessions``
(default 100000) pins are kept, least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import comox
from comox import BackendView, GatewayRequest, GroupView, power_of_two

__all__ = ["Session"]


class Session:
    def __init__(self, group: GroupView) -> None:
        options = group.policy_options
        self.group = group
        self.rng = group.rng
        self.header = str(options.pop("header", "x-session-id")).lower().encode()
        self.max_sessions = int(options.pop("max_sessions", 100_000))
        if options:
            raise ValueError(f"unknown option(s) for session: {', '.join(sorted(options))}")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.pins: OrderedDict[bytes | str, BackendView] = OrderedDict()

    def key(self, request: GatewayRequest) -> bytes | str | None:
        value = request.header(self.header)
        if value:
            return value
        user = request.json.get("user")
        return user if isinstance(user, str) and user else None

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None:
        if not candidates:
            return None
        key = self.key(request)
        pinned = None
        if key is not None:
            pinned = self.pins.get(key)
            if pinned is not None:
                if self.group.is_candidate(pinned, candidates):
                    self.pins.move_to_end(key)
                    return pinned
                if pinned.routable:
                    return power_of_two(request, candidates, self.rng)  # busy now, keep the pin
        pick = power_of_two(request, candidates, self.rng)
        if key is not None and pick is not None:
            self.pins[key] = pick
            self.pins.move_to_end(key)
            if len(self.pins) > self.max_sessions:
                self.pins.popitem(last=False)
        return pick


@comox.hookimpl
def comox_routing_policies() -> dict[str, type]:
    return {"session": Session}
