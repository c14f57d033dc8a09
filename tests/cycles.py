"""Whether requests are freed when they end, or only at the cyclic GC's next
pass (a reference cycle through a request keeps it, and all it holds, until then)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import comox


def requests_left_in_cycles(send: Callable[[bool], None]) -> list[comox.GatewayRequest]:
    """The requests the collector found unreachable (in a cycle) after
    ``send(stream)`` sent one JSON and one streamed request, twice, after one
    of each to warm up; ``[]`` when every request was freed as it ended."""
    for stream in (False, True):
        send(stream)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable stays in gc.garbage, to be looked at
    try:
        for stream in (False, True, False, True):
            send(stream)
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, comox.GatewayRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
