"""Loading the configuration: a TOML file (``-c`` / ``COMOX_CONFIG``) with
``COMOX_*`` overrides (:mod:`comox.settings`), or, given none at all, the
embedded default (:mod:`comox.default_config`)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .default_config import default_settings, is_configured
from .errors import ConfigError
from .settings import Settings, describe_validation_error

__all__ = ["load_settings"]


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (or ``$COMOX_CONFIG``) and ``COMOX_*`` variables.

    Keyword ``overrides`` win over both. Raises :class:`ConfigError` naming the
    key and the reason. With no configuration of models at all, the embedded
    default (:mod:`comox.default_config`).
    """
    path = path if path is not None else os.environ.get("COMOX_CONFIG") or None
    if not is_configured(path, overrides):
        return default_settings(**overrides)
    cls: type[Settings] = Settings
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist or is not a file")
        try:
            tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"config file {str(file)!r} is not valid TOML: {exc}") from None
        cls = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": file}})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except ValueError as exc:  # e.g. bad JSON in a COMOX_* variable
        raise ConfigError(str(exc)) from None
