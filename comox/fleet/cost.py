"""The one cost formula routing policies share (peak-EWMA × load, Finagle and
Linkerd's), and power of two choices over it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from .measure import DEFAULT_LATENCY_MS

if TYPE_CHECKING:
    from ..request import GatewayRequest
    from ..views import BackendView

__all__ = ["cheaper", "power_of_two", "request_size"]

B = TypeVar("B", bound="BackendView")


def cheaper(a: B, b: B, prompt_tokens: float, output_tokens: float) -> B:
    """The cheaper of two backends by cost = expected service time
    (:meth:`~comox.BackendView.service_ms`) × (``load`` + 1). A backend never
    measured is taken to be as fast as the other, so load alone decides until
    it has answered."""
    sa = a.service_ms(prompt_tokens, output_tokens)
    sb = b.service_ms(prompt_tokens, output_tokens)
    if sa is None:
        sa = sb if sb is not None else DEFAULT_LATENCY_MS
    if sb is None:
        sb = sa
    return a if sa * (a.load + 1) <= sb * (b.load + 1) else b


def power_of_two(request: GatewayRequest, candidates: Sequence[B], rng: random.Random) -> B | None:
    """Power of two choices: the :func:`cheaper` of two distinct backends drawn
    at random (None when there are no candidates)."""
    n = len(candidates)
    if n < 2:
        return candidates[0] if n else None
    draw = rng.random  # one C call per draw; randrange costs four Python calls
    i = int(draw() * n)
    j = int(draw() * (n - 1))
    if j >= i:
        j += 1
    prompt, output = request_size(request)
    return cheaper(candidates[i], candidates[j], prompt, output)


def request_size(request: GatewayRequest) -> tuple[float, float]:
    """Rough prompt and output token counts of a request, in O(1): body bytes
    / 4, and ``max_tokens`` (default 256, at most 4096)."""
    body = request.json
    out = body.get("max_tokens") or body.get("max_completion_tokens") or 256
    if not isinstance(out, int):
        out = 256
    return len(request.raw) / 4.0, float(min(out, 4096))
