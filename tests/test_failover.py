"""Cloud failover (plugins/comox_failover): when it happens, traffic going
back local, data that must stay home never reaching the cloud, and the
configuration. A recording OpenAI-format stand-in plays the cloud; the
official openai SDK is the client. Budgets and cost: test_failover_budgets.py."""

import asyncio
import threading

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.completion_usage import PromptTokensDetails

import comox
from comox.testing import Fault, ServerThread, StandInUpstream, free_port, wait_until
from tests.secrets_check import secret

ADMIN = {"authorization": f"Bearer {secret('admin-secret', 'admin key')}"}
CLOUD_KEY = secret("sk-cloud-secret", "upstream key")
HI = [{"role": "user", "content": "hi"}]


class CloudStandIn(StandInUpstream):
    """A cloud API in OpenAI's wire format, recording what reaches it. It
    reports ``usage`` as OpenAI does (cached tokens inside ``prompt_tokens``;
    in a stream, a last chunk with no choices, only when
    ``stream_options.include_usage`` asks), built with the SDK's own types.
    ``written`` adds ``cache_creation_input_tokens`` (also inside
    ``prompt_tokens``), as the ``anthropic`` backend type reports cache writes.
    While ``gate`` is clear, requests that arrive (``arrived``) wait."""

    def __init__(self, name="cloud", *, prompt=1000, cached=400, completion=50, written=None, **kwargs):
        super().__init__(name, **kwargs)
        extra = {} if written is None else {"cache_creation_input_tokens": written}
        self.usage = CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached), **extra)
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            self.arrived += 1
            if not self.gate.is_set():
                await asyncio.to_thread(self.gate.wait)
        await super().__call__(scope, receive, send)

    def _completion(self, payload, chat):
        return {**super()._completion(payload, chat), "usage": self.usage.model_dump(exclude_none=True)}

    async def _stream(self, receive, send, payload, chat, fault, extra):
        asked = (payload.get("stream_options") or {}).get("include_usage") is True

        async def usage_before_done(message):
            if asked and message.get("body") == b"data: [DONE]\n\n":
                chunk = ChatCompletionChunk(id="chatcmpl-standin", object="chat.completion.chunk", created=1,
                                            model=payload.get("model"), choices=[], usage=self.usage)
                body = b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send(message)

        await super()._stream(receive, usage_before_done, payload, chat, fault, extra)


@pytest.fixture
def clouds(monkeypatch):
    """``clouds(name, **usage)``: started cloud stand-ins; their key is in
    CLOUD_API_KEY, the admin key in COMOX_ADMIN_KEY."""
    monkeypatch.setenv("CLOUD_API_KEY", CLOUD_KEY)
    monkeypatch.setenv("COMOX_ADMIN_KEY", "admin-secret")
    started = []

    def make(name="cloud", **kwargs):
        cloud = CloudStandIn(name, **kwargs).start()
        started.append(cloud)
        return cloud

    yield make
    for cloud in started:
        cloud.gate.set()
        cloud.stop()


class Keys:
    """Test authentication: ``Bearer <key id>`` is that key; keys in ``local``
    are local_only; ``budgets`` gives keys a ``cloud_usd_per_day`` limit."""

    def __init__(self, *, local=(), budgets=None):
        self.local = set(local)
        self.budgets = budgets or {}

    @comox.hookimpl
    def comox_authenticate(self, request):
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        key_id = token.decode() if scheme.lower() == b"bearer" and token else None
        return comox.Principal(key_id=key_id, local_only=key_id in self.local,
                               limits={"cloud_usd_per_day": self.budgets.get(key_id)})


def cloud_backend(cloud, name=None, **keys):
    return {"name": name or cloud.name, "type": "openai", "url": cloud.url, "model": "cloud-model",
            "api_key_env": "CLOUD_API_KEY", "price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0,
            "price_cached_input_per_mtok": 0.5, **keys}


def dead_backend(name="local"):
    return {"name": name, "url": f"http://127.0.0.1:{free_port()}", "health_check": {"enabled": False}}


