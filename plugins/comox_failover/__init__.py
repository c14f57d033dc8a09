"""Cloud failover under strict cost control (docs/failover.md).

* ``[models.failover]`` of a model group (``trigger``, ``max_tokens_cap``,
  ``[[models.failover.backends]]`` with their prices): validated and the cloud
  backends built when the gateway starts (:mod:`comox_failover.config`).
* ``comox_failover`` answers when the core says local capacity is exhausted
  and the group's trigger allows it: the cloud backends in order, each only
  if its worst-case cost fits every budget (:mod:`comox_failover.ledger`);
  decided before the first byte, one provider per answer. Requests that must
  stay local never reach a cloud backend (the core keeps them; this plugin
  checks again).
* Settled with the real usage: from the body, or for a stream from the usage
  the cloud was asked to report (:mod:`comox_failover.stream`), when the
  request is done; a cloud that did not answer gets its reservation back.
* An audit line (``comox.events``, event ``cloud_request``) for every request
  sent to a cloud — ids, provider, model, tokens, cost, trigger; never content.
* ``GET /admin/spend`` (:mod:`comox_failover.spend`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from typing import Any, NamedTuple

from pydantic import BaseModel
from starlette.routing import Route

import comox
from comox import BackendResponse, ComoxError, Gateway, GatewayRequest

from .config import BudgetSettings, Cloud, GroupFailover, build_groups, close_groups
from .ledger import Budget, Hold, Ledger, usd
from .spend import spend_openapi, spend_routes
from .stream import Tokens, UsageTap, tapped, usage_of_body

__all__ = ["InsufficientBudget", "IMAGE_TOKENS", "REQUEST_FAULTS"]

log = logging.getLogger("comox.failover")
events = logging.getLogger("comox.events")

IMAGE_TOKENS = 2000
"""Prompt tokens reserved for each image of a request (its bytes may be a URL)."""
REQUEST_FAULTS = frozenset({400, 413, 422})
"""A cloud's answers that blame the request: passed to the client, not
retried on the next cloud backend."""
ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
"""The endpoints whose cost can be bounded before they are sent (others never fail over)."""
SCOPES = {"day": "the daily cloud budget", "month": "the monthly cloud budget", "key": "its key's daily cloud budget"}


class InsufficientBudget(ComoxError):
    """503: local capacity is exhausted and the cloud answer would not fit a budget."""

    status = 503
    type = "insufficient_budget"
    code = "insufficient_budget"


class _Failover:
    """This plugin's state for one gateway."""

    def __init__(self, gateway: Gateway):
        settings = gateway.plugin_settings("failover")
        self.ledger = Ledger(gateway.shared_state, settings if isinstance(settings, BudgetSettings) else BudgetSettings())
        self.groups: dict[str, GroupFailover] = {}
        self.expose = gateway.settings.server.expose_backend_header


_gateways: weakref.WeakKeyDictionary[Gateway, _Failover] = weakref.WeakKeyDictionary()


def _of(gateway: Gateway) -> _Failover:
    found = _gateways.get(gateway)
    if found is None:
        found = _gateways[gateway] = _Failover(gateway)
    return found


class _Answer:
    """A cloud answer being sent: settled when the request is done."""

    __slots__ = ("cloud", "hold", "why", "tap")

    def __init__(self, cloud: Cloud, hold: Hold, why: tuple[str, str | None], tap: UsageTap | None):
        self.cloud = cloud
        self.hold = hold
        self.why = why  # the trigger, and the code of the local error
        self.tap = tap


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return BudgetSettings


@comox.hookimpl
def comox_active(gateway: Gateway) -> bool:
    """Off for requests (its hooks left out) when no model group has a
    ``[models.failover]``: nothing could ever fail over or be settled."""
    return any(group.failover for group in gateway.settings.models)


@comox.hookimpl
def comox_routes(gateway: Gateway) -> list[Route] | None:
    return spend_routes(gateway, lambda: _of(gateway).ledger)


@comox.hookimpl
def comox_openapi(gateway: Gateway) -> dict[str, Any] | None:
    return spend_openapi(gateway)


@comox.hookimpl
async def comox_startup(gateway: Gateway) -> None:
    groups = await build_groups(gateway)
    for group in gateway.settings.models:
        if group.name in groups and group.sovereign:
            log.warning("model %s is sovereign: its requests never leave, so its [models.failover] is never used", group.name)
    _of(gateway).groups = groups


