"""Writes sent at the end of the event loop's turn: each connection's bytes of
that turn in one system call, every connection's one after another.

A proxy's every write on loopback runs the reader's TCP input at once and wakes
the reading process (the client, the upstream) if it sleeps; when it sleeps on
another core, the wakeup is an inter-processor interrupt, which a virtual
machine turns into an exit. Written as they are made, a busy gateway's answers
and upstream requests wake their readers about once per write; held to the
end of the turn in which the event loop ran the requests that made them, they
go out back to back and a reader woken by the first finds the rest waiting.
(Netty's flush consolidation does the same.) Nothing waits longer than the
loop's next turn: at one request at a time that is one non-blocking poll.

:class:`comox.server_protocol.BatchedTransport` holds the answers ``comox
serve`` writes; the ``httptools`` transport's connections hold their requests.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Protocol

from .late import per_loop

__all__ = ["Held", "WriteBatch", "batch_for"]

log = logging.getLogger("comox")


class Held(Protocol):
    """What holds bytes for the end of the turn: :meth:`flush` writes them
    (or drops them, if its connection closed meanwhile) and never raises."""

    def flush(self) -> None: ...


class WriteBatch:
    """One event loop's writers with bytes held this turn."""

    __slots__ = ("loop", "held")

    def __init__(self) -> None:
        # Weak: the batch is its loop's value in a weak table, and must not keep the loop alive.
        self.loop: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None
        self.held: list[Held] = []

    def hold(self, writer: Held) -> None:
        """Have ``writer.flush()`` called at the end of this turn (once more
        if it is held twice: a flush with nothing held does nothing)."""
        held = self.held
        if not held:
            loop = self.loop()
            assert loop is not None  # (a writer of a loop that is gone cannot run)
            loop.call_soon(self.flush)
        held.append(writer)

    def flush(self) -> None:
        held, self.held = self.held, []
        for writer in held:
            try:
                writer.flush()
            except Exception:  # one connection's failure is not the others'
                log.exception("could not write to a connection")


_for_loop = per_loop(WriteBatch)


def batch_for(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    """The loop's :class:`WriteBatch` (one per loop, made on first use)."""
    batch = _for_loop(loop)
    if batch.loop() is not loop:
        batch.loop = weakref.ref(loop)
    return batch
