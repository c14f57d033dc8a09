"""The fleet on bad days (issue 11): a node that stops answering, poison
requests, stale estimates, a current admin view, and fleet events in the log.
Real servers on 127.0.0.1; timing through short configured intervals or an
injectable clock, never long sleeps."""

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time

import httpx
import pytest

from comox.fleet import EJECT_AFTER
from comox.testing import Fault, free_port, stop_process, wait_until
from comox_p2c_ewma import P2CEwma

from tests.policy_helpers import Clock, make_group, names, pick

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "m", "input": "hello"}
FAST_CHECKS = {"interval_s": 0.1, "timeout_s": 0.3, "unhealthy_threshold": 1}


def post(server, body=CHAT, path="/v1/chat/completions", timeout=10.0, **kwargs):
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout, **kwargs)


# -- a node that stopped answering -------------------------------------------------


def test_requests_on_a_node_that_hangs_move_when_it_turns_unhealthy(comox_serve, upstreams):
    hung, good = upstreams("hung"), upstreams("good")
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "hung", "url": hung.url, "health_check": FAST_CHECKS},
        {"name": "good", "url": good.url, "health_check": FAST_CHECKS}]}]})
    gateway = server.app.gateway
    wait_until(lambda: post(server).status_code == 200 and len(hung.requests) >= 1)
    hung.hang = True  # accepts connections, answers nothing: requests, probes
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(server), range(4)))
    elapsed = time.monotonic() - started
    # Two of the four went to the hung node first; they moved when its health
    # check failed, long before its 600 s read timeout or the client's 10 s.
    assert [r.status_code for r in replies] == [200] * 4
    assert {r.headers["x-comox-backend"] for r in replies} == {"good"}
    assert elapsed < 5
    assert gateway.backend("hung").state == "unhealthy"
    assert gateway.backend("hung").inflight == 0


@pytest.mark.transports
def test_first_byte_timeout_moves_a_stream_stalled_after_its_headers(comox_serve, upstreams):
    stalled, good = upstreams("stalled"), upstreams("good")
    off = {"enabled": False}
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "stalled", "url": stalled.url, "health_check": off, "first_byte_timeout_s": 0.5},
        {"name": "good", "url": good.url, "health_check": off, "first_byte_timeout_s": 0.5}]}]})
    stalled.faults.append(Fault(stall_after_chunks=0))  # headers, then nothing
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10) as response:
        body = response.read()
        backend = response.headers["x-comox-backend"]
    assert time.monotonic() - started < 3
    assert backend == "good" and b"tok0" in body and body.rstrip().endswith(b"data: [DONE]")
    state = server.app.gateway.backend("stalled")
    assert state.failures == 1 and "no first byte within 0.5 s" in state.last_error
    wait_until(lambda: stalled.disconnects == 1)  # the stalled upstream call was closed


@pytest.mark.transports
def test_first_byte_timeout_moves_a_non_streaming_request_whose_headers_never_come(comox_serve, upstreams):
    slow, good = upstreams("slow"), upstreams("good")
    off = {"enabled": False}
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "slow", "url": slow.url, "health_check": off, "first_byte_timeout_s": 0.3},
        {"name": "good", "url": good.url, "health_check": off}]}]})
    slow.faults.append(Fault(delay=30))
    started = time.monotonic()
    reply = post(server)
    assert reply.status_code == 200 and reply.headers["x-comox-backend"] == "good"
    assert time.monotonic() - started < 3


def test_the_default_first_byte_timeout_leaves_long_generations_alone():
    from comox.settings import BackendSettings

    assert BackendSettings().first_byte_timeout_s >= 300


# -- poison requests ---------------------------------------------------------------