def gateway_settings(local, cloud_backends, *, trigger="capacity", budgets=None, expose=True, **group):
    failover = {"trigger": trigger, "backends": cloud_backends, **group.pop("failover", {})}
    settings = {"server": {"expose_backend_header": expose},
                "models": [{"name": "chat", "backends": local, "failover": failover, **group}]}
    if budgets is not None:
        settings["sections"] = {"budgets": budgets}
    return settings


def client(server, key="team-a"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def chat(server, key="team-a", headers=None, **body):
    return client(server, key).chat.completions.with_raw_response.create(
        model="chat", messages=HI, extra_headers=headers, **body)


def test_capacity_failover_while_the_fleet_is_drained_and_back_local_at_once(comox_serve, upstreams, clouds):
    local = upstreams("local")
    cloud = clouds()
    server = comox_serve(gateway_settings([{"name": "local", "url": local.url, "slow_start_s": 0}], [cloud_backend(cloud)]),
                         plugins=[Keys()])
    first = chat(server)
    assert first.headers["x-comox-route"] == "local" and first.parse().choices[0].message.content == "hello from local"

    assert httpx.post(f"{server.url}/admin/backends/local/drain", headers=ADMIN).status_code == 200
    answer = chat(server)
    assert answer.headers["x-comox-route"] == "failover" and answer.headers["x-comox-backend"] == "cloud"
    assert answer.parse().choices[0].message.content == "hello from cloud"
    streamed = client(server).chat.completions.create(model="chat", messages=HI, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == "tok0 tok1 tok2 "
    assert len(cloud.requests) == 2
    sent = cloud.requests[0]
    assert sent["body"]["model"] == "cloud-model" and sent["headers"]["authorization"] == f"Bearer {CLOUD_KEY}"
    assert "team-a" not in str(sent["headers"])  # the client's key stays here

    assert httpx.post(f"{server.url}/admin/backends/local/undrain", headers=ADMIN).status_code == 200
    back = [chat(server) for _ in range(3)]
    assert {reply.headers["x-comox-route"] for reply in back} == {"local"}
    assert len(cloud.requests) == 2 and len(local.requests) == 4


def test_a_fleet_killed_under_load_fails_over_with_no_client_visible_error_and_comes_back(comox_serve, clouds):
    port = free_port()
    local = StandInUpstream("local")
    local.server = ServerThread(local, lifespan="off", port=port).start()
    cloud = clouds()
    node = {"name": "local", "url": local.url, "slow_start_s": 0,
            "health_check": {"interval_s": 0.05, "timeout_s": 1, "unhealthy_threshold": 1}}
    server = comox_serve(gateway_settings([node], [cloud_backend(cloud)], trigger="error"), plugins=[Keys()])
    answered_by: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def load():
        sdk = client(server)
        while not stop.is_set():
            try:
                reply = sdk.chat.completions.create(model="chat", messages=HI)
                answered_by.append(reply.choices[0].message.content)
            except Exception as exc:  # any error the client would see
                errors.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: answered_by.count("hello from local") >= 10)
        local.stop()  # the whole fleet dies under load
        wait_until(lambda: answered_by.count("hello from cloud") >= 20)
        local.server = ServerThread(local, lifespan="off", port=port).start()  # and comes back
        served_before = len(local.requests)
        wait_until(lambda: len(local.requests) >= served_before + 10, timeout=20)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        local.stop()
    assert errors == []
    assert answered_by[-1] == "hello from local"


def test_the_capacity_trigger_never_fails_over_because_requests_failed(comox_serve, upstreams, clouds):
    sick, fine = upstreams("sick"), upstreams("fine")
    cloud = clouds()
    two = [{"name": "sick", "url": sick.url}, {"name": "fine", "url": fine.url}]
    server = comox_serve(gateway_settings(two, [cloud_backend(cloud)]), plugins=[Keys()])
    sick.faults.extend([Fault(status=503)] * 4)
    replies = [chat(server) for _ in range(4)]  # one node fails, the other answers
    assert {reply.parse().choices[0].message.content for reply in replies} == {"hello from fine"}

    # Every local attempt fails: "capacity" lets the node's 503 stand, "error" fails over.
    alone = upstreams("alone")
    capacity = comox_serve(gateway_settings([{"url": alone.url}], [cloud_backend(cloud)]), plugins=[Keys()])
    alone.faults.extend([Fault(status=503)] * 2)
    with pytest.raises(openai.InternalServerError) as refused:
        chat(capacity)
    assert refused.value.status_code == 503 and refused.value.body["message"] == "alone injected 503"
    assert cloud.requests == []
    error = comox_serve(gateway_settings([{"url": alone.url, "name": "alone"}], [cloud_backend(cloud)], trigger="error"),
                        plugins=[Keys()])
    alone.faults.extend([Fault(status=503)] * 2)
    assert chat(error).parse().choices[0].message.content == "hello from cloud"
    assert len(cloud.requests) == 1


def test_data_that_must_stay_home_never_reaches_the_cloud(comox_serve, clouds):
    cloud = clouds()
    settings = gateway_settings([dead_backend()], [cloud_backend(cloud)], trigger="error")
    sovereign = {"name": "vault", "sovereign": True, "backends": [dead_backend("vault-node")],
                 "failover": {"trigger": "error", "backends": [cloud_backend(cloud, "vault-cloud")]}}
    settings["models"].append(sovereign)
    server = comox_serve(settings, plugins=[Keys(local={"local-key"})])
    kept = []
    for _ in range(3):  # every kind, streaming and not, and a request trying to lift its key's rule
        for stream in (False, True):
            for key, headers, model in [("local-key", None, "chat"), ("team-a", {"x-comox-local-only": "true"}, "chat"),
                                        ("team-a", None, "vault"), ("local-key", {"x-comox-local-only": "false"}, "chat")]:
                with pytest.raises(openai.InternalServerError) as refused:
                    client(server, key).chat.completions.create(model=model, messages=HI, stream=stream,
                                                                extra_headers=headers)
                kept.append(refused.value)
    assert {(error.status_code, error.body["code"]) for error in kept} == {(503, "local_capacity_exhausted")}
    assert all(error.response.headers["retry-after"] and "must stay local" in error.message for error in kept)
    assert cloud.requests == [] and cloud.arrived == 0
    # The same gateway does fail over what may leave: the cloud was there all along.
    assert chat(server).headers["x-comox-route"] == "failover" and len(cloud.requests) == 1


def test_the_plugin_itself_refuses_requests_that_must_stay_local(clouds):
    """The core never asks for them; were it to, the plugin still says no."""
    import comox_failover

    cloud = clouds()
    gateway = comox.build_gateway(comox.Settings(auth="none", **gateway_settings([dead_backend()], [cloud_backend(cloud)])))

    async def ask(local_only):
        request = comox.GatewayRequest(id="r1", endpoint="chat/completions", path="/v1/chat/completions", headers=[],
                                       json={"model": "chat", "messages": HI}, gateway=gateway)
        request.model_group, request.local_only = "chat", local_only
        error = comox.NoBackendAvailable("no backend")
        return await comox_failover.comox_failover(request=request, error=error, trigger="capacity")

    async def run():
        await gateway.startup()
        try:
            kept, sent = await ask(True), await ask(False)
            await sent.aclose()
            return kept, sent
        finally:
            await gateway.aclose()

    kept, sent = asyncio.run(run())
    assert kept is None and sent.status == 200 and len(cloud.requests) == 1


def test_the_backend_header_only_when_enabled(comox_serve, clouds):
    cloud = clouds()
    server = comox_serve(gateway_settings([dead_backend()], [cloud_backend(cloud)], trigger="error", expose=False),
                         plugins=[Keys()])
    reply = chat(server)
    assert reply.headers["x-comox-route"] == "failover" and "x-comox-backend" not in reply.headers


def test_a_failing_cloud_backend_moves_to_the_next(comox_serve, clouds):
    first, second = clouds("first"), clouds("second")
    server = comox_serve(gateway_settings([dead_backend()], [cloud_backend(first), cloud_backend(second)], trigger="error"),
                         plugins=[Keys()])
    first.faults.append(Fault(status=529))
    reply = chat(server)
    assert reply.headers["x-comox-backend"] == "second" and reply.parse().choices[0].message.content == "hello from second"
    streamed = client(server).chat.completions.create(model="chat", messages=HI, stream=True)
    assert [chunk.choices[0].delta.content for chunk in streamed] == ["tok0 ", "tok1 ", "tok2 "]
    assert len(first.requests) == 2 and len(second.requests) == 1  # first answered the stream


def build_error(settings):
    """The one-line ConfigError the gateway stops with as it starts, or None."""
    async def start():
        gateway = comox.build_gateway(comox.Settings(auth="none", **settings))
        try:
            await gateway.startup()
        finally:
            await gateway.aclose()

    with pytest.raises(comox.ConfigError) as error:
        asyncio.run(start())
    return str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"trigger": "sometimes"}, "models[0].failover.trigger: Input should be 'capacity' or 'error'"),
    ({"tigger": "error"}, "models[0].failover.tigger: Extra inputs are not permitted"),
    ({"backends": []}, "models[0].failover.backends: List should have at least 1 item after validation, not 0"),
    ({"max_tokens_cap": 0}, "models[0].failover.max_tokens_cap: Input should be greater than or equal to 1"),
])
def test_failover_table_errors_are_one_line(clouds, change, message):
    cloud = clouds()
    settings = gateway_settings([dead_backend()], [cloud_backend(cloud)], failover=change)
    assert build_error(settings) == message


