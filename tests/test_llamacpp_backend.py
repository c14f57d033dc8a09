"""The ``llamacpp`` backend type against a stand-in speaking llama-server's
wire format: /health while loading, /slots as load, /metrics, id_slot pinning
with prefix_affinity, and cached-token feedback from ``timings.cache_n``."""


import httpx
import pytest

from tests.standins import LlamaServerStandIn
from comox.testing import wait_until, free_port

SYSTEM = "You are a careful assistant who answers briefly. " * 30


@pytest.fixture
def servers():
    started = []

    def make(name, **kwargs):
        up = LlamaServerStandIn(name, **kwargs)
        started.append(up)
        return up.start()

    yield make
    for up in started:
        up.stop()


def gateway_settings(*backends, policy="round_robin", **health):
    check = {"interval_s": 0.05, **health}
    return {
        "server": {"expose_backend_header": True},
        "models": [{"name": "m", "policy": policy, "policy_options": {"block_chars": 64} if policy == "prefix_affinity" else {},
                    "backends": [{"name": up.name, "type": "llamacpp", "url": up.url, "health_check": check, "slow_start_s": 0, **extra}
                                 for up, extra in backends]}],
    }


def ask(server, *messages):
    body = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}] + [{"role": "user", "content": m} for m in messages]}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def test_loading_means_not_ready_not_broken(comox_serve, servers):
    a, b = servers("a"), servers("b")
    a.loading = True
    server = comox_serve(gateway_settings((a, {}), (b, {})))
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    state = server.app.gateway.backend("a")
    wait_until(lambda: state.state == "loading")
    assert state.last_health == "Loading model" and state.failures == 0 and not state.ejected
    assert {ask(server, f"q{i}").headers["x-comox-backend"] for i in range(6)} == {"b"}
    a.loading = False
    wait_until(lambda: state.state == "healthy")
    assert {ask(server, f"r{i}").headers["x-comox-backend"] for i in range(6)} == {"a", "b"}


def test_503_loading_on_a_request_is_retried_and_penalised(comox_serve, servers):
    a, b = servers("a"), servers("b")
    server = comox_serve(gateway_settings((a, {}), (b, {}), enabled=False))
    a.loading = True  # the gateway has not noticed yet (no health checks)
    replies = [ask(server, f"q{i}") for i in range(4)]
    assert all(r.status_code == 200 and r.headers["x-comox-backend"] == "b" for r in replies)
    state = server.app.gateway.backend("a")
    assert state.penalty_ms > 0 and state.last_error == "HTTP 503"


def test_slots_and_metrics_become_load(comox_serve, servers):
    a = servers("a", n_slots=4)
    a.busy_slots, a.deferred = 3, 2
    server = comox_serve(gateway_settings((a, {"metrics": True})))
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    state = server.app.gateway.backend("a")
    wait_until(lambda: state.ext_waiting == 5)  # 3 busy slots that are not ours + 2 deferred
    assert state.total_slots == 4 and state.idle_slots == 1 and state.ext_running == 3


def test_prefix_affinity_pins_node_and_slot_and_learns_from_cache_n(comox_serve, servers):
    a, b = servers("a", n_slots=2), servers("b", n_slots=2)
    server = comox_serve(gateway_settings((a, {}), (b, {}), policy="prefix_affinity"))
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    gateway = server.app.gateway
    wait_until(lambda: all(s.total_slots == 2 for s in gateway.backends()))
    first = ask(server, "tell me about rivers " * 10)
    home_name = first.headers["x-comox-backend"]
    home = a if home_name == "a" else b
    slot = home.requests[-1]["body"]["id_slot"]
    home.cache_n = 150  # the server reports it reused the cached prefix
    conversation = ["tell me about rivers " * 10]
    for turn in range(3):
        conversation.append(f"and then {turn} " * 20)
        reply = ask(server, *conversation)
        assert reply.headers["x-comox-backend"] == home_name
        assert home.requests[-1]["body"]["id_slot"] == slot
    policy = gateway.groups["m"].policy
    state = gateway.backend(home_name)
    assert policy.hit_rate[id(state)] == 1.0 and state.cached_tokens >= 450
    assert state.prefill_tps == pytest.approx(2000.0) and state.decode_tps == pytest.approx(100.0)  # from timings
    home.cache_n = 0  # it restarted: predicted hits stop happening
    for turn in range(4):
        ask(server, "tell me about rivers " * 10, f"later {turn} " * 20)
    assert policy.hit_rate[id(state)] < policy.min_hit_rate


# -- real llama_cpp.server processes ---------------------------------------------

def test_real_llama_servers_survive_a_kill_under_load(comox_serve, llama_processes):
    a, b = llama_processes(), llama_processes()
    health = {"interval_s": 0.5, "timeout_s": 5, "unhealthy_threshold": 1}
    server = comox_serve({
        "server": {"expose_backend_header": True, "retries": 1},
        "models": [{"name": "gemma", "policy": "least_inflight", "backends": [
            {"name": "a", "type": "llamacpp", "url": a.url, "slot_count": 1, "slow_start_s": 0, "health_check": health},
            {"name": "b", "type": "llamacpp", "url": b.url, "slot_count": 1, "slow_start_s": 0, "health_check": health},
        ]}],
    })
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    gateway = server.app.gateway
    sa, sb = gateway.backend("a"), gateway.backend("b")
    # Both are "loading" (not listening yet) until the model is in memory: no traffic, no failures.
    wait_until(lambda: sa.state == "healthy" and sb.state == "healthy", timeout=120)
    assert sa.failures == 0 and sb.failures == 0

    def complete(i):
        body = {"model": "gemma", "prompt": f"Question {i}: the capital of France is", "max_tokens": 4, "temperature": 0}
        # (skip the response cache: these prompts repeat, and a cache hit names no backend)
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120, headers={"x-comox-cache": "skip"})

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = list(pool.map(complete, range(4)))
        assert {r.status_code for r in first} == {200}
        assert {r.headers["x-comox-backend"] for r in first} == {"a", "b"}
        futures = [pool.submit(complete, i) for i in range(4, 16)]
        wait_until(lambda: sa.inflight > 0, timeout=60)
        a.kill()  # under load
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * 12, [r.text for r in replies if r.status_code != 200]  # not one failed request
    wait_until(lambda: sa.state in ("unhealthy", "ejected"), timeout=30)
    assert {complete(i).headers["x-comox-backend"] for i in range(3)} == {"b"}

    llama_processes(port=a.port)  # restart on the same address
    wait_until(lambda: sa.state == "healthy", timeout=120)
    served = {complete(i).headers["x-comox-backend"] for i in range(8)}
    assert "a" in served  # back in rotation
