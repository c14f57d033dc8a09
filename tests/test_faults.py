"""Fault injection under load (issue 16): nodes SIGKILLed and started again,
nodes that hang before their first byte or in the middle of a stream, and the
whole local fleet gone, each while client threads send a bounded load
(tests/faults.py) and every answer is checked. Real processes: stand-in
upstreams in processes of their own, ``python -m llama_cpp.server`` nodes.
Garbage answers: test_faults_garbage.py; slow and vanishing clients:
test_faults_clients.py; Redis: test_faults_redis.py."""

import hashlib
import time

import httpx
import pytest

from comox.fleet import EJECT_AFTER
from comox.testing import StandInUpstream, wait_until

from tests.faults import Load, NodeProcess, Outcome, call
from tests.secrets_check import secret

OUT_OF_ROTATION = ("ejected", "unhealthy")


@pytest.fixture
def node_processes():
    """``node_processes(name, **options)``: started :class:`NodeProcess`es; all stopped at teardown."""
    started: list[NodeProcess] = []

    def start(name, **options):
        node = NodeProcess(name, **options).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def completions(url: str, group: str, stream: bool, max_tokens: int, **extra) -> tuple[str, dict]:
    body = {"model": group, "prompt": "Count: 1, 2, 3,", "max_tokens": max_tokens, **extra}  # not cached: no temperature 0
    if stream:
        body["stream"] = True
    return f"{url}/v1/completions", body


# -- one of three nodes SIGKILLed under load, and started again ---------------------------


def fleet(urls: dict[str, str], kind: str, checks: dict) -> dict:
    """Two groups over the same three nodes: ``plain`` (a broken stream ends
    with an error event) and ``resumable`` (resume_streams: another node
    continues it). Backends ``p-<node>`` and ``r-<node>``."""
    def backends(prefix):
        return [{"name": f"{prefix}-{node}", "type": kind, "url": url, "health_check": checks, "slow_start_s": 0}
                for node, url in urls.items()]

    return {"server": {"expose_backend_header": True}, "models": [
        {"name": "plain", "policy": "round_robin", "backends": backends("p")},
        {"name": "resumable", "policy": "round_robin", "resume_streams": True, "backends": backends("r")}]}


def witness(client: httpx.Client, server, group: str, max_tokens: int, node: str | None = None, tries: int = 12):
    """A stream of ``group`` that has sent its first chunk, on ``node`` if
    given (streams that land elsewhere are closed): ``(node, response, the
    rest of its bytes, its first bytes)``."""
    for _ in range(tries):
        url, body = completions(server.url, group, True, max_tokens)
        response = client.send(client.build_request("POST", url, json=body), stream=True)
        landed = response.headers["x-comox-backend"].split("-", 1)[1]
        if node is None or landed == node:
            chunks = response.iter_raw()
            return landed, response, chunks, next(chunks)
        response.close()
    raise AssertionError(f"no stream of {group} landed on {node} in {tries} tries")


