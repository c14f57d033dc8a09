import comox


def test_all_is_the_public_api():
    assert sorted(comox.__all__) == sorted([
        "ANONYMOUS", "AuthenticationFailed", "Backend", "BackendResponse", "BackendSettings",
        "BackendUnavailable", "BodyTooLarge", "ComoxApp", "ComoxError", "ComoxMiddleware",
        "ConfigError", "Gateway", "GatewayRequest", "InvalidRequest", "ModelNotFound",
        "NoBackendAvailable", "NotFound", "PermissionDenied", "Principal", "RateLimited",
        "Settings", "UpstreamError", "build_gateway", "check_number", "create_app", "hookimpl", "load_settings",
    ])
    for name in comox.__all__:
        assert getattr(comox, name) is not None


def test_error_hierarchy_maps_to_openai_statuses():
    assert issubclass(comox.BodyTooLarge, comox.InvalidRequest)
    assert issubclass(comox.ModelNotFound, comox.NotFound)
    assert issubclass(comox.BackendUnavailable, comox.UpstreamError)
    statuses = {cls.__name__: cls.status for cls in (
        comox.InvalidRequest, comox.BodyTooLarge, comox.AuthenticationFailed, comox.PermissionDenied,
        comox.ModelNotFound, comox.RateLimited, comox.UpstreamError, comox.NoBackendAvailable)}
    assert statuses == {"InvalidRequest": 400, "BodyTooLarge": 413, "AuthenticationFailed": 401, "PermissionDenied": 403,
                        "ModelNotFound": 404, "RateLimited": 429, "UpstreamError": 502, "NoBackendAvailable": 503}
    error = comox.RateLimited("slow down", retry_after=2.4)
    assert error.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    assert (b"retry-after", b"2") in error.headers()
