"""The gateway: settings and plugins turned into model groups of live backends,
and the routing step that sends a request to one of them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, cast

import httpx

import orjson
from pydantic import BaseModel, ValidationError

from .backends import BackendResponse, SupportsStartup
from .default_config import serving_default
from .dispatch import dispatch
from .events import emit
from .errors import BackendUnavailable, ComoxError, ConfigError, NoBackendAvailable, NotFound
from .fleet import BackendState, FleetCounters, ModelGroup
from .health import HealthChecker, check_once
from .plugins import HookChain, PluginManager, call_startup_hook, make_plugin_manager
from .request import GatewayRequest, Principal
from .inbound import InboundAPIs
from .shared_state import MemoryState, SharedState
from .settings import BackendSettings, ModelGroupSettings, Settings, describe_validation_error
from .views import ObservesUsage, ReportsStats

__all__ = ["Gateway"]

log = logging.getLogger("comox")

class Gateway:
    """Everything one Comox instance owns: its plugin manager, hook chain,
    backend and policy registries, and model groups."""

    def __init__(self, settings: Settings, *, plugins: Iterable[object] = (), pm: PluginManager | None = None):
        self.settings = settings
        self.pm = pm if pm is not None else make_plugin_manager(plugins)
        self.pm.check_failures()
        self._plugin_settings = self._validate_plugin_settings()
        # A plugin whose settings or ``comox_active`` say it is off for this
        # config is left out of the per-request hooks: installed, unused, free.
        self.hooks = HookChain(self.pm, skip=self._inactive_plugins())
        self.shared_state: SharedState = self.pm.hook.comox_shared_state(gateway=self) or MemoryState()
        self.inbound = InboundAPIs(api for apis in self.pm.hook.comox_inbound_apis(gateway=self) for api in (apis or ()))
        self.backend_types: dict[str, type] = self._registry(self.pm.hook.comox_backend_types(), "backend type")
        self.policies: dict[str, type] = self._registry(self.pm.hook.comox_routing_policies(), "routing policy")
        self.counters = FleetCounters()
        self.groups: dict[str, ModelGroup] = {
            group_settings.name: self._build_group(i, group_settings) for i, group_settings in enumerate(settings.models)
        }
        # Every name a client may send: group names and their aliases.
        self.names: dict[str, ModelGroup] = {
            name: group for group in self.groups.values() for name in [group.name, *group.settings.aliases]
        }
        # Server settings read on every request, as plain attributes (see ModelGroup).
        self.retries = settings.server.retries
        self.max_body_bytes = settings.server.max_body_bytes
        self.expose_backend_header = settings.server.expose_backend_header
        self.retry_budget_ratio = settings.server.retry_budget_ratio
        self.retry_budget_min = settings.server.retry_budget_min
        self.health_checker: HealthChecker | None = None
        self.created = created = int(time.time())
        self.models_body = orjson.dumps({
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "comox"} for name in self.names],
        })
        self.auth_required = settings.auth != "none"
        self.started = False
        self._banner_task: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None

    def models_list(self, principal: Principal) -> bytes:
        """``GET /v1/models`` as ``principal`` sees it: only the groups it may use."""
        return orjson.dumps({
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "comox"}
                     for name, group in self.names.items() if principal.may_use(group.name)],
        })

    def plugin_settings(self, name: str) -> Any:
        """The validated settings of plugin ``name`` (an instance of the model
        its ``comox_plugin_settings`` returned), or None if it declares none."""
        return self._plugin_settings.get(name)

    def _inactive_plugins(self) -> set[str]:
        inactive = {name for name, model in self._plugin_settings.items() if getattr(model, "active", True) is False}
        for impl in self.pm.hook.comox_active.get_hookimpls():
            try:
                active = impl.function(**({"gateway": self} if "gateway" in impl.argnames else {}))
            except Exception as exc:
                raise ConfigError(f"plugin {impl.plugin_name!r}: comox_active failed: {exc!r}") from exc
            if active is False:
                inactive.add(impl.plugin_name)
        return inactive

    def _validate_plugin_settings(self) -> dict[str, BaseModel]:
        tables = dict(self.settings.plugins)
        extra = dict(self.settings.sections)
        validated: dict[str, BaseModel] = {}
        for impl in self.pm.hook.comox_plugin_settings.get_hookimpls():
            name = impl.plugin_name
            model = impl.function()
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError(f"plugin {name!r}: comox_plugin_settings must return a pydantic model class, got {model!r}")
            section = getattr(model, "section", None)
            where, table = (section, extra.pop(section, {})) if section else (f"plugins.{name}", tables.pop(name, {}))
            try:
                validated[name] = model.model_validate(table)
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(exc, prefix=where)) from None
        for name in sorted(tables):
            raise ConfigError(f"plugins.{name}: no loaded plugin named {name!r} declares settings (see comox plugins)")
        for key in sorted(extra):
            raise ConfigError(f"{key}: unknown key (no loaded plugin owns a [{key}] table)")
        return validated

    @staticmethod
    def _registry(results: list[dict[str, type]], what: str) -> dict[str, type]:
        merged: dict[str, type] = {}
        for mapping in results:
            for name, cls in (mapping or {}).items():
                if name in merged and merged[name] is not cls:
                    raise ConfigError(f"{what} {name!r} is registered by two plugins")
                merged[name] = cls
        return merged

    def _build_group(self, i: int, group_settings: ModelGroupSettings) -> ModelGroup:
        policy_cls = self.policies.get(group_settings.policy)
        if policy_cls is None:
            raise ConfigError(
                f"models[{i}].policy: unknown routing policy {group_settings.policy!r} "
                f"(known: {', '.join(sorted(self.policies)) or 'none'}; is its plugin installed and not blocked? see comox plugins)"
            )
        states = []
        for j, backend_settings in enumerate(group_settings.backends):
            if self.backend_types.get(backend_settings.type) is None and serving_default(self.settings):
                raise ConfigError(
                    f"the embedded default model needs the backend type {backend_settings.type!r}, which no loaded "
                    "plugin registers: COMOX_LOAD_PLUGINS or COMOX_BLOCK_PLUGINS leave out its plugin "
                    "(llama_cpp_python), or it failed to load; see comox plugins, or pass your own config with -c"
                )
            backend, validated = self.build_backend(backend_settings.model_dump(), f"models[{i}].backends[{j}]")
            states.append(BackendState(backend, validated))
        server = self.settings.server
        timeout_ms = group_settings.queue_timeout_ms if group_settings.queue_timeout_ms is not None else server.queue_timeout_ms
        group = ModelGroup(
            group_settings.name, states, settings=group_settings, counters=self.counters,
            queue_timeout_s=timeout_ms / 1000.0,
            queue_size=group_settings.queue_size if group_settings.queue_size is not None else server.queue_size,
            decay_s=group_settings.estimate_decay_s,
        )
        try:
            group.policy = policy_cls(group)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"models[{i}].policy_options: {exc}") from None
        if isinstance(group.policy, ObservesUsage):
            group.observer = group.policy.observe
        return group

    def build_backend(self, config: dict[str, Any], where: str) -> tuple[Any, BackendSettings]:
        """A backend from its config (a ``[[models.backends]]``-style table):
        its type looked up, its settings validated by the type's model, the
        object built. For plugins that keep backends of their own (cloud
        failover). Raises :class:`ConfigError` naming ``where``; the caller
        owns the backend (``await backend.aclose()``)."""
        type_name = config.get("type", "openai")
        cls = self.backend_types.get(type_name)
        if cls is None:
            raise ConfigError(
                f"{where}.type: unknown backend type {type_name!r} "
                f"(known: {', '.join(sorted(self.backend_types)) or 'none'}; is its plugin installed and not blocked? see comox plugins)"
            )
        model = getattr(cls, "settings_model", BackendSettings)
        try:
            validated = model.model_validate({"type": type_name, **config})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, prefix=where)) from None
        if not validated.name:
            validated.name = getattr(validated, "url", None) or type_name
        try:
            return cls(validated), validated
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def backends(self) -> list[BackendState]:
        return [state for group in self.groups.values() for state in group.backends]

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers: ready once started, while the shared
        state can be used (a degraded one still serves, and says so)."""
        state = self.shared_state.readiness()
        return {**state, "ready": self.started and bool(state.get("ready", True)), "started": self.started}

    def snapshot(self) -> dict[str, Any]:
        """The fleet as ``/admin/backends`` shows it: every backend, and per
        model group its policy, backends in rotation, panic mode, queue and
        policy statistics — as of now, not as of the last request."""
        data = []
        groups = {}
        for group in self.groups.values():
            policy_name = group.settings.policy if group.settings is not None else None
            for state in group.backends:
                data.append({**state.snapshot(), "model": group.name, "policy": policy_name})
            groups[group.name] = {
                "policy": policy_name,
                "available": len(group.current()),
                "panic": group.panic,
                "queued": len(group.waiters),
                "policy_stats": group.policy.stats() if isinstance(group.policy, ReportsStats) else None,
            }
        return {"object": "list", "data": data, "groups": groups}

    def set_draining(self, name: str, draining: bool) -> dict[str, Any]:
        """Drain (no new requests; in-flight ones finish) or undrain the
        backend ``name``; its snapshot. Raises :class:`NotFound`."""
        state = self.backend(name)
        if state is None:
            raise NotFound(f"no backend named {name!r}")
        state.set_draining(draining)
        return state.snapshot()

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
                if isinstance(state.backend, SupportsStartup):
                    await state.backend.startup()
            self.health_checker = HealthChecker(self.backends())
            self.health_checker.start()
            self._banner_task = asyncio.create_task(self._banner(self.health_checker), name="comox-banner")
            await call_startup_hook(self.pm.hook.comox_startup, gateway=self)
            self.started = True

    async def _banner(self, checker: HealthChecker) -> None:
        """Log each model group, its policy and its backends with their first
        health verdict; warn about a group with no backend that answered."""
        first = await checker.first_round()
        for group in self.groups.values():
            policy = group.settings.policy if group.settings is not None else "?"
            verdicts = []
            for state in group.backends:
                report = first.get(state.name)
                verdict = "not checked" if report is None else report.status
                url = getattr(state.settings, "url", None)
                verdicts.append(f"{state.name} ({state.type}{', ' + url if url else ''}): {verdict}"
                                + (f" ({report.detail})" if report is not None and report.status != "ok" else ""))
            emit("model_group", f"model {group.name} (policy {policy}): " + "; ".join(verdicts),
                 model=group.name, policy=policy, backends=len(group.backends))
            if group.backends and all(s.name in first and first[s.name].status == "fail" for s in group.backends):
                emit("no_reachable_backend", f"model {group.name} has no reachable backend: every health check failed; "
                     "its requests will fail until one answers", level=logging.WARNING, model=group.name)

    async def probe(self) -> list[tuple[str, str, str]]:
        """Check every backend once, now: ``(backend name, verdict, detail)``
        with verdict ``"ok"``, ``"loading"`` or ``"fail"`` (for ``comox check``)."""
        results = []
        async with httpx.AsyncClient(trust_env=False, headers={"user-agent": "comox-check"}) as http:
            for state in self.backends():
                report = await check_once(state, http)
                results.append((state.name, report.status, report.detail))
        return results

    async def aclose(self) -> None:
        if self._banner_task is not None:
            self._banner_task.cancel()
            self._banner_task = None
        if self.health_checker is not None:
            await self.health_checker.stop()
            self.health_checker = None
        for state in self.backends():
            try:
                await state.backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", state.name)
        await call_startup_hook(self.pm.hook.comox_shutdown, gateway=self)
        try:
            await self.shared_state.aclose()
        except Exception:
            log.exception("closing the shared state failed")
        self.started = False

    # -- routing ------------------------------------------------------------

    def dispatch(self, request: GatewayRequest, group: ModelGroup) -> Coroutine[Any, Any, tuple[BackendResponse, BackendState | None]]:
        """Send ``request`` to a backend of ``group`` (:func:`comox.dispatch.dispatch`):
        a coroutine to await. (Its own, returned as it is: no coroutine around it.)"""
        return dispatch(self, request, group)

    @staticmethod
    def release(state: BackendState | None) -> None:
        if state is not None:
            state.release()
