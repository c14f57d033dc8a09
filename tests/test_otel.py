"""Traces (plugins/comox_otel, docs/telemetry.md "Traces"): a server span per
API request and a client span per backend attempt, with the OpenTelemetry
GenAI attributes and Comox's own, the client's ``traceparent`` continued and
sent upstream on either transport, no content unless asked, real OTLP/HTTP
export to a stand-in collector — and nothing at all when tracing is off.

Real servers on 127.0.0.1: the gateway and stand-in upstreams under uvicorn;
spans read from the SDK's in-memory exporter (the process's tracer provider,
as a host app or ``opentelemetry-instrument`` sets it) or from the protobuf
bodies the collector received."""

import gzip
import json
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_http_instrumentation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

import comox
from comox import hookspecs
from comox.asgi_io import read_body
from comox.testing import Fault, ServerThread, free_port, wait_until
from tests.plugins.in_order import InOrderPolicy
from tests.secrets_check import secret

PROMPT = secret("the quick brown fox jumps over the lazy dog", "prompt")
DOCS = Path(__file__).parent.parent / "docs"
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
             "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans():
    """The process's tracer provider, exporting to memory, as a host app sets
    it (request this fixture before ``comox_serve``: it is reset after the
    gateways stopped)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # as opentelemetry's own test helpers reset it
    trace._TRACER_PROVIDER = None


class Fixtures(InOrderPolicy):
    @comox.hookimpl
    def comox_authenticate(self, request):
        return comox.Principal(key_id="team-a")


def settings(*backends, telemetry=None, **group):
    out = {"models": [{"name": "m", "policy": "in_order", **group,
                       "backends": [{"health_check": {"enabled": False}, **backend} for backend in backends]}]}
    if telemetry is not None:
        out["sections"] = {"telemetry": telemetry}
    return out


def post(url, body, headers=None):
    """A client that is no span of its own (httpx is instrumented process-wide
    while a gateway traces): the request arrives with only the headers given."""
    with suppress_http_instrumentation():
        reply = httpx.post(url, json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def chat(server, *, stream=False, headers=None, **body):
    payload = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 7, "stream": stream, **body}
    return post(f"{server.url}/v1/chat/completions", payload, headers)


def request_traces(exporter, total=1):
    """The server spans of the requests so far, each with the spans of its
    trace, once there are ``total`` (a server span ends only after the client
    had its last byte)."""
    def servers():
        return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]

    wait_until(lambda: len(servers()) >= total)
    found = []
    for server in servers():
        same = [s for s in exporter.get_finished_spans() if s.context.trace_id == server.context.trace_id]
        found.append((server, same))
    return found


def children(span, spans):
    return [s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id]


def attempts(server, spans):
    return sorted((s for s in children(server, spans) if "comox.attempt" in s.attributes),
                  key=lambda s: s.attributes["comox.attempt"])


# -- off by default ---------------------------------------------------------------


def test_off_by_default_the_plugin_is_not_in_any_request(comox_serve, upstreams):
    up = upstreams("up")
    server = comox_serve(settings({"name": "gpu-1", "url": up.url}), plugins=[Fixtures()])
    chat(server)
    hooks = server.app.gateway.hooks
    assert not [impl for name in hookspecs.PER_REQUEST_HOOKS for impl in getattr(hooks, name) if impl.plugin == "otel"]
    assert "traceparent" not in up.requests[-1]["headers"]  # nothing instrumented: nothing added upstream
    assert server.app.gateway.plugin_settings("otel").source == "off"
    # Configured, it takes part in every stage it traces.
    on = comox.build_gateway(comox.Settings(**settings({"url": up.url}, telemetry={"otlp_endpoint": "http://127.0.0.1:9"})),
                             plugins=[Fixtures()])
    assert [impl.plugin for impl in on.hooks.comox_request_start] == ["otel"]
    assert [impl.plugin for impl in on.hooks.comox_attempt_start] == ["otel"]


def test_what_turns_tracing_on(monkeypatch, spans):
    def source(**telemetry):
        config = comox.Settings(**settings({"url": "http://127.0.0.1:9"}, telemetry=telemetry))
        return comox.build_gateway(config, plugins=[Fixtures()]).plugin_settings("otel").source

    assert source() == "global"  # a tracer provider the host app set
    assert source(otlp_endpoint="http://127.0.0.1:9") == "otlp"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert source(otlp_endpoint="http://127.0.0.1:9") == "off"
    with pytest.raises(comox.ConfigError, match=r"telemetry\.otlp_endpoint: .*not an http:// or https:// URL"):
        source(otlp_endpoint="collector:4318")


# -- spans, attributes, structure ---------------------------------------------------


def test_a_request_is_a_server_span_with_an_attempt_span_and_the_genai_attributes(spans, comox_serve, upstreams):
    up = upstreams("up")
    server = comox_serve(settings({"name": "gpu-1", "url": up.url, "model": "upstream-m"}), plugins=[Fixtures()])
    chat(server, temperature=0)
    [(request, same)] = request_traces(spans)
    assert request.name == "chat m" and request.kind is SpanKind.SERVER and request.parent is None
    assert {key: request.attributes.get(key) for key in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
        "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "comox.model_group", "comox.backend", "comox.policy", "comox.route", "comox.cache", "comox.key_id",
        "comox.attempts", "http.response.status_code")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "m",
        "gen_ai.response.model": "upstream-m", "gen_ai.request.max_tokens": 7, "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 3, "comox.model_group": "m", "comox.backend": "gpu-1", "comox.policy": "in_order",
        "comox.route": "local", "comox.cache": "miss", "comox.key_id": "team-a", "comox.attempts": 1,
        "http.response.status_code": 200}
    [attempt] = attempts(request, same)
    assert attempt.name == "chat upstream-m" and attempt.kind is SpanKind.CLIENT
    assert {key: attempt.attributes.get(key) for key in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
        "server.address", "server.port", "comox.backend", "comox.attempt", "comox.attempt.kind",
        "comox.attempt.outcome", "http.response.status_code")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "upstream-m",
        "gen_ai.response.model": "upstream-m", "server.address": "127.0.0.1", "server.port": up.server.port,
        "comox.backend": "gpu-1", "comox.attempt": 1, "comox.attempt.kind": "first", "comox.attempt.outcome": "ok",
        "http.response.status_code": 200}
    # The HTTP client span of the call is the attempt's child, and its context went upstream.
    [call] = children(attempt, same)
    assert call.kind is SpanKind.CLIENT and (call.attributes.get("url.full") or call.attributes.get("http.url")).startswith(up.url)
    _, trace_id, parent_id, _ = up.requests[-1]["headers"]["traceparent"].split("-")
    assert (int(trace_id, 16), int(parent_id, 16)) == (request.context.trace_id, call.context.span_id)

    documented = (DOCS / "telemetry.md").read_text().split("## Traces")[1].split("\n## ")[0]
    for name in {*request.attributes, *attempt.attributes}:
        assert f"`{name}`" in documented, name

    # The same request again is a cache hit: no attempt.
    chat(server, temperature=0)
    [_, (hit, same)] = request_traces(spans, total=2)
    assert hit.attributes["comox.cache"] == "hit" and hit.attributes["comox.route"] == "cache"
    assert attempts(hit, same) == [] and hit.attributes["comox.attempts"] == 0 and "comox.backend" not in hit.attributes


def test_a_request_passed_through_natively_is_not_translated_for_its_spans(spans, comox_serve):
    from tests.anthropic_standin import AnthropicStandIn

    standin = AnthropicStandIn(native=True).start()
    translated = []

    class Watch:
        @comox.hookimpl
        def comox_request_done(self, request):  # (a request is a GatewayRequest proper once translated)
            translated.append(type(request) is comox.GatewayRequest)

    try:
        server = comox_serve(settings({"name": "gpu-1", "url": standin.url, "native_apis": ["messages"]}),
                             plugins=[Fixtures(), Watch()])
        post(f"{server.url}/v1/messages", {"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": PROMPT}]},
             {"anthropic-version": "2023-06-01"})
        [(request, same)] = request_traces(spans)
        [attempt] = attempts(request, same)
        assert request.attributes["gen_ai.request.max_tokens"] == attempt.attributes["gen_ai.request.max_tokens"] == 7
        assert translated == [False]
    finally:
        standin.stop()


def test_a_retry_is_a_second_attempt_span_and_a_stream_has_its_time_to_first_token(spans, comox_serve, upstreams):
    bad, good = upstreams("bad"), upstreams("good")
    bad.faults.append(Fault(status=502))
    server = comox_serve(settings({"name": "bad", "url": bad.url}, {"name": "good", "url": good.url}), plugins=[Fixtures()])
    assert b"[DONE]" in chat(server, stream=True).content
    [(request, same)] = request_traces(spans)
    first, retry = attempts(request, same)
    assert [(a.attributes["comox.attempt.kind"], a.attributes["comox.backend"], a.attributes["comox.attempt.outcome"],
             a.attributes["http.response.status_code"]) for a in (first, retry)] == [
        ("first", "bad", "server_error", 502), ("retry", "good", "ok", 200)]
    assert first.status.status_code is StatusCode.ERROR and first.attributes["error.type"] == "502"
    assert retry.status.status_code is StatusCode.UNSET
    assert [len(children(a, same)) for a in (first, retry)] == [1, 1]  # each its own HTTP call
    assert first.end_time <= retry.start_time
    assert request.attributes["comox.attempts"] == 2 and request.attributes["comox.backend"] == "good"
    assert 0 < request.attributes["comox.time_to_first_token_ms"] < (request.end_time - request.start_time) / 1e6
    assert retry.end_time > first.end_time  # a stream's attempt lasts until the stream ends


def test_failover_is_an_attempt_span_of_its_own(spans, comox_serve, upstreams):
    cloud = upstreams("cloud")
    dead = {"name": "local", "url": f"http://127.0.0.1:{free_port()}"}
    failover = {"trigger": "error", "backends": [{"name": "cloud", "url": cloud.url, "model": "cloud-model",
                                                  "price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0}]}
    server = comox_serve(settings(dead, failover=failover), plugins=[Fixtures()])
    assert chat(server).headers["x-comox-route"] == "failover"
    [(request, same)] = request_traces(spans)
    local, spill = attempts(request, same)
    assert (local.attributes["comox.attempt.kind"], local.attributes["comox.attempt.outcome"], local.attributes["error.type"]) == \
        ("first", "unreachable", "unreachable")
    assert (spill.attributes["comox.attempt.kind"], spill.attributes["comox.attempt.outcome"]) == ("failover", "ok")
    assert spill.attributes["gen_ai.provider.name"] == "openai" and "comox.backend" not in spill.attributes
    [call] = children(spill, same)  # the failover plugin's call to the cloud, under the failover attempt
    assert (call.attributes.get("url.full") or call.attributes.get("http.url")).startswith(cloud.url)
    assert request.attributes["comox.route"] == "failover" and request.attributes["gen_ai.response.model"] == "cloud-model"


def test_a_resumed_stream_is_a_broken_attempt_and_a_resume_attempt(spans, comox_serve, upstreams):
    a, b = upstreams("a", stream_chunks=5), upstreams("b")
    a.faults.append(Fault(close_after_chunks=2))
    server = comox_serve(settings({"name": "a", "url": a.url}, {"name": "b", "url": b.url}, resume_streams=True),
                         plugins=[Fixtures()])
    reply = post(f"{server.url}/v1/completions", {"model": "m", "prompt": "Count:", "max_tokens": 10, "stream": True})
    assert reply.text.count("data: [DONE]") == 1
    [(request, same)] = request_traces(spans)
    assert request.name == "text_completion m"
    broken, resumed = attempts(request, same)
    assert [(s.attributes["comox.backend"], s.attributes["comox.attempt.kind"], s.attributes["comox.attempt.outcome"])
            for s in (broken, resumed)] == [("a", "first", "broken"), ("b", "resume", "ok")]
    assert broken.status.status_code is StatusCode.ERROR and broken.end_time <= resumed.start_time
    assert resumed.attributes["gen_ai.request.max_tokens"] == 8  # the continuation asks for the tokens left
    assert broken.name == resumed.name == "text_completion m"


@pytest.mark.parametrize("transport", ["aiohttp", "pyreqwest", "httpx"])
def test_the_clients_traceparent_is_continued_and_sent_upstream_on_either_transport(spans, comox_serve, upstreams, transport):
    up = upstreams("up")
    server = comox_serve(settings({"name": "gpu-1", "url": up.url, "transport": "pyreqwest" if transport == "pyreqwest" else "aiohttp"}),
                         plugins=[Fixtures()])
    if transport == "httpx":
        server.app.gateway.backend("gpu-1").backend.transport = comox.HttpxTransport(httpx.AsyncClient())
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    chat(server, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    [(request, same)] = request_traces(spans)
    assert request.context.trace_id == int(trace_id, 16) and request.parent.span_id == int(parent_id, 16)
    assert request.parent.is_remote
    [attempt] = attempts(request, same)
    [call] = children(attempt, same)
    sent = up.requests[-1]["headers"]["traceparent"].split("-")
    assert (sent[1], int(sent[2], 16)) == (trace_id, call.context.span_id)


class Host:
    """An app that traces its own requests and mounts Comox (as an instrumented
    FastAPI app would): its server span is current while Comox serves."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        with trace.get_tracer("host").start_as_current_span("host", kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def test_mounted_in_a_traced_app_the_request_span_is_a_child_of_its_span(spans, upstreams):
    up = upstreams("up")
    app = comox.create_app(comox.Settings(auth="none", **settings({"name": "gpu-1", "url": up.url})), plugins=[Fixtures()])
    with ServerThread(Host(app)) as server:
        chat(server)
        [(host, same)] = request_traces(spans)
        wait_until(lambda: any(s.name == "chat m" for s in spans.get_finished_spans()))
    [request] = [s for s in spans.get_finished_spans() if s.name == "chat m" and s.kind is SpanKind.INTERNAL]
    assert host.name == "host" and request.parent.span_id == host.context.span_id
    assert len(attempts(request, spans.get_finished_spans())) == 1