@pytest.mark.parametrize("change, message", [
    ({"price_input_per_mtok": "cheap"}, "models[0].failover.backends[0].price_input_per_mtok: Input should be a valid number"),
    ({"price_output_per_mtok": -1}, "models[0].failover.backends[0].price_output_per_mtok: Input should be greater than or equal to 0"),
    ({"type": "telepathy"}, "models[0].failover.backends[0].type: unknown backend type 'telepathy'"),
    ({"api_key_env": "NO_SUCH_VARIABLE_SET"}, "models[0].failover.backends[0]: api_key_env: the environment variable 'NO_SUCH_VARIABLE_SET' is not set"),
    ({"timeout": 3}, "models[0].failover.backends[0].timeout: Extra inputs are not permitted"),
    ({"name": "local"}, "models[0].failover.backends[0].name: backend name 'local' is used twice"),
])
def test_cloud_backend_errors_are_one_line(clouds, change, message):
    cloud = clouds()
    backend = {key: value for key, value in {**cloud_backend(cloud), **change}.items() if value is not None}
    assert build_error(gateway_settings([dead_backend()], [backend])).startswith(message)


def test_prices_are_required(clouds):
    cloud = clouds()
    backend = {key: value for key, value in cloud_backend(cloud).items() if not key.startswith("price_")}
    assert build_error(gateway_settings([dead_backend()], [backend])) == (
        "models[0].failover.backends[0].price_input_per_mtok: Field required; "
        "models[0].failover.backends[0].price_output_per_mtok: Field required")