@comox.hookimpl
async def comox_shutdown(gateway: Gateway) -> None:
    state = _gateways.pop(gateway, None)
    if state is not None:
        await close_groups(state.groups)


@comox.hookimpl
async def comox_failover(request: GatewayRequest, error: Exception, trigger: str) -> BackendResponse | None:
    state = _gateways.get(request.gateway) if request.gateway is not None else None
    if state is None or request.local_only:
        return None  # data that must stay home never leaves (the core keeps it too)
    group = state.groups.get(request.model_group)
    if group is None or (group.trigger == "capacity" and trigger != "capacity") or request.endpoint not in ENDPOINTS:
        return None
    bound = _prepare(request, group.max_tokens_cap)
    budgets = state.ledger.budgets(request.principal)
    why = (trigger, getattr(error, "code", None))
    refused: Budget | None = None
    for cloud in group.clouds:
        # A backend that speaks an inbound API itself gets the client's own
        # bytes: only the client's own max_tokens bounds its answer.
        native = request.api is not None and request.api_endpoint in getattr(cloud.backend, "native_apis", ())
        completion = bound.native_completion if native else bound.completion
        if completion is None:
            _audit(request, cloud, why, status=None, usage=None, cost=0, outcome="skipped: no max_tokens bounds its cost")
            continue
        hold = await state.ledger.reserve(budgets, cloud.prices.worst_case(bound.prompt, completion))
        if isinstance(hold, Budget):
            refused = refused or hold
            _audit(request, cloud, why, status=None, usage=None, cost=0, outcome=f"refused: {hold.scope} budget")
            continue
        try:
            response = await _send(cloud, request)
        except BaseException:  # cancelled (the client left, or shutdown): the cloud may have billed it
            await state.ledger.settle(hold, None)
            _audit(request, cloud, why, status=None, usage=None, cost=hold.amount, outcome="cancelled: charged its reservation")
            raise
        status = response.status if isinstance(response, BackendResponse) else None
        if isinstance(response, str) or (status != 200 and status not in REQUEST_FAULTS):
            if isinstance(response, BackendResponse):
                await response.aclose()
            await state.ledger.release(hold)
            reason = response if isinstance(response, str) else f"HTTP {status}"
            _audit(request, cloud, why, status=status, usage=None, cost=0, outcome=f"failed: {reason}")
            continue
        assert isinstance(response, BackendResponse)
        if state.expose:
            request.response_headers.append((b"x-comox-backend", cloud.name.encode()))
        if status != 200:  # the cloud blames the request: the client's answer, at no cost
            await state.ledger.release(hold)
            _audit(request, cloud, why, status=status, usage=None, cost=0, outcome="refused by the provider")
            return response
        if response.stream is None:
            assert response.body is not None
            await _settle(state.ledger, request, _Answer(cloud, hold, why, None), usage_of_body(response.body))
            return response
        tap = UsageTap(drop=bound.drop_usage and not native)
        response.head = tap.feed(response.head or b"")
        response.stream = tapped(response.stream, tap)
        request.state["failover"] = _Answer(cloud, hold, why, tap)
        return response
    if refused is not None:
        limit = f" (${usd(refused.cap):g})" if refused.cap is not None else ""
        raise InsufficientBudget(
            f"no local backend of model {request.model_group!r} can take the request now, and failing over to a "
            f"cloud backend would exceed {SCOPES[refused.scope]}{limit} for {refused.period}",
            retry_after=getattr(error, "retry_after", None))
    return None


@comox.hookimpl(tryfirst=True)
def comox_request_done(request: GatewayRequest) -> Awaitable[None] | None:
    # A plain function: only a request answered by a cloud backend has I/O to await.
    answer = request.state.pop("failover", None)
    if not isinstance(answer, _Answer) or request.gateway is None:
        return None
    assert answer.tap is not None
    usage = answer.tap.usage
    if usage is not None and (request.usage is None or request.usage.prompt is None):
        request.usage = usage.usage()  # the usage-only chunk the client did not ask for, for later observers
    elif usage is None and request.usage is not None and request.usage.prompt is not None:
        usage = Tokens(request.usage.prompt, request.usage.completion, request.usage.cached or 0)
    return _settle(_of(request.gateway).ledger, request, answer, usage)


