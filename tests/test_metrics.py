"""The metrics plugin and x-comox-overhead-ms: /metrics scraped from real
gateways (uvicorn on loopback, stand-in upstreams) under small bounded loads,
`comox serve --workers 2` scraped as one, and the Grafana dashboard checked
against what /metrics exposes (docs/telemetry.md)."""

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import comox
from comox.testing import Fault, free_port, stop_process, wait_for_http, wait_until
from comox_metrics.series import FOLD_EVERY, Metrics
from tests.secrets_check import secret as register_secret

ROOT = Path(__file__).parent.parent
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
LABEL_NAMES = {"model", "backend", "endpoint", "status", "route", "cache", "state", "budget", "version", "le"}


def scrape(url, **kwargs):
    """``(samples, families)`` of ``GET url/metrics``: samples as
    ``(name, labels, value)``, families as ``{name: type}``."""
    response = httpx.get(f"{url}/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, families = [], {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = family.type
        samples += [(s.name, s.labels, s.value) for s in family.samples]
    return samples, families


def total(samples, name, **labels):
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def values_of(samples, name, label):
    return {have[label] for n, have, _ in samples if n == name}


def two_backends(a, b, **group):
    return {"models": [{"name": "chat", "policy": "round_robin", **group,
                        "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]},
                       {"name": "embed", "backends": [{"name": "e", "url": a.url}]}]}


def stream(url, body, headers=None):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers) as response:
        text = "".join(response.iter_text())
    return response, text


# -- a gateway under load ----------------------------------------------------------


def test_scrape_counts_a_bounded_load_by_every_label(comox_serve, upstreams):
    a = upstreams("a", stream_chunks=5, chunk_delay=0.02)
    b = upstreams("b", stream_chunks=5, chunk_delay=0.02)
    server = comox_serve(two_backends(a, b))
    url = server.url

    def one(i):
        kind = i % 4
        if kind == 0:
            return stream(url, CHAT)[0].status_code
        if kind == 3 and i % 8 == 3:
            return httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": f"x{i}"}).status_code
        return httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(48)))
    assert statuses == [200] * 48
    # Refused ones: unknown model, broken JSON, unknown path, wrong method.
    assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    assert httpx.post(f"{url}/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(f"{url}/v1/nothing-here", json=CHAT).status_code == 404
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405

    samples, families = scrape(url)
    requests = "comox_requests_total"
    assert total(samples, requests) == 52
    assert total(samples, requests, model="chat", status="200", route="local") == 42  # 12 streams, 30 JSON
    assert total(samples, requests, model="embed", endpoint="embeddings", backend="e") == 6
    assert total(samples, requests, model="chat", backend="a") == total(samples, requests, model="chat", backend="b") == 21
    assert total(samples, requests, route="", status="404") == 2 and total(samples, requests, status="400") == 1
    assert total(samples, requests, status="405", endpoint="chat/completions") == 1
    assert total(samples, requests, endpoint="", status="404") == 1  # the unknown path

    # Latency for every answer, TTFT and inter-token latency for streams, overhead for all.
    assert total(samples, "comox_request_duration_seconds_count", model="chat") == 42
    assert total(samples, "comox_time_to_first_token_seconds_count") == 12
    assert total(samples, "comox_inter_token_latency_seconds_count") == 12
    assert total(samples, "comox_gateway_overhead_seconds_count") == 48
    itl = total(samples, "comox_inter_token_latency_seconds_sum") / 12
    assert 0.015 < itl < 0.2  # the stand-in waits 20 ms between chunks
    duration = total(samples, "comox_request_duration_seconds_sum", model="chat") / 42
    overhead = total(samples, "comox_gateway_overhead_seconds_sum") / 48
    assert 0 < overhead < duration
    assert total(samples, "comox_request_duration_seconds_bucket", model="chat", le="+Inf") == 42

    # Tokens as the answers reported them (a stream without usage: its events).
    assert total(samples, "comox_input_tokens_total", model="chat") == 30 * 5
    assert total(samples, "comox_output_tokens_total", model="chat") == 30 * 3 + 12 * 5
    assert total(samples, "comox_input_tokens_total", model="embed") == 6

    # The fleet, read when scraped.
    assert total(samples, "comox_backend_inflight") == 0
    assert total(samples, "comox_backend_state", backend="a", state="healthy") == 1
    assert total(samples, "comox_backend_state", backend="a", state="ejected") == 0
    assert total(samples, "comox_model_backends_available", model="chat") == 2
    assert total(samples, "comox_backend_decode_tokens_per_second", backend="a") > 0
    assert total(samples, "comox_backend_ejections_total", backend="a") == 0
    assert total(samples, "comox_info", version=comox.__version__) == 1

    assert all(name.startswith("comox_") for name in families)
    assert {"comox_requests", "comox_request_duration_seconds", "comox_time_to_first_token_seconds",
            "comox_inter_token_latency_seconds", "comox_gateway_overhead_seconds", "comox_input_tokens",
            "comox_output_tokens", "comox_cached_tokens", "comox_retries", "comox_failovers", "comox_rate_limited",
            "comox_backend_inflight", "comox_backend_state", "comox_backend_ejections",
            "comox_backend_decode_tokens_per_second", "comox_model_backends_available"} <= set(families)


def test_time_to_first_token_and_in_flight_are_the_backends(comox_serve, upstreams):
    a = upstreams("a")
    server = comox_serve({"models": [{"name": "chat", "backends": [{"name": "a", "url": a.url}]}]})
    a.faults.append(Fault(delay=0.3))
    slow = threading.Thread(target=stream, args=(server.url, CHAT))
    slow.start()
    wait_until(lambda: len(a.requests) == 1)
    samples, _ = scrape(server.url)
    assert total(samples, "comox_backend_inflight", backend="a") == 1
    slow.join()
    samples, _ = scrape(server.url)
    assert total(samples, "comox_backend_inflight", backend="a") == 0
    ttft = total(samples, "comox_time_to_first_token_seconds_sum")
    assert 0.3 <= ttft < 2
    assert total(samples, "comox_time_to_first_token_seconds_bucket", le="0.2") == 0
    assert total(samples, "comox_time_to_first_token_seconds_bucket", le="0.4") == 1
    # The backend's wait is not the gateway's overhead.
    assert total(samples, "comox_gateway_overhead_seconds_sum") < 0.1


# -- retries, failover, rate limits, cache, ejections -----------------------------------


class Refuse:
    """Rate-limits mallory; answers a group with no live backend from "the cloud"."""

    @comox.hookimpl
    def comox_admit(self, request):
        if request.json.get("user") == "mallory":
            raise comox.RateLimited("mallory sends too much", retry_after=1)

    @comox.hookimpl
    async def comox_failover(self, request):
        await asyncio.sleep(0.25)  # a slow cloud: its time is not the gateway's overhead
        body = {"id": "x", "object": "chat.completion", "created": 1, "model": "cloud", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "from the cloud"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
        return comox.BackendResponse(200, body=json.dumps(body).encode())


def test_retries_failovers_rate_limits_and_cache_hits_are_counted(comox_serve, upstreams):
    a, b = upstreams("a"), upstreams("b")
    dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}", "health_check": {"enabled": False}}
    settings = two_backends(a, b)
    settings["models"].append({"name": "spill", "backends": [dead]})
    server = comox_serve(settings, plugins=[Refuse()])
    url = server.url

    a.faults.append(Fault(status=503))
    b.faults.append(Fault(status=503))
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200  # one 503, retried on the other
    assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "user": "mallory"}).status_code == 429
    spilled = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "spill"})
    assert spilled.json()["choices"][0]["message"]["content"] == "from the cloud"
    assert spilled.headers["x-comox-route"] == "failover"
    assert float(spilled.headers["x-comox-overhead-ms"]) < 200  # the cloud took 250 ms of it
    deterministic = {**CHAT, "temperature": 0}
    assert httpx.post(f"{url}/v1/chat/completions", json=deterministic).headers["x-comox-cache"] == "miss"
    assert httpx.post(f"{url}/v1/chat/completions", json=deterministic).headers["x-comox-cache"] == "hit"

    samples, _ = scrape(url)
    assert total(samples, "comox_retries_total", model="chat") == 1
    assert total(samples, "comox_rate_limited_total", model="chat") == 1
    assert total(samples, "comox_requests_total", status="429", route="", model="chat") == 1
    assert total(samples, "comox_failovers_total", model="spill") == 1
    assert total(samples, "comox_requests_total", model="spill", route="failover", backend="", status="200") == 1
    assert total(samples, "comox_input_tokens_total", model="spill", route="failover") == 7
    assert total(samples, "comox_requests_total", route="cache", cache="hit") == 1
    assert total(samples, "comox_requests_total", route="local", cache="miss") == 1
    assert values_of(samples, "comox_requests_total", "route") == {"local", "failover", "cache", ""}
    assert values_of(samples, "comox_requests_total", "cache") <= {"hit", "miss", "skip", ""}


