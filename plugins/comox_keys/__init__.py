"""API keys: who may call the gateway, which models each key may use, and
the limits a limits plugin holds it to (docs/keys.md).

* ``[[keys]]`` entries in the config (``id``, ``key_sha256``, ``models``,
  ``rpm``, ``tpm``, ``max_concurrency``, ``local_only``), and those of
  ``keys_file = "..."``, a TOML file of the same entries (the form a Kubernetes
  Secret mounts) reloaded on SIGHUP and when it changes; a broken file keeps
  the last good set.
* ``comox_authenticate`` takes ``Authorization: Bearer <key>`` or
  ``x-api-key: <key>`` (what the Anthropic SDK sends) and returns the key's
  :class:`comox.Principal`; anything else presented is 401.
* Fail closed: with ``auth = "keys"`` (the default), a config with model groups
  and no keys refuses to be built, unless another plugin implements
  ``comox_authenticate``. ``auth = "none"`` logs a warning at every start.

The keys are read, and the rule checked, while the gateway is built, in
``comox_shared_state`` — the one hook called then with the gateway — so that
``create_app``, ``ComoxMiddleware`` and ``comox serve`` all refuse such a
config with one line. The keys plugin provides no shared state (it returns
None).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import weakref
from types import FrameType
from typing import Any

from pydantic import BaseModel

import comox
from comox_keys.credential import Malformed, credential
from comox_keys.keyring import KeyEntry, KeyRing, KeysSection

__all__ = ["KeyEntry", "KeysSection", "KeyRing", "POLL_S"]

log = logging.getLogger("comox.keys")

POLL_S = 1.0
"""How often the keys file is looked at for a change."""

NO_KEYS = ('no API keys: a config with model groups needs [[keys]] entries or keys_file = "..." '
           '(comox keys new makes a key), or auth = "none" to serve without authentication')

_rings: weakref.WeakKeyDictionary[comox.Gateway, _Keys] = weakref.WeakKeyDictionary()


class _Keys:
    """This plugin's state for one gateway."""

    def __init__(self, ring: KeyRing, others: bool) -> None:
        self.ring = ring
        self.others = others  # another plugin authenticates too: leave it unknown keys
        self.watcher: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


def _others(gateway: comox.Gateway) -> bool:
    this = sys.modules[__name__]
    return any(impl.plugin is not this for impl in gateway.pm.hook.comox_authenticate.get_hookimpls())


def _admin_key(gateway: comox.Gateway) -> dict[bytes, str]:
    """The admin key's digest, which no client key may have."""
    admin = gateway.plugin_settings("admin")
    env = getattr(admin, "key_env", None)
    key = os.environ.get(env) if env else None
    return {hashlib.sha256(key.encode()).digest(): f"admin key (${env})"} if key else {}


def _configure(gateway: comox.Gateway) -> _Keys:
    settings = gateway.settings
    section: KeysSection = gateway.plugin_settings("keys")
    path = os.path.abspath(settings.keys_file) if settings.keys_file else None
    try:
        ring = KeyRing(section.root, path, _admin_key(gateway))
    except ValueError as exc:
        raise comox.ConfigError(str(exc)) from None
    others = _others(gateway)
    if settings.auth == "keys" and settings.models and not ring.configured and not others:
        raise comox.ConfigError(NO_KEYS)
    keys = _rings[gateway] = _Keys(ring, others)
    return keys


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return KeysSection


@comox.hookimpl(tryfirst=True)
def comox_shared_state(gateway: comox.Gateway) -> None:
    _configure(gateway)  # see the module docstring: the check runs while the gateway is built
    return None


@comox.hookimpl
async def comox_startup(gateway: comox.Gateway) -> None:
    keys = _rings.get(gateway) or _configure(gateway)
    if gateway.settings.auth == "none":
        log.warning('authentication is off (auth = "none"): anyone who can reach this gateway may use every model')
    ring = keys.ring
    if ring.configured and not ring.entries:
        log.warning("no API keys in keys_file %s yet: every request gets 401 until keys are added", ring.keys_file)
    if ring.keys_file is None:
        return
    keys.loop = asyncio.get_running_loop()
    keys.watcher = asyncio.create_task(_watch(ring), name="comox-keys-file")
    _hangup.add(keys)


@comox.hookimpl
async def comox_shutdown(gateway: comox.Gateway) -> None:
    keys = _rings.get(gateway)
    if keys is None or keys.watcher is None:
        return
    _hangup.discard(keys)
    keys.watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keys.watcher
    keys.watcher = None


async def _watch(ring: KeyRing) -> None:
    while True:
        await asyncio.sleep(POLL_S)
        ring.poll()


@comox.hookimpl
def comox_authenticate(request: comox.GatewayRequest) -> comox.Principal | None:
    keys = _rings.get(request.gateway) if request.gateway is not None else None
    if keys is None or not keys.ring.configured:
        return None  # no keys here: another plugin decides, or auth = "none"
    try:
        key = credential(request.headers)
    except Malformed:
        if keys.others:
            return None
        raise comox.AuthenticationFailed(
            "malformed credentials: send one key, as Authorization: Bearer <key> or x-api-key: <key>") from None
    if key is None:
        return None  # the core answers 401, unless auth = "none"
    principal = keys.ring.lookup(key)
    if principal is None and not keys.others:
        raise comox.AuthenticationFailed("invalid API key")
    return principal


class _Hangup:
    """SIGHUP reloads the keys file of every started gateway of the process.
    The handler is installed only from the main thread, when nothing else
    handles SIGHUP (the default or ignored, as under ``nohup``; a host app's
    own handler is left alone), and the previous disposition is restored when
    the last such gateway stops."""

    def __init__(self) -> None:
        self.members: set[_Keys] = set()
        self.previous: Any = None
        self.installed = False

    def add(self, keys: _Keys) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return
        if not self.installed:
            # Ignored (``nohup comox serve``) counts as unhandled: a terminal's
            # hangup then reloads the keys, which is harmless, and kill -HUP works.
            if signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                log.debug("SIGHUP already has a handler: keys are reloaded when the keys file changes")
                return
            self.previous = signal.signal(signal.SIGHUP, self.handle)
            self.installed = True
        self.members.add(keys)

    def discard(self, keys: _Keys) -> None:
        self.members.discard(keys)
        if self.installed and not self.members and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGHUP) == self.handle:
                signal.signal(signal.SIGHUP, self.previous)
            self.installed = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        for keys in list(self.members):
            if keys.loop is not None and not keys.loop.is_closed():
                keys.loop.call_soon_threadsafe(keys.ring.reload, "SIGHUP")


_hangup = _Hangup()
