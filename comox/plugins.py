"""The plugin manager (one per gateway), plugin loading, and the per-request
hook chain.

Plugins are distributions declaring an entry point in the ``comox`` group;
the entry point's name is the plugin's name. ``COMOX_LOAD_PLUGINS``
(comma-separated plugin names) loads only those, ``COMOX_BLOCK_PLUGINS``
skips the ones it names; essential plugins (:data:`ESSENTIAL`) are always
loaded. A plugin that fails to import or register is recorded with its error
(:attr:`PluginManager.failures`) instead of stopping the others from loading.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from collections.abc import Awaitable, Callable, Collection, Iterable
from importlib.metadata import Distribution, entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError

__all__ = ["PluginManager", "make_plugin_manager", "HookChain", "plugin_info", "ESSENTIAL"]

log = logging.getLogger("comox.plugins")

ESSENTIAL = frozenset({"openai", "round_robin"})
"""Plugins every config may rely on (the default backend ``type`` and
``policy``): loaded whatever ``COMOX_LOAD_PLUGINS`` says, and never blocked,
as pytest's essential plugins."""


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__("comox")
        self.distributions: dict[str, Distribution] = {}  # plugin name → its distribution
        self.failures: dict[str, str] = {}  # plugin name → why it could not be loaded

    def check_failures(self) -> None:
        """Raise :class:`ConfigError` naming every plugin that failed to load:
        a gateway must not serve without a plugin it was given (an auth
        plugin that failed would fail open)."""
        if self.failures:
            lines = [f"plugin {name!r} failed to load: {error}" for name, error in sorted(self.failures.items())]
            names = ",".join(sorted(self.failures))
            raise ConfigError("; ".join(lines) + f" (fix or uninstall it, or set COMOX_BLOCK_PLUGINS={names})")


def _register(pm: PluginManager, plugin: object, name: str | None) -> str | None:
    """Register ``plugin``; on an invalid hook, unregister it and return why."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()  # a misspelled hook fails loudly
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        return str(exc)
    return None


def make_plugin_manager(extra_plugins: Iterable[object] = ()) -> PluginManager:
    """A fresh plugin manager with the entry-point plugins the environment allows,
    then ``extra_plugins`` (objects or modules with ``@comox.hookimpl`` functions).
    Failures are recorded in ``pm.failures``; :meth:`PluginManager.check_failures`
    turns them into one error."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    allow = _env_names("COMOX_LOAD_PLUGINS")
    block = _env_names("COMOX_BLOCK_PLUGINS") or set()
    blocked_essential = sorted(block & ESSENTIAL)
    if blocked_essential:
        raise ConfigError(f"COMOX_BLOCK_PLUGINS: {', '.join(blocked_essential)} is essential and cannot be blocked")
    seen: set[str] = set()
    for ep in sorted(entry_points(group="comox"), key=lambda ep: ep.name):
        if ep.name in seen or ep.name in block or (allow is not None and ep.name not in allow and ep.name not in ESSENTIAL):
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.failures[ep.name] = f"import of {ep.value} raised {exc!r}"
            log.error("plugin %r (%s) failed to import: %r", ep.name, ep.value, exc)
            continue
        problem = _register(pm, plugin, ep.name)
        if problem is not None:
            pm.failures[ep.name] = problem
            log.error("plugin %r failed to register: %s", ep.name, problem)
            continue
        if ep.dist is not None:
            pm.distributions[ep.name] = ep.dist
    for plugin in extra_plugins:
        problem = _register(pm, plugin, None)
        if problem is not None:
            raise ConfigError(problem)
    return pm


def registrations(pm: pluggy.PluginManager, hook: str) -> dict[str, list[str]]:
    """Per plugin, the names it registers through ``hook``
    (``comox_backend_types`` or ``comox_routing_policies``)."""
    found: dict[str, list[str]] = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        try:
            result = impl.function()
        except Exception:
            continue
        found[impl.plugin_name] = sorted(result or ())
    return found


def plugin_info(pm: PluginManager) -> list[dict[str, Any]]:
    """Name, version, hooks, backend types and routing policies of every
    loaded plugin, and the error of each that failed (for ``comox plugins``)."""
    types = registrations(pm, "comox_backend_types")
    policies = registrations(pm, "comox_routing_policies")
    info = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = pm.distributions.get(name)
        info.append({
            "name": name,
            "distribution": dist.name if dist else None,
            "version": dist.version if dist else None,
            "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()),
            "backend_types": types.get(name, []),
            "routing_policies": policies.get(name, []),
            "essential": name in ESSENTIAL,
            "error": None,
        })
    for name, error in sorted(pm.failures.items()):
        info.append({"name": name, "distribution": None, "version": None, "hooks": [], "backend_types": [],
                     "routing_policies": [], "essential": name in ESSENTIAL, "error": error})
    return info


