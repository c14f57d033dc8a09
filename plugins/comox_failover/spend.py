"""``GET /admin/spend``: cloud spend and reservations against every budget
(the day's, the month's, each key's), behind the admin key (the environment
variable ``[plugins.admin] key_env`` names, ``COMOX_ADMIN_KEY`` by default;
without it the route does not exist)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comox import AuthenticationFailed, Gateway

from .ledger import Ledger

__all__ = ["spend_routes", "spend_openapi"]


def _admin_key(gateway: Gateway) -> str | None:
    env = getattr(gateway.plugin_settings("admin"), "key_env", None) or "COMOX_ADMIN_KEY"
    return os.environ.get(env)


def spend_openapi(gateway: Gateway) -> dict[str, Any] | None:
    """``GET /admin/spend`` in ``GET /openapi.json``, when it is served."""
    if not _admin_key(gateway):
        return None
    row = {"type": "object", "required": ["budget", "period", "spent_usd"],
           "properties": {"budget": {"type": "string"}, "period": {"type": "string"}, "spent_usd": {"type": "number"}}}
    report = {"type": "object", "required": ["object", "currency", "budgets"],
              "properties": {"object": {"const": "spend"}, "currency": {"const": "USD"},
                             "budgets": {"type": "array", "items": row}}}
    return {
        "paths": {"/admin/spend": {"get": {
            "tags": ["Admin"], "summary": "Cloud spend and reservations against every budget",
            "security": [{"AdminKey": []}],
            "responses": {"200": {"description": "The budgets", "content": {"application/json": {"schema": report}}},
                          "4XX": {"$ref": "#/components/responses/Error"}},
        }}},
        "components": {"securitySchemes": {"AdminKey": {
            "type": "http", "scheme": "bearer", "description": "The admin key (the variable [plugins.admin] key_env names)."}}},
    }


def spend_routes(gateway: Gateway, ledger: Callable[[], Ledger]) -> list[Route] | None:
    key = _admin_key(gateway)
    if not key:
        return None
    expected = key.encode()

    async def spend(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compare whatever came, so timing tells nothing about the scheme.
        if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), expected) or scheme.lower() != "bearer":
            error = AuthenticationFailed("a valid admin key is required (Authorization: Bearer <admin key>)")
            headers = {name.decode(): value.decode() for name, value in error.headers()}
            return Response(error.to_bytes(), status_code=401, headers={**headers, "www-authenticate": "Bearer"})
        return Response(orjson.dumps(await ledger().report()), media_type="application/json")

    return [Route("/admin/spend", spend, methods=["GET"])]