def test_an_ejected_backend_shows_in_its_state_and_ejections(comox_serve, upstreams):
    live = upstreams("live")
    dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}", "health_check": {"enabled": False}}
    server = comox_serve({"models": [{"name": "chat", "policy": "round_robin",
                                      "backends": [dead, {"name": "live", "url": live.url}]}]})
    for _ in range(10):  # every other one tries the dead node first: 5 failures eject it
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    samples, _ = scrape(server.url)
    assert total(samples, "comox_backend_ejections_total", backend="dead") == 1
    assert total(samples, "comox_backend_state", backend="dead", state="ejected") == 1
    assert total(samples, "comox_backend_state", backend="dead", state="healthy") == 0
    assert total(samples, "comox_model_backends_available", model="chat") == 1
    assert total(samples, "comox_retries_total") == 5
    server.app.gateway.set_draining("live", True)
    samples, _ = scrape(server.url)
    assert total(samples, "comox_backend_state", backend="live", state="draining") == 1


def test_cloud_spend_and_reservations_are_what_admin_spend_reports(comox_serve, upstreams, monkeypatch):
    monkeypatch.setenv("CLOUD_KEY", "sk-cloud")
    monkeypatch.setenv("COMOX_ADMIN_KEY", "admin-secret")
    cloud = upstreams("cloud")
    dead = {"name": "local", "url": f"http://127.0.0.1:{free_port()}", "health_check": {"enabled": False}}
    failover = {"trigger": "error", "backends": [{"name": "cloud", "url": cloud.url, "api_key_env": "CLOUD_KEY",
                                                  "price_input_per_mtok": 2000.0, "price_output_per_mtok": 8000.0}]}
    server = comox_serve({"models": [{"name": "chat", "backends": [dead], "failover": failover}],
                          "sections": {"budgets": {"cloud_usd_per_day": 5.0}}})
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 10})
    assert reply.headers["x-comox-route"] == "failover"
    # A reservation held by a request in flight, as the failover plugin makes it.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    asyncio.run(server.app.gateway.shared_state.add(f"budget:day:{today}", 250_000_000, ttl_s=3600))
    spend = {row["budget"]: row for row in httpx.get(f"{server.url}/admin/spend",
                                                    headers={"authorization": "Bearer admin-secret"}).json()["budgets"]}
    samples, _ = scrape(server.url)
    assert spend["day"]["spent_usd"] == pytest.approx(5 * 2000 / 1e6 + 3 * 8000 / 1e6)  # 0.034
    for budget in ("day", "month"):
        assert total(samples, "comox_cloud_spent_usd", budget=budget) == pytest.approx(spend[budget]["spent_usd"])
        assert total(samples, "comox_cloud_reserved_usd", budget=budget) == pytest.approx(spend[budget]["reserved_usd"])
    assert total(samples, "comox_cloud_reserved_usd", budget="day") == pytest.approx(0.25)
    assert total(samples, "comox_cloud_budget_usd", budget="day") == 5.0
    assert "month" not in values_of(samples, "comox_cloud_budget_usd", "budget")  # no monthly limit set


