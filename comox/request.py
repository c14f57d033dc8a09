"""The parsed API request that flows through the hook chain, and its validation."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import InvalidRequest

__all__ = ["GatewayRequest", "Principal", "ANONYMOUS", "ENDPOINTS", "check_number", "parse_body"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as decided by ``comox_authenticate``."""

    key_id: str | None = None
    allowed_models: frozenset[str] | None = None  # None: every model
    local_only: bool = False
    limits: dict[str, Any] = field(default_factory=dict)


ANONYMOUS = Principal()

# API path (relative to the mount point) → endpoint name used in hooks and upstream paths.
ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}

# Fields that would let a client redirect the upstream call or inject credentials.
FORBIDDEN_FIELDS = ("api_base", "base_url", "api_key", "extra_headers", "api_version", "organization")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(header: bytes | None) -> str:
    """The client's ``x-request-id`` if it is sane, else a fresh one."""
    if header:
        try:
            value = header.decode("ascii")
        except UnicodeDecodeError:
            value = ""
        if _REQUEST_ID.match(value):
            return value
    return os.urandom(16).hex()  # 128 random bits like uuid4().hex, at a fifth of its cost


class GatewayRequest:
    """One API request. Plugins read ``json`` and may replace it with ``set_json``;
    the raw body is sent upstream unchanged unless someone did."""

    __slots__ = (
        "id", "endpoint", "path", "headers", "raw", "json", "model", "stream",
        "principal", "state", "sent_at", "answered_at", "_upstream_cache",
    )

    def __init__(self, *, id: str, endpoint: str, path: str, headers: list[tuple[bytes, bytes]], raw: bytes, json: dict):
        self.id = id
        self.endpoint = endpoint
        self.path = path
        self.headers = headers
        self.raw = raw
        self.json = json
        self.model: str = json["model"]
        self.stream: bool = bool(json.get("stream", False))
        self.principal: Principal = ANONYMOUS
        self.state: dict[str, Any] = {}  # per-request scratch space for plugins
        # time.perf_counter() when the backend that answered was sent the request,
        # and when its status and headers (and a JSON body) had come back.
        self.sent_at = 0.0
        self.answered_at = 0.0
        self._upstream_cache: dict[str | None, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def set_json(self, body: dict) -> None:
        """Replace the body; it will be re-serialised for the upstream."""
        self.json = body
        self.raw = orjson.dumps(body)
        self.stream = bool(body.get("stream", False))
        self._upstream_cache = None

    def body_for(self, upstream_model: str | None) -> bytes:
        """The bytes to send to a backend that calls the model ``upstream_model``
        (``None``: keep the client's name). Re-serialised only when it differs."""
        if upstream_model is None or upstream_model == self.model:
            return self.raw
        cache = self._upstream_cache
        if cache is None:
            cache = self._upstream_cache = {}
        body = cache.get(upstream_model)
        if body is None:
            body = cache[upstream_model] = orjson.dumps({**self.json, "model": upstream_model})
        return body


_FORBIDDEN = frozenset(FORBIDDEN_FIELDS)
# Numeric fields checked when present: (key, low, high, integer only).
_NUMBERS = (
    ("max_tokens", 1, 1_000_000, True),
    ("max_completion_tokens", 1, 1_000_000, True),
    ("n", 1, 128, True),
    ("temperature", 0, 2, False),
    ("top_p", 0, 1, False),
)


def check_number(body: dict, key: str, low: float, high: float, *, integer: bool = False) -> None:
    """Raise InvalidRequest (400, ``param=key``) unless ``body[key]`` is absent or a
    number (an integer, with ``integer``) between ``low`` and ``high``."""
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"'{key}' must be {kind}", param=key, code="invalid_type")
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidRequest(f"'{key}' must be between {low:g} and {high:g}, got {value!r}", param=key, code="invalid_value")


def parse_body(endpoint: str, raw: bytes) -> dict:
    """Parse and check an API body. Raises :class:`InvalidRequest` (400)."""
    try:
        body = orjson.loads(raw)  # rejects NaN/Infinity and nesting deeper than 1024
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    if not _FORBIDDEN.isdisjoint(body):  # one C-level check in the common case
        key = next(key for key in FORBIDDEN_FIELDS if key in body)
        raise InvalidRequest(f"'{key}' is not allowed: the gateway chooses the upstream", param=key, code="forbidden_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model", code="missing_model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", param="messages", code="invalid_messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"'messages[{i}]' must be an object with a 'role'", param=f"messages[{i}]", code="invalid_messages")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest("'prompt' must be a string or an array", param="prompt", code="invalid_prompt")
    elif endpoint == "embeddings":
        value = body.get("input")
        if not isinstance(value, (str, list)) or not value:
            raise InvalidRequest("'input' must be a non-empty string or array", param="input", code="invalid_input")
    for key, low, high, integer in _NUMBERS:
        value = body.get(key)
        if value is None:
            continue
        kind = type(value)
        # The common case in one step (NaN and ±inf fail the comparison, bool is
        # not int here); check_number words the error for anything else.
        if (kind is int or (kind is float and not integer)) and low <= value <= high:
            continue
        check_number(body, key, low, high, integer=integer)
    return body
