"""The ``anthropic`` backend type: a real gateway in front of a stand-in
Anthropic API (tests/anthropic_standin.py, the real wire format), with the
official ``openai`` SDK as the client."""

import asyncio
import threading

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types import Usage
from comox_anthropic import AnthropicBackend
from pydantic import BaseModel

import comox
from comox.testing import free_port
from tests.anthropic_standin import AnthropicStandIn, Reply, text, tool_use
from tests.plugins.usage_seen import UsageSeen
from tests.secrets_check import secret

KEY = secret("sk-ant-test-key", "upstream key")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Setup:
    def __init__(self, server, claude, seen):
        self.server, self.claude, self.seen = server, claude, seen
        self.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def post(self, body):
        return httpx.post(f"{self.server.url}/v1/chat/completions", json={"model": "claude", **body}, timeout=30)


def backend(url, **extra):
    return {"name": "claude", "type": "anthropic", "url": url, "model": "claude-sonnet-4-5",
            "api_key_env": "COMOX_TEST_ANTHROPIC_KEY", **extra}


@pytest.fixture
def claude():
    standin = AnthropicStandIn(api_key=KEY).start()
    yield standin
    standin.stop()


@pytest.fixture
def serve(comox_serve, claude, monkeypatch):
    """A gateway serving the model ``claude`` from the stand-in. Only this
    plugin is loaded (and the essential ones), so that no other plugin —
    failover, a cache, limits — changes what the client sees."""
    monkeypatch.setenv("COMOX_TEST_ANTHROPIC_KEY", KEY)
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "anthropic")

    def make(*backends):
        seen = UsageSeen()
        server = comox_serve({"models": [{"name": "claude", "backends": list(backends) or [backend(claude.url)]}]}, plugins=[seen])
        return Setup(server, claude, seen)

    return make


def test_the_standin_speaks_the_real_wire_format(claude):
    """The official anthropic SDK reads the stand-in's answers, JSON and stream."""
    sdk = anthropic.Anthropic(base_url=claude.url, api_key=KEY, max_retries=0)
    claude.replies.append(Reply([text("Let me check."), tool_use("toolu_1", "get_weather", {"city": "Paris"})], "tool_use"))
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    answer = sdk.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert answer.stop_reason == "tool_use" and answer.content[1].input == {"city": "Paris"}
    claude.replies.append(Reply([text("Let me check."), tool_use("toolu_1", "get_weather", {"city": "Paris"})], "tool_use"))
    with sdk.messages.stream(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}], tools=tools) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Let me check." and final.content[1].input == {"city": "Paris"}
    claude.replies.append(Reply(status=529))
    with pytest.raises(anthropic.InternalServerError) as exc:
        sdk.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 529 and exc.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError):  # it checks requests as the API does
        sdk.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "assistant", "content": "hi"}])


def test_chat(serve):
    setup = serve()
    reply = setup.client.chat.completions.create(
        model="claude", max_tokens=50, temperature=0.2, stop=["END"], user="u-7",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}])
    assert reply.choices[0].message.content == "hello from claude" and reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (12, 5, 17)
    assert reply.model == "claude-sonnet-4-5" and reply.object == "chat.completion"
    (sent,) = setup.claude.requests
    assert sent["headers"]["x-api-key"] == KEY and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    assert sent["body"] == {"model": "claude-sonnet-4-5", "max_tokens": 50, "system": "Be brief.", "temperature": 0.2,
                            "stop_sequences": ["END"], "metadata": {"user_id": "u-7"},
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}]}
    assert setup.seen.done == [(200, comox.Usage(prompt=12, completion=5, cached=0))]