# -- labels ----------------------------------------------------------------------------


def test_labels_hold_no_request_id_key_or_content_and_stay_bounded(comox_serve, upstreams):
    a, b = upstreams("a"), upstreams("b")
    key = register_secret("cmx-metrics-test-secret-key")
    settings = {"auth": "keys", **two_backends(a, b),
                "sections": {"keys": [{"id": "team-a", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}]}}
    server = comox_serve(settings)
    url = server.url
    auth = {"authorization": f"Bearer {key}"}

    def burst(tag):
        ids = []
        for i in range(10):
            rid = f"req-{tag}-{i}"
            ids.append(rid)
            body = {"model": "chat", "messages": [{"role": "user", "content": f"secret prompt {tag} {i}"}]}
            headers = {**auth, "x-request-id": rid}
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            stream(url, body, headers)
            httpx.post(f"{url}/v1/chat/completions", json={**body, "model": f"no-such-model-{tag}-{i}"}, headers=headers)
            httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer wrong-{tag}-{i}"})
            httpx.post(f"{url}/v1/path-{tag}-{i}", json=body, headers=headers)
        return ids

    ids = burst("one")
    first = httpx.get(f"{url}/metrics").text
    ids += burst("two")
    text = httpx.get(f"{url}/metrics").text
    for secret in (key, "secret prompt", "no-such-model", "wrong-", "path-", *ids):
        assert secret not in text
    # Twice the requests, with new ids, prompts and model names: not one more series.
    assert len([line for line in text.splitlines() if not line.startswith("#")]) == \
        len([line for line in first.splitlines() if not line.startswith("#")])
    samples, _ = scrape(url)
    assert {label for _, labels, _ in samples for label in labels} <= LABEL_NAMES
    assert values_of(samples, "comox_requests_total", "model") <= {"chat", "embed", ""}
    assert values_of(samples, "comox_requests_total", "backend") <= {"a", "b", "e", ""}
    assert values_of(samples, "comox_requests_total", "endpoint") == {"chat/completions", ""}
    assert values_of(samples, "comox_requests_total", "status") == {"200", "401", "404"}
    assert total(samples, "comox_requests_total") == 100


