"""Noticing a client that leaves a stream, so the upstream can be cancelled.

Under ``comox serve``, the server's own protocol tells: it runs each request
in a task whose context holds its :class:`comox.server_cycle.ComoxResponseCycle`
(:data:`SERVER_CYCLE`), which cancels the watched task the moment its
connection is lost (:class:`ServerWatch`: no timer, no task, nothing queued
per request), whatever middleware wraps ``receive``.

Under any other server, ASGI tells an app about a disconnect only through
``receive()``, so noticing one means a task waiting on it. Most streams end in a few milliseconds and
never need one: a stream gets its watcher only once it has lasted
``WATCH_AFTER_S``. One :class:`DisconnectWatch` per event loop (:func:`watch_for`) keeps the open
streams in start order and checks them with one timer, re-armed while any is
open, instead of one timer per stream (which cost ~10% of an SSE stream's CPU
under load; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .late import LateQueue, per_loop

if TYPE_CHECKING:
    from .asgi_io import Receive

__all__ = ["SERVER_CYCLE", "WATCH_AFTER_S", "DisconnectWatch", "ServerWatch", "WatchedStream", "running_loop",
           "watch_current", "watch_for"]

WATCH_AFTER_S = 0.02  # a stream's watcher starts this long after the stream (give or take a loop turn)

SERVER_CYCLE: ContextVar[Any] = ContextVar("comox_server_cycle")
"""The request's cycle, in the context of the task comox serve's protocol runs
it in: an object with ``disconnected``, ``response_complete`` and a
``watched`` attribute it calls ``client_left()`` on when the connection is
lost before the answer ended, and ``protocol.loop``, the loop it runs on."""


def running_loop() -> asyncio.AbstractEventLoop:
    """The running event loop, as ``asyncio.get_running_loop()`` answers; in
    a request under ``comox serve``, read off its cycle (:data:`SERVER_CYCLE`):
    on Python 3.11 ``get_running_loop`` makes a ``getpid()`` system call."""
    cycle = SERVER_CYCLE.get(None)
    if cycle is not None:
        loop: asyncio.AbstractEventLoop = cycle.protocol.loop
        return loop
    return asyncio.get_running_loop()


class WatchedStream:
    """One open stream: the task sending it and the ASGI ``receive`` of its request."""

    __slots__ = ("task", "receive", "started", "finished", "disconnected", "watcher")

    def __init__(self, task: asyncio.Task[Any], receive: Receive, started: float):
        self.task = task
        self.receive = receive
        self.started = started
        self.finished = False
        self.disconnected = False  # set when the client left: ``task`` was cancelled for it
        self.watcher: asyncio.Task[None] | None = None

    def close(self) -> None:
        """The stream is over (sent, failed or cancelled): stop watching it."""
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()

    async def watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.disconnected = True
                    self.task.cancel()
                return


class ServerWatch:
    """A task watched by the server's own protocol: its request's cycle
    (:data:`SERVER_CYCLE`) calls :meth:`client_left` when the connection is
    lost before the answer ended. Read as a :class:`WatchedStream` is."""

    __slots__ = ("task", "cycle", "finished", "disconnected")

    def __init__(self, task: asyncio.Task[Any], cycle: Any):
        self.task = task
        self.cycle = cycle
        self.finished = False
        self.disconnected = False  # set when the client left: ``task`` was cancelled for it
        cycle.watched = self
        if cycle.disconnected:  # already gone
            self.client_left()

    def client_left(self) -> None:
        if not self.finished:
            self.disconnected = True
            self.task.cancel()

    def close(self) -> None:
        self.finished = True
        if self.cycle.watched is self:
            self.cycle.watched = None


class DisconnectWatch(LateQueue[WatchedStream]):
    """The open streams of one event loop; one open for ``after_s`` gets a
    task waiting on its ``receive()``."""

    def __init__(self, after_s: float = WATCH_AFTER_S):
        super().__init__(after_s)

    def add(self, task: asyncio.Task[Any], receive: Receive, loop: asyncio.AbstractEventLoop | None = None) -> WatchedStream:
        """Watch ``task``'s client (``loop``: the running loop, if the caller has it)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        stream = WatchedStream(task, receive, loop.time())
        self.queue(stream, loop)
        return stream

    def promote(self, entry: WatchedStream, loop: asyncio.AbstractEventLoop) -> None:
        entry.watcher = loop.create_task(entry.watch())


watch_for = per_loop(DisconnectWatch)
"""The watch of a loop (``watch_for(loop)``; each server thread runs its own loop)."""


def watch_current(receive: Receive) -> WatchedStream | ServerWatch:
    """Watch the running task's client, whose ASGI ``receive`` this is."""
    # current_task given the loop: without it, it asks get_running_loop (a getpid()).
    cycle = SERVER_CYCLE.get(None)
    if cycle is not None and not cycle.response_complete:
        task = asyncio.current_task(cycle.protocol.loop)
        assert task is not None
        return ServerWatch(task, cycle)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    return watch_for(loop).add(task, receive, loop)