def test_a_conversation_with_images_reaches_anthropic_as_alternating_turns(serve):
    setup = serve()
    image = "data:image/png;base64,iVBORw0KGgo="
    setup.client.chat.completions.create(model="claude", messages=[
        {"role": "developer", "content": "You see images."},
        {"role": "user", "content": "Look:"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}]},
        {"role": "assistant", "content": "Two images."},
        {"role": "user", "content": "Which is bigger?"},
    ])
    body = setup.claude.last
    assert body["system"] == "You see images." and body["max_tokens"] == 4096  # the default_max_tokens
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.png"}}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_final_assistant_message_is_continued(serve, stream):
    """A prefill, as a resumed stream sends it: Claude continues the text, and
    the whitespace the API refuses at its end is not doubled in the answer."""
    setup = serve()
    setup.claude.replies.append(Reply([text(" Paris, on the Seine.")]))
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "The capital is "}]
    if stream:
        said = "".join(c.choices[0].delta.content or "" for c in setup.client.chat.completions.create(
            model="claude", messages=messages, stream=True) if c.choices)
    else:
        said = setup.client.chat.completions.create(model="claude", messages=messages).choices[0].message.content
    assert said == "Paris, on the Seine."
    assert setup.claude.last["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "The capital is"}]}
    assert AnthropicBackend.continues == {"chat/completions"}


def stream_text(setup, **options):
    chunks = list(setup.client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hello?"}], stream=True, **options))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streaming(serve):
    setup = serve()
    chunks, said = stream_text(setup)
    assert said == "hello from claude" and len(chunks) >= 4
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert setup.claude.last["stream"] is True
    # The last chunk carries usage even unasked, so the gateway can count it.
    assert chunks[-1].usage.prompt_tokens == 12 and chunks[-1].usage.completion_tokens == 5
    assert setup.seen.done == [(200, comox.Usage(prompt=12, completion=5, cached=0))]
    raw = setup.post({"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")
    assert raw.text.count("data: [DONE]") == 1 and "event:" not in raw.text


def test_streaming_with_include_usage(serve):
    setup = serve()
    chunks, said = stream_text(setup, stream_options={"include_usage": True})
    assert said == "hello from claude"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17


def test_tools_over_two_turns(serve):
    setup = serve()
    setup.claude.replies.append(Reply([text("Checking."), tool_use("toolu_01", "get_weather", {"city": "Paris"})], "tool_use"))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = setup.client.chat.completions.create(model="claude", messages=messages, tools=[WEATHER], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, orjson.loads(call.function.arguments)) == ("toolu_01", "get_weather", {"city": "Paris"})
    assert setup.claude.last["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                                           "input_schema": WEATHER["function"]["parameters"]}]
    assert setup.claude.last["tool_choice"] == {"type": "auto"}

    setup.claude.replies.append(Reply([text("18°C and sunny in Paris.")]))
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}]
    second = setup.client.chat.completions.create(model="claude", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "18°C and sunny in Paris." and second.choices[0].finish_reason == "stop"
    assert setup.claude.last["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny"}]}]


