"""A pool of loaded copies of the model, one request at a time on each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

__all__ = ["Pool"]


class Pool:
    """Copies of the model made by ``make`` in a worker thread: at startup for
    the backend's own copies, on the first request that needs them for the
    extra ones (an embedding copy, a copy that computes log probabilities).
    Requests that come while the copies load wait for that one load."""

    def __init__(self, what: str, make: Callable[[], list[Any]]):
        self.what = what
        self.make = make
        self.copies: list[Any] = []
        self.free: asyncio.Queue[Any] | None = None  # the idle copies, once loaded
        self.waiting = 0  # requests waiting for a copy (or for the load)
        self.loads = 0  # times ``make`` ran
        self._loading: asyncio.Future[None] | None = None

    def _load(self) -> None:  # worker thread
        self.loads += 1
        self.copies = self.make()  # set here, so that close() after the executor's shutdown sees them

    async def ready(self, executor: Executor | None) -> asyncio.Queue[Any]:
        """The queue of idle copies, loading them first if need be. A load
        that fails is retried by the next request."""
        if self.free is None:
            if self._loading is None:
                self._loading = asyncio.get_running_loop().run_in_executor(executor, self._load)
            loading = self._loading
            try:
                await asyncio.shield(loading)  # a waiter that goes away does not stop the load
            except asyncio.CancelledError:
                raise
            except BaseException:
                if self._loading is loading:
                    self._loading = None
                raise
            if self._loading is not loading:
                raise RuntimeError(f"the {self.what} was closed while it loaded")
            if self.free is None:
                free: asyncio.Queue[Any] = asyncio.Queue()
                for copy in self.copies:
                    free.put_nowait(copy)
                self.free = free
        return self.free

    def close(self) -> None:
        """Free the copies (their worker threads must be done with them)."""
        for copy in self.copies:
            copy.close()
        self.copies = []
        self.free = None
        self._loading = None
