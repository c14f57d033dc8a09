"""The fleet page's routes, all under ``/dashboard``:

* ``GET /dashboard`` — the page (with the admin key as a bearer header, or a
  session cookie); a browser without either is sent to the login form, a
  client that sent a wrong ``Authorization`` gets 401.
* ``GET|POST /dashboard/login``, ``POST /dashboard/logout`` — the form, the
  session cookie (HttpOnly, SameSite=Strict, Path=/dashboard; Secure over
  https), its end.
* ``GET /dashboard/events`` — server-sent events: a message every second with
  the fleet, the samples and fleet events the browser has not seen yet, and
  cloud spend. Each stream ends after ``STREAM_S`` and the browser reconnects
  with ``Last-Event-ID``, so nothing is lost, a server shutting down waits
  for no stream for long, and a session that ended is noticed.
* ``GET /dashboard/static/…`` — the page's script and style sheet.

Every page forbids loading anything from elsewhere (Content-Security-Policy).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from comox import AuthenticationFailed, Gateway

from .history import HISTORY_S, INTERVAL_S, EventRing, Samples, clip
from .session import COOKIE, SESSION_S, Sessions

__all__ = ["Dashboard", "STREAM_S"]

log = logging.getLogger("comox.dashboard")

STREAM_S = 15.0
SPEND_EVERY_S = 5.0
MAX_FORM_BYTES = 4096
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
BACKEND_FIELDS = ("name", "type", "state", "inflight", "max_concurrency", "ewma_latency_ms", "decode_tokens_per_s",
                  "prefill_tokens_per_s", "requests", "failures", "ejections", "ejected_for_s")
SPEND_FIELDS = ("budget", "period", "key_id", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd")


def _asset(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


def fleet(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The model groups and their backends, as the page shows them: named
    fields only (no reported load, no health-check detail besides the error)."""
    groups = {name: {"name": name, "policy": info.get("policy"), "available": info.get("available"),
                     "panic": info.get("panic"), "queued": info.get("queued"), "backends": []}
              for name, info in snapshot["groups"].items()}
    for backend in snapshot["data"]:
        row = {field: backend.get(field) for field in BACKEND_FIELDS}
        row["last_error"] = clip(backend["last_error"]) if backend.get("last_error") else None
        group = groups.setdefault(backend["model"], {"name": backend["model"], "backends": []})
        group["backends"].append(row)
    return list(groups.values())


def _resume(last_event_id: str, instance: str) -> tuple[int, int]:
    """The sample and event numbers a reconnecting browser has seen; (0, 0)
    when it saw another process's (or nothing)."""
    parts = last_event_id.split(".")
    if len(parts) == 3 and parts[0] == instance and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return 0, 0


