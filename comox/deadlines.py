"""Timeouts that almost never fire, without a timer each: the first-byte
timeout of every backend attempt.

A loop timer per attempt, armed and cancelled a few milliseconds later, cost
about 4 µs of each request (bench/pipeline.py, docs/benchmarks.md). Most
attempts are over long before their timeout, so an attempt is only noted in a
queue; one check per event loop, re-armed while any is open, gives the few
still running after ``PROMOTE_AFTER_S`` a timer of their own for the time
they have left — the same deadline, to the loop's precision
(:class:`comox.late.LateQueue`, as for :mod:`comox.disconnects`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .late import LateQueue, per_loop

__all__ = ["PROMOTE_AFTER_S", "Deadline", "Deadlines", "deadlines_for"]

PROMOTE_AFTER_S = 0.02


class Deadline:
    """One pending timeout: ``callback(*args)`` at loop time ``at`` unless
    :meth:`cancel` was called first."""

    __slots__ = ("callback", "args", "at", "started", "finished", "handle")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...], at: float, started: float):
        self.callback = callback
        self.args = args
        self.at = at
        self.started = started
        self.finished = False  # cancelled or fired
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.finished = True
        if self.handle is not None:
            self.handle.cancel()

    def _fire(self) -> None:
        if not self.finished:
            self.finished = True
            self.callback(*self.args)


class Deadlines(LateQueue[Deadline]):
    """The pending timeouts of one event loop; one still pending after
    ``after_s`` gets a loop timer at its deadline."""

    def __init__(self, after_s: float = PROMOTE_AFTER_S):
        super().__init__(after_s)

    def add(self, delay_s: float, callback: Callable[..., object], *args: Any) -> Deadline:
        """Call ``callback(*args)`` in ``delay_s`` seconds unless cancelled."""
        return self.add_on(asyncio.get_running_loop(), delay_s, callback, *args)

    def add_on(self, loop: asyncio.AbstractEventLoop, delay_s: float, callback: Callable[..., object],
               *args: Any) -> Deadline:
        """:meth:`add`, from a caller that has the running ``loop`` already."""
        now = loop.time()
        deadline = Deadline(callback, args, now + delay_s, now)
        if delay_s <= self.after_s:  # too short to wait for the check
            deadline.handle = loop.call_at(deadline.at, deadline._fire)
        else:
            self.queue(deadline, loop)
        return deadline

    def promote(self, entry: Deadline, loop: asyncio.AbstractEventLoop) -> None:
        entry.handle = loop.call_at(entry.at, entry._fire)


deadlines_for = per_loop(Deadlines)
"""The :class:`Deadlines` of a loop (``deadlines_for(loop)``; each server thread runs its own loop)."""