class _Bound(NamedTuple):
    """The most tokens a cloud request may take and give."""

    prompt: int
    completion: int  # with the body as sent to the cloud (max_tokens capped)
    native_completion: int | None  # with the client's own body (None: unbounded)
    drop_usage: bool  # the client did not ask for a stream's usage chunk


def _prepare(request: GatewayRequest, cap: int) -> _Bound:
    """Bound what the request may cost, and make the cloud keep to it: the
    prompt's tokens (at most one per byte of the body, plus each image), the
    completion's (``max_tokens``, capped, times ``n``); a stream asks for its
    usage."""
    body = request.json
    raw = request.raw
    prompt = max(len(raw), len(request.inbound_raw or b"")) + IMAGE_TOKENS * raw.count(b'"image_url"')
    if request.endpoint == "embeddings":
        return _Bound(prompt, 0, 0, False)
    changes: dict[str, Any] = {}
    limits = [body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None and body[name] > cap:
            changes[name] = cap
    if not limits:
        changes["max_tokens"] = cap
    choices = max([1] + [value for name in ("n", "best_of") if isinstance(value := body.get(name), int)])
    drop_usage = False
    if request.stream:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            # An inbound API's translation reads the usage chunk: it stays.
            drop_usage = request.api is None
            changes["stream_options"] = {**options, "include_usage": True}
    if changes:
        request.set_json({**body, **changes})
    return _Bound(prompt, min([cap, *limits]) * choices, min(limits) * choices if limits else None, drop_usage)


async def _send(cloud: Cloud, request: GatewayRequest) -> BackendResponse | str:
    """The cloud's answer, with a stream's first chunk read; or why there is none."""
    response: BackendResponse | None = None
    try:
        async with asyncio.timeout(cloud.first_byte_timeout_s):
            response = await cloud.backend.handle(request)
            if response.stream is not None and response.status == 200 and response.head is None:
                response.head = await anext(aiter(response.stream), b"")
        return response
    except TimeoutError:
        reason = f"no first byte within {cloud.first_byte_timeout_s:g} s"
    except comox.BackendUnavailable as exc:
        reason = exc.message
    except Exception as exc:
        log.warning("cloud backend %s failed before its first byte", cloud.name, exc_info=True)
        reason = f"{type(exc).__name__} before the first byte"
    if response is not None:
        await response.aclose()
    return reason


async def _settle(ledger: Ledger, request: GatewayRequest, answer: _Answer, usage: Tokens | None) -> None:
    """Charge the answer's real cost; without usage (a stream that broke off
    or whose client left, a provider that reported none), its reservation."""
    cost = None
    if usage is not None and usage.prompt is not None:
        cost = answer.cloud.prices.cost(usage.prompt, usage.cached, usage.written, usage.completion or 0)
    await ledger.settle(answer.hold, cost)
    outcome = "answered" if cost is not None else "answered without usage: charged its reservation"
    _audit(request, answer.cloud, answer.why, status=200, usage=usage,
           cost=answer.hold.amount if cost is None else cost, outcome=outcome)


def _audit(request: GatewayRequest, cloud: Cloud, why: tuple[str, str | None], *, status: int | None,
           usage: Tokens | None, cost: int, outcome: str) -> None:
    """One ``cloud_request`` line: who, where, how much, why — never content."""
    fields = {
        "event": "cloud_request",
        "request_id": request.id,
        "key_id": request.principal.key_id,
        "model": request.model_group,
        "provider": cloud.type,
        "backend": cloud.name,
        "upstream_model": cloud.model or request.model,
        "status": status,
        "prompt_tokens": usage.prompt if usage else None,
        "cached_tokens": usage.cached if usage else None,
        "cache_write_tokens": usage.written if usage else None,
        "completion_tokens": usage.completion if usage else None,
        "cost_usd": usd(cost),
        "trigger": why[0],
        "local_error": why[1],
        "outcome": outcome,
    }
    events.info("request %s of model %s to cloud backend %s (%s): %s, $%s", request.id, request.model_group,
                cloud.name, cloud.type, outcome, fields["cost_usd"], extra={"comox_event": fields})
