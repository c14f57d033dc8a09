"""Active health checks: verdicts from real servers (one check at a time, no
waiting on timers), thresholds, un-ejection, and the background checker's
lifecycle in Gateway.startup / aclose."""

import asyncio
import socket

import httpx
import pytest

from comox.app import build_gateway as _build
from comox.settings import Settings
from comox import FAIL, LOADING, OK, HealthReport
from comox.health import HealthChecker, check_once
from comox.testing import Fault, StandInUpstream

from tests.standins import LlamaServerStandIn


@pytest.fixture
def upstream():
    up = StandInUpstream("plain").start()
    yield up
    up.stop()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def build_gateway(settings):
    return _build(Settings(**{"auth": "none", **settings}))  # health checks, not keys (tests/test_keys.py)


def gateway_for(*backends):
    return build_gateway({"models": [{"name": "m", "backends": list(backends)}]})


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, 60)  # a hang fails the test instead of the suite

    return asyncio.run(bounded())


async def checks(state, n):
    async with httpx.AsyncClient() as http:
        return [(await check_once(state, http)).status for _ in range(n)]


def test_every_http_backend_type_is_checked_by_default_unless_disabled(upstream):
    gateway = build_gateway({"models": [{"name": "m", "backends": [
        {"name": "a", "url": upstream.url},
        {"name": "b", "url": upstream.url, "health_check": {"enabled": False}},
        {"name": "c", "type": "llamacpp", "url": upstream.url},
        {"name": "d", "type": "vllm", "url": upstream.url},
    ]}]})
    assert [s.name for s in HealthChecker(gateway.backends()).states] == ["a", "c", "d"]


def test_thresholds_then_recovery_un_ejects(upstream):
    gateway = gateway_for({"name": "a", "url": upstream.url,
                           "health_check": {"enabled": True, "unhealthy_threshold": 2, "healthy_threshold": 2}})
    state = gateway.backend("a")
    upstream.probe_faults.extend([Fault(status=500), Fault(status=500)])
    assert run(checks(state, 1)) == [FAIL]
    assert state.state == "healthy"  # one failure of the two needed
    assert run(checks(state, 1)) == [FAIL]
    assert state.state == "unhealthy" and "HTTP 500" in state.last_error
    state.eject()  # also ejected by passive checks meanwhile
    assert run(checks(state, 1)) == [OK]
    assert state.state == "ejected"  # one pass of the two needed
    assert run(checks(state, 1)) == [OK]
    assert state.state == "healthy" and not state.ejected and state.recovered_at is not None  # slow start


def test_refused_and_timeout_fail():
    gateway = gateway_for({"name": "gone", "url": closed_port_url(), "health_check": {"enabled": True, "unhealthy_threshold": 1}})
    state = gateway.backend("gone")
    assert run(checks(state, 1)) == [FAIL]
    assert "ConnectError" in state.last_error


def test_timeout_fails(upstream):
    gateway = gateway_for({"name": "slow", "url": upstream.url, "health_check": {"enabled": True, "timeout_s": 0.1, "unhealthy_threshold": 1}})
    upstream.probe_faults.append(Fault(delay=1.0))
    state = gateway.backend("slow")
    assert run(checks(state, 1)) == [FAIL]
    assert "timed out" in state.last_error


def test_llamacpp_starting_then_loading_then_ready():
    url = closed_port_url()
    gateway = build_gateway({"models": [{"name": "m", "backends": [{"name": "l", "type": "llamacpp", "url": url}]}]})
    state = gateway.backend("l")
    assert run(checks(state, 1)) == [LOADING]  # nothing listening yet: starting, not failed
    assert state.state == "loading" and state.health_ok


