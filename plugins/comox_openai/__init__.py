"""The ``openai`` backend type: any OpenAI-compatible HTTP server (llama.cpp's
server, vLLM, SGLang, TGI, a cloud API), served by :class:`comox.HTTPBackend`.

An essential plugin: the default ``type`` of a backend in the config, so it is
loaded even when ``COMOX_LOAD_PLUGINS`` does not name it.
"""

from __future__ import annotations

import comox

__all__ = ["OpenAIBackend", "OpenAIBackendSettings"]

OpenAIBackend = comox.HTTPBackend
OpenAIBackendSettings = comox.HTTPBackendSettings


@comox.hookimpl
def comox_backend_types() -> dict[str, type]:
    return {"openai": comox.HTTPBackend}