def test_the_same_5xx_from_every_node_is_the_requests_failure(comox_serve, upstreams):
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve({"models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}]})
    gateway = server.app.gateway
    a.faults.extend([Fault(status=500)] * 12)
    b.faults.extend([Fault(status=500)] * 12)
    replies = [post(server, EMBED, "/v1/embeddings") for _ in range(12)]
    assert [r.status_code for r in replies] == [500] * 12  # the upstream's error, passed on
    assert len(a.requests) + len(b.requests) == 24  # each tried on two nodes, not more
    for name in ("a", "b"):
        state = gateway.backend(name)
        assert state.state == "healthy" and state.ejections == 0 and state.consecutive_failures == 0
    assert not gateway.groups["m"].panic


def test_a_5xx_another_node_contradicts_counts_against_its_node(comox_serve, upstreams):
    bad, good = upstreams("bad"), upstreams("good")
    server = comox_serve({"models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "bad", "url": bad.url, "health_check": {"enabled": False}}, {"name": "good", "url": good.url}]}]})
    bad.faults.extend([Fault(status=500)] * 20)
    for _ in range(2 * EJECT_AFTER):
        assert post(server).status_code == 200
    assert server.app.gateway.backend("bad").ejections == 1


def test_a_client_error_is_passed_through_and_never_retried(comox_serve, upstreams):
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve({"models": [{"name": "m", "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}]})
    a.faults.extend([Fault(status=400)] * 10)
    b.faults.extend([Fault(status=400)] * 10)
    assert {post(server).status_code for _ in range(10)} == {400}
    assert len(a.requests) + len(b.requests) == 10
    assert all(s.failures == 0 for s in server.app.gateway.backends())


def test_real_llama_servers_refusing_embeddings_are_not_ejected(comox_serve, llama_processes):
    a, b = llama_processes(), llama_processes()
    checks = {"interval_s": 0.5, "timeout_s": 5}
    server = comox_serve({"models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "a", "type": "llamacpp", "url": a.url, "health_check": checks},
        {"name": "b", "type": "llamacpp", "url": b.url, "health_check": checks}]}]})
    gateway = server.app.gateway
    wait_until(lambda: all(s.state == "healthy" for s in gateway.backends()), timeout=120)
    replies = [post(server, EMBED, "/v1/embeddings", timeout=60) for _ in range(12)]
    # The nodes' own refusal, a 500 from each (the shape issue 11 found):
    # counted against neither, tried on two nodes, not more.
    # (A clean-clone CI run once got 503 for all twelve, both nodes ejected after
    # connection failures: the message says whether the llama servers had died.)
    assert {r.status_code for r in replies} == {500}, (
        f"llama servers' exit codes {a.proc.poll()}, {b.proc.poll()}; ports {a.port}, {b.port}; "
        f"first reply {replies[0].status_code} {replies[0].text[:300]}; "
        f"backends {[(s.name, s.state, s.last_error) for s in gateway.backends()]}")
    assert all(s.state == "healthy" and s.ejections == 0 for s in gateway.backends())
    assert not gateway.groups["m"].panic
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 2}
    assert post(server, body, "/v1/completions", timeout=60).status_code == 200  # the fleet still serves


# -- estimates that age --------------------------------------------------------------


def sequential_share(decay_s, seconds_between=1.0, n=60):
    clock = Clock()
    group = make_group(P2CEwma, 2, clock=clock)
    group.decay_s = decay_s
    a, b = group.backends
    a.record_success(0.100)
    b.record_success(0.300)  # one slow cold measurement
    served = []
    for _ in range(n):
        state = pick(group)
        state.record_success(0.100)  # both are really as fast
        served.append(state.name)
        clock.advance(seconds_between)
    return served


def test_an_idle_node_is_tried_again_as_its_estimate_ages():
    served = sequential_share(decay_s=10.0)
    assert served.count("b1") >= 5 and served.count("b0") >= 5
    # The estimates still matter: without time passing, the slow sample stands.
    assert sequential_share(decay_s=10.0, seconds_between=0.0, n=20).count("b1") == 0


def test_p2c_ewma_spreads_one_sequential_client_over_nodes_of_similar_speed(comox_serve, upstreams):
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve({"models": [{"name": "m", "policy": "p2c_ewma", "estimate_decay_s": 0.2, "backends": [
        {"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}]})
    b.faults.append(Fault(delay=0.3))  # b's first answer is slow; the later ones are not
    deadline = time.monotonic() + 20
    while not b.requests and time.monotonic() < deadline:
        assert post(server).status_code == 200
    assert b.requests, "b never got its first request"
    before = len(b.requests)
    sent = 0
    while len(b.requests) - before < 3 and sent < 120:  # bounded; without ageing b never gets one
        assert post(server).status_code == 200
        sent += 1
        time.sleep(0.05)
    assert len(b.requests) - before >= 3, f"b served {len(b.requests) - before} of {sent} sequential requests"


# -- the admin view is current -----------------------------------------------------


def test_admin_view_shows_health_changes_without_a_request(comox_serve, upstreams, monkeypatch):
    monkeypatch.setenv("COMOX_ADMIN_KEY", "admin-secret")
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve({"models": [{"name": "m", "backends": [
        {"name": "a", "url": a.url, "health_check": FAST_CHECKS}, {"name": "b", "url": b.url, "health_check": FAST_CHECKS}]}]})

    def view():
        return httpx.get(f"{server.url}/admin/backends", headers={"authorization": "Bearer admin-secret"}).json()

    wait_until(lambda: view()["groups"]["m"]["available"] == 2)
    a.hang = True
    wait_until(lambda: view()["groups"]["m"]["available"] == 1, timeout=5)
    assert {e["name"]: e["state"] for e in view()["data"]} == {"a": "unhealthy", "b": "healthy"}
    assert not a.requests and not b.requests  # no API request was needed to see it


# -- fleet events in the log -----------------------------------------------------------


def events(caplog):
    return [getattr(r, "comox_event") for r in caplog.records if hasattr(r, "comox_event")]


def test_fleet_state_changes_and_retries_are_logged(comox_serve, upstreams, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="comox")
    monkeypatch.setenv("COMOX_ADMIN_KEY", "admin-secret")
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve({"models": [{"name": "m", "policy": "round_robin", "backends": [
        {"name": "a", "url": a.url, "health_check": FAST_CHECKS, "slow_start_s": 0},
        {"name": "b", "url": b.url, "health_check": FAST_CHECKS, "slow_start_s": 0}]}]})
    wait_until(lambda: any(e["event"] == "model_group" for e in events(caplog)))
    banner = next(e for e in events(caplog) if e["event"] == "model_group")
    assert banner["model"] == "m" and banner["policy"] == "round_robin"
    assert "a (openai, " in next(r.getMessage() for r in caplog.records if getattr(r, "comox_event", {}).get("event") == "model_group")

    a.faults.append(Fault(status=502))  # one retry, from a to b
    b.faults.append(Fault(status=200))
    assert post(server).status_code == 200 and post(server).status_code == 200
    retried = [e for e in events(caplog) if e["event"] == "request_retried"]
    assert retried and retried[0]["previous"] == "a" and retried[0]["backend"] == "b" and retried[0]["reason"] == "HTTP 502"

    a.hang = True
    wait_until(lambda: any(e["event"] == "backend_unhealthy" and e["backend"] == "a" for e in events(caplog)), timeout=5)
    a.hang = False
    wait_until(lambda: any(e["event"] == "backend_recovered" and e["backend"] == "a" for e in events(caplog)), timeout=5)

    admin = {"authorization": "Bearer admin-secret"}
    assert httpx.post(f"{server.url}/admin/backends/b/drain", headers=admin).status_code == 200
    assert httpx.post(f"{server.url}/admin/backends/b/undrain", headers=admin).status_code == 200
    server.app.gateway.backend("b").eject()
    kinds = [e["event"] for e in events(caplog)]
    for kind in ("backend_unhealthy", "backend_recovered", "backend_drained", "backend_undrained", "backend_ejected"):
        assert kind in kinds
    ejected = next(e for e in events(caplog) if e["event"] == "backend_ejected")
    assert ejected["backend"] == "b" and ejected["seconds"] == 30.0


def test_panic_is_logged_when_it_starts_and_ends(caplog):
    from comox_round_robin import RoundRobin

    caplog.set_level(logging.INFO, logger="comox")
    group = make_group(RoundRobin, 2)
    for state in group.backends:
        state.eject()
    pick(group)
    for state in group.backends:
        state.health_passed()
    pick(group)
    assert [e["event"] for e in events(caplog) if e["event"].startswith("panic")] == ["panic_entered", "panic_left"]


def test_serve_warns_about_a_group_with_no_reachable_backend_in_json(tmp_path):
    config = tmp_path / "comox.toml"
    config.write_text(f'auth = "none"\n[[models]]\nname = "chat"\n[[models.backends]]\nname = "gone"\nurl = "http://127.0.0.1:{free_port()}"\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True, env={**os.environ})
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"no_reachable_backend"' in line:
                break
    finally:
        stop_process(proc)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    warning = next(r for r in records if r.get("event") == "no_reachable_backend")
    assert warning["level"] == "warning" and warning["model"] == "chat"
    group = next(r for r in records if r.get("event") == "model_group")
    assert "gone (openai, http://127.0.0.1:" in group["message"] and ": fail" in group["message"]