class Dashboard:
    """The page of one gateway."""

    def __init__(self, gateway: Gateway, key: str, samples: Samples, events: EventRing):
        self.gateway = gateway
        self.sessions = Sessions(key, gateway.shared_state)
        self.samples = samples
        self.events = events
        self._authorization = b"Bearer " + key.encode()
        self._page = _asset("page.html")
        self._login = _asset("login.html")
        self._static = {name: _asset(name) for name in STATIC}
        self._spend: dict[str, Any] | None = None
        self._spend_at = float("-inf")

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self.page, methods=["GET"]),
            Route("/dashboard/login", self.login_form, methods=["GET"]),
            Route("/dashboard/login", self.login, methods=["POST"]),
            Route("/dashboard/logout", self.logout, methods=["POST"]),
            Route("/dashboard/events", self.stream, methods=["GET"]),
            Route("/dashboard/static/{name}", self.static, methods=["GET"]),
        ]

    # -- who --------------------------------------------------------------

    async def authorized(self, request: Request) -> bool:
        if self.sessions.bearer(request.headers.get("authorization", "")):
            return True
        token = request.cookies.get(COOKIE)
        return token is not None and await self.sessions.valid(token)

    @staticmethod
    def _refused() -> Response:
        error = AuthenticationFailed("log in at /dashboard/login, or send Authorization: Bearer <admin key>")
        headers = {name.decode(): value.decode() for name, value in error.headers()}
        return Response(error.to_bytes(), status_code=401, headers={**headers, **HEADERS, "www-authenticate": "Bearer"})

    @staticmethod
    def _base(request: Request) -> str:
        return str(request.scope.get("root_path", "")) + "/dashboard"

    def _html(self, request: Request, template: str, status: int = 200, error: str = "",
              headers: dict[str, str] | None = None) -> Response:
        text = template.replace("{{base}}", html.escape(self._base(request)))
        text = text.replace("{{error}}", f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "")
        return Response(text, status_code=status, media_type="text/html; charset=utf-8", headers={**HEADERS, **(headers or {})})

    # -- pages ------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        if await self.authorized(request):
            return self._html(request, self._page)
        if "authorization" in request.headers:
            return self._refused()
        return RedirectResponse(self._base(request) + "/login", status_code=303, headers=HEADERS)

    async def login_form(self, request: Request) -> Response:
        return self._html(request, self._login)

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client is not None else "-"
        wait = await self.sessions.may_try(client)
        if wait:
            return self._html(request, self._login, 429, f"Too many tries: wait {wait:.0f} s.", {"retry-after": f"{wait:.0f}"})
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                return self._html(request, self._login, 413, "That is not an admin key.")
        key = parse_qs(raw.decode("utf-8", "replace")).get("key", [""])[0]
        if not self.sessions.is_key(key):
            return self._html(request, self._login, 401, "Wrong key.")
        response = RedirectResponse(self._base(request), status_code=303, headers=HEADERS)
        response.set_cookie(COOKIE, self.sessions.issue(), max_age=SESSION_S, path=self._base(request), httponly=True,
                            samesite="strict", secure=request.scope.get("scheme") == "https")
        return response

    async def logout(self, request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        if token is not None:
            await self.sessions.revoke(token)
        response = RedirectResponse(self._base(request) + "/login", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path=self._base(request), httponly=True, samesite="strict",
                               secure=request.scope.get("scheme") == "https")
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response(b"", status_code=404, headers=HEADERS)
        return Response(self._static[name], media_type=STATIC[name], headers={**HEADERS, "cache-control": "no-cache"})

    # -- the stream -------------------------------------------------------

    async def stream(self, request: Request) -> Response:
        if not await self.authorized(request):
            return self._refused()
        messages = self._messages(request.scope, request.headers.get("last-event-id", ""))
        return StreamingResponse(messages, media_type="text/event-stream", headers={**HEADERS, "x-accel-buffering": "no"})

    async def _messages(self, scope: MutableMapping[str, Any], last_event_id: str) -> AsyncIterator[bytes]:
        instance = self.samples.instance
        sample_seq, event_seq = _resume(last_event_id, instance)
        reset = sample_seq == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_S
        yield b"retry: 1000\n\n"
        while True:
            samples = self.samples.since(sample_seq)
            events = self.events.since(event_seq)
            sample_seq = samples[-1]["seq"] if samples else sample_seq
            event_seq = events[-1]["seq"] if events else event_seq
            message = {"reset": reset, "now": round(time.time(), 3), "interval_s": INTERVAL_S, "history_s": HISTORY_S,
                       "groups": fleet(self.gateway.snapshot()), "samples": samples, "events": events,
                       "spend": await self.spend(scope)}
            yield f"id: {instance}.{sample_seq}.{event_seq}\ndata: ".encode() + orjson.dumps(message) + b"\n\n"
            reset = False
            if loop.time() >= deadline:
                return
            await self.samples.next(2 * INTERVAL_S)

    # -- cloud spend ------------------------------------------------------

    async def spend(self, scope: MutableMapping[str, Any]) -> dict[str, Any] | None:
        """What ``GET /admin/spend`` (the failover plugin's) answers, at most
        every ``SPEND_EVERY_S``; None without that route."""
        now = time.monotonic()
        if now - self._spend_at < SPEND_EVERY_S:
            return self._spend
        self._spend_at = now
        try:
            status, body = await self._admin_get(scope, "/admin/spend")
            data = orjson.loads(body) if status == 200 else None
        except Exception as exc:
            log.warning("the fleet page could not read /admin/spend: %r", exc)
            data = None
        if isinstance(data, dict) and data.get("object") == "spend" and isinstance(data.get("budgets"), list):
            budgets = [{field: row.get(field) for field in SPEND_FIELDS} for row in data["budgets"] if isinstance(row, dict)]
            self._spend = {"currency": data.get("currency", "USD"), "budgets": budgets}
        else:
            self._spend = None
        return self._spend

    async def _admin_get(self, scope: MutableMapping[str, Any], path: str) -> tuple[int, bytes]:
        """GET ``path`` of this app with the admin key, in process: through
        the router that served this request, as a request from the same
        client to that path would go."""
        base = scope["path"][: -len("/dashboard/events")]
        sub = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": scope.get("scheme", "http"), "server": scope.get("server"), "client": scope.get("client"),
            "path": base + path, "raw_path": (base + path).encode(), "query_string": b"",
            "root_path": scope.get("app_root_path", scope.get("root_path", "")),
            "headers": [(b"authorization", self._authorization)],
        }
        status = 0
        body = bytearray()
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if asked:
                await asyncio.Event().wait()  # no disconnect until the answer is in
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        async with asyncio.timeout(5):
            await scope["router"](sub, receive, send)
        return status, bytes(body)
