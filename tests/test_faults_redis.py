"""Redis gone under load (issue 16): two gateway processes sharing a real
``redis-server`` through the ``redis`` plugin, with the ``keys`` and
``limits`` plugins and an ``rpm`` on each key, while client threads keep
sending. Redis is killed and started again, then frozen (SIGSTOP, so calls
time out instead of being refused) and let go. Service never stops (no
request fails beyond its key's limit), and a capped key is never allowed
more than docs/limits.md and docs/deployment.md allow: ``rpm`` plus its
refill while shared; each replica its share (``rpm`` / 2 here) plus its
refill while degraded; a fresh full bucket once an empty Redis is back."""

import hashlib
import math
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from comox.testing import free_port, stop_process, wait_for_http, wait_until

from tests.faults import Load, call
from tests.secrets_check import secret

RPM = 30
REFILL = RPM / 60  # tokens a second
STEADY, CAPPED = secret("sk-steady-faults"), secret("sk-capped-faults")


def sha(key: str) -> str:
    """The hash of a client key, which is registered with the secrets check."""
    return hashlib.sha256(secret(key).encode()).hexdigest()


def config(upstream: str, redis_url: str) -> str:
    return f"""
[[keys]]
id = "steady"
key_sha256 = "{sha(STEADY)}"
rpm = 1000000

[[keys]]
id = "capped"
key_sha256 = "{sha(CAPPED)}"
rpm = {RPM}

[[models]]
name = "m"

  [[models.backends]]
  name = "stand-in"
  url = "{upstream}"

[state]
redis_url = "{redis_url}"
heartbeat_s = 0.2
"""


class Gateway:
    """``comox serve`` in a process of its own."""

    def __init__(self, config_path, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config_path), "--port",
                                      str(self.port), "--log-level", "info"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_http(f"{self.url}/healthz", proc=self.proc, detail=log_path.read_text)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> str:
        return httpx.get(f"{self.url}/readyz", timeout=5).json().get("state")

    def stop(self):
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def gateways(tmp_path, redis_server, comox_upstream):
    path = tmp_path / "comox.toml"
    path.write_text(config(comox_upstream.url, redis_server.url))
    started = []
    try:
        for n in range(2):
            started.append(Gateway(path, tmp_path / f"gateway{n}.log"))
        wait_until(lambda: all(httpx.get(f"{g.url}/readyz").json().get("replicas") == 2 for g in started), timeout=15)
        yield started
    finally:
        for gateway in started:
            gateway.stop()


def chat(client: httpx.Client, gateway: Gateway, key: str):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return call(client, f"{gateway.url}/v1/chat/completions", body, str(gateway.port), {"authorization": f"Bearer {key}"})


def capped(gateways, count: int) -> tuple[dict[int, int], float]:
    """``count`` requests of the capped key, taking turns: 200s per gateway
    port, and how long it took. Anything but 200 or 429 fails the test."""
    served = {g.port: 0 for g in gateways}
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            outcome = chat(client, gateways[i % len(gateways)], CAPPED)
            assert outcome.status in (200, 429), (outcome.status, outcome.body)
            served[int(outcome.group)] += outcome.status == 200
    return served, time.monotonic() - started


def allowed(capacity: float, seconds: float) -> int:
    """What a token bucket holding ``capacity`` (full at the start) can grant in ``seconds``."""
    return math.floor(capacity + REFILL * capacity / RPM * seconds)


def test_redis_killed_then_frozen_under_load_keeps_serving_and_holds_the_limits(gateways, redis_server):
    a, b = gateways

    def steady(client, i):
        return chat(client, (a, b)[i % 2], STEADY)

    phases = []
    with Load(steady, threads=4, limit=100000) as load:
        load.wait(40)
        served, took = capped(gateways, 40)  # shared: one bucket of RPM across both
        phases.append(served)
        assert RPM <= sum(served.values()) <= allowed(RPM, took), served

        killed_at = time.monotonic()
        redis_server.kill()
        wait_until(lambda: a.state() == b.state() == "degraded", timeout=10)
        served, took = capped(gateways, 40)  # degraded: each replica takes its share, RPM / 2
        phases.append(served)
        for port, count in served.items():
            assert RPM / 2 <= count <= allowed(RPM / 2, took) + 1, served  # "within about one request per replica"
        load.wait(40, since=time.monotonic())

        redis_server.start()  # the same port, empty: full buckets again
        wait_until(lambda: a.state() == b.state() == "shared", timeout=15)
        back_at = time.monotonic()
        served, took = capped(gateways, 40)
        phases.append(served)
        assert sum(served.values()) <= allowed(RPM, took), served
        load.wait(40, since=time.monotonic())

        frozen_at = time.monotonic()
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing: calls time out
        try:
            wait_until(lambda: a.state() == b.state() == "degraded", timeout=10)
            served, took = capped(gateways, 40)
            phases.append(served)
            for port, count in served.items():
                assert count <= allowed(RPM / 2, took) + 1, served
            load.wait(40, since=time.monotonic())
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        thawed_at = time.monotonic()
        wait_until(lambda: a.state() == b.state() == "shared", timeout=15)
        load.wait(40, since=time.monotonic())

    outcomes = load.outcomes
    # Service never stopped: every request of the key within its limits answered.
    failed = [(o.status, o.body[:120]) for o in outcomes if o.status != 200]
    assert failed == [], failed[:5]
    for start, end in ((killed_at, back_at), (frozen_at, thawed_at)):
        during = [o for o in outcomes if start <= o.started <= end]
        assert len(during) >= 40
    # A frozen Redis costs a request at most its timeouts (200 ms a call), never a hang.
    assert max(o.elapsed for o in outcomes if frozen_at <= o.started <= thawed_at) < 2.0
    print(f"redis outages: {len(outcomes)} requests of the steady key, all answered; "
          f"slowest while frozen {max(o.elapsed for o in outcomes if frozen_at <= o.started <= thawed_at):.3f} s; "
          f"the capped key per phase and gateway: {[list(p.values()) for p in phases]}")
    for gateway in gateways:
        log = gateway.log_path.read_text()
        assert log.count("shared state degraded") == 2 and log.count("shared state recovered") == 2
        assert "Traceback" not in log
