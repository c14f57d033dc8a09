"""The public plugin API: what ``comox`` exports, and that first-party
plugins need nothing else (which proves a third party can write any of them)."""

import ast
from pathlib import Path

import comox

ROOT = Path(__file__).parent.parent
PUBLIC = {
    # the app
    "ComoxApp", "ComoxMiddleware", "Gateway", "Settings", "build_gateway", "create_app", "load_settings", "__version__",
    # plugins and backends
    "hookimpl", "Backend", "BackendResponse", "BackendSettings", "SupportsStartup", "SupportsHealthCheck",
    "SupportsSlotPinning", "SupportsNativeAPI", "SupportsContinuation", "InboundAPI", "HealthReport", "LoadReport", "OK", "LOADING", "FAIL", "HTTPBackend", "HTTPBackendSettings",
    "Transport", "AiohttpTransport", "HttpxTransport", "UpstreamUnreachable", "instrument_pyreqwest", "instrument_transports",
    # routing policies
    "RoutingPolicy", "ObservesUsage", "ReportsStats", "BackendView", "GroupView", "Usage", "cheaper", "power_of_two",
    "request_size",
    # shared state
    "SharedState", "MemoryState", "Bucket", "Take", "Add",
    # shared state
    "SharedState", "MemoryState", "Bucket", "Take", "Add",
    # requests
    "GatewayRequest", "Principal", "ANONYMOUS", "check_number", "DeferredBody",
    # errors
    "ComoxError", "InvalidRequest", "BodyTooLarge", "AuthenticationFailed", "PermissionDenied", "NotFound",
    "ModelNotFound", "MethodNotAllowed", "RateLimited", "UpstreamError", "BackendUnavailable", "NoBackendAvailable",
    "ConfigError",
    # helpers
    "parse_prometheus",
}


def test_all_is_the_public_api():
    assert sorted(comox.__all__) == sorted(PUBLIC)
    assert len(comox.__all__) == len(set(comox.__all__))
    for name in comox.__all__:
        assert getattr(comox, name) is not None


def test_the_package_is_typed():
    assert (ROOT / "comox" / "py.typed").is_file()


def comox_imports(path: Path) -> list[str]:
    """Every ``comox`` module (or other plugin) a file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0].startswith("comox")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0].startswith("comox"):
            found.append(node.module if node.module != "comox" else "comox")
            if node.module == "comox":
                found += [f"comox.{alias.name}" for alias in node.names if alias.name not in comox.__all__]
    return found


def test_first_party_plugins_import_only_the_public_api():
    plugins = sorted((ROOT / "plugins").glob("comox_*"))
    assert len(plugins) >= 10
    for package in plugins:
        own = package.name
        for path in package.rglob("*.py"):
            for name in comox_imports(path):
                top = name.split(".")[0]
                assert name == "comox" or top == own, f"{path.relative_to(ROOT)} imports {name}: only `comox` (its __all__) is public"


def test_the_check_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from comox.fleet import BackendState\nfrom comox import ModelGroup\nimport comox_llamacpp\n")
    assert comox_imports(bad) == ["comox.fleet", "comox", "comox.ModelGroup", "comox_llamacpp"]


def test_error_hierarchy_maps_to_openai_statuses():
    assert issubclass(comox.BodyTooLarge, comox.InvalidRequest)
    assert issubclass(comox.ModelNotFound, comox.NotFound)
    assert issubclass(comox.BackendUnavailable, comox.UpstreamError)
    statuses = {cls.__name__: cls.status for cls in (
        comox.InvalidRequest, comox.BodyTooLarge, comox.AuthenticationFailed, comox.PermissionDenied,
        comox.ModelNotFound, comox.MethodNotAllowed, comox.RateLimited, comox.UpstreamError, comox.NoBackendAvailable)}
    assert statuses == {"InvalidRequest": 400, "BodyTooLarge": 413, "AuthenticationFailed": 401, "PermissionDenied": 403,
                        "ModelNotFound": 404, "MethodNotAllowed": 405, "RateLimited": 429, "UpstreamError": 502,
                        "NoBackendAvailable": 503}
    error = comox.RateLimited("slow down", retry_after=2.4)
    assert error.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    assert (b"retry-after", b"2") in error.headers()


def test_an_endless_retry_after_is_left_out_not_a_crash():
    assert not any(name == b"retry-after" for name, _ in comox.RateLimited("never", retry_after=float("inf")).headers())
    assert (b"retry-after", b"1") in comox.RateLimited("soon", retry_after=0.2).headers()
