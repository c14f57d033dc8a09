"""``ComoxMiddleware``: serve the OpenAI routes inside a host app.

``app.add_middleware(ComoxMiddleware, settings=...)`` answers ``/v1/...`` and
passes every other path, and every non-HTTP scope, to the host app untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from typing import Any

from .app import build_gateway, framing_error
from .asgi_io import Message, Receive, Responder, Send, route_path
from .pipeline import serve_api
from .request import request_id_from
from .settings import Settings

__all__ = ["ComoxMiddleware"]


class ComoxMiddleware:
    def __init__(self, app: Any, settings: Settings | str | os.PathLike[str] | None = None, *, plugins: Iterable[object] = ()):
        self.app = app
        self.gateway = build_gateway(settings, plugins=plugins)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = route_path(scope)
            if path.startswith("/v1/"):
                refused = framing_error(scope["headers"])
                if refused is not None:
                    await Responder(send).error(refused, request_id_from(None).encode(), [(b"connection", b"close")])
                else:
                    await serve_api(self.gateway, scope, receive, send, path)
                return
        elif scope["type"] == "lifespan":
            receive = self._lifespan_receive(receive)
        await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        # Start and stop the gateway alongside the host app, without taking
        # over the host's lifespan protocol.
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.gateway.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.aclose()
            return message

        return wrapped
