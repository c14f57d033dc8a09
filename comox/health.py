"""Active health checks: one background task per backend that asks for them,
started by ``Gateway.startup`` and stopped by ``Gateway.aclose``.

A backend type takes part by providing ``async health_check(state, http) ->
(verdict, detail)`` (``http``: an ``httpx.AsyncClient`` shared by the checks) where verdict is :data:`OK`, :data:`LOADING` (up but not
ready — llama.cpp's ``/health`` 503 "Loading model": no traffic, but not a
failure) or :data:`FAIL`. It may also write the load it reads (``/slots``,
``/metrics``) into ``state``. Types without one (``openai``) are checked, when
``health_check.enabled = true``, with ``GET <url>/v1/models``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from .fleet import BackendState

__all__ = ["OK", "LOADING", "FAIL", "HealthChecker", "check_once"]

log = logging.getLogger("comox.health")

OK = "ok"
LOADING = "loading"
FAIL = "fail"


def enabled(state: BackendState) -> bool:
    config = state.settings.health_check
    if config.enabled is not None:
        return config.enabled
    return bool(getattr(state.backend, "health_check_default", False))


async def _generic_check(state: BackendState, http: httpx.AsyncClient) -> tuple[str, str]:
    base = getattr(state.backend, "base_url", None)
    if base is None:
        return OK, "no health check for this backend type"
    response = await http.get(f"{base}/models", timeout=state.settings.health_check.timeout_s)
    if response.status_code == 200:
        return OK, "ok"
    return FAIL, f"GET /v1/models: HTTP {response.status_code}"


async def check_once(state: BackendState, http: httpx.AsyncClient) -> str:
    """Run one check of ``state`` and apply its verdict; returns the verdict."""
    config = state.settings.health_check
    check = getattr(state.backend, "health_check", None)
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that
        # arrives as the check finishes, and stop() would then wait forever.
        async with asyncio.timeout(config.timeout_s):
            if check is not None:
                verdict, detail = await check(state, http)
            else:
                verdict, detail = await _generic_check(state, http)
    except asyncio.TimeoutError:
        verdict, detail = FAIL, f"timed out after {config.timeout_s:g} s"
    except Exception as exc:  # connection refused, bad answer, …
        verdict, detail = FAIL, f"{type(exc).__name__}: {exc}"[:200]
    if verdict == OK:
        state.health_passed(healthy_threshold=config.healthy_threshold)
    elif verdict == LOADING:
        state.not_ready(detail)
    else:
        state.health_failed(detail, unhealthy_threshold=config.unhealthy_threshold)
    return verdict


class HealthChecker:
    """The background checks of a set of backends."""

    def __init__(self, states: list[BackendState]):
        self.states = [state for state in states if enabled(state)]
        self.tasks: list[asyncio.Task] = []
        self.http: httpx.AsyncClient | None = None
        self.stopping = False

    def start(self) -> None:
        if self.states:
            self.http = httpx.AsyncClient(trust_env=False, headers={"user-agent": "comox-health"})
        for state in self.states:
            self.tasks.append(asyncio.create_task(self._run(state), name=f"comox-health-{state.name}"))

    async def _run(self, state: BackendState) -> None:
        interval = state.settings.health_check.interval_s
        while not self.stopping:  # also ends a loop whose cancel a library swallowed
            try:
                await check_once(state, self.http)
            except Exception:  # never let one bad check end the loop
                log.exception("health check of %s failed unexpectedly", state.name)
            await asyncio.sleep(interval)

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
