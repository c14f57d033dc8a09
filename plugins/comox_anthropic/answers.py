"""Reading an upstream's error answer, for either direction."""

from __future__ import annotations

from typing import Any

import orjson

import comox

__all__ = ["error_json"]


async def error_json(response: comox.BackendResponse) -> Any:
    """The parsed body of an error answer — read whole when it came with an
    event-stream content type — or None when it is not JSON. The response is
    closed."""
    try:
        raw = response.body
        if raw is None:
            assert response.stream is not None
            raw = (response.head or b"") + b"".join([piece async for piece in response.stream])
    finally:
        await response.aclose()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
