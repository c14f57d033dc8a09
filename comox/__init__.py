"""Comox: one OpenAI-compatible endpoint in front of a self-hosted inference fleet."""

from .app import ComoxApp, build_gateway, create_app
from .backends import Backend, BackendResponse
from .errors import (
    AuthenticationFailed,
    BackendUnavailable,
    BodyTooLarge,
    ComoxError,
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    NoBackendAvailable,
    NotFound,
    PermissionDenied,
    RateLimited,
    UpstreamError,
)
from .gateway import Gateway
from .hookspecs import hookimpl
from .middleware import ComoxMiddleware
from .request import ANONYMOUS, GatewayRequest, Principal, check_number
from .settings import BackendSettings, Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "ANONYMOUS",
    "AuthenticationFailed",
    "Backend",
    "BackendResponse",
    "BackendSettings",
    "BackendUnavailable",
    "BodyTooLarge",
    "ComoxApp",
    "ComoxError",
    "ComoxMiddleware",
    "ConfigError",
    "Gateway",
    "GatewayRequest",
    "InvalidRequest",
    "ModelNotFound",
    "NoBackendAvailable",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "RateLimited",
    "Settings",
    "UpstreamError",
    "build_gateway",
    "check_number",
    "create_app",
    "hookimpl",
    "load_settings",
]
