"""The gateway: settings and plugins turned into model groups of live backends,
and the routing step that sends a request to one of them."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from pydantic import ValidationError

from .backends import BackendResponse
from .errors import BackendUnavailable, ComoxError, ConfigError, NoBackendAvailable
from .fleet import BackendState, FleetCounters, ModelGroup
from .plugins import HookChain, PluginManager, call_startup_hook, make_plugin_manager
from .request import GatewayRequest
from .settings import BackendSettings, Settings, describe_validation_error

__all__ = ["Gateway"]

log = logging.getLogger("comox")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class Gateway:
    """Everything one Comox instance owns: its plugin manager, hook chain,
    backend and policy registries, and model groups."""

    def __init__(self, settings: Settings, *, plugins: list[Any] = (), pm: PluginManager | None = None):
        self.settings = settings
        self.pm = pm if pm is not None else make_plugin_manager(list(plugins))
        self.hooks = HookChain(self.pm)
        self.backend_types: dict[str, type] = self._registry(self.pm.hook.comox_backend_types(), "backend type")
        self.policies: dict[str, type] = self._registry(self.pm.hook.comox_routing_policies(), "routing policy")
        self.counters = FleetCounters()
        self.groups: dict[str, ModelGroup] = {
            group_settings.name: self._build_group(i, group_settings) for i, group_settings in enumerate(settings.models)
        }
        self.retries = settings.server.retries
        self.retry_budget_ratio = settings.server.retry_budget_ratio
        self.retry_budget_min = settings.server.retry_budget_min
        self.health_checker = None
        self.created = created = int(time.time())
        self.models_body = orjson.dumps({
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "comox"} for name in self.groups],
        })
        self.started = False
        self._start_lock: asyncio.Lock | None = None

    @staticmethod
    def _registry(results: list[dict], what: str) -> dict[str, type]:
        merged: dict[str, type] = {}
        for mapping in results:
            for name, cls in (mapping or {}).items():
                if name in merged and merged[name] is not cls:
                    raise ConfigError(f"{what} {name!r} is registered by two plugins")
                merged[name] = cls
        return merged

    def _build_group(self, i: int, group_settings) -> ModelGroup:
        policy_cls = self.policies.get(group_settings.policy)
        if policy_cls is None:
            raise ConfigError(
                f"models[{i}].policy: unknown routing policy {group_settings.policy!r} "
                f"(known: {', '.join(sorted(self.policies)) or 'none'}; is its plugin installed and not blocked?)"
            )
        states = []
        for j, backend_settings in enumerate(group_settings.backends):
            where = f"models[{i}].backends[{j}]"
            cls = self.backend_types.get(backend_settings.type)
            if cls is None:
                raise ConfigError(
                    f"{where}.type: unknown backend type {backend_settings.type!r} "
                    f"(known: {', '.join(sorted(self.backend_types)) or 'none'}; is its plugin installed and not blocked?)"
                )
            model = getattr(cls, "settings_model", BackendSettings)
            try:
                validated = model.model_validate(backend_settings.model_dump())
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(exc, prefix=where)) from None
            try:
                backend = cls(validated)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            states.append(BackendState(backend, validated))
        server = self.settings.server
        timeout_ms = group_settings.queue_timeout_ms if group_settings.queue_timeout_ms is not None else server.queue_timeout_ms
        group = ModelGroup(
            group_settings.name, states, settings=group_settings, counters=self.counters,
            queue_timeout_s=timeout_ms / 1000.0,
            queue_size=group_settings.queue_size if group_settings.queue_size is not None else server.queue_size,
        )
        try:
            group.policy = policy_cls(group)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"models[{i}].policy_options: {exc}") from None
        return group

    def backends(self) -> list[BackendState]:
        return [state for group in self.groups.values() for state in group.backends]

    def backend(self, name: str) -> BackendState | None:
        for group in self.groups.values():
            for state in group.backends:
                if state.name == name:
                    return state
        return None

    # -- lifecycle ----------------------------------------------------------

    async def startup(self) -> None:
        """Run startup hooks once; safe to call from every request."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.started:
                return
            for state in self.backends():
                start = getattr(state.backend, "startup", None)
                if start is not None:
                    await start()
            from .health import HealthChecker

            self.health_checker = HealthChecker(self.backends())
            self.health_checker.start()
            await call_startup_hook(self.pm.hook.comox_startup, gateway=self)
            self.started = True

    async def probe(self) -> list[tuple[str, str, str]]:
        """Check every backend once, now: ``(backend name, verdict, detail)``
        with verdict ``"ok"``, ``"loading"`` or ``"fail"`` (for ``comox check``)."""
        import httpx

        from .health import check_once

        results = []
        async with httpx.AsyncClient(trust_env=False, headers={"user-agent": "comox-check"}) as http:
            for state in self.backends():
                verdict = await check_once(state, http)
                results.append((state.name, verdict, state.last_health or ""))
        return results

    async def aclose(self) -> None:
        if self.health_checker is not None:
            await self.health_checker.stop()
            self.health_checker = None
        for state in self.backends():
            try:
                await state.backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", state.name)
        await call_startup_hook(self.pm.hook.comox_shutdown, gateway=self)
        self.started = False

    # -- routing ------------------------------------------------------------

    async def dispatch(self, request: GatewayRequest, group: ModelGroup) -> tuple[BackendResponse, BackendState | None]:
        """Send ``request`` to a backend of ``group``; retry on another one if it
        fails before its first byte, within the retry budget. When every backend
        is at ``max_concurrency`` wait (bounded) for a slot. The caller must
        ``release()`` the returned state once the response is finished."""
        tried: list[BackendState] = []
        failure: ComoxError | None = None
        response: BackendResponse | None = None
        last_state: BackendState | None = None
        counters = self.counters
        saturated = False
        for attempt in range(self.retries + 1):
            if attempt and counters.retries >= max(self.retry_budget_min, self.retry_budget_ratio * counters.inflight):
                break  # retry budget spent: retries must not snowball
            state = group.choose(request, tried)
            if state is None:
                if group.saturated_only(tried):
                    saturated = True
                    if group.queue_timeout_s > 0 and group.queue_size > 0:
                        state = await group.wait_for_slot(request, tried, time.monotonic() + group.queue_timeout_s)
                if state is None:
                    break
            saturated = False
            tried.append(state)
            if response is not None:  # a retryable answer we are replacing
                await response.aclose()
                response = None
            state.acquire()
            if attempt:
                counters.retries += 1
            started = request.sent_at = time.perf_counter()
            try:
                response = await state.backend.handle(request)
            except BackendUnavailable as exc:
                state.release()
                state.record_failure(exc.message)
                failure = exc
                continue
            except BaseException:
                state.release()
                raise
            finally:
                if attempt:
                    counters.retries -= 1
            if response.status in RETRYABLE_STATUS:
                state.release()
                state.record_failure(f"HTTP {response.status}", response.status)
                failure = None
                last_state = state
                continue
            answered = request.answered_at = time.perf_counter()
            state.record_success(answered - started)
            return response, state
        if response is not None:
            # Every try answered 5xx/429: pass the last answer through, as a proxy does.
            last_state.acquire()
            if not any(name == b"retry-after" for name, _ in response.headers):
                response.headers.append((b"retry-after", str(self.settings.server.retry_after_s).encode()))
            return response, last_state
        if saturated:
            error = NoBackendAvailable(
                f"every backend of model {group.name!r} is at its max_concurrency"
                + (f" and the queue is full ({group.queue_size})" if len(group.waiters) >= group.queue_size
                   else f"; waited {round(group.queue_timeout_s * 1000)} ms"),
                retry_after=self.settings.server.retry_after_s, code="backends_saturated",
            )
        else:
            error = NoBackendAvailable(
                f"no backend of model {group.name!r} can take the request now"
                + (f" (last error: {failure.message})" if failure else ""),
                retry_after=self.settings.server.retry_after_s,
            )
        if self.hooks.comox_failover:
            answer = await HookChain.first(self.hooks.comox_failover, request, error)
            if answer is not None:
                return answer, None
        raise error

    @staticmethod
    def release(state: BackendState | None) -> None:
        if state is not None:
            state.release()
