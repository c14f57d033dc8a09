"""The ``limits`` plugin: requests per minute, tokens per minute and
concurrent requests per key, as ``principal.limits`` says (``rpm``, ``tpm``,
``max_concurrency``: ints, or None for no limit), whichever plugin
authenticated the caller.

* ``rpm`` — token bucket ``limits:rpm:<key id>`` holding ``rpm`` requests,
  refilling ``rpm / 60`` a second; each request takes one.
* ``tpm`` — token bucket ``limits:tpm:<key id>`` holding ``tpm`` tokens,
  refilling ``tpm / 60`` a second. A request takes its estimate when admitted
  (:func:`estimate`) and is settled with its real usage when done.
* ``max_concurrency`` — counter ``limits:conc:<key id>``, capped, with a time
  to live so that the slots of a replica that died are forgotten.

Everything lives in ``gateway.shared_state``, so the limits hold across every
replica sharing it. Over a limit: 429 with ``retry-after``; every answer to a
key with an ``rpm`` or ``tpm`` carries OpenAI's ``x-ratelimit-*`` headers.
Settings: ``[plugins.limits]`` (:class:`LimitSettings`). See docs/limits.md.

The work on each request is in ``admission.py`` and ``local.py``, which the
install compiles with mypyc (docs/deployment.md); the hooks stay here, in
Python, where pluggy can mark them.
"""

from __future__ import annotations

from collections.abc import Awaitable

from pydantic import BaseModel

import comox
from comox import GatewayRequest, Principal

from . import admission
from .admission import duration, estimate
from .settings import DEFAULTS, LimitSettings

__all__ = ["LimitSettings", "estimate", "duration"]

_admit, _request_done = admission.admit, admission.request_done


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return LimitSettings


@comox.hookimpl
def comox_admit(request: GatewayRequest, principal: Principal) -> Awaitable[None] | None:
    return _admit(request, principal)


@comox.hookimpl
def comox_request_done(request: GatewayRequest, status: int) -> Awaitable[None] | None:
    return _request_done(request, status)
