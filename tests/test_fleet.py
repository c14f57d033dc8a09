"""Fleet state and the routing step: ejection, panic, slow start, draining,
max_concurrency with its queue, retries and their budget, measured speed.

Unit tests use a fake clock; integration tests run real gateways in front of
real stand-in servers on 127.0.0.1."""

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest

from comox.fleet import EJECT_AFTER
from comox.testing import Fault, wait_until
from comox_round_robin import RoundRobin

from tests.policy_helpers import Clock, chat, make_group, names, pick

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- unit: ejection, panic, slow start -----------------------------------------


def test_ejection_after_consecutive_failures_with_growing_capped_time():
    clock = Clock()
    group = make_group(RoundRobin, 2, clock=clock)
    a = group.backends[0]
    for _ in range(EJECT_AFTER - 1):
        a.record_failure("connection refused")
    a.record_success(0.01)  # a success resets the streak
    for _ in range(EJECT_AFTER - 1):
        a.record_failure("timeout")
    assert not a.ejected
    a.record_failure("timeout")
    assert a.ejected and a.state == "ejected"
    assert set(names(pick(group) for _ in range(6))) == {"b1"}
    clock.advance(29.9)
    assert a.ejected
    clock.advance(0.2)
    assert not a.ejected and "b0" in names(pick(group) for _ in range(4))
    durations = []
    for _ in range(12):
        for _ in range(EJECT_AFTER):
            a.record_failure("HTTP 502", 502)
        durations.append(a.ejected_until - clock())
        clock.advance(durations[-1] + 1)
    assert durations[:3] == [60.0, 90.0, 120.0]
    assert max(durations) == 300.0 and a.ejections == 13


def test_panic_mode_routes_to_all_when_all_are_ejected():
    group = make_group(RoundRobin, 3)
    for state in group.backends:
        state.eject()
    assert set(names(pick(group) for _ in range(6))) == {"b0", "b1", "b2"}
    assert group.panic


def test_draining_gets_no_new_requests_but_keeps_its_inflight():
    group = make_group(RoundRobin, 2)
    a, b = group.backends
    a.acquire()
    a.set_draining(True)
    assert set(names(pick(group) for _ in range(4))) == {"b1"}
    assert a.inflight == 1 and a.state == "draining"
    a.release()
    a.set_draining(False)
    assert set(names(pick(group) for _ in range(4))) == {"b0", "b1"}


def test_available_is_rebuilt_only_on_change():
    group = make_group(RoundRobin, 3)
    pick(group)
    first = group.available
    pick(group)
    assert group.available is first
    group.backends[1].set_draining(True)
    pick(group)
    assert group.available is not first and len(group.available) == 2


def test_slow_start_after_ejection_ramps_traffic_up():
    clock = Clock()
    group = make_group(RoundRobin, 2, clock=clock, slow_start_s=10.0, seed=5)
    a = group.backends[0]
    a.eject()
    clock.advance(30.0 + 1.0)  # ejection over, 1 s into slow start
    early = Counter(names(pick(group) for _ in range(1000)))
    clock.advance(5.0)  # 6 s in
    middle = Counter(names(pick(group) for _ in range(1000)))
    clock.advance(5.0)  # past the window
    late = Counter(names(pick(group) for _ in range(1000)))
    assert early["b0"] < 120  # ~10 % of its round-robin half
    assert early["b0"] * 2 < middle["b0"] < 450  # more, still less than its half
    assert late["b0"] == 500


def test_passing_health_check_un_ejects_and_starts_slow_start():
    clock = Clock()
    group = make_group(RoundRobin, 2, clock=clock, slow_start_s=10.0)
    a = group.backends[0]
    a.eject()
    a.health_passed(healthy_threshold=1)
    assert not a.ejected and a.state == "healthy"
    assert a.slow_start_factor(clock()) == pytest.approx(0.1)
    a.health_failed("refused", unhealthy_threshold=2)
    assert a.state == "healthy"
    a.health_failed("refused", unhealthy_threshold=2)
    assert a.state == "unhealthy"
    assert set(names(pick(group) for _ in range(4))) == {"b1"}
    a.not_ready("Loading model")
    a.health_passed(healthy_threshold=2)
    assert a.state == "unhealthy" and a.ready  # one pass of the two needed
    a.health_passed(healthy_threshold=2)
    assert a.state == "healthy" and a.failures == 0  # health checks do not count as request failures


