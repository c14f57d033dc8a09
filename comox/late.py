"""Work that only the long-lived few need, done for them alone.

Most requests are over in milliseconds; a disconnect watcher or a timeout
timer armed and cancelled for each would cost every one of them. A
:class:`LateQueue` notes each entry instead, in start order, and one timer per
event loop, re-armed while any entry is open, checks them: an entry still open
``after_s`` after its start is promoted (given its watcher, its timer), a
finished one dropped. Used by :mod:`comox.disconnects` and :mod:`comox.deadlines`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Entry", "LateQueue", "per_loop"]


class Entry(Protocol):
    started: float  # loop time
    finished: bool


E = TypeVar("E", bound=Entry)
T = TypeVar("T")


def per_loop(factory: Callable[[], T]) -> Callable[[asyncio.AbstractEventLoop], T]:
    """A function giving each event loop its own ``factory()`` (each server
    thread runs its own loop), made on first use and kept no longer than
    the loop. The last loop asked for is answered without a lookup: with one
    loop per thread, that is nearly every call."""
    table: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
    last: list[Any] = [lambda: None, None]  # a weak reference to the last loop, and its value

    def for_loop(loop: asyncio.AbstractEventLoop) -> T:
        if last[0]() is loop:
            value: T = last[1]
            return value
        value = table.get(loop)  # type: ignore[assignment]
        if value is None:
            value = table[loop] = factory()
        last[:] = weakref.ref(loop), value
        return value

    return for_loop


class LateQueue(Generic[E]):
    """Entries of one event loop, oldest first. Used from that loop only; it
    keeps no reference to it."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self.open: deque[E] = deque()
        self.armed = False

    def queue(self, entry: E, loop: asyncio.AbstractEventLoop) -> None:
        self.open.append(entry)
        if not self.armed:
            self.armed = True
            loop.call_later(self.after_s, self.check)

    def promote(self, entry: E, loop: asyncio.AbstractEventLoop) -> None:
        """What an entry open for ``after_s`` gets."""
        raise NotImplementedError

    def check(self) -> None:
        """Drop the finished; promote each open for ``after_s``; re-arm for
        the oldest left."""
        loop = asyncio.get_running_loop()
        self.armed = False
        open_ = self.open
        now = loop.time()
        while open_:
            entry = open_[0]
            if not entry.finished:
                if now - entry.started < self.after_s:
                    break
                self.promote(entry, loop)
            open_.popleft()
        if open_:
            self.armed = True
            loop.call_later(max(open_[0].started + self.after_s - now, 0.001), self.check)