def kill_and_restart(server, nodes: dict, *, kill, restart, interval_s: float, load_tokens: tuple[int, int],
                     witness_tokens: int, plain_witness: bool, threads: int, warmup: int, while_down: int) -> list[Outcome]:
    """The scenario both variants share: a load of JSON and streamed
    completions on both groups; a witness stream (and one of ``plain``, if
    asked) on a node that is then killed; the load goes on while it is down,
    and until it has served again after ``restart``. Returns the outcomes."""
    gateway = server.app.gateway
    wait_until(lambda: all(s.state == "healthy" for s in gateway.backends()), timeout=120)
    json_tokens, stream_tokens = load_tokens

    def request(client, i):
        group = ("plain", "resumable")[i % 2]
        stream = i % 4 >= 2
        url, body = completions(server.url, group, stream, stream_tokens if stream else json_tokens)
        return call(client, url, body, group)

    with Load(request, threads=threads, timeout=60) as load, httpx.Client(timeout=60) as client:
        load.wait(warmup, timeout=120)
        victim, resumable_stream, resumable_rest, resumable_first = witness(client, server, "resumable", witness_tokens)
        plain = witness(client, server, "plain", witness_tokens, victim) if plain_witness else None
        states = [gateway.backend(f"{g}-{victim}") for g in ("p", "r")]
        before = [(s.failures, s.inflight) for s in states]
        kill(victim)
        killed_at = time.monotonic()

        resumed = resumable_first + b"".join(resumable_rest)
        resumable_stream.close()
        witnessed = [Outcome("resumable", True, 200, killed_at, 0.0, resumed)]
        if plain is not None:
            witnessed.append(Outcome("plain", True, 200, killed_at, 0.0, plain[3] + b"".join(plain[2])))
            plain[1].close()
        # Out of rotation by its health checks or by ejection, after at most
        # EJECT_AFTER failed requests more than those it had when it died.
        wait_until(lambda: all(s.state in OUT_OF_ROTATION for s in states), timeout=15)
        for state, (failures, inflight) in zip(states, before):
            assert state.failures - failures <= EJECT_AFTER + inflight, (state.name, state.failures, failures, inflight)
        load.wait(while_down, since=time.monotonic(), timeout=120)

        restart(victim)
        url = nodes[victim]
        wait_until(lambda: _answers(url), timeout=120, interval=0.02)
        back_at = time.monotonic()
        wait_until(lambda: all(s.state == "healthy" for s in states), timeout=15, interval=0.01)
        back_in = time.monotonic() - back_at
        assert back_in <= interval_s + 0.75, f"healthy {back_in:.2f} s after it answered (health interval {interval_s} s)"
        print(f"{victim} killed: out after {[s.failures - f for s, (f, _) in zip(states, before)]} failures, "
              f"healthy {back_in:.2f} s after it answered again")
        # It serves again: requests of the load land on it.
        wait_until(lambda: sum(o.backend in (f"p-{victim}", f"r-{victim}") and o.started > back_at
                               for o in load.outcomes) >= 2, timeout=120)
    outcomes = load.outcomes

    assert resumed.count(b"data: [DONE]") == 1 and b'"error"' not in resumed and b": comox-resumed " in resumed
    if plain is not None:
        assert witnessed[1].interrupted, witnessed[1].body[-300:]
        assert witnessed[1].error_events[0]["code"] == "stream_interrupted"
    failed = [o for o in outcomes if not o.stream and o.status != 200]
    assert failed == [], f"{len(failed)} of {sum(not o.stream for o in outcomes)} JSON requests failed: {failed[:3]}"
    for o in outcomes:
        if o.stream and o.group == "resumable":
            assert o.complete, o.body[-300:]
        elif o.stream:
            assert o.complete or o.interrupted, o.body[-300:]
    # Every slot back: released just after an answer's last byte, which its client may see first.
    wait_until(lambda: all(s.inflight == 0 for s in gateway.backends()), timeout=5)
    print(f"{len(outcomes)} requests ({sum(not o.stream for o in outcomes)} JSON), "
          f"{sum(o.interrupted for o in outcomes)} streams ended with an error event, "
          f"{sum(o.resumed for o in outcomes)} resumed; witnesses: {[o.resumed or o.interrupted for o in witnessed]}")
    return outcomes + witnessed


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_stand_in_node_loses_no_request_and_is_back_within_one_health_interval(comox_serve, node_processes):
    nodes = {name: node_processes(name, stream_chunks=30, chunk_delay=0.02) for name in "abc"}
    checks = {"interval_s": 0.25, "timeout_s": 1.0}
    server = comox_serve(fleet({n: node.url for n, node in nodes.items()}, "openai", checks))
    outcomes = kill_and_restart(
        server, {n: node.url for n, node in nodes.items()}, kill=lambda n: nodes[n].kill(),
        restart=lambda n: nodes[n].start(), interval_s=checks["interval_s"],
        # max_tokens above the stand-in's 30 chunks: a broken stream is unfinished
        load_tokens=(8, 100), witness_tokens=100, plain_witness=True, threads=6, warmup=40, while_down=40)
    assert len(outcomes) >= 80


