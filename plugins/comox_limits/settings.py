"""``[plugins.limits]``: the limits plugin's settings (a pydantic model: kept out
of the modules mypyc compiles, which cannot hold one)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LimitSettings", "DEFAULTS"]


class LimitSettings(BaseModel):
    """``[plugins.limits]``"""

    model_config = ConfigDict(extra="forbid")

    default_completion_tokens: int = Field(1024, ge=0)
    """Completion tokens reserved for a request that names no ``max_tokens``
    (nor ``max_completion_tokens``); settled with the real count when done."""
    chars_per_token: float = Field(4.0, gt=0)
    """Characters of prompt text per estimated token."""
    concurrency_ttl_s: float = Field(600.0, gt=0)
    """A key's concurrency count is forgotten this long after its last change
    (so the slots of a replica that died do not stay taken for ever)."""


DEFAULTS = LimitSettings()