def test_not_ready_is_not_a_failure():
    group = make_group(RoundRobin, 2)
    a = group.backends[0]
    a.not_ready("Loading model")
    assert a.state == "loading" and a.consecutive_failures == 0
    assert set(names(pick(group) for _ in range(4))) == {"b1"}
    a.health_passed()
    assert set(names(pick(group) for _ in range(4))) == {"b0", "b1"}


def test_a_waiter_leaving_as_it_is_handed_the_slot_passes_it_on():
    # The client of the first waiter goes away in the same instant its slot
    # is freed: it must leave (not be served for nobody), and the slot must
    # go to the next waiter instead of sitting idle until its queue timeout.
    group = make_group(RoundRobin, 1, max_concurrency=1)
    group.queue_size = 10
    (state,) = group.backends
    state.acquire()

    async def scenario():
        deadline = time.monotonic() + 10
        first = asyncio.create_task(group.wait_for_slot(chat("x"), (), deadline))
        second = asyncio.create_task(group.wait_for_slot(chat("y"), (), deadline))
        await asyncio.sleep(0.01)
        assert len(group.waiters) == 2
        state.release()  # wakes the first...
        first.cancel()  # ...whose client leaves before it runs
        served = await asyncio.wait_for(second, 2)
        with pytest.raises(asyncio.CancelledError):
            await first
        return served

    assert asyncio.run(scenario()) is state
    assert not group.waiters


def test_a_waiter_that_times_out_leaves_the_queue():
    group = make_group(RoundRobin, 1, max_concurrency=1)
    group.queue_size = 10
    group.backends[0].acquire()

    async def scenario():
        return await group.wait_for_slot(chat("x"), (), time.monotonic() + 0.05)

    assert asyncio.run(scenario()) is None
    assert not group.waiters


# -- integration: real gateway, real stand-ins ---------------------------------


def settings_for(*backends, policy="round_robin", server=None, **group):
    settings = {"models": [{"name": "m", "policy": policy, "backends": list(backends), **group}]}
    settings["server"] = {"expose_backend_header": True, **(server or {})}
    return settings


def post(server, body=CHAT, **kwargs):
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30, **kwargs)


def gateway_of(server):
    return server.app.gateway


def second_while_first_holds_the_only_slot(comox_serve, upstreams, faults, **group):
    """Send one request to a backend with max_concurrency 1, then a second one
    while the first holds the slot. Returns (first reply, second reply, state)."""
    up = upstreams("slow")
    up.faults.extend(faults)
    server = comox_serve(settings_for({"name": "a", "url": up.url, "max_concurrency": 1}, **group))
    results = []
    first = threading.Thread(target=lambda: results.append(post(server)))
    first.start()
    state = gateway_of(server).backend("a")
    wait_until(lambda: state.inflight == 1)
    second = post(server)
    first.join(60)
    assert not first.is_alive()
    return results[0], second, state


def test_max_concurrency_queues_then_serves(comox_serve, upstreams):
    first, second, state = second_while_first_holds_the_only_slot(
        comox_serve, upstreams, [Fault(delay=0.4), Fault()], queue_timeout_ms=5000)
    assert second.status_code == 200 and first.status_code == 200
    assert state.inflight == 0 and not state.group.waiters


def test_queue_timeout_gives_503_with_retry_after(comox_serve, upstreams):
    _, second, _ = second_while_first_holds_the_only_slot(comox_serve, upstreams, [Fault(delay=1.0)], queue_timeout_ms=50)
    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "backends_saturated"


def test_queue_size_zero_rejects_at_once(comox_serve, upstreams):
    _, second, _ = second_while_first_holds_the_only_slot(comox_serve, upstreams, [Fault(delay=1.0)], queue_size=0)
    assert second.status_code == 503 and second.json()["error"]["code"] == "backends_saturated"


