"""Errors that Comox turns into OpenAI-format responses.

Every error a client can see is a :class:`ComoxError`; its status, ``type`` and
``code`` are those the OpenAI SDKs map to their own exception classes::

    ComoxError
    ├── InvalidRequest             400 invalid_request_error
    │   └── BodyTooLarge           413
    ├── AuthenticationFailed       401 authentication_error
    ├── PermissionDenied           403 permission_error
    ├── NotFound                   404 invalid_request_error
    │   └── ModelNotFound          404 model_not_found
    ├── MethodNotAllowed           405 invalid_request_error
    ├── RateLimited                429 rate_limit_error (retry-after)
    ├── UpstreamError              502 upstream_error
    │   └── BackendUnavailable     502 (connect error / timeout: retried elsewhere)
    └── NoBackendAvailable         503 service_unavailable (retry-after)

``ConfigError`` is separate: it stops startup and never reaches a client.
"""

from __future__ import annotations

from typing import Any

import math

import orjson

__all__ = [
    "ComoxError",
    "InvalidRequest",
    "BodyTooLarge",
    "AuthenticationFailed",
    "PermissionDenied",
    "NotFound",
    "ModelNotFound",
    "MethodNotAllowed",
    "RateLimited",
    "UpstreamError",
    "BackendUnavailable",
    "NoBackendAvailable",
    "ConfigError",
]


class ComoxError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        # A wait that would never end (more than a limit ever holds) is no
        # wait worth announcing: no header, rather than a crash on round(inf).
        if self.retry_after is not None and math.isfinite(self.retry_after):
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        return headers


class InvalidRequest(ComoxError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class AuthenticationFailed(ComoxError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ComoxError):
    status = 403
    type = "permission_error"


class NotFound(ComoxError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ComoxError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(ComoxError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ComoxError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class BackendUnavailable(UpstreamError):
    """Raised by a backend that could not be reached before its first byte."""

    code = "backend_unavailable"


class NoBackendAvailable(ComoxError):
    status = 503
    type = "service_unavailable"
    code = "no_backend_available"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the reason."""
