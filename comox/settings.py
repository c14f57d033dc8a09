"""Configuration: a TOML file (``-c`` / ``COMOX_CONFIG``) overridden by ``COMOX_*``
environment variables, read with pydantic-settings.

Nested keys use ``__`` in environment variables: ``COMOX_SERVER__MAX_BODY_BYTES``.
List-valued keys (``COMOX_MODELS``) take JSON.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError

__all__ = ["Settings", "ServerSettings", "ModelGroupSettings", "BackendSettings", "HealthCheckSettings", "describe_validation_error"]


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expose_backend_header: bool = False
    """Add ``x-comox-backend: <backend name>`` to every proxied response."""
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    """Largest request body accepted; larger ones get 413."""
    retries: int = Field(1, ge=0, le=10)
    """How many other backends to try when one fails before its first byte."""
    retry_after_s: int = Field(1, ge=1)
    """``retry-after`` sent with 503 when no backend of a group can answer."""
    retry_budget_ratio: float = Field(0.2, ge=0, le=10)
    """Retries in progress may be at most this share of requests in flight…"""
    retry_budget_min: int = Field(10, ge=0)
    """…or this many, whichever is larger (see docs/routing.md)."""
    queue_timeout_ms: int = Field(10_000, ge=0)
    """How long a request waits when every backend of its group is at
    ``max_concurrency``, before 503 with ``retry-after``. 0: no waiting."""
    queue_size: int = Field(1024, ge=0)
    """Most requests waiting per model group; more get 503 at once."""
    tune_gc: bool = True
    """``comox serve`` only: once started, freeze what startup loaded out of the
    garbage collector's way and collect young objects less often (see
    docs/deployment.md). Mounted in another app, Comox leaves its GC alone."""


class HealthCheckSettings(BaseModel):
    """Active health checks of one backend (see docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    """None: the backend type's default (on for ``llamacpp`` and ``vllm``)."""
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    healthy_threshold: int = Field(1, ge=1)
    """Passing checks in a row that mark an unhealthy/ejected backend healthy."""
    unhealthy_threshold: int = Field(2, ge=1)
    """Failed checks in a row that take a backend out of rotation."""


class BackendSettings(BaseModel):
    """Keys every backend type understands; a type adds its own by subclassing
    this as its ``settings_model``."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    """Unique across the config; defaults to the url (or the type)."""
    type: str = "openai"
    """A backend type, by the name ``comox plugins`` lists (``openai``,
    ``llamacpp``, ``vllm``, ``llama-cpp-python``, or a third party's)."""
    weight: int = Field(1, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    """Most requests in flight at once on this backend."""
    endpoints: list[str] | None = None
    """The API endpoints this backend serves (``chat/completions``,
    ``completions``, ``embeddings``, ``rerank``); requests for others go to
    the group's other backends. None: every one but ``rerank``, which a
    backend must declare."""
    first_byte_timeout_s: float | None = Field(300.0, gt=0)
    """Longest wait for the backend's first byte — the first chunk of a
    stream, the response headers of a non-streaming request — before the
    request moves to another backend (within the retry budget) and the wait
    counts as a failure of this one. A non-streaming answer's headers come only
    once the whole generation is done, so the default leaves long generations
    alone; lower it for interactive streaming traffic. None: no limit (only
    the type's own read timeout)."""
    slow_start_s: float = Field(10.0, ge=0)
    """After an ejection or failed health checks, ramp traffic up over this long."""
    health_check: HealthCheckSettings = HealthCheckSettings()


class ModelGroupSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    """What clients send as ``model``."""
    policy: str = "round_robin"
    """A routing policy, by the name ``comox plugins`` lists (``round_robin``,
    ``p2c_ewma``, ``prefix_affinity``, …)."""
    policy_options: dict[str, Any] = {}
    """Options of the routing policy (see docs/routing.md)."""
    queue_timeout_ms: int | None = Field(None, ge=0)
    """Overrides ``server.queue_timeout_ms`` for this group."""
    queue_size: int | None = Field(None, ge=0)
    """Overrides ``server.queue_size`` for this group."""
    estimate_decay_s: float = Field(10.0, gt=0)
    """Time constant with which a backend's latency and tokens/s estimates
    drift to the group's typical values while it is not measured, so an idle
    or once-slow backend is tried again."""
    aliases: list[str] = []
    """Other names clients may use for this group (a client whose model name
    is fixed, such as ``claude-sonnet-4-5``, still lands here)."""
    sovereign: bool = False
    """Requests to this group never leave for a cloud backend: at exhausted
    local capacity they get 503 with ``retry-after``."""
    resume_streams: bool = False
    """When a local node breaks off a stream, continue it on another node of
    the group (docs/failover.md)."""
    failover: dict[str, Any] | None = None
    """Cloud failover for this group (``[models.failover]``), validated by the
    plugin that implements ``comox_failover`` (docs/failover.md)."""
    backends: list[BackendSettings] = Field(min_length=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COMOX_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    auth: Literal["keys", "none"] = "keys"
    """``keys``: every API request needs a caller some plugin vouches for
    (``[[keys]]``, or a plugin's ``comox_authenticate``), else 401, and a
    config with model groups and no keys refuses to start. ``none``: no
    authentication at all (a warning is logged at every start)."""
    keys_file: str | None = None
    """A TOML file of ``[[keys]]`` entries besides the config's own (the
    ``keys`` plugin, docs/keys.md), reloaded on SIGHUP and when it changes. A
    top-level key of the config, so the core declares it for that plugin."""
    server: ServerSettings = ServerSettings()
    models: list[ModelGroupSettings] = []
    plugins: dict[str, dict[str, Any]] = {}
    """``[plugins.<name>]`` tables: each plugin's own settings, validated by
    the model the plugin declares (``comox_plugin_settings``)."""
    sections: dict[str, Any] = Field({}, exclude=True)
    """Other top-level tables of the config file, for plugins that own one
    (validated when the gateway is built; unknown ones are an error there)."""

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        groups: set[str] = set()
        backends: set[str] = set()
        for i, group in enumerate(self.models):
            for j, name in enumerate([group.name, *group.aliases]):
                if name in groups:
                    where = f"models[{i}].name" if j == 0 else f"models[{i}].aliases[{j - 1}]"
                    raise ValueError(f"{where}: model name {name!r} is used twice")
                groups.add(name)
            for j, backend in enumerate(group.backends):
                if not backend.name:
                    backend.name = getattr(backend, "url", None) or f"{group.name}-{backend.type}-{j}"
                if backend.name in backends:
                    raise ValueError(f"models[{i}].backends[{j}].name: backend name {backend.name!r} is used twice")
                backends.add(backend.name)
        return self

    def native_models(self, api: str) -> dict[str, bool]:
        """Each model name (group and alias): whether every backend of its
        group serves inbound API ``api`` itself (``native_apis``), so that a
        request to it is passed through, never translated (unless it fails
        over). An inbound API may then check such a request only as far as
        routing and limits need, and leave the rest to the backend."""
        out = {}
        for group in self.models:
            native = all(api in (getattr(backend, "native_apis", None) or ()) for backend in group.backends)
            for name in (group.name, *group.aliases):
                out[name] = native
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(_TomlSource(settings_cls))
        return tuple(sources)


class _TomlSource(TomlConfigSettingsSource):
    """The config file, its top-level tables that are not core keys gathered
    under ``sections`` for the plugins that own them."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        core = {name for name in Settings.model_fields if name != "sections"}
        sections = {key: data.pop(key) for key in list(data) if key not in core}
        if sections:
            data["sections"] = sections
        return data


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the key: ``models[0].backends[1].url: Field required``."""
    lines = []
    for err in exc.errors():
        if not err["loc"] and "error" in err.get("ctx", {}):
            lines.append(str(err["ctx"]["error"]))  # a model validator's message names its key
            continue
        key = prefix
        for part in err["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        lines.append(f"{key or '(top level)'}: {err['msg']}")
    return "; ".join(lines)
