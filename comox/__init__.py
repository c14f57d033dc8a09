"""Comox: one OpenAI-compatible endpoint in front of a self-hosted inference fleet.

Everything a plugin needs is here, behind ``__all__``: the hook marker, the
backend protocol and its optional capabilities, the HTTP backend to subclass,
the routing-policy protocols and the fleet views a policy reads, the request
and principal types, the errors, and shared helpers. First-party plugins
import nothing else from Comox.
"""

from .app import ComoxApp, build_gateway, create_app
from .backends import (
    Backend,
    BackendResponse,
    SupportsContinuation,
    SupportsHealthCheck,
    SupportsNativeAPI,
    SupportsSlotPinning,
    SupportsStartup,
)
from .config import load_settings
from .errors import (
    AuthenticationFailed,
    BackendUnavailable,
    BodyTooLarge,
    ComoxError,
    ConfigError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NoBackendAvailable,
    NotFound,
    PermissionDenied,
    RateLimited,
    UpstreamError,
)
from .fleet import FAIL, LOADING, OK, HealthReport, LoadReport, cheaper, power_of_two, request_size
from .gateway import Gateway
from .hookspecs import hookimpl
from .http_backend import HTTPBackend, HTTPBackendSettings, instrument_pyreqwest, instrument_transports
from .inbound import InboundAPI
from .middleware import ComoxMiddleware
from .prometheus import parse_prometheus
from .request import ANONYMOUS, DeferredBody, GatewayRequest, Principal, check_number
from .settings import BackendSettings, Settings
from .shared_state import Add, Bucket, MemoryState, SharedState, Take
from .transport import AiohttpTransport, HttpxTransport, Transport, UpstreamUnreachable
from .usage import Usage
from .version import __version__
from .views import BackendView, GroupView, ObservesUsage, ReportsStats, RoutingPolicy

__all__ = [
    # the app
    "ComoxApp",
    "ComoxMiddleware",
    "Gateway",
    "Settings",
    "build_gateway",
    "create_app",
    "load_settings",
    "__version__",
    # writing plugins
    "hookimpl",
    # backends
    "Backend",
    "BackendResponse",
    "BackendSettings",
    "SupportsStartup",
    "SupportsHealthCheck",
    "SupportsSlotPinning",
    "SupportsNativeAPI",
    "SupportsContinuation",
    "HealthReport",
    "LoadReport",
    "OK",
    "LOADING",
    "FAIL",
    "HTTPBackend",
    "HTTPBackendSettings",
    "Transport",
    "AiohttpTransport",
    "HttpxTransport",
    "instrument_pyreqwest",
    "instrument_transports",
    "UpstreamUnreachable",
    # routing policies
    "RoutingPolicy",
    "ObservesUsage",
    "ReportsStats",
    "BackendView",
    "GroupView",
    "Usage",
    "cheaper",
    "power_of_two",
    "request_size",
    # other APIs
    "InboundAPI",
    "DeferredBody",
    # shared state
    "SharedState",
    "MemoryState",
    "Bucket",
    "Take",
    "Add",
    # requests
    "GatewayRequest",
    "Principal",
    "ANONYMOUS",
    "check_number",
    # errors
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
    # helpers
    "parse_prometheus",
]
