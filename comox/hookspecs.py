"""The hook specifications: the contract between Comox and its plugins.

Two kinds of hook:

* **Startup hooks** are ordinary pluggy calls made once, while the gateway is
  built: they register backend types, routing policies and extra routes, and
  run startup/shutdown code.
* **Per-request hooks** run for every API request. Their implementations may be
  ``async def``. Comox does not call them through pluggy: it takes, once at
  startup, each hook's implementations in pluggy's order (``tryfirst`` /
  ``trylast`` respected) and awaits them itself, so a hook with no
  implementation costs nothing. Hook wrappers are not supported on them.

Every hook is called with keyword arguments; an implementation declares only the
arguments it needs, so specs can grow new ones without breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .backends import BackendResponse
    from .gateway import Gateway
    from .request import GatewayRequest, Principal
    from .inbound import InboundAPI
    from .shared_state import SharedState

hookspec = pluggy.HookspecMarker("comox")
hookimpl = pluggy.HookimplMarker("comox")

# Hooks the core awaits itself on every request (see module docstring).
PER_REQUEST_HOOKS = (
    "comox_request_start",
    "comox_authenticate",
    "comox_admit",
    "comox_cache_lookup",
    "comox_attempt_start",
    "comox_attempt_done",
    "comox_failover",
    "comox_cache_store",
    "comox_request_done",
)


# -- startup hooks ---------------------------------------------------------


@hookspec
def comox_backend_types() -> dict[str, type]:  # type: ignore[empty-body]  # a spec: pluggy never runs its body
    """Register backend types.

    :return: a mapping of type name (what ``type = "..."`` in a backend's
        configuration refers to, and what ``comox plugins`` lists) to a class
        implementing :class:`comox.Backend`. The class is built as
        ``cls(settings)`` with the backend's validated settings (an instance of
        its ``settings_model`` attribute, a subclass of
        :class:`comox.BackendSettings`). Optional capabilities:
        :class:`comox.SupportsStartup`, :class:`comox.SupportsHealthCheck`,
        :class:`comox.SupportsSlotPinning`.

    Results of all plugins are merged; a name registered twice is a
    configuration error.
    """


@hookspec
def comox_routing_policies() -> dict[str, type]:  # type: ignore[empty-body]  # a spec: pluggy never runs its body
    """Register routing policies.

    :return: a mapping of policy name (``policy = "..."`` of a model group,
        as ``comox plugins`` lists it) to a class built as ``cls(group)``
        with a :class:`comox.GroupView` and implementing
        :class:`comox.RoutingPolicy` (optionally :class:`comox.ObservesUsage`
        and :class:`comox.ReportsStats`).

    Results of all plugins are merged; a name registered twice is a
    configuration error.
    """


@hookspec
def comox_plugin_settings() -> type[BaseModel]:  # type: ignore[empty-body]  # a spec: pluggy never runs its body
    """Declare the plugin's own settings.

    :return: a pydantic model class. The ``[plugins.<name>]`` table of the
        config (``<name>`` being the plugin's name, as ``comox plugins`` lists
        it) is validated with it when the gateway is built, with one-line
        errors naming the key (``plugins.admin.key_env: ...``); an absent table
        gives the model's defaults. Read the result with
        :meth:`comox.Gateway.plugin_settings`. A model with a class attribute
        ``section = "<table>"`` owns that top-level table instead.
    """


@hookspec
def comox_active(gateway: Gateway) -> bool | None:
    """Whether the plugin has work to do on this gateway's requests.

    Called once per plugin while the gateway is built, when
    ``gateway.settings`` and :meth:`comox.Gateway.plugin_settings` are ready
    (not yet its fleet or its routes). Return ``False`` when the config leaves
    the plugin nothing to do on requests (no group it would serve, no page
    that would show what it records): its per-request hooks are then left out
    of this gateway, and cost nothing. ``None`` or ``True``: they run. The
    declarative form of the same is an ``active`` attribute of the plugin's
    settings. Its other hooks (``comox_startup``, ``comox_routes``, …) run
    either way.

    :param gateway: the gateway being built.
    """


@hookspec
def comox_inbound_apis(gateway: Gateway) -> list[InboundAPI] | None:
    """Serve APIs besides OpenAI's (Anthropic's Messages, OpenAI's Responses,
    rerank …) through the same stages as the OpenAI endpoints.

    Called once while the gateway is built.

    :param gateway: the gateway being built.
    :return: :class:`comox.InboundAPI` objects; a path no inbound API
        matches is served as an OpenAI one.
    """


@hookspec(firstresult=True)
def comox_shared_state(gateway: Gateway) -> SharedState | None:
    """Provide the state every replica shares (rate-limit buckets, counters,
    cached values), instead of the default :class:`comox.MemoryState`.

    Called once while the gateway is built; the first non-``None`` result
    wins. The result is ``gateway.shared_state``; it is closed with the
    gateway (``aclose()``).

    :param gateway: the gateway being built (its settings and plugin settings
        are ready).
    :return: a :class:`comox.SharedState`, or ``None``.
    """


@hookspec
def comox_routes(gateway: Gateway) -> list[Any] | None:
    """Add HTTP routes to the standalone/mounted app.

    :param gateway: the gateway being built.
    :return: a list of Starlette ``Route`` (or ``Mount``) objects. They are
        served for paths outside ``/v1/``; ``ComoxMiddleware`` does not serve
        them (the host app owns those paths).
    """


@hookspec
def comox_openapi(gateway: Gateway) -> dict[str, Any] | None:
    """Describe the routes the plugin adds (``comox_routes``) in the app's
    ``GET /openapi.json``.

    Called once, when the app is created, after ``comox_routes``.

    :param gateway: the gateway being served.
    :return: an OpenAPI 3.1 fragment, ``{"paths": {...}, "components":
        {...}, "tags": [...]}`` (every key optional), or ``None``. Fragments
        are merged into the document; an operation described twice, or a
        component defined twice differently, is a configuration error. A
        fragment may refer to the core's components
        (``#/components/schemas/Error``, ``#/components/responses/Error``).
        Routes no fragment describes are listed with their methods only.
    """


@hookspec
def comox_startup(gateway: Gateway) -> None:
    """Run once when the gateway starts, before the first request is served.

    May be ``async def``. All implementations are called.

    :param gateway: the gateway that is starting.
    """


@hookspec
def comox_shutdown(gateway: Gateway) -> None:
    """Run once when the gateway stops, after the backends are closed.

    May be ``async def``. All implementations are called.

    :param gateway: the gateway that is stopping.
    """


# -- per-request hooks -----------------------------------------------------


@hookspec
def comox_request_start(request: GatewayRequest) -> None:
    """Observe a request as it arrives, before any other per-request hook:
    start a timer or a trace span.

    May be ``async def``. All implementations are called, in the request's
    own task, for every request ``comox_request_done`` sees (every request to
    an API path), and ``comox_request_done`` always follows. Exceptions are
    logged, not raised.

    :param request: the request before authentication: ``id``, ``method``,
        ``path``, ``endpoint`` and the headers are set; the body is not read.
    """


@hookspec
def comox_authenticate(request: GatewayRequest) -> Principal | None:
    """Decide who is calling.

    May be ``async def``. First non-``None`` result wins; the rest are skipped.
    Raise :class:`comox.errors.AuthenticationFailed` to reject the request.
    With no implementation (or all returning ``None``) the caller is
    :data:`comox.request.ANONYMOUS`.

    :param request: the parsed request (:class:`comox.GatewayRequest`). Decide on ``request.path`` (the ASGI
        ``scope["path"]`` relative to the mount point) and headers, never on a
        URL rebuilt from the ``Host`` header.
    :return: a :class:`comox.request.Principal`, or ``None`` to let other
        plugins decide.
    """


@hookspec
def comox_admit(request: GatewayRequest, principal: Principal) -> None:
    """Admit or reject the request: rate limits, budgets, request policy.

    May be ``async def``. All implementations are called, in order; raise a
    :class:`comox.errors.ComoxError` (e.g. ``RateLimited``,
    ``PermissionDenied``) to reject.

    :param request: the parsed request; an implementation may change its body
        with ``request.set_json()``.
    :param principal: the caller, as decided by ``comox_authenticate``.
    """


@hookspec
def comox_cache_lookup(request: GatewayRequest) -> BackendResponse | None:
    """Answer from a cache instead of a backend.

    May be ``async def``. First non-``None`` result wins.

    :param request: the parsed, admitted request.
    :return: a :class:`comox.backends.BackendResponse` (JSON body, or a
        ``stream`` of SSE bytes), or ``None`` for a miss.
    """


@hookspec
def comox_attempt_start(request: GatewayRequest, backend: str | None, kind: str) -> None:
    """Observe an attempt to answer the request beginning: a backend about to
    be sent it, or the failover stage about to be asked.

    May be ``async def``. All implementations are called, in the request's own
    task right before the backend call, so what an implementation makes
    current there (an OpenTelemetry span) is the context of that call, until
    ``comox_attempt_done`` for the same attempt, which always follows.
    Exceptions are logged, not raised. No implementation: no cost.

    :param request: the request (for ``"resume"``, the continuation sent to
        the next node: it shares ``id`` and ``state`` with the client's).
    :param backend: the backend's name; ``None`` for ``"failover"``.
    :param kind: ``"first"``; ``"retry"`` (another backend, after one failed
        or answered busy before its first byte); ``"resume"`` (another node
        continues a stream that broke off, ``resume_streams``); or
        ``"failover"`` (``comox_failover`` is asked).
    """


@hookspec
def comox_attempt_done(
    request: GatewayRequest, backend: str | None, kind: str, response: BackendResponse | None, error: str | None
) -> None:
    """Observe an attempt ending: its answer came (its status, headers and JSON
    body, or a stream's first chunk), or it failed.

    May be ``async def``. All implementations are called, in the request's own
    task, after each ``comox_attempt_start`` (same ``request``, ``backend`` and
    ``kind``). Exceptions are logged, not raised.

    :param response: the answer (``status``, ``headers``, ``body`` or
        ``stream`` with its first chunk in ``head``), also one the core then
        retries elsewhere (429, 5xx); ``None`` when there was none. Read it;
        do not consume its stream (wrapping ``response.stream`` to watch the
        chunks pass is allowed).
    :param error: ``None`` when it answered; else ``"unreachable"`` (could not
        connect, or broke before its answer), ``"timeout"`` (no first byte
        within ``first_byte_timeout_s``), ``"moved"`` (the backend left
        rotation while the request waited), ``"cancelled"`` (the client went
        away), ``"declined"`` (failover: no implementation answered, or one
        refused with a ``ComoxError``) or ``"failed"`` (any other exception).
    """


@hookspec
def comox_failover(request: GatewayRequest, error: Exception, trigger: str) -> BackendResponse | None:
    """Answer when no local backend could: the cloud failover stage.

    Called, before anything reached the client, only when local capacity is
    exhausted, and never for a request that must stay local
    (``request.local_only``: the core answers those 503 itself). May be
    ``async def``. First non-``None`` result wins.

    :param request: the parsed request (``request.model_group`` names its group).
    :param error: the error the client gets if no implementation answers (a
        :class:`comox.NoBackendAvailable`).
    :param trigger: ``"capacity"`` — every backend of the group is ejected,
        unhealthy or draining, or all were saturated past the queue wait; or
        ``"error"`` — backends were tried and every attempt failed (unreachable,
        no first byte, busy or unavailable answers). An implementation whose
        group is configured ``trigger = "capacity"`` answers only the first.
    :return: a response to send, or ``None`` to let the error stand.
    """


@hookspec
def comox_cache_store(request: GatewayRequest, response: BackendResponse) -> None:
    """Store a successful non-streaming response.

    May be ``async def``. All implementations are called, after the response
    has been sent to the client; an exception is logged and changes nothing
    the client sees.

    :param request: the request that was answered.
    :param response: the backend's response; ``response.body`` holds the bytes.
    """


@hookspec
def comox_request_done(
    request: GatewayRequest, status: int, backend: str | None, error: Exception | None
) -> None:
    """Observe a finished request: telemetry, usage and cost accounting.

    May be ``async def``. All implementations are called, after the last byte
    was sent (or the client went away). Exceptions are logged, not raised.

    Runs once for every request to an API path (``/v1/...``): refused before
    its body was parsed (unknown path, wrong method, body too large or not
    valid JSON: then ``request.json`` is ``{}`` and ``request.model`` is
    ``""``), refused later (unknown model, ``comox_admit``, no backend),
    ``GET /v1/models``, and answered ones.

    :param request: the request.
    :param status: the HTTP status sent to the client (499 when the client
        went away before a response started).
    :param backend: the name of the backend that answered, or ``None``.
    :param error: the error that ended the request, if any (also set when a
        stream failed after its first byte).
    """
