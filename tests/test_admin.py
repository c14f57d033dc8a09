"""The admin API against a real gateway: off without COMOX_ADMIN_KEY, bearer
auth, backend listing, drain/undrain with requests in flight."""

import threading

import httpx
import pytest

from comox.testing import Fault, StandInUpstream, wait_until
from tests.secrets_check import secret

KEY = secret("admin-secret-key", "admin key")


@pytest.fixture
def two_upstreams():
    ups = [StandInUpstream("a").start(), StandInUpstream("b").start()]
    yield ups
    for up in ups:
        up.stop()


def settings(ups):
    return {
        "server": {"expose_backend_header": True},
        "models": [{"name": "m", "backends": [{"name": "a", "url": ups[0].url}, {"name": "b", "url": ups[1].url}]}],
    }


def chat(server):
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, timeout=30)


def test_admin_api_is_off_without_the_key(monkeypatch, comox_serve, two_upstreams):
    monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    server = comox_serve(settings(two_upstreams))
    reply = httpx.get(f"{server.url}/admin/backends", headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", "Bearer é"])
def test_admin_api_rejects_bad_credentials(monkeypatch, comox_serve, two_upstreams, header):
    monkeypatch.setenv("COMOX_ADMIN_KEY", KEY)
    server = comox_serve(settings(two_upstreams))
    headers = {"authorization": header.encode()} if header else {}
    reply = httpx.get(f"{server.url}/admin/backends", headers=headers)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    assert KEY not in reply.text


def test_list_drain_undrain(monkeypatch, comox_serve, two_upstreams):
    monkeypatch.setenv("COMOX_ADMIN_KEY", KEY)
    a, b = two_upstreams
    server = comox_serve(settings(two_upstreams))
    auth = {"authorization": f"Bearer {KEY}"}

    # Drain a while it has a request in flight: that one finishes, no new ones arrive.
    a.faults.append(Fault(delay=0.5))
    answers = []
    state = server.app.gateway.backend("a")
    slow = threading.Thread(target=lambda: answers.append(chat(server)))
    slow.start()  # round robin: the first request goes to a
    wait_until(lambda: state.inflight == 1)
    drained = httpx.post(f"{server.url}/admin/backends/a/drain", headers=auth)
    assert drained.status_code == 200 and drained.json()["state"] == "draining"
    assert drained.json()["inflight"] == 1
    served = {chat(server).headers["x-comox-backend"] for _ in range(4)}
    slow.join(60)
    assert not slow.is_alive()
    assert served == {"b"}
    assert answers[0].status_code == 200 and answers[0].headers["x-comox-backend"] == "a"

    answer = httpx.get(f"{server.url}/admin/backends", headers=auth).json()
    assert answer["groups"]["m"] == {"policy": "round_robin", "available": 1, "panic": False, "queued": 0, "policy_stats": None}
    listing = answer["data"]
    assert [entry["name"] for entry in listing] == ["a", "b"]
    entry = listing[0]
    for field in ("state", "inflight", "ewma_latency_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "ejections", "last_error"):
        assert field in entry
    assert entry["state"] == "draining" and entry["model"] == "m" and entry["requests"] == 1
    assert entry["inflight"] == 0 and entry["ewma_latency_ms"] >= 500
    assert listing[1]["requests"] == 4 and listing[1]["decode_tokens_per_s"] > 0

    assert httpx.post(f"{server.url}/admin/backends/a/undrain", headers=auth).json()["state"] == "healthy"
    assert {chat(server).headers["x-comox-backend"] for _ in range(4)} == {"a", "b"}
    missing = httpx.post(f"{server.url}/admin/backends/nope/drain", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/admin/backends/a/drain", headers=auth).status_code == 405