class _Impl:
    """One implementation of a per-request hook: the function, the hook
    arguments it declares, whether it is a coroutine function, and ``call``:
    the function applied to the hook's keyword arguments, passing only those
    it declares, matched by name and given in its own order, as pluggy does
    (an adapter compiled once, so a call builds no dict)."""

    __slots__ = ("function", "argnames", "is_async", "plugin", "call")

    def __init__(self, function: Callable[..., Any], argnames: tuple[str, ...], spec_args: tuple[str, ...], plugin: str):
        self.function = function
        self.argnames = argnames
        self.is_async = inspect.iscoroutinefunction(function)
        self.plugin = plugin
        self.call: Callable[[dict[str, Any]], Any] = _adapter(function, argnames, spec_args)


def _adapter(function: Callable[..., Any], argnames: tuple[str, ...], spec_args: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    unknown = [name for name in argnames if name not in spec_args]
    if unknown:  # pluggy refuses these at registration; never compile a name we did not check
        raise ConfigError(f"hook implementation {function!r} takes arguments the hook does not have: {unknown}")
    # Positionally, as pluggy itself calls: argnames are the function's parameters, in order.
    source = "lambda kwargs: function(" + ", ".join(f"kwargs[{name!r}]" for name in argnames) + ")"
    adapter: Callable[[dict[str, Any]], Any] = eval(source, {"function": function})  # names checked above
    return adapter


class HookChain:
    """Each per-request hook's implementations, in pluggy's call order, resolved
    once at startup. An empty tuple means the stage is skipped at no cost; an
    implementation is given the arguments it declares, matched by name
    (so specs can grow new arguments without breaking plugins). The plugins
    named in ``skip`` (those whose settings say they are off) are left out."""

    comox_request_start: tuple[_Impl, ...]
    comox_authenticate: tuple[_Impl, ...]
    comox_admit: tuple[_Impl, ...]
    comox_cache_lookup: tuple[_Impl, ...]
    comox_attempt_start: tuple[_Impl, ...]
    comox_attempt_done: tuple[_Impl, ...]
    comox_failover: tuple[_Impl, ...]
    comox_cache_store: tuple[_Impl, ...]
    comox_request_done: tuple[_Impl, ...]

    def __init__(self, pm: pluggy.PluginManager, skip: Collection[str] = ()):
        for name in hookspecs.PER_REQUEST_HOOKS:
            caller = getattr(pm.hook, name)
            spec_args = tuple(caller.spec.argnames)
            chain = []
            # pluggy calls the last registered first (tryfirst/trylast already sorted).
            for impl in reversed(caller.get_hookimpls()):
                if impl.plugin_name in skip:
                    continue
                if impl.hookwrapper or impl.wrapper:
                    raise ConfigError(f"plugin {impl.plugin_name!r}: {name} cannot be a wrapper (per-request hooks are awaited by Comox)")
                chain.append(_Impl(impl.function, tuple(impl.argnames), spec_args, impl.plugin_name))
            setattr(self, name, tuple(chain))
        # Each hook's implementations, called in one compiled function per way the
        # core calls them: no keyword dict, adapter or loop per request.
        def compiled(mode: str, name: str) -> Callable[..., Any]:
            return _compiled(mode, getattr(self, name), tuple(getattr(pm.hook, name).spec.argnames))

        self.request_start = compiled("each_logged", "comox_request_start")
        self.authenticate = compiled("first", "comox_authenticate")
        self.admit = compiled("each", "comox_admit")
        self.cache_lookup = compiled("first", "comox_cache_lookup")
        self.cache_store = compiled("each_logged", "comox_cache_store")
        self.request_done = compiled("each_logged", "comox_request_done")

    @staticmethod
    async def first(impls: tuple[_Impl, ...], **kwargs: Any) -> Any:
        """The first non-None result."""
        for impl in impls:
            result = impl.call(kwargs)
            if impl.is_async or (result is not None and inspect.isawaitable(result)):
                result = await result
            if result is not None:
                return result
        return None

    @staticmethod
    async def each(impls: tuple[_Impl, ...], **kwargs: Any) -> None:
        """Call every implementation; the first exception stops the rest."""
        for impl in impls:
            result = impl.call(kwargs)
            if impl.is_async or (result is not None and inspect.isawaitable(result)):
                await result

    @staticmethod
    async def each_logged(impls: tuple[_Impl, ...], **kwargs: Any) -> None:
        """Call every implementation; one that raises is logged and the
        others still run (observers: cache stores, telemetry)."""
        for impl in impls:
            try:
                result = impl.call(kwargs)
                if impl.is_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception:
                log.exception("plugin %r failed in a hook whose failures are only logged", impl.plugin)


def _compiled(mode: str, impls: tuple[_Impl, ...], args: tuple[str, ...]) -> Callable[..., Any]:
    """``HookChain.<mode>(impls, **kwargs)`` as one plain function of ``args``
    (the hook's arguments, keywords only), its calls written out: each
    implementation given the arguments it declares (each a name of the spec:
    pluggy checks them, and :class:`_Impl` refuses any other).

    It runs the implementations until one is ``async def`` or returns an
    awaitable, and then returns a coroutine that awaits it and runs the rest
    as the static forms do; a chain with nothing to await returns without a
    coroutine made. So it returns None (nothing more to do), a ``first``
    hook's result, or a coroutine (:data:`PENDING`) for the caller to await."""
    signature = ", ".join(args)
    passed = ", ".join(f"{name}={name}" for name in args)

    def call(i: int) -> str:  # positionally: pluggy's argnames are the function's own, in order
        return f"f{i}(" + ", ".join(impls[i].argnames) + ")"

    def guarded(i: int, body: list[str]) -> list[str]:  # each_logged: a failure is logged, the others still run
        if mode != "each_logged":
            return body
        return ["try:", *("    " + line for line in body), "except Exception:",
                f"    log.exception('plugin %r failed in a hook whose failures are only logged', p{i})"]

    answered = ["if r is not None:", "    return r"] if mode == "first" else []
    lines = [f"def run(*, {signature}):"]
    for i, impl in enumerate(impls):
        if impl.is_async:
            body = [f"return c{i}({call(i)}, {passed})"]
        else:
            body = [f"r = {call(i)}", "if r is not None:",
                    f"    if type(r) is CO or (type(r) not in PLAIN and awaitable(r)): return c{i}(r, {passed})",
                    *answered[1:]]
        lines += ["    " + line for line in guarded(i, body)]
    lines.append("    return None")
    for i in range(len(impls)):  # c{i}: implementation i's awaitable awaited, then the rest
        lines.append(f"async def c{i}(r, *, {signature}):")
        lines += ["    " + line for line in guarded(i, ["r = await r", *answered])]
        for j in range(i + 1, len(impls)):
            body = [f"r = {call(j)}", "if r is not None and awaitable(r):", "    r = await r", *answered]
            lines += ["    " + line for line in guarded(j, body)]
        lines.append("    return None")
    names: dict[str, Any] = {"awaitable": _awaitable, "CO": types.CoroutineType, "PLAIN": _PLAIN, "log": log}
    for i, impl in enumerate(impls):
        names[f"f{i}"], names[f"p{i}"] = impl.function, impl.plugin
    exec("\n".join(lines), names)  # only the spec's names, checked when each _Impl was made
    run: Callable[..., Any] = names["run"]
    return run


_PLAIN: set[type] = set()  # classes a hook returned whose instances are not awaitable


def _awaitable(result: object) -> bool:
    """``inspect.isawaitable``, its answer remembered for the class when it is
    no (a Principal from every authenticate: the ABC check once, not per
    request). Not for generators: one is awaitable by its code's flag."""
    if inspect.isawaitable(result):
        return True
    kind = type(result)
    if kind is not types.GeneratorType and len(_PLAIN) < 1024:
        _PLAIN.add(kind)
    return False


PENDING = types.CoroutineType
"""The type of what a compiled hook call returns when there is something to
await (``type(result) is PENDING``): a ``first`` hook's result never is one."""


async def call_startup_hook(hook: pluggy.HookCaller, **kwargs: Any) -> None:
    """Call a startup hook whose implementations may be ``async def``. When
    one raises, the coroutines of those after it are closed unawaited (not
    left to warn that they never ran) and the error goes on."""
    results = hook(**kwargs)
    for i, result in enumerate(results):
        if inspect.isawaitable(result):
            try:
                await result
            except BaseException:
                for rest in results[i + 1:]:
                    if inspect.iscoroutine(rest):
                        rest.close()
                raise
