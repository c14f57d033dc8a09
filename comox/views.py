"""What a routing policy may read of the fleet, and the policy protocols.

The core owns fleet state (:mod:`comox.fleet`); a policy sees each backend as a
:class:`BackendView` and its model group as a :class:`GroupView`. Both are
read-only: a policy decides, it never writes fleet state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .request import GatewayRequest
    from .usage import Usage

__all__ = ["BackendView", "GroupView", "RoutingPolicy", "ObservesUsage", "ReportsStats"]


class BackendView(Protocol):
    """One backend as a policy sees it."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str:
        """The backend type name (as ``comox plugins`` lists it)."""
    @property
    def weight(self) -> int: ...
    @property
    def inflight(self) -> int:
        """Requests this gateway has in flight there."""
    @property
    def load(self) -> int:
        """``inflight`` plus requests the backend reports queued that are not
        this gateway's."""
    @property
    def saturated(self) -> bool:
        """At its ``max_concurrency``."""
    @property
    def routable(self) -> bool:
        """In rotation (in the group's ``available``): not ejected, unhealthy,
        loading or draining. A backend that is routable but not among a
        request's candidates is only busy or being retried around."""
    @property
    def total_slots(self) -> int | None:
        """Slots of the server, when it reports them (llama.cpp)."""
    @property
    def idle_slots(self) -> int | None: ...
    @property
    def pins_slots(self) -> bool:
        """The backend sends a request to the slot set in
        :attr:`GatewayRequest.slot <comox.GatewayRequest.slot>`."""

    def latency_ms(self) -> float:
        """Peak-EWMA latency plus a decaying failure penalty."""

    def service_ms(self, prompt_tokens: float, output_tokens: float) -> float | None:
        """Expected service time of a request of that size, from measured
        tokens/s or latency; None when never measured."""


class GroupView(Protocol):
    """A model group as its policy sees it; the policy is built as ``cls(group)``."""

    @property
    def name(self) -> str: ...
    @property
    def backends(self) -> Sequence[BackendView]:
        """Every backend of the group, in config order, in rotation or not."""
    @property
    def available(self) -> Sequence[BackendView]:
        """Backends in rotation: the same tuple object until one changes
        state, so a policy may cache what it derives from it by identity."""
    @property
    def policy_options(self) -> dict[str, Any]:
        """``policy_options`` of the group's config (a copy the policy may pop)."""
    @property
    def rng(self) -> random.Random:
        """The group's random generator (seeded in tests)."""

    def is_candidate(self, backend: Any, candidates: Sequence[Any]) -> bool:
        """Whether ``backend`` is in ``candidates``; O(1) when ``candidates``
        is ``available``."""

    def on_load_change(self, listener: Callable[[Any, int], None]) -> None:
        """Call ``listener(backend, previous_inflight)`` whenever a backend's
        in-flight count changes."""


@runtime_checkable
class RoutingPolicy(Protocol):
    """A routing policy registered through ``comox_routing_policies``; built
    once per model group as ``cls(group)`` with a :class:`GroupView`.

    ``choose`` gets the backends the request may go to, never empty. In the
    common case that is ``group.available`` itself; on a retry, or when some
    are saturated, a smaller sequence. It returns one of them, or None to
    refuse (the request then gets 503).
    """

    def choose(self, request: GatewayRequest, candidates: Sequence[BackendView]) -> BackendView | None: ...


@runtime_checkable
class ObservesUsage(Protocol):
    """Optional: a policy that learns from what backends report."""

    def observe(self, request: GatewayRequest, backend: BackendView, usage: Usage) -> None:
        """Called once a response from ``backend`` has finished, with what it
        reported about tokens (cache hits included)."""


@runtime_checkable
class ReportsStats(Protocol):
    """Optional: a policy whose statistics ``/admin/backends`` shows."""

    def stats(self) -> dict[str, Any]: ...
