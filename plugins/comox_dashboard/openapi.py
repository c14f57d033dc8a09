"""The fleet page's paths in ``GET /openapi.json`` (``comox_openapi``): HTML
pages, a login form, the live event stream and two static files, all behind
the admin key (a bearer header or the session cookie the login sets)."""

from __future__ import annotations

from typing import Any

from .routes import STATIC
from .session import COOKIE

__all__ = ["dashboard_openapi"]

Json = dict[str, Any]

_HTML = {"text/html": {"schema": {"type": "string"}}}
_ERROR = {"$ref": "#/components/responses/Error"}
_SECURED: list[Json] = [{"AdminKey": []}, {"DashboardSession": []}]


def _see_other(where: str) -> Json:
    return {"description": f"See {where}", "headers": {"location": {"schema": {"type": "string"}}}}


def dashboard_openapi() -> Json:
    tags = ["Dashboard"]
    form = {"type": "object", "properties": {"key": {"type": "string"}}}
    event = {"description": "Each event: the fleet, its recent samples and events, cloud spend (``data:`` JSON)",
             "type": "object", "properties": {"data": {"type": "string"}, "id": {"type": "string"}}}
    return {
        "paths": {
            "/dashboard": {"get": {
                "tags": tags, "summary": "The fleet page", "security": _SECURED,
                "responses": {"200": {"description": "The page", "content": _HTML},
                              "303": _see_other("the login form (not logged in)"), "401": _ERROR},
            }},
            "/dashboard/login": {
                "get": {"tags": tags, "summary": "The login form",
                        "responses": {"200": {"description": "The form", "content": _HTML}}},
                "post": {"tags": tags, "summary": "Log in with the admin key: a session cookie",
                         "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": form}}},
                         "responses": {"303": _see_other("the page (logged in)"),
                                       **{status: {"description": "The form again, saying why", "content": _HTML}
                                          for status in ("401", "413", "429")}}},
            },
            "/dashboard/logout": {"post": {
                "tags": tags, "summary": "End the session", "responses": {"303": _see_other("the login form")},
            }},
            "/dashboard/events": {"get": {
                "tags": tags, "summary": "The page's live updates (server-sent events)", "security": _SECURED,
                "responses": {"200": {"description": "Events", "content": {"text/event-stream": {"schema": event}}},
                              "401": _ERROR},
            }},
            "/dashboard/static/{name}": {"get": {
                "tags": tags, "summary": "The page's script and style",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": sorted(STATIC)}}],
                "responses": {"200": {"description": "The file", "content": {
                    media.split(";")[0]: {"schema": {"type": "string"}} for media in STATIC.values()}},
                    "404": {"description": "No such file"}},
            }},
        },
        "components": {"securitySchemes": {
            "AdminKey": {"type": "http", "scheme": "bearer",
                         "description": "The admin key (the variable [plugins.admin] key_env names)."},
            "DashboardSession": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                                 "description": "The session POST /dashboard/login sets."},
        }},
        "tags": [{"name": "Dashboard", "description": "The fleet page (behind the admin key)"}],
    }
