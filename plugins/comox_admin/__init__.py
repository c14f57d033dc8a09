"""The admin API, served by the Comox app (not by ``ComoxMiddleware``):

* ``GET  /admin/backends`` — every backend: state, in flight, EWMA latency,
  measured tokens/s, ejections, last error, reported load; and per model
  group: backends available, panic mode, requests queued, policy statistics.
* ``POST /admin/backends/{name}/drain`` — no new requests; in-flight ones finish.
* ``POST /admin/backends/{name}/undrain``

Off unless the environment variable named by ``[plugins.admin] key_env``
(default ``COMOX_ADMIN_KEY``) is set when the app is built (then these paths
are 404 like any unknown one). Callers send it as ``Authorization: Bearer
<key>``; it is compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import comox
from comox import AuthenticationFailed, ComoxError, Gateway

__all__ = ["AdminSettings", "admin_routes"]

Handler = Callable[[Request], Awaitable[Response]]


class AdminSettings(BaseModel):
    """``[plugins.admin]``"""

    model_config = ConfigDict(extra="forbid")

    key_env: str = "COMOX_ADMIN_KEY"
    """The environment variable holding the admin key; unset: no admin API."""


def _json(status: int, obj: Any) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _error(exc: ComoxError) -> Response:
    return Response(exc.to_bytes(), status_code=exc.status, headers={k.decode(): v.decode() for k, v in exc.headers()})


def admin_routes(gateway: Gateway, key: str) -> list[Route]:
    expected = key.encode()

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Always compare, so timing does not tell a wrong scheme from a wrong key.
        ok = hmac.compare_digest(token.strip().encode("utf-8", "replace"), expected)
        return ok and scheme.lower() == "bearer"

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                response = _error(AuthenticationFailed("a valid admin key is required (Authorization: Bearer <admin key>)"))
                response.headers["www-authenticate"] = "Bearer"
                return response
            try:
                return await handler(request)
            except ComoxError as exc:
                return _error(exc)

        return endpoint

    async def backends(request: Request) -> Response:
        return _json(200, gateway.snapshot())

    def setter(draining: bool) -> Handler:
        async def handler(request: Request) -> Response:
            return _json(200, gateway.set_draining(request.path_params["name"], draining))

        return handler

    return [
        Route("/admin/backends", guarded(backends), methods=["GET"]),
        Route("/admin/backends/{name:path}/drain", guarded(setter(True)), methods=["POST"]),
        Route("/admin/backends/{name:path}/undrain", guarded(setter(False)), methods=["POST"]),
    ]


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return AdminSettings


@comox.hookimpl
def comox_routes(gateway: Gateway) -> list[Route] | None:
    settings: AdminSettings = gateway.plugin_settings("admin")
    key = os.environ.get(settings.key_env)
    if not key:
        return None
    return admin_routes(gateway, key)


ADMIN_KEY_SCHEME = {"type": "http", "scheme": "bearer", "description": "The admin key (the variable [plugins.admin] key_env names)."}


def admin_openapi() -> dict[str, Any]:
    """The admin API in ``GET /openapi.json``."""
    secured: list[dict[str, list[str]]] = [{"AdminKey": []}]
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    errors = {"4XX": {"$ref": "#/components/responses/Error"}}
    backend = {"description": "The backend's snapshot", "content": {"application/json": {"schema": {
        "type": "object", "required": ["name", "state"], "properties": {"name": {"type": "string"}, "state": {"type": "string"}}}}}}
    setter = {"tags": ["Admin"], "security": secured, "parameters": name, "responses": {"200": backend, **errors}}
    return {
        "paths": {
            "/admin/backends": {"get": {
                "tags": ["Admin"], "summary": "Every backend and model group, as of now", "security": secured,
                "responses": {"200": {"description": "The fleet", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["data", "groups"],
                    "properties": {"data": {"type": "array"}, "groups": {"type": "object"}}}}}}, **errors},
            }},
            "/admin/backends/{name}/drain": {"post": {**setter, "summary": "No new requests; in-flight ones finish"}},
            "/admin/backends/{name}/undrain": {"post": {**setter, "summary": "Back in rotation"}},
        },
        "components": {"securitySchemes": {"AdminKey": ADMIN_KEY_SCHEME}},
        "tags": [{"name": "Admin", "description": "The admin API: only with the admin key"}],
    }


@comox.hookimpl
def comox_openapi(gateway: Gateway) -> dict[str, Any] | None:
    settings: AdminSettings = gateway.plugin_settings("admin")
    return admin_openapi() if os.environ.get(settings.key_env) else None
