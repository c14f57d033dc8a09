"""Timeouts that almost never fire, without a timer each: the first-byte
timeout of every backend attempt.

A loop timer per attempt, armed and cancelled a few milliseconds later, cost
about 4 µs of each request (bench/pipeline.py, docs/benchmarks.md). Most
attempts are over long before their timeout, so an attempt is only noted in a
queue; one check per event loop, re-armed while any is open, gives the few
still running after ``PROMOTE_AFTER_S`` a timer of their own for the time
they have left — the same deadline, to the loop's precision. The pattern of
:mod:`comox.disconnects`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["PROMOTE_AFTER_S", "Deadline", "Deadlines", "deadlines_for"]

PROMOTE_AFTER_S = 0.02


class Deadline:
    """One pending timeout: ``callback(*args)`` at loop time ``at`` unless
    :meth:`cancel` was called first."""

    __slots__ = ("callback", "args", "at", "started", "done", "handle")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...], at: float, started: float):
        self.callback = callback
        self.args = args
        self.at = at
        self.started = started
        self.done = False
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.done = True
        if self.handle is not None:
            self.handle.cancel()

    def _fire(self) -> None:
        if not self.done:
            self.done = True
            self.callback(*self.args)


class Deadlines:
    """The pending timeouts of one event loop, oldest first. Used from that
    loop only; it keeps no reference to it."""

    def __init__(self, promote_after_s: float = PROMOTE_AFTER_S):
        self.promote_after_s = promote_after_s
        self.open: deque[Deadline] = deque()
        self.armed = False

    def add(self, delay_s: float, callback: Callable[..., object], *args: Any) -> Deadline:
        """Call ``callback(*args)`` in ``delay_s`` seconds unless cancelled."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = Deadline(callback, args, now + delay_s, now)
        if delay_s <= self.promote_after_s:  # too short to wait for the check
            deadline.handle = loop.call_at(deadline.at, deadline._fire)
            return deadline
        self.open.append(deadline)
        if not self.armed:
            self.armed = True
            loop.call_later(self.promote_after_s, self.check)
        return deadline

    def check(self) -> None:
        """Drop the cancelled; give each still pending after
        ``promote_after_s`` a timer at its deadline; re-arm for the oldest left."""
        loop = asyncio.get_running_loop()
        self.armed = False
        open_ = self.open
        now = loop.time()
        while open_:
            deadline = open_[0]
            if not deadline.done:
                if now - deadline.started < self.promote_after_s:
                    break
                deadline.handle = loop.call_at(deadline.at, deadline._fire)
            open_.popleft()
        if open_:
            self.armed = True
            loop.call_later(max(open_[0].started + self.promote_after_s - now, 0.001), self.check)


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()


_last: tuple[weakref.ref[asyncio.AbstractEventLoop], Deadlines] | None = None


def deadlines_for(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The :class:`Deadlines` of ``loop`` (each server thread runs its own loop)."""
    global _last
    last = _last
    if last is not None and last[0]() is loop:  # the usual case: one loop, no weak dict lookup
        return last[1]
    deadlines = _deadlines.get(loop)
    if deadlines is None:
        deadlines = _deadlines[loop] = Deadlines()
    _last = (weakref.ref(loop), deadlines)
    return deadlines