# -- x-comox-overhead-ms -------------------------------------------------------------


class Limited:
    @comox.hookimpl
    def comox_admit(self, request):
        if request.json.get("user") == "mallory":
            raise comox.RateLimited("slow down", retry_after=1)


def timed(send):
    start = time.perf_counter()
    response = send()
    return response, (time.perf_counter() - start) * 1000


def test_every_api_answer_says_the_overhead_and_it_excludes_the_backend(comox_serve, upstreams):
    a = upstreams("a")
    key = register_secret("cmx-overhead-key")
    server = comox_serve({"auth": "keys", "models": [{"name": "chat", "backends": [{"name": "a", "url": a.url}]}],
                          "sections": {"keys": [{"id": "k", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}]}},
                         plugins=[Limited()])
    url = server.url
    auth = {"authorization": f"Bearer {key}"}
    answers = {
        "json": lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth),
        "stream": lambda: stream(url, CHAT, auth)[0],
        "models": lambda: httpx.get(f"{url}/v1/models", headers=auth),
        "unknown model": lambda: httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "x"}, headers=auth),
        "no key": lambda: httpx.post(f"{url}/v1/chat/completions", json=CHAT),
        "rate limited": lambda: httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "user": "mallory"}, headers=auth),
        "unknown path": lambda: httpx.post(f"{url}/v1/nope", json=CHAT, headers=auth),
        "bad json": lambda: httpx.post(f"{url}/v1/chat/completions", content=b"{", headers=auth),
    }
    for name, send in answers.items():
        response, elapsed_ms = timed(send)
        overhead = float(response.headers["x-comox-overhead-ms"])
        assert 0 <= overhead < elapsed_ms, name
        assert re.fullmatch(r"\d+\.\d{3}", response.headers["x-comox-overhead-ms"]), name
    for fault in (Fault(delay=0.3), Fault(delay=0.3)):  # a slow backend, JSON then stream
        a.faults.append(fault)
    for send in (answers["json"], answers["stream"]):
        response, elapsed_ms = timed(send)
        assert elapsed_ms >= 300
        assert float(response.headers["x-comox-overhead-ms"]) < 100


