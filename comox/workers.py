"""``comox serve --workers N``: a small supervisor of N worker processes.

On Linux each worker binds its own listening socket on the same address with
``SO_REUSEPORT``, so the kernel hashes every new connection to one of the
workers' accept queues: the load is shared even with a few long-lived
keep-alive connections, where one shared socket lets whichever worker wakes
first take most of them. Where ``SO_REUSEPORT`` is missing, the workers share
the parent's listening socket instead, as uvicorn's supervisor does.

The parent keeps a bound (never listening) socket on the port for as long as
it runs, so no other program takes the port while a worker restarts; a socket
with ``SO_REUSEPORT`` shares a port only with sockets of the same user that
set it too, and the parent checks first, without it, that nobody listens
there already. Workers are started with multiprocessing's *spawn* context
(the metrics plugin's multiprocess mode keys on
:func:`multiprocessing.parent_process`), each builds its own gateway from the
pickled app factory and runs :class:`uvicorn.Server`. SIGINT and SIGTERM stop
every worker (SIGTERM to each, SIGKILL after a grace period); a worker that
dies on its own is started again, up to :data:`MAX_RESTARTS` in
:data:`RESTART_WINDOW` seconds, after which the supervisor stops the rest and
exits 1. A worker whose supervisor is killed outright gets SIGTERM (Linux's
``PR_SET_PDEATHSIG``), so none is left serving.

A connection already queued on a dying worker's socket is reset with it (the
known cost of ``SO_REUSEPORT``); new connections go to the workers alive.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["PortBusy", "Supervisor", "reuseport_supported", "reserve_port"]

log = logging.getLogger("comox.workers")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_GRACE = 10.0


class PortBusy(Exception):
    """The address cannot be listened on; the message says why in one line."""


def reuseport_supported() -> bool:
    """Whether the kernel balances connections across sockets bound with
    ``SO_REUSEPORT`` (Linux 3.9 and later; other systems' ``SO_REUSEPORT``
    does not balance)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        return False
    return True


def _socket(host: str, port: int, *, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortBusy(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def reserve_port(host: str, port: int, *, reuseport: bool) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one) that holds the
    port for the supervisor's lifetime. With ``reuseport`` it is bound with
    ``SO_REUSEPORT`` (the workers bind their own beside it) after a plain
    bind has shown that no one else listens there: a group of another
    ``SO_REUSEPORT`` server of this user would otherwise be joined silently.
    Without, it is the socket every worker listens on."""
    plain = _socket(host, port, reuseport=False)
    if not reuseport:
        plain.set_inheritable(True)
        return plain
    port = plain.getsockname()[1]
    plain.close()
    return _socket(host, port, reuseport=True)


def _worker(factory: Callable[[], Any], host: str, port: int, options: dict[str, Any],
            shared: socket.socket | None) -> None:
    """One worker process: its own ``SO_REUSEPORT`` socket (or the shared
    one), uvicorn serving the app the factory builds."""
    import uvicorn

    _stop_with_parent()
    sock = shared if shared is not None else _socket(host, port, reuseport=True)
    server = uvicorn.Server(uvicorn.Config(factory, factory=True, host=host, port=port, **options))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


def _stop_with_parent() -> None:
    """On Linux, SIGTERM this worker when the supervisor dies, even by
    SIGKILL, so no orphan keeps serving on the port."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = multiprocessing.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        sys.exit(0)  # the supervisor died before the line above


class Supervisor:
    """Runs ``workers`` processes serving ``factory`` on ``host:port``,
    listening with ``sock`` (from :func:`reserve_port`)."""

    def __init__(self, factory: Callable[[], Any], host: str, sock: socket.socket, workers: int, *,
                 reuseport: bool, options: dict[str, Any]):
        self.factory, self.host, self.sock, self.count = factory, host, sock, workers
        self.port: int = sock.getsockname()[1]
        self.reuseport, self.options = reuseport, options
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.restarts: deque[float] = deque()
        self.stopping = False

    def _spawn(self) -> BaseProcess:
        process = self.context.Process(
            target=_worker, name="comox-worker",
            args=(self.factory, self.host, self.port, self.options, None if self.reuseport else self.sock))
        process.start()
        return process

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM (0), or until workers keep dying (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.processes = [self._spawn() for _ in range(self.count)]
            return self._watch()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()

    def _watch(self) -> int:
        while not self.stopping:
            multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=0.5)
            if self.stopping:
                break
            for i, process in enumerate(self.processes):
                if process.is_alive():
                    continue
                pid, code = process.pid, process.exitcode
                process.close()
                now = time.monotonic()
                while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
                    self.restarts.popleft()
                if len(self.restarts) >= MAX_RESTARTS:
                    self.processes.pop(i)
                    log.error("worker %s exited with %s after %d restarts in %.0f s: stopping the others",
                              pid, code, len(self.restarts), RESTART_WINDOW)
                    return 1
                self.restarts.append(now)
                self.processes[i] = self._spawn()
                log.warning("worker %s exited with %s: worker %s started in its place", pid, code, self.processes[i].pid)
        return 0

    def stop(self) -> None:
        """SIGTERM to every worker, SIGKILL to those still there after the grace period."""
        self.stopping = True
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