# -- content ----------------------------------------------------------------------------


def span_text(spans):
    """Every attribute and event value of ``spans``, as one string."""
    values = []
    for span in spans:
        values += [str(value) for value in span.attributes.values()]
        values += [str(value) for event in span.events for value in (event.attributes or {}).values()]
    return "\n".join(values)


@pytest.mark.parametrize("stream", [False, True])
def test_no_prompt_or_answer_in_any_span_unless_capture_content(spans, comox_serve, upstreams, stream):
    up = upstreams("up")
    server = comox_serve(settings({"name": "gpu-1", "url": up.url}), plugins=[Fixtures()])
    chat(server, stream=stream)
    [(request, same)] = request_traces(spans)
    assert len(same) >= 3 and "comox.request_id" in request.attributes
    text = span_text(same)
    assert "quick brown" not in text and "hello from" not in text and "tok1" not in text
    assert "gen_ai.input.messages" not in request.attributes and "gen_ai.output.messages" not in request.attributes

    captured = comox_serve(settings({"name": "gpu-1", "url": up.url}, telemetry={"capture_content": True}), plugins=[Fixtures()])
    chat(captured, stream=stream)
    [_, (request, same)] = request_traces(spans, total=2)
    assert json.loads(request.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    answer = "tok0 tok1 tok2 " if stream else "hello from up"
    assert json.loads(request.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer}], "finish_reason": "stop"}]


