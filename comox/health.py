"""Active health checks: one background task per backend that has them,
started by ``Gateway.startup`` and stopped by ``Gateway.aclose``.

A backend type takes part by implementing :class:`comox.SupportsHealthCheck`:
``async health_check(http) -> HealthReport``. The core applies the report
(verdict and reported load) to the fleet; plugins never write fleet state.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from .backends import SupportsHealthCheck
from .fleet import FAIL, BackendState, HealthReport

__all__ = ["HealthChecker", "check_once", "enabled"]

log = logging.getLogger("comox.health")


def enabled(state: BackendState) -> bool:
    if not isinstance(state.backend, SupportsHealthCheck):
        return False
    config = state.settings.health_check
    if config.enabled is not None:
        return config.enabled
    return bool(getattr(state.backend, "health_check_default", True))


async def check_once(state: BackendState, http: httpx.AsyncClient) -> HealthReport:
    """Run one check of ``state`` and apply its report; returns the report."""
    config = state.settings.health_check
    backend = state.backend
    if not isinstance(backend, SupportsHealthCheck):
        return HealthReport("ok", "no health check for this backend type")
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that
        # arrives as the check finishes, and stop() would then wait forever.
        async with asyncio.timeout(config.timeout_s):
            report = await backend.health_check(http)
        if not isinstance(report, HealthReport):
            raise TypeError(f"health_check returned {type(report).__name__}, not a HealthReport")
    except TimeoutError:
        report = HealthReport(FAIL, f"timed out after {config.timeout_s:g} s")
    except Exception as exc:  # connection refused, bad answer, …
        report = HealthReport(FAIL, f"{type(exc).__name__}: {exc}"[:200])
    state.apply_health(report, healthy_threshold=config.healthy_threshold, unhealthy_threshold=config.unhealthy_threshold)
    return report


class HealthChecker:
    """The background checks of a set of backends."""

    def __init__(self, states: list[BackendState]):
        self.states = [state for state in states if enabled(state)]
        self.tasks: list[asyncio.Task[None]] = []
        self.http: httpx.AsyncClient | None = None
        self.stopping = False
        self.first: dict[str, HealthReport] = {}  # each backend's first verdict
        self._first_round: asyncio.Event | None = None

    def start(self) -> None:
        self._first_round = asyncio.Event()
        if not self.states:
            self._first_round.set()
        if self.states:
            self.http = httpx.AsyncClient(trust_env=False, headers={"user-agent": "comox-health"})
        for state in self.states:
            self.tasks.append(asyncio.create_task(self._run(state), name=f"comox-health-{state.name}"))

    async def _run(self, state: BackendState) -> None:
        interval = state.settings.health_check.interval_s
        assert self.http is not None
        while not self.stopping:  # also ends a loop whose cancel a library swallowed
            try:
                report = await check_once(state, self.http)
            except Exception as exc:  # never let one bad check end the loop
                log.exception("health check of %s failed unexpectedly", state.name)
                report = HealthReport(FAIL, repr(exc))
            if state.name not in self.first:
                self.first[state.name] = report
                if len(self.first) == len(self.states) and self._first_round is not None:
                    self._first_round.set()
            await asyncio.sleep(interval)

    async def first_round(self) -> dict[str, HealthReport]:
        """Each checked backend's first verdict, once every one has had its first check."""
        if self._first_round is not None:
            await self._first_round.wait()
        return self.first

    async def stop(self, grace_s: float = 5.0) -> None:
        """Cancel the checks and wait for them, at most ``grace_s`` seconds:
        shutdown must not hang on a check stuck in a client library."""
        self.stopping = True
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait neither raises the tasks' errors nor swallows a
            # cancel of stop() itself
            _, stuck = await asyncio.wait(tasks, timeout=grace_s)
            for task in stuck:
                log.warning("health check task %s did not stop within %g s", task.get_name(), grace_s)
        if self.http is not None:
            await self.http.aclose()
            self.http = None