def test_a_killed_llama_server_node_loses_no_request_and_is_back_within_one_health_interval(comox_serve, llama_processes):
    processes = {name: llama_processes() for name in "abc"}
    urls = {name: process.url for name, process in processes.items()}
    checks = {"interval_s": 0.5, "timeout_s": 2.0}
    server = comox_serve(fleet(urls, "llamacpp", checks))

    def restart(name):
        processes[name] = llama_processes(processes[name].port)

    outcomes = kill_and_restart(
        server, urls, kill=lambda n: processes[n].kill(), restart=restart, interval_s=checks["interval_s"],
        load_tokens=(2, 6), witness_tokens=24, plain_witness=False, threads=3, warmup=6, while_down=6)
    assert sum(not o.stream for o in outcomes) >= 5


# -- nodes that hang -------------------------------------------------------------------


class Stuck(StandInUpstream):
    """An engine that stopped answering behind a server that did not: health
    probes (GET) pass; a JSON request gets nothing, a stream its headers and
    then nothing, until the client leaves (counted in ``disconnects``)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        message = await receive()
        body = message.get("body", b"")
        self.requests.append({"path": scope["path"], "raw": body})
        if b'"stream":true' in body.replace(b" ", b""):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await self._hang(receive)
        self.disconnects += 1


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat_load(server, group="m", **extra):
    def request(client, i):  # two streams in three (a period the round robin over two nodes does not share)
        return call(client, f"{server.url}/v1/chat/completions", {**CHAT, "model": group, "stream": i % 3 > 0, **extra}, group)

    return request


@pytest.mark.transports
def test_a_node_that_hangs_before_its_first_byte_is_left_within_first_byte_timeout(comox_serve, upstreams):
    stuck, good = upstreams("stuck", kind=Stuck), upstreams("good")
    timeout = 0.5
    checks = {"interval_s": 0.2, "timeout_s": 1.0}  # they pass: only the timeout can tell
    # The good node gets room to answer on a loaded machine: what is tested is leaving the stuck one.
    slack = {"first_byte_timeout_s": 5.0, "health_check": {"interval_s": 0.2, "timeout_s": 5.0}}
    server = comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "backends": [
        {"name": "stuck", "url": stuck.url, "first_byte_timeout_s": timeout, "health_check": checks},
        {"name": "good", "url": good.url, **slack}]}]})
    with Load(chat_load(server), threads=8, limit=60) as load:
        load.wait(60)
    outcomes = load.outcomes
    assert [o.status for o in outcomes] == [200] * 60, [(o.status, o.body[:300]) for o in outcomes if o.status != 200]
    assert {o.backend for o in outcomes} == {"good"}
    assert all(o.complete for o in outcomes if o.stream)
    # None waited past one first-byte timeout (plus the answer from good).
    assert max(o.elapsed for o in outcomes) < timeout + 0.75, sorted(o.elapsed for o in outcomes)[-5:]
    gateway = server.app.gateway
    # Ejected after its first-byte timeouts (its passing probes un-eject it, as Envoy's do: each
    # round costs at most EJECT_AFTER requests a timeout, and none waits longer).
    assert gateway.backend("stuck").ejections >= 1 and len(stuck.requests) >= EJECT_AFTER
    assert {b'"stream":true' in r["raw"] for r in stuck.requests} == {True, False}  # streams and JSON both moved
    wait_until(lambda: stuck.disconnects == len(stuck.requests))  # every hung upstream call was closed
    # Every slot back: released just after an answer's last byte, which its client may see first.
    wait_until(lambda: all(s.inflight == 0 for s in gateway.backends()), timeout=5)


@pytest.mark.transports
def test_when_every_node_hangs_the_client_gets_a_503_after_the_timeouts_not_a_hang(comox_serve, upstreams):
    a, b = upstreams("a", kind=Stuck), upstreams("b", kind=Stuck)
    off = {"enabled": False}
    server = comox_serve({"models": [{"name": "m", "backends": [
        {"name": "a", "url": a.url, "first_byte_timeout_s": 0.4, "health_check": off},
        {"name": "b", "url": b.url, "first_byte_timeout_s": 0.4, "health_check": off}]}]})
    with Load(chat_load(server), threads=4, limit=8) as load:
        load.wait(8)
    for o in load.outcomes:  # one try and one retry (server.retries = 1), each cut at 0.4 s
        assert o.status == 503 and o.headers["retry-after"] == "1" and o.elapsed < 2 * 0.4 + 0.75
        message = httpx.Response(503, content=o.body).json()["error"]["message"]
        assert "(last error: no first byte within 0.4 s)" in message or "(last error: backend ejected)" in message
    # Every hung call was closed: at most two tries per request (fewer once both are ejected).
    wait_until(lambda: a.disconnects + b.disconnects == len(a.requests) + len(b.requests))
    assert len(a.requests) + len(b.requests) <= 16


@pytest.mark.transports
def test_a_node_that_hangs_mid_stream_ends_it_within_its_read_timeout(comox_serve, upstreams):
    from comox.testing import Fault

    stalling, good = upstreams("stalling", stream_chunks=6), upstreams("good", stream_chunks=6)
    stalling.faults.extend([Fault(stall_after_chunks=2)] * 200)  # every stream: two chunks, then nothing
    read_timeout = 1.0

    def backends(prefix):
        return [{"name": f"{prefix}-stalling", "url": stalling.url, "timeout_s": read_timeout, "health_check": {"enabled": False}},
                {"name": f"{prefix}-good", "url": good.url, "timeout_s": read_timeout, "health_check": {"enabled": False}}]

    server = comox_serve({"server": {"expose_backend_header": True}, "models": [
        {"name": "plain", "backends": backends("p")},
        {"name": "resumable", "resume_streams": True, "backends": backends("r")}]})

    def request(client, i):
        group = ("plain", "resumable")[i % 2]
        url, body = completions(server.url, group, i % 5 > 0, 100)  # periods the round robin does not share
        return call(client, url, body, group)

    with Load(request, threads=6, limit=40) as load:
        load.wait(40)
    outcomes = load.outcomes
    assert all(o.status == 200 for o in outcomes)
    broken = [o for o in outcomes if o.stream and o.backend == "p-stalling"]
    resumed = [o for o in outcomes if o.stream and o.backend == "r-stalling"]
    assert broken and resumed, [(o.group, o.stream, o.backend, o.status, round(o.elapsed, 2)) for o in outcomes]
    for o in broken:  # the error event came one read timeout after the stall
        assert o.interrupted and o.error_events[0]["code"] == "stream_interrupted"
        assert read_timeout <= o.elapsed < read_timeout + 0.75
    for o in resumed:  # continued by the good node once the read timed out
        assert o.complete and o.resumed and o.elapsed < read_timeout + 0.75
    assert all(o.complete for o in outcomes if o.stream and o.backend.endswith("-good"))
    gateway = server.app.gateway
    wait_until(lambda: stalling.disconnects == len(broken) + len(resumed))  # the stalled calls were closed
    # Every slot back: released just after an answer's last byte, which its client may see first.
    wait_until(lambda: all(s.inflight == 0 for s in gateway.backends()), timeout=5)


# -- the whole local fleet gone ------------------------------------------------------------


def sha(key: str) -> str:
    """The hash of a client key, which is registered with the secrets check."""
    return hashlib.sha256(secret(key).encode()).hexdigest()


def test_the_whole_local_fleet_gone_fails_over_or_503s_and_sovereign_traffic_never_leaves(
        comox_serve, node_processes, upstreams, monkeypatch):
    monkeypatch.setenv("CLOUD_API_KEY", "sk-cloud")
    a, b = node_processes("a"), node_processes("b")
    cloud = upstreams("cloud")
    checks = {"interval_s": 0.2, "timeout_s": 1.0}

    def local(prefix):
        return [{"name": f"{prefix}-{n.name}", "url": n.url, "health_check": checks} for n in (a, b)]

    def failover(name):
        return {"trigger": "error", "backends": [{"name": name, "url": cloud.url, "model": "cloud-model",
                                                  "api_key_env": "CLOUD_API_KEY", "price_input_per_mtok": 1.0,
                                                  "price_output_per_mtok": 2.0}]}

    keys = [{"id": "team", "key_sha256": sha("sk-team")},
            {"id": "vault", "key_sha256": sha("sk-vault"), "local_only": True}]
    with_cloud = comox_serve({"auth": "keys", "sections": {"keys": keys}, "models": [
        {"name": "chat", "backends": local("c"), "failover": failover("cloud")},
        # sovereign, with a failover it must never use
        {"name": "secret", "sovereign": True, "backends": local("s"), "failover": failover("cloud-s")}]})
    without = comox_serve({"auth": "keys", "sections": {"keys": keys}, "models": [{"name": "chat", "backends": local("n")}]})
    # (target, model, key); a request that must stay home says so in its text
    kinds = [(with_cloud, "chat", "sk-team"), (with_cloud, "chat", "sk-vault"), (with_cloud, "secret", "sk-team"),
             (without, "chat", "sk-team")]

    def request(client, i):
        server, model, key = kinds[i % 4]
        home = key == "sk-vault" or model == "secret"
        body = {"model": model, "messages": [{"role": "user", "content": f"{'stay-home' if home else 'hi'} {i}"}],
                "stream": i % 8 >= 4}
        outcome = call(client, f"{server.url}/v1/chat/completions", body, f"{i % 4}",
                       headers={"authorization": f"Bearer {key}"})
        return outcome

    states = [s for server in (with_cloud, without) for s in server.app.gateway.backends()]
    with Load(request, threads=8, limit=3000) as load:
        load.wait(40)
        gone_at = time.monotonic()
        a.kill()
        b.kill()
        wait_until(lambda: all(s.state in OUT_OF_ROTATION for s in states), timeout=10)
        seen_at = time.monotonic()  # every gateway knows: no local backend in rotation
        load.wait(120, since=seen_at)
    outcomes = load.outcomes
    assert all(o.status is not None for o in outcomes)
    before = [o for o in outcomes if o.started + o.elapsed < gone_at]
    after = [o for o in outcomes if o.started > seen_at]
    assert before and all(o.status == 200 for o in before)
    by_kind = {k: [o for o in after if o.group == str(k)] for k in range(4)}
    assert all(by_kind.values())
    # Traffic that may leave: every request answered, by the cloud once the fleet is gone.
    for o in [o for o in outcomes if o.group == "0"]:
        assert o.status == 200 and (o.complete if o.stream else True), o.body[-200:]
    assert {o.headers["x-comox-route"] for o in by_kind[0]} == {"failover"}
    # Traffic that must stay home: 503 local_capacity_exhausted with retry-after, never the cloud.
    for o in by_kind[1] + by_kind[2]:
        assert o.status == 503 and o.headers["retry-after"] == "1"
        assert httpx.Response(503, content=o.body).json()["error"]["code"] == "local_capacity_exhausted"
    # No failover configured: a clean 503 with retry-after, at once.
    for o in by_kind[3]:
        assert o.status == 503 and o.headers["retry-after"] == "1" and o.elapsed < 1.0
        assert httpx.Response(503, content=o.body).json()["error"]["code"] == "no_backend_available"
    assert all(o.status == 200 or o.status == 503 for o in outcomes)
    sent = [r["raw"] for r in cloud.requests]
    assert sent and not any(b"stay-home" in raw for raw in sent)
    assert len(sent) == sum(o.headers.get("x-comox-route") == "failover" for o in outcomes)
