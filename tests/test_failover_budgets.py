"""Cost control of cloud failover (plugins/comox_failover): settlement with
the real usage (cached tokens priced as cached, once), reservations that
bound concurrent spend, failed requests that cost nothing, 503
insufficient_budget, per-key budgets, the audit line and /admin/spend."""

import asyncio
import threading

import httpx
import openai
import orjson
import pytest

import comox
from comox.testing import Fault, wait_until
from tests.secrets_check import secret
from tests.test_failover import ADMIN, CLOUD_KEY, HI, CloudStandIn, Keys, chat, client, clouds, cloud_backend, dead_backend, gateway_settings

__all__ = ["clouds"]  # the fixture, imported for these tests

# Prices 2 / 8 / 0.5 $ per million tokens; the cloud reports 1000 prompt
# tokens of which 400 cached, and 50 completion tokens:
# 600 × 2 + 400 × 0.5 + 50 × 8 = 1800 $ per million answers.
ONE_ANSWER = 0.0018


def spend(server):
    reply = httpx.get(f"{server.url}/admin/spend", headers=ADMIN)
    assert reply.status_code == 200
    return {(row["budget"], row.get("key_id")): row for row in reply.json()["budgets"]}


def serve(comox_serve, cloud, *, budgets=None, keys=None, **group):
    settings = gateway_settings([dead_backend()], [cloud_backend(cloud)], trigger="error", budgets=budgets, **group)
    return comox_serve(settings, plugins=[keys or Keys()])


