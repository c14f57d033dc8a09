"""The failover plugin's configuration: ``[models.failover]`` of each model
group (validated here, when the gateway starts: the core passes the table
through as ``group_settings.failover``) and the top-level ``[budgets]``.

Prices are kept in nano-dollars per token (``price_*_per_mtok`` × 1000), so
that costs and budgets are whole numbers every replica adds up exactly.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import comox

__all__ = ["BudgetSettings", "Cloud", "GroupFailover", "Prices", "build_groups", "close_groups", "NANO"]

log = logging.getLogger("comox.failover")

NANO = 1_000_000_000
"""Nano-dollars in a dollar: the unit of every cost and budget counter."""


class BudgetSettings(BaseModel):
    """``[budgets]``: what cloud failover may spend, in US dollars; unset: no limit."""

    section: ClassVar[str] = "budgets"
    model_config = ConfigDict(extra="forbid")

    cloud_usd_per_day: float | None = Field(None, ge=0)
    """All cloud requests together, per UTC day."""
    cloud_usd_per_month: float | None = Field(None, ge=0)
    """All cloud requests together, per UTC calendar month."""


class FailoverTable(BaseModel):
    """``[models.failover]``"""

    model_config = ConfigDict(extra="forbid")

    trigger: Literal["capacity", "error"] = "capacity"
    """``capacity``: only when no local backend can take the request (every one
    ejected, unhealthy or draining, or saturated past the queue wait).
    ``error``: also when every local attempt failed."""
    max_tokens_cap: int = Field(4096, ge=1, le=1_000_000)
    """The most tokens a cloud answer may generate: sent as ``max_tokens`` when
    the request names none, and the limit of one that names more."""
    backends: list[dict[str, Any]] = Field(min_length=1)
    """The cloud backends, tried in order."""


class PriceTable(BaseModel):
    """The price keys of one ``[[models.failover.backends]]`` entry, in US
    dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    price_input_per_mtok: float = Field(ge=0)
    price_output_per_mtok: float = Field(ge=0)
    price_cached_input_per_mtok: float | None = Field(None, ge=0)
    """Prompt tokens the provider served from its cache; by default the input price."""
    price_cache_write_per_mtok: float | None = Field(None, ge=0)
    """Prompt tokens the provider wrote to its cache (Anthropic's
    ``cache_creation_input_tokens``); by default the input price."""


class Prices:
    """Nano-dollars per token."""

    __slots__ = ("input", "output", "cached", "written")

    def __init__(self, table: PriceTable):
        def per_token(per_mtok: float | None) -> float:
            return (table.price_input_per_mtok if per_mtok is None else per_mtok) * 1000

        self.input = per_token(table.price_input_per_mtok)
        self.output = per_token(table.price_output_per_mtok)
        self.cached = per_token(table.price_cached_input_per_mtok)
        self.written = per_token(table.price_cache_write_per_mtok)

    def cost(self, prompt: int, cached: int, written: int, completion: int) -> int:
        """What an answer cost. ``prompt`` counts every prompt token, those
        read from the provider's cache (``cached``, as OpenAI counts them) and
        written to it (``written``) included: each is priced once, at its own
        price; the completion at the output price."""
        cached = min(cached, prompt)
        written = min(written, prompt - cached)
        plain = prompt - cached - written
        return round(plain * self.input + cached * self.cached + written * self.written + completion * self.output)

    def worst_case(self, prompt: int, completion: int) -> int:
        """The most ``prompt`` and ``completion`` tokens can cost."""
        return round(prompt * max(self.input, self.cached, self.written) + completion * self.output)


class Cloud:
    """One cloud backend of a group, as built by the gateway."""

    __slots__ = ("name", "type", "model", "backend", "prices", "first_byte_timeout_s")

    def __init__(self, backend: Any, settings: comox.BackendSettings, prices: Prices):
        self.name = settings.name
        self.type = settings.type
        self.model: str | None = getattr(settings, "model", None)
        self.backend = backend
        self.prices = prices
        self.first_byte_timeout_s = settings.first_byte_timeout_s


class GroupFailover:
    __slots__ = ("trigger", "max_tokens_cap", "clouds")

    def __init__(self, table: FailoverTable, clouds: list[Cloud]):
        self.trigger = table.trigger
        self.max_tokens_cap = table.max_tokens_cap
        self.clouds = clouds


def _validate(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"])
            problems.append(f"{key}: {err['msg']}")
        raise comox.ConfigError("; ".join(problems)) from None


async def build_groups(gateway: comox.Gateway) -> dict[str, GroupFailover]:
    """Every group's ``[models.failover]``, validated, its cloud backends
    built and started (the caller closes them: :func:`close_groups`). Raises
    :class:`comox.ConfigError` naming ``models[i].failover…``, having closed
    what it built."""
    groups: dict[str, GroupFailover] = {}
    names = {state.name for group in gateway.groups.values() for state in group.backends}
    try:
        for i, group_settings in enumerate(gateway.settings.models):
            raw = group_settings.failover
            if raw is None:
                continue
            where = f"models[{i}].failover"
            table: FailoverTable = _validate(FailoverTable, raw, where)
            clouds: list[Cloud] = []
            groups[group_settings.name] = GroupFailover(table, clouds)
            for j, entry in enumerate(table.backends):
                at = f"{where}.backends[{j}]"
                config = dict(entry)
                priced = {key: config.pop(key) for key in PriceTable.model_fields if key in config}
                prices = Prices(_validate(PriceTable, priced, at))
                backend, settings = gateway.build_backend(config, at)
                clouds.append(Cloud(backend, settings, prices))
                if settings.name in names:
                    raise comox.ConfigError(f"{at}.name: backend name {settings.name!r} is used twice")
                names.add(settings.name)
                if isinstance(backend, comox.SupportsStartup):
                    await backend.startup()
    except BaseException:
        await close_groups(groups)
        raise
    return groups


async def close_groups(groups: dict[str, GroupFailover]) -> None:
    for group in groups.values():
        for cloud in group.clouds:
            try:
                await cloud.backend.aclose()
            except Exception:
                log.exception("closing cloud backend %s failed", cloud.name)