def test_llamacpp_loading_via_health_503():
    up = LlamaServerStandIn("l")
    up.loading = True
    up.start()
    try:
        gateway = build_gateway({"models": [{"name": "m", "backends": [{"name": "l", "type": "llamacpp", "url": up.url}]}]})
        state = gateway.backend("l")
        assert run(checks(state, 2)) == [LOADING, LOADING]
        assert state.state == "loading" and state.failures == 0
        up.loading = False
        assert run(checks(state, 1)) == [OK]
        assert state.state == "healthy" and state.total_slots == 2
    finally:
        up.stop()


def test_background_checks_start_with_the_gateway_and_stop_with_it(upstream):
    gateway = gateway_for({"name": "a", "url": upstream.url, "health_check": {"enabled": True, "interval_s": 0.02}})

    async def scenario():
        await gateway.startup()
        tasks = list(gateway.health_checker.tasks)
        assert len(tasks) == 1
        for _ in range(200):
            if upstream.probes.count("/v1/models") >= 3:
                break
            await asyncio.sleep(0.01)
        await gateway.aclose()
        assert all(task.done() for task in tasks) and gateway.health_checker is None

    run(scenario())
    checked = upstream.probes.count("/v1/models")
    assert checked >= 3
    assert len(upstream.probes) == checked and not upstream.requests  # and nothing else


def checker_with(upstream, check):
    """A HealthChecker over one backend whose check is ``check(http)``."""
    gateway = gateway_for({"name": "a", "url": upstream.url, "health_check": {"enabled": True, "interval_s": 0.01}})
    (state,) = gateway.backends()
    state.backend.health_check = check
    return HealthChecker([state])


def deaf_checker(upstream):
    """A HealthChecker whose check ignores cancels until ``released`` (the
    returned list) is made non-empty: a client library stuck for good."""
    released = []

    async def check(http):
        while not released:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass
        return HealthReport(OK, "ok")

    return checker_with(upstream, check), released


def test_a_cancel_arriving_as_a_check_finishes_still_stops_the_loop(upstream):
    # The check asks for its own task's cancellation and returns at once: the
    # cancel lands while the check's result is being handed back. (On 3.11,
    # asyncio.wait_for dropped such a cancel, and the loop ran on for ever.)
    calls = []

    async def check(http):
        calls.append(1)
        if len(calls) == 2:
            checker.tasks[0].cancel()
        return HealthReport(OK, "ok")

    checker = checker_with(upstream, check)

    async def scenario():
        checker.start()
        task = checker.tasks[0]
        for _ in range(100):
            if task.done():
                break
            await asyncio.sleep(0.01)
        done = task.done()
        await checker.stop(grace_s=1)
        return done

    assert run(scenario()) is True
    assert len(calls) == 2


def test_stop_ends_a_check_that_swallows_its_cancel(upstream):
    # A client library that eats CancelledError must not hang shutdown: the
    # loop sees stop() and ends after the check returns.
    async def check(http):
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass
        return HealthReport(OK, "ok")

    checker = checker_with(upstream, check)

    async def scenario():
        checker.start()
        await asyncio.sleep(0.05)
        task = checker.tasks[0]
        await checker.stop(grace_s=5)
        return task.done()

    assert run(scenario()) is True


def test_stop_waits_no_longer_than_its_grace_for_a_stuck_check(upstream, caplog):
    checker, released = deaf_checker(upstream)

    async def scenario():
        checker.start()
        await asyncio.sleep(0.05)
        task = checker.tasks[0]
        started = asyncio.get_running_loop().time()
        await checker.stop(grace_s=0.2)
        waited = asyncio.get_running_loop().time() - started
        stuck = not task.done()
        released.append(1)
        await asyncio.wait_for(task, 5)
        return waited, stuck

    waited, stuck = run(scenario())
    assert stuck and waited < 2
    assert "did not stop within" in caplog.text


def test_cancelling_stop_itself_is_not_swallowed(upstream):
    checker, released = deaf_checker(upstream)

    async def scenario():
        checker.start()
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(checker.stop(grace_s=30))
        await asyncio.sleep(0.05)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        released.append(1)
        return stopping.cancelled()

    assert run(scenario()) is True
