"""The standalone ASGI app: ``create_app()`` for uvicorn (``--factory``) or for
mounting in Starlette/FastAPI with ``app.mount("/llm", create_app(settings))``."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
from starlette.routing import Match, Router

from .asgi_io import Receive, Responder, Send, route_path
from .config import load_settings
from .disconnects import SERVER_CYCLE
from .errors import InvalidRequest, MethodNotAllowed, NotFound
from .gateway import Gateway
from .openapi import OpenAPI, build_document
from .pipeline import serve_api
from .request import request_id_from
from .settings import Settings

__all__ = ["ComoxApp", "create_app", "build_gateway", "tune_gc", "framing_error"]

log = logging.getLogger("comox")

GC_GEN0_THRESHOLD = 7000  # CPython's default is 700


def tune_gc() -> None:
    """Tune the garbage collector of a process that only serves Comox: move
    what startup loaded (modules, settings, plugins: most of the heap) to the
    permanent generation, so full collections stop walking it, and collect
    the youngest generation 10× less often. Measured under load
    (bench/gc_stats.py): GC time from 3–7% of the CPU, with 30–75 ms pauses,
    to under 0.5%."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def build_gateway(settings: Settings | str | os.PathLike[str] | None = None, *, plugins: Iterable[object] = ()) -> Gateway:
    """A :class:`Gateway` from a Settings object, a config file path, or (with
    ``None``) the file named by ``COMOX_CONFIG``."""
    if not isinstance(settings, Settings):
        settings = load_settings(settings)
    return Gateway(settings, plugins=plugins)


class ComoxApp:
    """Serves ``/v1/...``, ``/healthz``, ``/readyz``, ``/openapi.json`` and the routes plugins add."""

    def __init__(self, gateway: Gateway, *, tune_gc: bool = False):
        self.gateway = gateway
        self.tune_gc = tune_gc  # set by `comox serve`, which owns the process
        routes = [route for result in gateway.pm.hook.comox_routes(gateway=gateway) for route in (result or ())]
        # No redirect_slashes: Starlette builds that redirect's location from the Host header.
        self.router = Router(routes, redirect_slashes=False) if routes else None
        self.openapi = OpenAPI(build_document(gateway, routes))

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = route_path(scope)
            # comox serve's parser (llhttp) refuses these requests itself (tests/test_hostile_input.py).
            refused = framing_error(scope["headers"]) if SERVER_CYCLE.get(None) is None else None
            if refused is not None:  # and the connection closed: what follows on it is not to be trusted
                await Responder(send).error(refused, request_id_from(None).encode(), [(b"connection", b"close")])
            elif path.startswith("/v1/"):
                await serve_api(self.gateway, scope, receive, send, path)
            elif path == "/healthz":  # liveness: the process serves
                await Responder(send).json(200, b'{"status":"ok"}', [(b"content-type", b"application/json")])
            elif path == "/readyz":  # readiness: started, and its shared state usable
                ready = self.gateway.readiness()
                await Responder(send).json(200 if ready["ready"] else 503, orjson.dumps(ready),
                                           [(b"content-type", b"application/json")])
            elif path == "/openapi.json":
                if scope["method"] not in ("GET", "HEAD"):
                    wrong = MethodNotAllowed(f"{scope['method']} is not allowed on {path}; use GET")
                    await Responder(send).error(wrong, request_id_from(None).encode(), [(b"allow", b"GET, HEAD")])
                else:
                    await Responder(send).json(200, self.openapi.body(scope.get("root_path", "")),
                                               [(b"content-type", b"application/json")])
            else:
                await self.route(scope, receive, send, path)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        # websockets: not served; the server closes the connection.

    async def route(self, scope: MutableMapping[str, Any], receive: Receive, send: Send, path: str) -> None:
        """A plugin's route (``comox_routes``), as Starlette's Router would
        serve it but with the gateway's own errors: an unknown path is 404 and
        a known one with the wrong method 405, in OpenAI's format (Starlette
        would answer plain text, or redirect to the other slash form)."""
        router = self.router
        allowed: set[str] = set()
        if router is not None:
            scope.setdefault("router", router)
            for route in router.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await route.handle(scope, receive, send)
                    return
                if match is Match.PARTIAL:
                    allowed |= getattr(route, "methods", None) or set()
        rid = request_id_from(None).encode()
        if allowed:
            methods = ", ".join(sorted(allowed))
            await Responder(send).error(MethodNotAllowed(f"{scope['method']} is not allowed on {path}; use {methods}"),
                                        rid, [(b"allow", methods.encode())])
        else:
            await Responder(send).error(NotFound(f"unknown path {path}"), rid)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.startup()
                except Exception as exc:
                    log.exception("comox startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                if self.tune_gc:
                    tune_gc()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def framing_error(headers: list[tuple[bytes, bytes]]) -> InvalidRequest | None:
    """Refuse a request whose length is told two ways: ``Content-Length`` and
    ``Transfer-Encoding`` together, or two ``Content-Length`` headers. Behind
    a proxy that reads the other one, the rest of the connection would be
    read as another request (request smuggling). uvicorn's httptools parser
    refuses both itself; its h11 parser passes them on."""
    names = dict(headers)  # built in C: the usual request has no name twice and no transfer-encoding
    if len(names) == len(headers) and b"transfer-encoding" not in names:
        return None
    lengths = 0
    chunked = False
    for name, _ in headers:
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            chunked = True
    if lengths > 1:
        return InvalidRequest("more than one content-length header", code="invalid_framing")
    if lengths and chunked:
        return InvalidRequest("content-length and transfer-encoding together", code="invalid_framing")
    return None


def create_app(settings: Settings | str | os.PathLike[str] | None = None, *, plugins: Iterable[object] = ()) -> ComoxApp:
    """The Comox ASGI app. With no ``settings`` it reads ``COMOX_CONFIG``.

    ``plugins`` registers extra plugin objects besides the entry-point ones.
    """
    return ComoxApp(build_gateway(settings, plugins=plugins))