def test_budgets_table_errors_are_one_line(clouds):
    cloud = clouds()
    with pytest.raises(comox.ConfigError, match=r"^budgets.cloud_usd_per_dy: Extra inputs are not permitted$"):
        comox.build_gateway(comox.Settings(auth="none", **gateway_settings([dead_backend()], [cloud_backend(cloud)],
                                                                           budgets={"cloud_usd_per_dy": 5})))


@pytest.mark.parametrize("page", ["configuration.md", "failover.md"])
def test_the_documented_keys_and_defaults_are_the_codes(page):
    import re
    from pathlib import Path

    from comox_failover.config import BudgetSettings, FailoverTable, PriceTable

    text = (Path(__file__).parent.parent / "docs" / page).read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, re.M))
    assert FailoverTable.model_fields["trigger"].default == "capacity" and rows["trigger"] == '`"capacity"`'
    assert rows["max_tokens_cap"] == f"`{FailoverTable.model_fields['max_tokens_cap'].default}`"
    for name, field in PriceTable.model_fields.items():
        assert rows[name] == ("required" if field.is_required() else "the input price")
    for name, field in BudgetSettings.model_fields.items():
        assert field.default is None and (page == "failover.md" or rows[name] == "none")
        assert f"{name} = " in text or f"`{name}`" in text