# -- [plugins.metrics] -------------------------------------------------------------------


def test_metrics_behind_the_admin_key_when_asked(comox_serve, upstreams, monkeypatch, caplog):
    a = upstreams("a")
    settings = {"models": [{"name": "chat", "backends": [{"url": a.url}]}],
                "plugins": {"metrics": {"require_admin_key": True}}}
    monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    server = comox_serve(settings)  # no admin key: not served at all (fail closed), and said so
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    assert "the admin key's environment variable COMOX_ADMIN_KEY is not set, so /metrics is not served" in caplog.text
    monkeypatch.setenv("COMOX_ADMIN_KEY", "admin-secret")
    server = comox_serve(settings)
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
    assert scrape(server.url, headers={"authorization": "Bearer admin-secret"})[1]


def test_metrics_are_open_by_default_and_speak_openmetrics(comox_serve, upstreams):
    a = upstreams("a")
    server = comox_serve({"models": [{"name": "chat", "backends": [{"url": a.url}]}],
                          "plugins": {"metrics": {"path": "/-/metrics"}}})
    httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    with pytest.raises(comox.ConfigError, match=r"plugins\.metrics\.path: Value error, /v1/metrics is served by Comox"):
        comox.build_gateway(comox.Settings(auth="none", plugins={"metrics": {"path": "/v1/metrics"}}))
    response = httpx.get(f"{server.url}/-/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert 'comox_requests_total{backend="' in response.text


# -- comox serve --workers 2 -----------------------------------------------------------


def test_workers_are_scraped_as_one(tmp_path, upstreams):
    a = upstreams("a")
    config = tmp_path / "comox.toml"
    config.write_text(f'auth = "none"\n[[models]]\nname = "chat"\n[[models.backends]]\nname = "a"\nurl = "{a.url}"\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                             "--workers", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", proc=proc, detail=proc.stderr.read)

        def one(_):
            with httpx.Client() as client:  # a new connection each: the workers share the socket
                return client.post(f"{url}/v1/chat/completions", json=CHAT).status_code

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(200))) == [200] * 200
        # Both workers served some (each writes its own files: counter_<pid>.db)...
        shared = list(Path(tempfile.gettempdir()).glob(f"comox-metrics-{proc.pid}-*"))
        assert len(shared) == 1
        assert len(list(shared[0].glob("counter_*.db"))) == 2
        # ... and every scrape, whichever worker answers it, counts them all.
        for _ in range(6):
            samples, _ = scrape(url)
            assert total(samples, "comox_requests_total", status="200") == 200
            assert total(samples, "comox_request_duration_seconds_count") == 200
            assert total(samples, "comox_backend_state", backend="a", state="healthy") == 1
        # The fleet gauges of the worker not scraped are as old as its last refresh
        # (refresh_s, 2 s): in flight drops to 0 within a few refreshes, not at once.
        deadline = time.monotonic() + 10
        while total(scrape(url)[0], "comox_backend_inflight", backend="a") != 0:
            assert time.monotonic() < deadline, "in flight still counted 10 s after the load ended"
            time.sleep(0.2)
    finally:
        stop_process(proc)


# -- one process's plain numbers ----------------------------------------------------