def test_streamed_tool_calls(serve):
    setup = serve()
    setup.claude.replies.append(Reply([tool_use("toolu_01", "get_weather", {"city": "Paris"}),
                                       tool_use("toolu_02", "get_weather", {"city": "Oslo"})], "tool_use"))
    chunks = list(setup.client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}], tools=[WEATHER], stream=True))
    calls = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = (delta.function.name if delta.function else None) or call["name"]
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert {i: (c["id"], c["name"], orjson.loads(c["arguments"])) for i, c in calls.items()} == {
        0: ("toolu_01", "get_weather", {"city": "Paris"}), 1: ("toolu_02", "get_weather", {"city": "Oslo"})}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_through_a_forced_tool(serve, stream):
    setup = serve()
    setup.claude.replies.append(Reply([tool_use("toolu_j", "json_response", {"name": "Ada", "age": 36})], "tool_use"))
    messages = [{"role": "user", "content": "Who wrote the first program?"}]
    if stream:
        with setup.client.chat.completions.stream(model="claude", messages=messages, response_format=Person) as events:
            final = events.get_final_completion()
    else:
        final = setup.client.chat.completions.parse(model="claude", messages=messages, response_format=Person)
    assert final.choices[0].message.parsed == Person(name="Ada", age=36)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    body = setup.claude.last
    assert body["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert body["tools"][0]["name"] == "json_response" and body["tools"][0]["input_schema"]["properties"].keys() == {"name", "age"}


@pytest.mark.parametrize("stop_reason, finish", [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                                                 ("refusal", "content_filter")])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_reasons(serve, stop_reason, finish, stream):
    setup = serve()
    setup.claude.replies.append(Reply([text("Once upon")], stop_reason, stop_sequence="END" if stop_reason == "stop_sequence" else None))
    if stream:
        chunks, _ = stream_text(setup)
        assert chunks[-1].choices[0].finish_reason == finish
    else:
        reply = setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Tell"}])
        assert reply.choices[0].finish_reason == finish


@pytest.mark.parametrize("stream", [False, True])
def test_usage_with_cache_reads_and_writes_counts_each_token_once(serve, stream):
    setup = serve()
    setup.claude.replies.append(Reply(usage=Usage(input_tokens=20, output_tokens=7, cache_read_input_tokens=1000,
                                                  cache_creation_input_tokens=300)))
    if stream:
        chunks, _ = stream_text(setup, stream_options={"include_usage": True})
        usage = chunks[-1].usage
    else:
        usage = setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}]).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1320, 7, 1327)
    assert usage.prompt_tokens_details.cached_tokens == 1000
    assert usage.model_extra == {"cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300}
    assert setup.seen.done == [(200, comox.Usage(prompt=1320, completion=7, cached=1000))]


@pytest.mark.parametrize("status, error, out_status, out_type, headers, retry_after", [
    (400, openai.BadRequestError, 400, "invalid_request_error", {}, None),
    (401, openai.AuthenticationError, 401, "authentication_error", {}, None),
    (403, openai.PermissionDeniedError, 403, "permission_error", {}, None),
    (404, openai.NotFoundError, 404, "invalid_request_error", {}, None),
    (413, openai.APIStatusError, 413, "invalid_request_error", {}, None),
    (429, openai.RateLimitError, 429, "rate_limit_error", {"retry-after": "17"}, "17"),
    (500, openai.InternalServerError, 500, "server_error", {}, None),
    (529, openai.InternalServerError, 503, "service_unavailable", {}, "2"),
    (529, openai.InternalServerError, 503, "service_unavailable", {"retry-after": "9"}, "9"),
])
def test_each_error_status_is_mapped(serve, status, error, out_status, out_type, headers, retry_after):
    setup = serve()
    setup.claude.replies.append(Reply(status=status, headers=headers))
    with pytest.raises(error) as exc:
        setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == out_status
    assert exc.value.body["type"] == out_type and exc.value.body["message"] == f"stand-in error {status}"
    if retry_after:
        assert exc.value.response.headers["retry-after"] == retry_after


def test_an_error_event_before_the_first_chunk_is_a_status_the_gateway_can_retry(serve, claude):
    setup = serve()
    claude.replies.append(Reply(error_after_events=0))
    with pytest.raises(openai.InternalServerError) as exc:
        stream_text(setup)
    assert exc.value.status_code == 503 and exc.value.body["code"] == "overloaded"
    # With a second backend, the request moves there before the client saw a byte.
    setup = serve(backend(claude.url), backend(claude.url, name="claude-2"))
    claude.replies.append(Reply(error_after_events=0))
    _, said = stream_text(setup)
    assert said == "hello from claude" and len(claude.requests) == 3


def gated_stream(setup, reply):
    """A raw stream whose fault comes only once the client has read the text
    before it: ``(events before, events after)``, the ``data:`` payloads."""
    reply.gate = threading.Event()
    setup.claude.replies.append(reply)
    body = {"model": "claude", "messages": [{"role": "user", "content": "x"}], "stream": True}
    before, after = [], []
    with httpx.stream("POST", f"{setup.server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                (after if reply.gate.is_set() else before).append(line[6:])
                if '"two "' in line:
                    reply.gate.set()
    return before, after


def test_an_error_event_mid_stream_ends_it_with_an_openai_error_and_no_done(serve):
    setup = serve()
    before, after = gated_stream(setup, Reply([text("one two three four five")], error_after_events=4))
    assert "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in before) == "one two "
    assert after == ['{"error":{"message":"Overloaded","type":"service_unavailable","param":null,"code":"overloaded"}}']

    # The SDK raises it, as it does for OpenAI's own errors mid-stream.
    gate = threading.Event()
    setup.claude.replies.append(Reply([text("one two three four five")], error_after_events=4, gate=gate))
    stream = setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], stream=True)
    said = ""
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            said += chunk.choices[0].delta.content or ""
            if said == "one two ":
                gate.set()
    assert exc.value.message == "Overloaded" and said == "one two "


