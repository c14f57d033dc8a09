"""Sending a request to a backend of its group: the policy's pick, retries
elsewhere before the first byte (within the retry budget), the first-byte
timeout, moving requests off a backend that leaves rotation, the queue for a
saturated group, and failover when local capacity is exhausted.

What counts against a backend (towards its ejection):

* connection refused or reset, a timeout before the first byte, a stream that
  breaks off midway — always;
* a 5xx answer — only once another backend of the group has answered the
  same request successfully (the request is retried elsewhere first). A 5xx
  no other node contradicts belongs to the request (an unsupported endpoint,
  a prompt that crashes the engine): it is passed to the client, counted
  against no node, and once two nodes gave the same status, not retried on
  further ones;
* a 429 — never (busy, not broken), though it carries a latency penalty;
* any other 4xx — never: the client's mistake, passed through at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .backends import BackendResponse
from .deadlines import deadlines_for
from .disconnects import running_loop
from .errors import BackendUnavailable, ComoxError, InvalidRequest, NoBackendAvailable
from .events import emit
from .plugins import HookChain

if TYPE_CHECKING:
    from .fleet import BackendState, ModelGroup
    from .gateway import Gateway
    from .request import GatewayRequest

__all__ = ["dispatch", "RETRYABLE_STATUS"]

log = logging.getLogger("comox")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Answers that say the node is busy or away (not that the request is bad):
# with failover configured, they fail over instead of reaching the client.
OVERLOADED_STATUS = frozenset({429, 502, 503, 504})


class _Moved(Exception):
    """The attempt was taken off its backend before the first byte (the
    backend left rotation, or the first-byte timeout ran out)."""


async def _attempt(state: BackendState, request: GatewayRequest, timeout_s: float | None) -> BackendResponse:
    """``state.backend.handle(request)``, and for a stream its first chunk,
    within ``timeout_s``; raises :class:`_Moved` when the attempt was
    called off (the task is cancelled by a timer or by the backend leaving
    rotation; a cancel of our own is told apart from the client's)."""
    loop = running_loop()  # once, and not asyncio's: each of its calls is a getpid() on Python 3.11
    task = asyncio.current_task(loop)
    assert task is not None
    waiting = state.waiting
    waiting[task] = False
    timer = deadlines_for(loop).add_on(loop, timeout_s, _time_out, state, task) if timeout_s else None
    response = None
    try:
        response = await state.backend.handle(request)
        if response.stream is not None and response.head is None:
            try:
                response.head = await anext(aiter(response.stream))
            except StopAsyncIteration:
                response.head = b""
            except Exception as exc:  # it broke off before its first chunk: nothing was sent, the request moves
                await response.aclose()
                raise BackendUnavailable(f"backend {state.name!r} broke off before its first chunk: "
                                         f"{type(exc).__name__}") from exc
        return response
    except asyncio.CancelledError:
        if not waiting.get(task):
            raise  # not ours: the client went away
        task.uncancel()
        if response is not None:
            await response.aclose()
        if task.cancelling():
            raise  # the client went away too
        # Moved because the backend left rotation, or the timer ran out (``routable`` lags: not it).
        left = state.state in ("ejected", "unhealthy", "draining")
        reason = f"backend {state.state}" if left or not timeout_s else f"no first byte within {timeout_s:g} s"
        raise _Moved(reason) from None
    finally:
        waiting.pop(task, None)
        if timer is not None:
            timer.cancel()


def _time_out(state: BackendState, task: asyncio.Task[object]) -> None:
    if task in state.waiting and not state.waiting[task]:
        state.waiting[task] = True
        task.cancel()


def observed(gateway: Gateway) -> bool:
    """Whether a plugin watches attempts (``comox_attempt_start`` / ``_done``)."""
    hooks = gateway.hooks
    return bool(hooks.comox_attempt_start or hooks.comox_attempt_done)


async def _observed(gateway: Gateway, state: BackendState, request: GatewayRequest, kind: str) -> BackendResponse:
    """:func:`_attempt` between ``comox_attempt_start`` and
    ``comox_attempt_done``; only when :func:`observed`."""
    hooks = gateway.hooks
    await HookChain.each_logged(hooks.comox_attempt_start, request=request, backend=state.name, kind=kind)
    timeout_s = state.first_byte_timeout_s
    response = None
    error: str | None = "failed"
    try:
        response = await _attempt(state, request, timeout_s)
        error = None
        return response
    except BackendUnavailable:
        error = "unreachable"
        raise
    except _Moved:
        error = "timeout" if state.routable and timeout_s else "moved"  # as _attempt tells them apart
        raise
    except asyncio.CancelledError:
        error = "cancelled"
        raise
    finally:
        await HookChain.each_logged(hooks.comox_attempt_done, request=request, backend=state.name, kind=kind,
                                    response=response, error=error)


async def dispatch(gateway: Gateway, request: GatewayRequest, group: ModelGroup) -> tuple[BackendResponse, BackendState | None]:
    """Send ``request`` to a backend of ``group`` (see the module docstring).
    The caller must ``release()`` the returned state once the response is
    finished."""
    tried: list[BackendState] = []
    failure: str | None = None
    response: BackendResponse | None = None
    last_state: BackendState | None = None
    suspects: list[tuple[BackendState, int]] = []  # 5xx answers not yet counted against their node
    counters = gateway.counters
    saturated = False
    can_fail_over = bool(gateway.hooks.comox_failover) and not request.local_only
    watched = observed(gateway)
    if can_fail_over and (group.current() == () or group.panic):
        # No local backend in rotation: capacity is exhausted; the cloud
        # answers before any known-bad node is tried in panic mode.
        answer = await _fail_over(gateway, request, _unavailable(gateway, group, False, "no backend in rotation"), "capacity")
        if answer is not None:
            return answer, None
    skip = group.unsupported(request.endpoint)  # backends that do not serve this endpoint
    if len(skip) == len(group.backends):
        raise InvalidRequest(f"model {group.name!r} does not serve {request.endpoint} (no backend of it lists it "
                             "in its endpoints)", param="model", code="unsupported_endpoint")
    for attempt in range(gateway.retries + 1):
        if attempt and counters.retries >= max(gateway.retry_budget_min, gateway.retry_budget_ratio * counters.inflight):
            break  # retry budget spent: retries must not snowball
        exclude = [*skip, *tried] if skip else tried
        state = group.choose(request, exclude)
        if state is None:
            if group.saturated_only(exclude):
                saturated = True
                if group.queue_timeout_s > 0 and group.queue_size > 0:
                    state = await group.wait_for_slot(request, exclude, time.monotonic() + group.queue_timeout_s)
            if state is None:
                break
        saturated = False
        if tried:
            request.retries += 1
            emit("request_retried", f"request {request.id} retried on {state.name} after {tried[-1].name}: {failure}",
                 request_id=request.id, model=group.name, backend=state.name, previous=tried[-1].name, reason=failure)
        tried.append(state)
        if response is not None:  # a retryable answer we are replacing
            await response.aclose()
            response = None
        state.acquire()
        if attempt:
            counters.retries += 1
        started = request.sent_at = time.perf_counter()
        try:
            if watched:
                response = await _observed(gateway, state, request, "retry" if attempt else "first")
            else:
                response = await _attempt(state, request, state.first_byte_timeout_s)
        except (BackendUnavailable, _Moved) as exc:
            state.release()
            failure = exc.message if isinstance(exc, BackendUnavailable) else str(exc)
            state.record_failure(failure)
            continue
        except BaseException:
            state.release()
            raise
        finally:
            if attempt:
                counters.retries -= 1
        answered = request.answered_at = time.perf_counter()
        status = response.status
        if status in RETRYABLE_STATUS:
            state.release()
            failure = f"HTTP {status}"
            last_state = state
            if status == 429:
                state.record_failure(failure, 429)
                continue
            if any(code == status for _, code in suspects):
                # The same 5xx from another node: the request's failure, not the nodes'.
                suspects.clear()
                break
            suspects.append((state, status))
            continue
        state.record_success(answered - started)
        for suspect, code in suspects:  # another node answered: those 5xx were the nodes'
            suspect.record_failure(f"HTTP {code}", code)
        return response, state
    error = _unavailable(gateway, group, saturated, failure, local_only=request.local_only and bool(gateway.hooks.comox_failover))
    if can_fail_over and (response is None or response.status in OVERLOADED_STATUS):
        # Exhausted: every backend saturated past the queue wait, or none in
        # rotation ("capacity"); or every attempt failed or answered busy
        # ("error"). The busy answer is kept until failover has spoken.
        trigger = "capacity" if saturated or not tried else "error"
        try:
            answer = await _fail_over(gateway, request, error, trigger)
        except BaseException:
            if response is not None:
                await response.aclose()  # a refusal (no budget) must not leak the busy answer's connection
            raise
        if answer is not None:
            if response is not None:
                await response.aclose()
            return answer, None
    if response is not None and last_state is not None:
        # Every try answered 5xx/429 and no failover took it: pass the last
        # answer through, as a proxy does (its status and retry-after intact).
        # 5xx answers no other node contradicted are counted against none.
        last_state.acquire()
        if not any(name == b"retry-after" for name, _ in response.headers):
            response.headers.append((b"retry-after", str(gateway.settings.server.retry_after_s).encode()))
        return response, last_state
    raise error


async def _fail_over(gateway: Gateway, request: GatewayRequest, error: ComoxError, trigger: str) -> BackendResponse | None:
    request.sent_at = time.perf_counter()  # the cloud's time is the backend's, not the gateway's overhead
    hooks = gateway.hooks
    watched = observed(gateway)
    if watched:
        await HookChain.each_logged(hooks.comox_attempt_start, request=request, backend=None, kind="failover")
    answer: BackendResponse | None = None
    why: str | None = "failed"
    try:
        answer = await HookChain.first(hooks.comox_failover, request=request, error=error, trigger=trigger)
        why = None if answer is not None else "declined"
    except ComoxError:
        why = "declined"
        raise
    except asyncio.CancelledError:
        why = "cancelled"
        raise
    finally:
        if watched:
            await HookChain.each_logged(hooks.comox_attempt_done, request=request, backend=None, kind="failover",
                                        response=answer, error=why)
    if answer is not None:
        request.answered_at = time.perf_counter()
        emit("request_failed_over", f"request {request.id} of model {request.model_group} failed over ({trigger})",
             request_id=request.id, model=request.model_group, trigger=trigger)
    return answer


def _unavailable(gateway: Gateway, group: ModelGroup, saturated: bool, failure: str | None, *,
                 local_only: bool = False) -> ComoxError:
    retry_after = gateway.settings.server.retry_after_s
    if local_only:
        return NoBackendAvailable(
            f"no local backend of model {group.name!r} can take the request now, and it must stay local (its key is "
            "local_only, its model group sovereign, or it sent x-comox-local-only: true), so it was not sent to a "
            "cloud backend", retry_after=retry_after, code="local_capacity_exhausted",
        )
    if saturated:
        return NoBackendAvailable(
            f"every backend of model {group.name!r} is at its max_concurrency"
            + (f" and the queue is full ({group.queue_size})" if len(group.waiters) >= group.queue_size
               else f"; waited {round(group.queue_timeout_s * 1000)} ms"),
            retry_after=retry_after, code="backends_saturated",
        )
    return NoBackendAvailable(
        f"no backend of model {group.name!r} can take the request now" + (f" (last error: {failure})" if failure else ""),
        retry_after=retry_after,
    )
