"""The ``redis`` plugin: state shared by every replica of the gateway, in Redis
(or Valkey), so that many replicas behind a load balancer hold each key to
one set of limits and share one response cache.

It owns the ``[state]`` table::

    [state]
    redis_url = "redis://redis:6379/0"   # or redis_url_env = "COMOX_REDIS_URL"
    prefix = "comox:"
    timeout_ms = 200
    on_failure = "open"                  # or "closed"

With a Redis URL, ``comox_shared_state`` returns a :class:`RedisState`
(``comox_redis.state``); without one it returns ``None`` and the gateway keeps
its :class:`comox.MemoryState`. Needs the ``redis`` package
(``pip install 'comox[redis]'``) only when a URL is set.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import comox

if TYPE_CHECKING:
    from .state import RedisState

__all__ = ["StateSettings"]

SCHEMES = ("redis://", "rediss://", "unix://")


class StateSettings(BaseModel):
    """``[state]``"""

    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = "state"

    redis_url: str | None = None
    """``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS) or
    ``unix:///path``; unset: every replica keeps its own state in memory."""
    redis_url_env: str | None = None
    """The environment variable holding the URL instead (a password belongs
    in a Secret, not in the config file)."""
    prefix: str = "comox:"
    """Put before every key, so several gateways can share one Redis."""
    timeout_ms: int = Field(200, ge=1, le=60_000)
    """The most one Redis operation may add to a request (connect, wait for
    a pooled connection, the command); beyond it Redis counts as down."""
    on_failure: Literal["open", "closed"] = "open"
    """While Redis is unreachable: ``open`` keeps serving (limits counted per
    replica, each taking its share; cache bypassed); ``closed`` answers 503."""
    max_connections: int = Field(64, ge=1)
    """Connections to Redis per replica (requests wait for one, within
    ``timeout_ms``)."""
    heartbeat_s: float = Field(5.0, gt=0, le=300)
    """How often a replica tells Redis it is alive; replicas not heard of for
    three heartbeats no longer count when limits are shared out."""

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(SCHEMES):
            raise ValueError(f"must start with {', '.join(SCHEMES)}")
        return url

    @model_validator(mode="after")
    def _one_url(self) -> StateSettings:
        if self.redis_url is not None and self.redis_url_env is not None:
            raise ValueError("state: set redis_url or redis_url_env, not both")
        return self

    def url(self) -> str | None:
        """The Redis URL, from the file or the environment."""
        if self.redis_url_env is None:
            return self.redis_url
        url = os.environ.get(self.redis_url_env)
        if not url:
            raise comox.ConfigError(f"state.redis_url_env: the environment variable {self.redis_url_env!r} is not set")
        if not url.startswith(SCHEMES):
            raise comox.ConfigError(f"state.redis_url_env: ${self.redis_url_env} must start with {', '.join(SCHEMES)}")
        return url


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return StateSettings


@comox.hookimpl
def comox_shared_state(gateway: comox.Gateway) -> RedisState | None:
    settings = gateway.plugin_settings("redis")
    url = settings.url() if isinstance(settings, StateSettings) else None
    if url is None:
        return None
    try:
        from .state import RedisState
    except ImportError as exc:
        raise comox.ConfigError(f"state.redis_url: needs the redis package ({exc}): pip install 'comox[redis]'") from None
    return RedisState(url, prefix=settings.prefix, timeout_s=settings.timeout_ms / 1000, on_failure=settings.on_failure,
                      max_connections=settings.max_connections, heartbeat_s=settings.heartbeat_s)


@comox.hookimpl
async def comox_startup(gateway: comox.Gateway) -> None:
    settings = gateway.plugin_settings("redis")
    if isinstance(settings, StateSettings) and (settings.redis_url or settings.redis_url_env):
        from .state import RedisState  # imported already by comox_shared_state

        if isinstance(gateway.shared_state, RedisState):
            await gateway.shared_state.start()  # the first heartbeat: /readyz is right from the start
