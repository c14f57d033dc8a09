"""The admin API, served by the Comox app (not by ``ComoxMiddleware``):

* ``GET  /admin/backends`` — every backend: state, in flight, EWMA latency,
  measured tokens/s, ejections, last error, reported load; and per model
  group: backends available, panic mode, requests queued, policy statistics.
* ``POST /admin/backends/{name}/drain`` — no new requests; in-flight ones finish.
* ``POST /admin/backends/{name}/undrain``

Off unless ``COMOX_ADMIN_KEY`` is set when the app is built (then these paths
are 404 like any unknown one). Callers send it as ``Authorization: Bearer
<key>``; it is compared in constant time.
"""

from __future__ import annotations

import hmac
import os

import orjson
from starlette.responses import Response
from starlette.routing import Route

import comox
from comox.errors import AuthenticationFailed, ComoxError, NotFound

__all__ = ["admin_routes"]

ENV = "COMOX_ADMIN_KEY"


def _json(status: int, obj, headers=None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error(exc: ComoxError) -> Response:
    return Response(exc.to_bytes(), status_code=exc.status, headers=dict((k.decode(), v.decode()) for k, v in exc.headers()))


def admin_routes(gateway, key: str) -> list[Route]:
    expected = key.encode()

    def authorized(request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Always compare, so timing does not tell a wrong scheme from a wrong key.
        ok = hmac.compare_digest(token.strip().encode("utf-8", "replace"), expected)
        return ok and scheme.lower() == "bearer"

    def guarded(handler):
        async def endpoint(request):
            if not authorized(request):
                response = _error(AuthenticationFailed("a valid admin key is required (Authorization: Bearer <COMOX_ADMIN_KEY>)"))
                response.headers["www-authenticate"] = "Bearer"
                return response
            try:
                return await handler(request)
            except ComoxError as exc:
                return _error(exc)

        return endpoint

    async def backends(request):
        data = []
        for group in gateway.groups.values():
            for state in group.backends:
                entry = state.snapshot()
                entry["model"] = group.name
                entry["policy"] = group.settings.policy if group.settings is not None else None
                data.append(entry)
        groups = {}
        for group in gateway.groups.values():
            stats = getattr(group.policy, "stats", None)
            groups[group.name] = {
                "policy": group.settings.policy if group.settings is not None else None,
                "available": len(group.available),
                "panic": group.panic,
                "queued": len(group.waiters),
                "policy_stats": stats() if stats is not None else None,
            }
        return _json(200, {"object": "list", "data": data, "groups": groups})

    def setter(draining: bool):
        async def handler(request):
            name = request.path_params["name"]
            state = gateway.backend(name)
            if state is None:
                raise NotFound(f"no backend named {name!r}")
            state.set_draining(draining)
            return _json(200, state.snapshot())

        return handler

    return [
        Route("/admin/backends", guarded(backends), methods=["GET"]),
        Route("/admin/backends/{name:path}/drain", guarded(setter(True)), methods=["POST"]),
        Route("/admin/backends/{name:path}/undrain", guarded(setter(False)), methods=["POST"]),
    ]


@comox.hookimpl
def comox_routes(gateway):
    key = os.environ.get(ENV)
    if not key:
        return None
    return admin_routes(gateway, key)
