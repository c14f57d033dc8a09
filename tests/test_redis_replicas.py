"""Many replicas, one Redis: gateway processes sharing a real ``redis-server``
through the ``redis`` plugin hold a key to its rpm across all of them (the
``limits`` plugin) and share one response cache (the ``cache`` plugin); with
Redis killed mid-test they keep serving, each counting its share, and share
again by themselves when it is back; ``on_failure = "closed"`` answers 503
meanwhile. Keys come from tests/plugins/bearer_limits.py."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from comox.testing import free_port, stop_process, wait_for_http, wait_until
from tests.plugins import bearer_limits

ROOT = Path(__file__).parent.parent


def config(upstream_url: str, redis_url: str, **state) -> str:
    table = "\n".join(f"{key} = {value!r}" for key, value in {"redis_url": redis_url, **state}.items())
    return f"""
auth = "none"  # tests/plugins/bearer_limits.py vouches for every caller

[[models]]
name = "m"

  [[models.backends]]
  name = "stand-in"
  url = "{upstream_url}"

[state]
{table}
"""


class Replica:
    """One gateway process: uvicorn serving create_app() with bearer_limits."""

    def __init__(self, config_path: Path, log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.plugins.bearer_limits:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info"],
            cwd=ROOT, env={**os.environ, "COMOX_CONFIG": str(config_path)}, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_http(f"{self.url}/healthz", proc=self.proc, detail=self.log_path.read_text)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=5).json()

    def chat(self, key: str, text: str = "hi", **extra) -> tuple[int, httpx.Headers]:
        """One chat completion with the openai SDK: its status and headers."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": text}], max_tokens=5, **extra)
            return raw.http_response.status_code, raw.headers
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def replicas(tmp_path, redis_server, comox_upstream):
    """``replicas(n, **state)``: n gateway processes sharing ``redis_server``."""
    started: list[Replica] = []

    def start(n: int = 2, **state) -> list[Replica]:
        path = tmp_path / "comox.toml"
        path.write_text(config(comox_upstream.url, redis_server.url, heartbeat_s=0.2, **state))
        started.extend(Replica(path, tmp_path / f"replica{len(started)}.log") for _ in range(n))
        wait_until(lambda: all(r.ready().get("replicas") == n for r in started), timeout=15)
        return started

    yield start
    for replica in started:
        replica.stop()


def statuses(replicas, key, count, **extra):
    """``count`` requests for ``key``, taking turns across ``replicas``."""
    return [replicas[i % len(replicas)].chat(key, **extra)[0] for i in range(count)]


def test_replicas_hold_a_key_to_its_rpm_and_share_the_cache(replicas, comox_upstream):
    a, b = replicas(2)
    assert a.ready() == {"ready": True, "state": "shared", "replicas": 2, "started": True}
    # 5 a minute across both replicas: the sixth is refused wherever it lands
    # (a token takes 12 s to come back; the test takes well under that).
    assert statuses([a, b], "alice:5", 8) == [200] * 5 + [429] * 3
    status, headers = b.chat("alice:5")
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "0" and int(headers["retry-after"]) >= 1
    assert statuses([b, a], "bob:5", 2) == [200, 200]  # another key has its own allowance

    sent = len(comox_upstream.requests)
    status, first = a.chat("carol:100", "cache me", temperature=0)
    assert status == 200 and first["x-comox-cache"] == "miss"
    status, second = b.chat("carol:100", "cache me", temperature=0)
    assert status == 200 and second["x-comox-cache"] == "hit"  # stored through a, found through b
    assert len(comox_upstream.requests) == sent + 1


def test_redis_down_degrades_without_a_failed_request_then_recovers(replicas, redis_server, comox_upstream):
    a, b = replicas(2)
    assert statuses([a, b], "big:1000", 4) == [200] * 4

    redis_server.kill()
    # Every request still answered: limits counted here, the cache bypassed.
    assert statuses([a, b], "big:1000", 10) == [200] * 10
    sent = len(comox_upstream.requests)
    assert [a.chat("big:1000", "uncached", temperature=0)[1]["x-comox-cache"] for _ in range(2)] == ["miss", "miss"]
    assert len(comox_upstream.requests) == sent + 2
    for replica in (a, b):
        ready = replica.ready()
        assert ready["ready"] and ready["state"] == "degraded" and "redis unreachable" in ready["reason"]
        assert httpx.get(f"{replica.url}/readyz").status_code == 200  # still takes traffic
    # 4 a minute among 2 replicas: each serves its 2.
    assert statuses([a], "small:4", 3) == [200, 200, 429]
    assert statuses([b], "small:4", 3) == [200, 200, 429]

    redis_server.start()  # the same port, empty
    wait_until(lambda: all(r.ready()["state"] == "shared" for r in (a, b)), timeout=15)
    assert statuses([a, b], "after:3", 6) == [200] * 3 + [429] * 3  # one count across both again
    assert a.chat("dave:100", "shared again", temperature=0)[1]["x-comox-cache"] == "miss"
    assert b.chat("dave:100", "shared again", temperature=0)[1]["x-comox-cache"] == "hit"

    logs = a.log_path.read_text()
    assert logs.count("shared state degraded (redis unreachable: ") == 1
    assert logs.count("shared state recovered") == 1


def test_on_failure_closed_refuses_while_redis_is_down(comox_serve, comox_upstream, redis_server):
    gateway = comox_serve({
        "models": [{"name": "m", "backends": [{"name": "stand-in", "url": comox_upstream.url}]}],
        "sections": {"state": {"redis_url": redis_server.url, "on_failure": "closed"}},
    }, plugins=[bearer_limits])
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="erin:100", max_retries=0, timeout=30)

    def chat():
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)

    assert chat().choices[0].message.content
    redis_server.kill()
    with pytest.raises(openai.InternalServerError) as refused:
        chat()
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "shared_state_unavailable"
    assert "shared state (Redis) is unreachable" in refused.value.body["message"]
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503 and ready.json()["state"] == "unavailable"

    redis_server.start()
    wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 200, timeout=15)
    assert chat().choices[0].message.content