def finished(i, cache=b"miss"):
    """A finished request of a varied kind, as ``comox_request_done`` gets it; its status and backend."""
    kind = i % 6
    request = comox.GatewayRequest(id=f"r{i}", endpoint="chat/completions", path="/v1/chat/completions",
                                   headers=[], json={"model": "chat", "stream": kind < 3, "messages": []})
    request.model_group, request.retries = "chat" if i % 5 else "embed", i % 7 == 0
    request.route = ("local", "local", "failover", "cache", "local", "")[kind]
    request.response_headers += [(b"x-comox-cache", cache)] if cache is not None else []
    now = request.received_at = time.perf_counter() - 7.0  # in one duration bucket, however long the test takes
    request.sent_at, request.answered_at = now + 0.0002 * (i % 3), now + 0.001 * (i % 50) + 0.0002
    request.first_byte_at = now + 0.001 * (i % 50) + 0.0003 * (i % 4) if kind != 4 else 0.0
    request.last_byte_at = request.first_byte_at + 0.01 * (i % 9)
    request.usage = comox.Usage(prompt=i % 11, completion=i % 13, cached=i % 3 or None) if kind != 1 else None
    return request, (429, 200, 200, 200, 502, 429)[kind], (None if kind in (3, 5) else "ab"[i % 2])


def exposed(registry):
    """The text exposition less what differs between two registries fed alike (creation times, duration sums)."""
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line and not line.startswith("comox_request_duration_seconds_sum")]


def test_one_process_exposes_what_prometheus_client_would():
    """Folded when scraped and every FOLD_EVERY requests, the plain numbers are prometheus_client's to the last float."""
    plain, shared = CollectorRegistry(), CollectorRegistry()
    metrics, reference = Metrics(plain), Metrics(shared, shared=True)
    for i in range(FOLD_EVERY * 2 + 100):
        request, status, backend = finished(i, [b"hit", b"miss", b"skip", None, b"refresh"][i % 5])
        request.response_headers += [(b"x-comox-cache", b"hit")] if i % 9 == 0 else []  # the first one counts
        metrics.record(request, status, backend)
        reference.record(request, status, backend)
        for m in (metrics, reference) if i % 10 == 0 else ():  # a value on a bucket's bound counts in it (le)
            m.ttft.labels("chat", "a", "chat/completions", "local").observe(0.1)
        if i == 1000:
            assert exposed(plain) == exposed(shared)  # a scrape between folds
    assert max(len(child.pending) for family in metrics._plain for child in family.children.values()) < FOLD_EVERY
    assert exposed(plain) == exposed(shared)
    assert sum(line.startswith("comox_requests_total{") for line in exposed(plain)) > 20  # many label sets


def test_a_cache_header_of_another_value_is_labelled_empty_and_keeps_no_series():
    metrics = Metrics(registry := CollectorRegistry())
    for i in range(300):
        metrics.record(*finished(6, f"odd-{i}".encode()))
    metrics.record(*finished(6, b"hit"))
    assert len(metrics._series) == 1  # the hit's: an unknown value's label set is made again, never kept
    assert [(s.labels["cache"], s.value) for family in registry.collect() for s in family.samples
            if s.name == "comox_requests_total"] == [("", 300.0), ("hit", 1.0)]


# -- the Grafana dashboard -------------------------------------------------------------


def test_the_grafana_dashboard_queries_only_metrics_comox_exposes(comox_serve, upstreams):
    dashboard = json.loads((ROOT / "contrib" / "grafana" / "comox.json").read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"] >= 30
    exprs = [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    a = upstreams("a")
    server = comox_serve({"models": [{"name": "chat", "backends": [{"url": a.url}]}]})
    _, families = scrape(server.url)
    exposed = set()
    for name, kind in families.items():
        exposed |= {f"{name}_total"} if kind == "counter" else \
            {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    used = Counter(name for expr in exprs for name in re.findall(r"\b(comox_\w+)", expr))
    assert set(used) <= exposed, set(used) - exposed
    # Every kind of metric has a panel.
    for name in ("comox_requests_total", "comox_request_duration_seconds_bucket", "comox_time_to_first_token_seconds_bucket",
                 "comox_inter_token_latency_seconds_bucket", "comox_gateway_overhead_seconds_bucket",
                 "comox_output_tokens_total", "comox_backend_inflight", "comox_backend_state",
                 "comox_backend_ejections_total", "comox_backend_decode_tokens_per_second", "comox_cloud_spent_usd",
                 "comox_retries_total", "comox_failovers_total", "comox_rate_limited_total"):
        assert name in used, name


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])