def test_a_stream_that_breaks_off_ends_with_an_error_event(serve):
    setup = serve()
    before, after = gated_stream(setup, Reply([text("one two three four five")], drop_after_events=4))
    assert len(before) == 3 and len(after) == 1
    assert orjson.loads(after[0])["error"]["code"] == "stream_interrupted"


def test_a_stream_that_breaks_before_its_first_event_moves_elsewhere(serve, claude):
    setup = serve(backend(claude.url), backend(claude.url, name="claude-2"))
    claude.replies.append(Reply(drop_after_events=0))
    _, said = stream_text(setup)
    assert said == "hello from claude" and len(claude.requests) == 2


@pytest.mark.parametrize("endpoint", ["completions", "embeddings"])
def test_endpoints_anthropic_does_not_have_are_a_clear_400(serve, endpoint):
    setup = serve()
    with pytest.raises(openai.BadRequestError) as exc:
        if endpoint == "completions":
            setup.client.completions.create(model="claude", prompt="Once")
        else:
            setup.client.embeddings.create(model="claude", input="Once")
    assert exc.value.code == "unsupported_endpoint" and f"no {endpoint} endpoint" in exc.value.message
    assert setup.claude.requests == []


def test_a_request_anthropic_cannot_express_is_a_400_before_it_leaves(serve):
    setup = serve()
    with pytest.raises(openai.BadRequestError) as exc:
        setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], n=2)
    assert exc.value.param == "n" and setup.claude.requests == []


def test_an_unreachable_api_is_a_503_naming_it(serve):
    setup = serve(backend(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(openai.InternalServerError) as exc:
        setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503 and "unreachable" in exc.value.message


def test_prompt_cache_asks_anthropic_to_cache(serve, claude):
    setup = serve(backend(claude.url, prompt_cache=True, default_max_tokens=99))
    setup.client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert claude.last["cache_control"] == {"type": "ephemeral"} and claude.last["max_tokens"] == 99


def test_configuration(monkeypatch, claude):
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "anthropic")
    monkeypatch.delenv("COMOX_TEST_ANTHROPIC_KEY", raising=False)
    models = [{"name": "claude", "backends": [backend(claude.url)]}]
    with pytest.raises(comox.ConfigError, match="COMOX_TEST_ANTHROPIC_KEY' is not set"):
        comox.build_gateway(comox.Settings(auth="none", models=models))
    monkeypatch.setenv("COMOX_TEST_ANTHROPIC_KEY", KEY)
    with pytest.raises(comox.ConfigError, match="anthropic_verison: Extra inputs are not permitted"):
        comox.build_gateway(comox.Settings(auth="none", models=[{"name": "c", "backends": [backend(claude.url, anthropic_verison="x")]}]))
    gateway = comox.build_gateway(comox.Settings(auth="none", models=[{"name": "c", "backends": [{"type": "anthropic", "name": "c"}]}]))
    assert gateway.backend("c").backend.messages_url == "https://api.anthropic.com/v1/messages"


def test_health_check_is_off_by_default_and_checks_the_key_when_on(monkeypatch, claude):
    assert AnthropicBackend.health_check_default is False  # a cloud API is not ours to probe
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "anthropic")
    monkeypatch.setenv("COMOX_TEST_ANTHROPIC_KEY", KEY)
    gateway = comox.build_gateway(comox.Settings(auth="none", models=[{"name": "c", "backends": [backend(claude.url + "/v1")]}]))
    assert asyncio.run(gateway.probe()) == [("claude", "ok", "ok")]
    assert claude.probe_headers[0]["x-api-key"] == KEY and claude.probe_headers[0]["anthropic-version"] == "2023-06-01"
    monkeypatch.setenv("COMOX_TEST_ANTHROPIC_KEY", "sk-ant-wrong")
    gateway = comox.build_gateway(comox.Settings(auth="none", models=[{"name": "c", "backends": [backend(claude.url)]}]))
    assert asyncio.run(gateway.probe()) == [("claude", "fail", "GET /v1/models: HTTP 401")]