# -- OTLP export ------------------------------------------------------------------------


class Collector:
    """A stand-in OpenTelemetry collector: OTLP/HTTP ``POST /v1/traces``,
    the protobuf bodies kept as they came."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = await read_body(receive, scope["headers"], 1 << 30)
        if scope["method"] != "POST" or scope["path"] != "/v1/traces":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if dict(scope["headers"]).get(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        answer = ExportTraceServiceResponse().SerializeToString()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-protobuf")]})
        await send({"type": "http.response.body", "body": answer})

    def spans(self):
        """``(resource attributes, span)`` of every span received."""
        found = []
        for body in self.bodies:
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
                found += [(resource, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return found


def value_of(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


@pytest.mark.parametrize("transport", ["aiohttp", "pyreqwest"])
@pytest.mark.parametrize("configured_by", ["config", "environment"])
def test_spans_are_exported_with_otlp_http_to_a_collector(comox_serve, upstreams, monkeypatch, configured_by, transport):
    """With the plugin's own tracer provider (not the global one), each
    transport's HTTP client span is exported under the attempt's, and is the
    parent the upstream got in its ``traceparent``."""
    collector = ServerThread(Collector(), lifespan="off").start()
    try:
        up = upstreams("up")
        checked = {"name": "gpu-1", "url": up.url, "transport": transport, "health_check": {"enabled": True, "interval_s": 0.05}}
        if configured_by == "config":
            telemetry = {"otlp_endpoint": collector.url}
        else:
            telemetry = None
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
            monkeypatch.setenv("OTEL_SERVICE_NAME", "comox-edge")
        server = comox_serve({"models": [{"name": "m", "backends": [checked]}],
                              **({"sections": {"telemetry": telemetry}} if telemetry else {})})
        assert server.app.gateway.plugin_settings("otel").source == ("otlp" if telemetry else "env")
        chat(server)
        wait_until(lambda: len(up.probes) >= 3)  # health checks ran while the gateway traced
        server.stop()  # shutting down exports what is left
        wait_until(lambda: any(span.kind == span.SPAN_KIND_SERVER for _, span in collector.app.spans()))
        exported = collector.app.spans()
        [(resource, request)] = [(r, s) for r, s in exported if s.kind == s.SPAN_KIND_SERVER]
        assert resource["service.name"] == ("comox" if telemetry else "comox-edge")
        attributes = {kv.key: value_of(kv.value) for kv in request.attributes}
        assert request.name == "chat m" and attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.usage.output_tokens"] == 3 and attributes["comox.backend"] == "gpu-1"
        [attempt] = [s for _, s in exported if s.parent_span_id == request.span_id]
        assert {kv.key: value_of(kv.value) for kv in attempt.attributes}["comox.attempt.outcome"] == "ok"
        [call] = [s for _, s in exported if s.parent_span_id == attempt.span_id]
        assert call.kind == call.SPAN_KIND_CLIENT
        _, trace_id, parent_id, _ = up.requests[-1]["headers"]["traceparent"].split("-")
        assert (bytes.fromhex(trace_id), bytes.fromhex(parent_id)) == (request.trace_id, call.span_id)
        # Health checks are not requests: no trace of their own.
        assert all(span.parent_span_id or span.kind == span.SPAN_KIND_SERVER for _, span in exported)
        assert len({span.trace_id for _, span in exported}) == 1
    finally:
        collector.stop()


def test_configuration_md_lists_the_telemetry_keys_with_their_defaults():
    from comox_otel import TelemetrySettings

    table = (DOCS / "configuration.md").read_text().split("### `[telemetry]`")[1].split("\n### ")[0]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| `")}
    assert rows == {"otlp_endpoint": "none", "capture_content": "`false`"}
    assert set(rows) == set(TelemetrySettings.model_fields)