def test_spend_is_the_priced_usage_with_cached_tokens_priced_once(comox_serve, clouds):
    cloud = clouds()
    server = serve(comox_serve, cloud)
    assert chat(server).parse().usage.prompt_tokens_details.cached_tokens == 400
    assert spend(server)["day", None]["spent_usd"] == ONE_ANSWER

    # A stream: the cloud is asked for usage, the client that did not ask sees no usage chunk.
    chunks = list(client(server).chat.completions.create(model="chat", messages=HI, stream=True))
    assert cloud.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["tok0 ", "tok1 ", "tok2 "]
    assert all(chunk.usage is None for chunk in chunks)
    # One that asked gets it.
    asked = list(client(server).chat.completions.create(model="chat", messages=HI, stream=True,
                                                        stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 50

    rows = spend(server)
    for budget in (("day", None), ("month", None), ("key", "team-a")):
        assert rows[budget]["spent_usd"] == pytest.approx(3 * ONE_ANSWER, abs=1e-12)
        assert rows[budget]["reserved_usd"] == 0


def test_cache_writes_are_priced_as_cache_writes(comox_serve, clouds):
    # The anthropic type's usage: prompt_tokens = input + cache reads + cache writes.
    cloud = clouds(written=300)
    backend = cloud_backend(cloud, price_cache_write_per_mtok=2.5)
    server = comox_serve(gateway_settings([dead_backend()], [backend], trigger="error"), plugins=[Keys()])
    chat(server)
    assert spend(server)["day", None]["spent_usd"] == (300 * 2.0 + 400 * 0.5 + 300 * 2.5 + 50 * 8.0) / 1e6


def test_the_output_is_capped_and_reserved_at_worst(comox_serve, clouds):
    cloud = clouds()
    cloud.gate.clear()
    server = serve(comox_serve, cloud, failover={"max_tokens_cap": 100})
    replies = []
    threading.Thread(target=lambda: replies.append(chat(server, max_tokens=5000))).start()
    wait_until(lambda: cloud.arrived == 1)
    # Worst case: 100 tokens of output (not 5000), and every byte of the
    # client's body (under 200) a prompt token at the input price.
    reserved = spend(server)["day", None]["reserved_usd"]
    assert (100 * 8.0 + 50 * 2.0) / 1e6 < reserved < (100 * 8.0 + 200 * 2.0) / 1e6
    cloud.gate.set()
    wait_until(lambda: replies)
    chat(server)
    assert [sent["body"]["max_tokens"] for sent in cloud.requests] == [100, 100]


def test_a_failed_cloud_request_gives_its_reservation_back(comox_serve, clouds):
    cloud = clouds()
    server = serve(comox_serve, cloud, budgets={"cloud_usd_per_day": 1.0})
    cloud.faults.extend([Fault(status=500), Fault(status=503)])
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as failed:
            client(server).chat.completions.create(model="chat", messages=HI, stream=stream)
        assert failed.value.status_code == 503
    cloud.faults.append(Fault(status=400))  # the cloud blames the request: the client's answer, at no cost
    with pytest.raises(openai.BadRequestError):
        chat(server)
    assert len(cloud.requests) == 3
    day = spend(server)["day", None]
    assert day["spent_usd"] == 0 and day["reserved_usd"] == 0 and day["remaining_usd"] == 1.0
    chat(server)
    assert spend(server)["day", None]["spent_usd"] == ONE_ANSWER


def test_a_stream_without_usage_is_charged_its_reservation(comox_serve, clouds):
    cloud = clouds()
    server = serve(comox_serve, cloud)
    cloud.faults.append(Fault(close_after_chunks=2))
    with pytest.raises(openai.APIError):
        list(client(server).chat.completions.create(model="chat", messages=HI, stream=True, max_tokens=10))
    wait_until(lambda: spend(server)["day", None]["reserved_usd"] == 0)
    spent = spend(server)["day", None]["spent_usd"]
    assert spent > 10 * 8.0 / 1e6  # at least the reserved output: the provider may have billed it


def test_a_request_over_budget_gets_503_insufficient_budget(comox_serve, clouds):
    cloud = clouds()
    server = serve(comox_serve, cloud, budgets={"cloud_usd_per_day": 0.0001, "cloud_usd_per_month": 100})
    with pytest.raises(openai.InternalServerError) as refused:
        chat(server, max_tokens=100)
    error = refused.value
    assert error.status_code == 503 and error.response.headers["retry-after"]
    assert error.body["type"] == "insufficient_budget" and error.body["code"] == "insufficient_budget"
    assert "daily cloud budget ($0.0001)" in error.message
    assert cloud.requests == []
    rows = spend(server)
    assert rows["day", None]["reserved_usd"] == rows["month", None]["reserved_usd"] == 0  # nothing held back


def test_a_key_budget_holds_its_key_only(comox_serve, clouds):
    cloud = clouds()
    server = serve(comox_serve, cloud, keys=Keys(budgets={"team-a": 0.002}))
    chat(server, "team-a", max_tokens=50)  # reserved ≈ 0.0006, cost 0.0018
    with pytest.raises(openai.InternalServerError) as refused:
        chat(server, "team-a", max_tokens=50)
    assert refused.value.body["type"] == "insufficient_budget" and "its key's daily cloud budget" in refused.value.message
    chat(server, "team-b", max_tokens=50)
    rows = spend(server)
    assert rows["key", "team-a"]["limit_usd"] == 0.002 and rows["key", "team-a"]["spent_usd"] == ONE_ANSWER
    assert rows["key", "team-b"]["limit_usd"] is None and rows["key", "team-b"]["spent_usd"] == ONE_ANSWER
    assert rows["day", None]["spent_usd"] == 2 * ONE_ANSWER and len(cloud.requests) == 2


@pytest.mark.parametrize("replicas", [1, 2], ids=["one replica", "two replicas sharing redis"])
def test_fifty_concurrent_requests_against_a_budget_for_ten(comox_serve, clouds, replicas, request):
    cloud = clouds()
    # Output dominates: each request reserves about 100 × 1000 $/M = $0.1; the budget fits 10.
    backend = cloud_backend(cloud, price_input_per_mtok=0.001, price_cached_input_per_mtok=0.001, price_output_per_mtok=1000)
    settings = gateway_settings([dead_backend()], [backend], trigger="error", budgets={"cloud_usd_per_day": 1.05})
    if replicas == 2:
        redis_server = request.getfixturevalue("redis_server")
        settings["sections"]["state"] = {"redis_url": redis_server.url, "timeout_ms": 5000}
    servers = []
    for i in range(replicas):
        settings["models"][0]["backends"] = [dead_backend(f"local-{i}")]
        servers.append(comox_serve(settings, plugins=[Keys()]))
    cloud.gate.clear()  # the cloud holds every request it gets until all 50 were decided
    answered, refused, other = [], [], []

    def one(server):
        try:
            answered.append(chat(server, max_tokens=100))
        except openai.InternalServerError as exc:
            (refused if exc.body["type"] == "insufficient_budget" else other).append(exc)
        except Exception as exc:
            other.append(exc)

    threads = [threading.Thread(target=one, args=(servers[i % replicas],)) for i in range(50)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(refused) + len(other) + cloud.arrived >= 50, timeout=30)
    for server in servers:  # every replica sees the same budget
        held = spend(server)["day", None]
        assert held["reserved_usd"] <= 1.05 and held["spent_usd"] == 0
    assert cloud.arrived == 10
    cloud.gate.set()
    for thread in threads:
        thread.join(30)
    assert (len(answered), len(refused), other) == (10, 40, [])
    for server in servers:
        day = spend(server)["day", None]
        assert day["spent_usd"] <= 1.05 and day["reserved_usd"] == 0
        assert day["spent_usd"] == pytest.approx(10 * (1000 * 0.001 + 50 * 1000) / 1e6)


def test_every_cloud_request_has_an_audit_line_without_content(comox_serve, clouds, caplog):
    caplog.set_level("INFO", logger="comox.events")
    cloud = clouds()
    server = serve(comox_serve, cloud, budgets={"cloud_usd_per_day": 0.01})
    secret = "the launch code is 0000"

    def ask(request_id, key="team-a", **body):
        return client(server, key).chat.completions.create(
            model="chat", **{"messages": HI, "max_tokens": 50, **body}, extra_headers={"x-request-id": request_id})

    cloud.faults.append(Fault(status=503))
    with pytest.raises(openai.InternalServerError):
        ask("req-failed", messages=[{"role": "user", "content": secret}])
    ask("req-answered", messages=[{"role": "user", "content": secret}])
    list(ask("req-streamed", "team-b", stream=True))
    with pytest.raises(openai.InternalServerError):
        ask("req-refused", max_tokens=10_000)  # over budget

    def audit():
        return {record.comox_event["request_id"]: record.comox_event for record in caplog.records
                if getattr(record, "comox_event", {}).get("event") == "cloud_request"}

    wait_until(lambda: len(audit()) == 4)
    lines = audit()
    assert lines["req-failed"]["status"] == 503 and lines["req-failed"]["outcome"] == "failed: HTTP 503"
    assert lines["req-failed"]["cost_usd"] == 0
    assert lines["req-answered"] == {
        "event": "cloud_request", "request_id": "req-answered", "key_id": "team-a", "model": "chat", "provider": "openai",
        "backend": "cloud", "upstream_model": "cloud-model", "status": 200, "prompt_tokens": 1000, "cached_tokens": 400,
        "cache_write_tokens": 0, "completion_tokens": 50, "cost_usd": ONE_ANSWER, "trigger": "error", "local_error": "no_backend_available",
        "outcome": "answered",
    }
    streamed = lines["req-streamed"]
    assert streamed["key_id"] == "team-b" and streamed["cost_usd"] == ONE_ANSWER and streamed["completion_tokens"] == 50
    assert lines["req-refused"]["outcome"] == "refused: day budget" and lines["req-refused"]["status"] is None
    text = "\n".join(record.getMessage() + str(getattr(record, "comox_event", "")) for record in caplog.records)
    for content in (secret, "hello from cloud", "tok0", CLOUD_KEY):
        assert content not in text


def test_admin_spend_needs_the_admin_key_and_reports_every_budget(comox_serve, clouds, monkeypatch):
    cloud = clouds()
    server = serve(comox_serve, cloud, budgets={"cloud_usd_per_day": 5, "cloud_usd_per_month": 50},
                   keys=Keys(budgets={"team-a": 1}))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic admin-secret"}):
        reply = httpx.get(f"{server.url}/admin/spend", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    chat(server)
    body = httpx.get(f"{server.url}/admin/spend", headers=ADMIN).json()
    day, month, key = body["budgets"]
    assert body["object"] == "spend" and body["currency"] == "USD"
    assert day["budget"] == "day" and len(day["period"]) == 10 and month["budget"] == "month" and len(month["period"]) == 7
    assert (day["limit_usd"], day["spent_usd"], day["reserved_usd"], day["remaining_usd"]) == (5, ONE_ANSWER, 0, 5 - ONE_ANSWER)
    assert (month["limit_usd"], month["remaining_usd"]) == (50, 50 - ONE_ANSWER)
    assert key == {"budget": "key", "period": day["period"], "key_id": "team-a", "limit_usd": 1, "spent_usd": ONE_ANSWER,
                   "reserved_usd": 0, "remaining_usd": 1 - ONE_ANSWER}

    monkeypatch.delenv("COMOX_ADMIN_KEY")
    off = serve(comox_serve, cloud)
    assert httpx.get(f"{off.url}/admin/spend", headers=ADMIN).status_code == 404


class MessagesAPI:
    """An inbound API in Anthropic's Messages shape (POST /v1/messages), as
    issue 14's plugins add them: translated to a chat completion, or sent
    natively to a backend that speaks it."""

    name = "messages"

    def match(self, path, method):
        return "messages" if path == "/v1/messages" else None

    async def serve(self, endpoint, request):
        return None

    def parse(self, endpoint, request, raw):
        body = orjson.loads(raw)
        return "chat/completions", {key: body[key] for key in ("model", "messages", "max_tokens") if key in body}

    def translate_response(self, endpoint, request, response):
        return response

    def render_error(self, exc):
        return exc.status, [(b"content-type", b"application/json")], exc.to_bytes()

    def render_stream_error(self, request, exc):
        return b"data: " + exc.to_bytes() + b"\n\n"

    @comox.hookimpl
    def comox_inbound_apis(self, gateway):
        return [self]


class NativeCloud(CloudStandIn):
    """A cloud that also speaks Anthropic's Messages API itself: its own
    answer to /v1/messages, built with the anthropic SDK's types."""

    def __init__(self, name="native-cloud"):
        super().__init__(name)
        types = pytest.importorskip("anthropic.types")
        message = types.Message(
            id="msg_standin", type="message", role="assistant", model="claude-standin", stop_reason="end_turn",
            stop_sequence=None, content=[types.TextBlock(type="text", text="hello natively")],
            usage=types.Usage(input_tokens=600, cache_read_input_tokens=400, cache_creation_input_tokens=0, output_tokens=50))
        self.message = message.model_dump_json(exclude_none=True).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/messages":
            self.requests.append({"path": scope["path"], "raw": (await receive())["body"]})
            if not self.gate.is_set():
                await asyncio.to_thread(self.gate.wait)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": self.message})
            return
        await super().__call__(scope, receive, send)


@pytest.fixture
def native_cloud(clouds):
    cloud = NativeCloud().start()
    yield cloud
    cloud.stop()


def test_a_cloud_that_speaks_the_inbound_api_natively_is_bounded_by_the_clients_own_max_tokens(comox_serve, native_cloud):
    cloud = native_cloud
    backend = cloud_backend(cloud, native_apis=["messages"])
    settings = gateway_settings([dead_backend()], [backend], trigger="error", failover={"max_tokens_cap": 100})
    server = comox_serve(settings, plugins=[Keys(), MessagesAPI()])
    raw = b'{"model": "chat", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}'
    cloud.gate.clear()
    replies = []
    threading.Thread(target=lambda: replies.append(
        httpx.post(f"{server.url}/v1/messages", content=raw, headers={"authorization": "Bearer team-a"}))).start()
    wait_until(lambda: cloud.requests)
    assert spend(server)["day", None]["reserved_usd"] > 5000 * 8.0 / 1e6  # the client's max_tokens, not the cap of 100
    cloud.gate.set()
    wait_until(lambda: replies)
    reply = replies[0]
    assert reply.status_code == 200 and reply.json()["content"][0]["text"] == "hello natively"
    assert cloud.requests[-1]["raw"].startswith(b'{"model":"cloud-model","max_tokens":5000')  # not capped: the client's bytes
    assert spend(server)["day", None]["spent_usd"] == ONE_ANSWER  # Anthropic's usage, cache reads priced as such
    unbounded = httpx.post(f"{server.url}/v1/messages", json={"model": "chat", "messages": HI},
                           headers={"authorization": "Bearer team-a"})
    assert unbounded.status_code == 503 and len(cloud.requests) == 1


def test_the_keys_plugin_gives_each_key_its_budget_and_its_local_only(comox_serve, clouds):
    import hashlib

    cloud = clouds()
    settings = gateway_settings([dead_backend()], [cloud_backend(cloud)], trigger="error", budgets={})
    settings["auth"] = "keys"
    settings["sections"]["keys"] = [
        {"id": "team-a", "key_sha256": hashlib.sha256(secret("sk-team-a").encode()).hexdigest(), "cloud_usd_per_day": 0.002},
        {"id": "vault", "key_sha256": hashlib.sha256(secret("sk-vault").encode()).hexdigest(), "local_only": True},
    ]
    server = comox_serve(settings)
    chat(server, "sk-team-a", max_tokens=50)
    with pytest.raises(openai.InternalServerError) as over:
        chat(server, "sk-team-a", max_tokens=50)
    with pytest.raises(openai.InternalServerError) as kept:
        chat(server, "sk-vault")
    assert over.value.body["type"] == "insufficient_budget" and kept.value.body["code"] == "local_capacity_exhausted"
    assert len(cloud.requests) == 1
    rows = spend(server)
    assert rows["key", "team-a"]["limit_usd"] == 0.002 and rows["key", "team-a"]["spent_usd"] == ONE_ANSWER
    assert ("key", "vault") not in rows


def test_no_budgeted_failover_while_the_shared_state_is_degraded(comox_serve, clouds, request):
    """Hard budgets cannot be counted while the replicas' shared counters are
    out of reach: failover is refused (insufficient_budget) until Redis is back."""
    redis_server = request.getfixturevalue("redis_server")
    cloud = clouds()
    settings = gateway_settings([dead_backend()], [cloud_backend(cloud)], trigger="error", budgets={"cloud_usd_per_day": 10.0})
    settings["sections"]["state"] = {"redis_url": redis_server.url, "timeout_ms": 200}
    server = comox_serve(settings, plugins=[Keys()])
    chat(server, max_tokens=10)
    assert len(cloud.requests) == 1
    redis_server.kill()
    wait_until(lambda: server.app.gateway.readiness().get("state") == "degraded" or _degrade(server), timeout=10)
    before = len(cloud.requests)
    with pytest.raises(openai.InternalServerError) as refused:
        chat(server, max_tokens=10)
    assert refused.value.body["type"] == "insufficient_budget"
    assert len(cloud.requests) == before


def _degrade(server):
    """Nudge the store into noticing Redis is gone: one request through it."""
    try:
        chat(server, max_tokens=10)
    except Exception:
        pass
    return server.app.gateway.readiness().get("state") == "degraded"
