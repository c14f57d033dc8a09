"""Comox with the openai backend's transport swapped, for ``bench/perf.py --extra``:
the same gateway over stock httpx, or httpx over the aiohttp transport.

    COMOX_CONFIG=... COMOX_BENCH_CLIENT=httpx uvicorn comox_variants:create_app --factory
"""

from __future__ import annotations

import os

import httpx

from comox.app import create_app as _create_app
from comox_openai import OpenAIBackend
from comox_openai.transport import HttpxTransport


def create_app():
    kind = os.environ.pop("COMOX_BENCH_CLIENT", None) or os.environ.get("BENCH_CLIENT", "httpx")
    app = _create_app()
    for state in app.gateway.backends():
        backend = state.backend
        if not isinstance(backend, OpenAIBackend):
            continue
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        timeout = httpx.Timeout(backend.settings.timeout_s, connect=backend.settings.connect_timeout_s)
        if kind == "httpx":
            client = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
        elif kind == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            client = httpx.AsyncClient(transport=AiohttpTransport(), limits=limits, timeout=timeout, trust_env=False)
        else:
            raise SystemExit(f"unknown BENCH_CLIENT {kind!r}")
        backend.transport = HttpxTransport(client, default_headers=backend._headers)
        backend.client = client
    return app
