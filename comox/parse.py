"""Reading what a request brings: its headers (:func:`first_header`) and its
JSON body, parsed and checked (:func:`parse_body`). Plain loops and checks on
plain values, run on every request: compiled with mypyc when Comox is
installed (``setup.py``; docs/deployment.md, "Compiled modules").
:mod:`comox.request` re-exports each name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import orjson

from .errors import InvalidRequest

__all__ = ["FORBIDDEN_FIELDS", "first_header", "parse_body", "check_number"]

# Fields that would let a client redirect the upstream call or inject credentials.
FORBIDDEN_FIELDS = ("api_base", "base_url", "api_key", "extra_headers", "api_version", "organization")


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` in ASGI ``headers``, or None."""
    try:
        return _first(cast("list[tuple[bytes, bytes]]", headers), name)
    except TypeError:  # compiled, the cast and the loop check for tuples in a list; ASGI allows any pairs
        pairs: Iterable[Any] = headers  # (Any: not checked to be tuples)
        return _first([(key, value) for key, value in pairs], name)


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    # A plain loop: timed, faster than building the names in C (map, index) for
    # 5 headers and for 15 (0.21 against 0.44-0.68 µs).
    for key, value in headers:
        if key == name:
            return value
    return None


_FORBIDDEN = frozenset(FORBIDDEN_FIELDS)
# Numeric fields checked when present: (key, low, high, integer only).
_NUMBERS = (
    ("max_tokens", 1, 1_000_000, True),
    ("max_completion_tokens", 1, 1_000_000, True),
    ("n", 1, 128, True),
    ("temperature", 0, 2, False),
    ("top_p", 0, 1, False),
)
_RANGES = {key: (low, high, integer) for key, low, high, integer in _NUMBERS}
_NUMBER_KEYS = frozenset(_RANGES)


def check_number(body: dict[str, Any], key: str, low: float, high: float, *, integer: bool = False) -> None:
    """Raise InvalidRequest (400, ``param=key``) unless ``body[key]`` is absent or a
    number (an integer, with ``integer``) between ``low`` and ``high`` (finite)."""
    value: Any = body.get(key)
    kind = type(value)
    # The common case in one step (NaN and ±inf fail the comparison; bool is not int here).
    if (kind is int or (kind is float and not integer)) and low <= value <= high:
        return
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        expected = "an integer" if integer else "a number"
        raise InvalidRequest(f"'{key}' must be {expected}", param=key, code="invalid_type")
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidRequest(f"'{key}' must be between {low:g} and {high:g}, got {value!r}", param=key, code="invalid_value")


def parse_body(endpoint: str, raw: bytes) -> dict[str, Any]:
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
        # Objects with a string role. A plain loop: timed, faster than the same
        # check in C (map, all) for one message to twenty.
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                i = messages.index(message)  # the first bad one: any equal to it is bad too
                raise InvalidRequest(f"'messages[{i}]' must be an object with a 'role'", param=f"messages[{i}]",
                                     code="invalid_messages")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest("'prompt' must be a string or an array", param="prompt", code="invalid_prompt")
    elif endpoint == "embeddings":
        value = body.get("input")
        if not isinstance(value, (str, list)) or not value:
            raise InvalidRequest("'input' must be a non-empty string or array", param="input", code="invalid_input")
    elif endpoint == "rerank":
        _check_rerank(body)
    for key in _NUMBER_KEYS.intersection(body):  # (the few a body has)
        value = body[key]
        if value is None:
            continue
        low, high, integer = _RANGES[key]
        kind = type(value)
        # check_number's first test, inlined (no call per field on every request).
        # Anything else: judged in _NUMBERS' order, so that the error names the
        # same field whatever the set's order.
        if (kind is int or (kind is float and not integer)) and low <= value <= high:
            continue
        for name, low, high, integer in _NUMBERS:
            check_number(body, name, low, high, integer=integer)
    return body


def _check_rerank(body: dict[str, Any]) -> None:
    """The Cohere/Jina rerank shape llama.cpp's server, vLLM and TEI serve:
    ``query``, ``documents`` (strings or ``{"text": ...}``), optional ``top_n``."""
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidRequest("'query' must be a non-empty string", param="query", code="invalid_query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise InvalidRequest("'documents' must be a non-empty array", param="documents", code="invalid_documents")
    for i, document in enumerate(documents):
        if not isinstance(document, str) and not (isinstance(document, dict) and isinstance(document.get("text"), str)):
            raise InvalidRequest(f"'documents[{i}]' must be a string or an object with a 'text' string",
                                 param=f"documents[{i}]", code="invalid_documents")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequest("'top_n' must be a positive integer", param="top_n", code="invalid_value")
