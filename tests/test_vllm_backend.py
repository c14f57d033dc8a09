"""The ``vllm`` backend type against a stand-in speaking vLLM's wire format."""


import httpx
import pytest

from comox_llamacpp import parse_prometheus

from tests.standins import VLLMStandIn
from comox.testing import wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def vllms():
    ups = [VLLMStandIn("v0").start(), VLLMStandIn("v1").start()]
    yield ups
    for up in ups:
        up.stop()


def test_parse_prometheus_sums_label_sets_and_ignores_comments():
    text = (
        "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 2.0\n'
        'vllm:num_requests_waiting{model_name="b"} 3.0\n'
        "vllm:num_requests_waiting_total 99\n"
        "llamacpp:requests_deferred 4\n"
    )
    assert parse_prometheus(text, ("vllm:num_requests_waiting", "llamacpp:requests_deferred")) == {
        "vllm:num_requests_waiting": 5.0, "llamacpp:requests_deferred": 4.0}


def test_vllm_metrics_become_the_load_policies_see(comox_serve, vllms):
    v0, v1 = vllms
    v0.waiting, v0.running, v0.kv_cache = 12, 30, 0.42
    health = {"interval_s": 0.05}
    server = comox_serve({
        "server": {"expose_backend_header": True},
        "models": [{"name": "m", "policy": "p2c_ewma", "backends": [
            {"name": "v0", "type": "vllm", "url": v0.url, "health_check": health},
            {"name": "v1", "type": "vllm", "url": v1.url, "health_check": health},
        ]}],
    })
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # starts the gateway
    gateway = server.app.gateway
    s0 = gateway.backend("v0")
    wait_until(lambda: s0.ext_waiting == 12)
    assert s0.ext_running == 30 and s0.kv_cache_usage == pytest.approx(0.42) and s0.load == 12
    served = {httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30).headers["x-comox-backend"] for _ in range(10)}
    assert served == {"v1"}  # v0's engine queue makes it look busy
    snapshot = s0.snapshot()["reported_load"]
    assert snapshot["waiting"] == 12 and snapshot["running"] == 30

    # A full KV cache: the running requests will queue for memory too.
    v0.waiting, v0.kv_cache = 0, 0.99
    wait_until(lambda: s0.ext_waiting == 30)
    assert s0.kv_cache_usage == pytest.approx(0.99)
    # The engine's queue drains: v0 gets traffic again.
    v0.running, v0.kv_cache = 0, 0.1
    wait_until(lambda: s0.ext_waiting == 0)
    served = {httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30).headers["x-comox-backend"] for _ in range(20)}
    # (Whether v1 gets some too is the latency averages' call: on a loaded machine
    # v1's, from the first ten, can stay above v0's for all twenty. Seen in CI.)
    assert "v0" in served


def test_vllm_failing_health_takes_it_out_and_back(comox_serve, vllms):
    v0, v1 = vllms
    health = {"interval_s": 0.05, "unhealthy_threshold": 2, "healthy_threshold": 2}
    server = comox_serve({
        "server": {"expose_backend_header": True},
        "models": [{"name": "m", "backends": [
            {"name": "v0", "type": "vllm", "url": v0.url, "health_check": health, "slow_start_s": 0},
            {"name": "v1", "type": "vllm", "url": v1.url, "health_check": health},
        ]}],
    })
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    s0 = server.app.gateway.backend("v0")
    v0.dead = True
    wait_until(lambda: s0.state == "unhealthy")
    assert "HTTP 500" in s0.last_error
    served = {httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30).headers["x-comox-backend"] for _ in range(6)}
    assert served == {"v1"}
    v0.dead = False
    wait_until(lambda: s0.state == "healthy")
    served = {httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30).headers["x-comox-backend"] for _ in range(6)}
    assert served == {"v0", "v1"}