def refused_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_connection_refused_is_retried_elsewhere_and_ejects(comox_serve, upstreams):
    good = upstreams("good")
    server = comox_serve(settings_for({"name": "dead", "url": refused_url()}, {"name": "good", "url": good.url}))
    for _ in range(2 * EJECT_AFTER):
        reply = post(server)
        assert reply.status_code == 200 and reply.headers["x-comox-backend"] == "good"
    dead = gateway_of(server).backend("dead")
    assert dead.ejected and dead.ejections == 1 and "unreachable" in dead.last_error


def test_5xx_is_retried_on_another_backend(comox_serve, upstreams):
    bad, good = upstreams("bad"), upstreams("good")
    bad.faults.append(Fault(status=503))
    server = comox_serve(settings_for({"name": "bad", "url": bad.url}, {"name": "good", "url": good.url}))
    reply = post(server)
    assert reply.status_code == 200 and reply.headers["x-comox-backend"] == "good"
    assert gateway_of(server).backend("bad").penalty_ms > 0


def test_retry_budget_stops_retries(comox_serve, upstreams):
    bad, good = upstreams("bad"), upstreams("good")
    bad.faults.append(Fault(status=500))
    server = comox_serve(settings_for({"name": "bad", "url": bad.url}, {"name": "good", "url": good.url},
                                      server={"retry_budget_min": 0, "retry_budget_ratio": 0.0}))
    reply = post(server)
    assert reply.status_code == 500  # no budget: the answer passes through
    assert len(good.requests) == 0
    assert gateway_of(server).counters.retries == 0 and gateway_of(server).counters.inflight == 0


def test_stream_broken_midway_counts_as_failure(comox_serve, upstreams):
    up = upstreams("flaky")
    up.faults.append(Fault(close_after_chunks=1))
    server = comox_serve(settings_for({"name": "a", "url": up.url}))
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as reply:
        text = reply.read().decode()
    assert "stream_interrupted" in text and "[DONE]" not in text
    state = gateway_of(server).backend("a")
    assert state.failures == 1 and state.inflight == 0


def test_measured_speed_steers_p2c_to_the_faster_backend(comox_serve, upstreams):
    fast = upstreams("fast", stream_chunks=6, chunk_delay=0.005)
    slow = upstreams("slow", stream_chunks=6, chunk_delay=0.06)
    server = comox_serve(settings_for({"name": "fast", "url": fast.url}, {"name": "slow", "url": slow.url}, policy="p2c_ewma"))
    served = Counter()
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=30) as http:
            for _ in range(10):
                with http.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}) as reply:
                    reply.read()
                    with lock:
                        served[reply.headers["x-comox-backend"]] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    gateway = gateway_of(server)
    f, s = gateway.backend("fast"), gateway.backend("slow")
    assert f.decode_tps > 3 * s.decode_tps  # measured from the real streams
    assert served["fast"] > 2 * served["slow"], served
    assert sum(served.values()) == 40


def test_usage_of_json_responses_is_recorded(comox_serve, upstreams):
    up = upstreams("a")
    server = comox_serve(settings_for({"name": "a", "url": up.url}))
    assert post(server).status_code == 200
    state = gateway_of(server).backend("a")
    assert state.prompt_tokens == 5 and state.decode_tps is not None and state.ewma_ms is not None


def test_queued_requests_are_all_served_one_at_a_time(comox_serve, upstreams):
    up = upstreams("slow")
    up.faults.extend([Fault(delay=0.1) for _ in range(6)])
    server = comox_serve(settings_for({"name": "a", "url": up.url, "max_concurrency": 1}, queue_timeout_ms=20000))
    state = gateway_of(server).backend("a")
    peak = []
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, server) for _ in range(6)]
        while not all(f.done() for f in futures):
            peak.append(state.inflight)
            time.sleep(0.002)
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * 6
    assert max(peak) == 1 and state.requests == 6 and not state.group.waiters
