"""Anthropic's Messages API served by Comox (plugins/comox_anthropic/inbound.py),
with the official ``anthropic`` SDK as the client: translated to chat
completions for an OpenAI-format fleet (a scripted stand-in, and real
``llama_cpp.server`` processes) and back, passed through byte for byte to a
backend that speaks the API itself (tests/anthropic_standin.py in its native
mode), ``count_tokens``, the model list in Anthropic's shape, and every error
in Anthropic's format."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest
from anthropic.types import ThinkingBlock, Usage
from comox_anthropic import MessagesAPI
from comox_anthropic.translate import anthropic_to_openai_request

import comox
from comox.testing import StandInUpstream, wait_for_http
from tests.anthropic_standin import AnthropicStandIn, Reply, text
from tests.cycles import requests_left_in_cycles
from tests.plugins.usage_seen import UsageSeen
from tests.secrets_check import secret

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HI = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34, "prompt_tokens_details": {"cached_tokens": 20}}
ALICE = secret("cmx-alice-anthropic-0123456789abcdef")


# -- an OpenAI-format server that answers what the test scripts ---------------------


@dataclass
class Answer:
    """One chat completion the scripted stand-in gives (JSON, or as chunks)."""

    content: str | None = "Hello there."
    reasoning: str | None = None
    """As ``reasoning_content`` (llama.cpp's server, vLLM)."""
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    """Tool calls: ``(id, name, arguments)``."""
    finish: str = "stop"
    stop_reason: str | None = None
    """vLLM's ``stop_reason``: the stop string that matched."""
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(USAGE))
    error_after: int | None = None
    """For a stream: an OpenAI error event after this many chunks, then the end."""
    drop_after: int | None = None
    """For a stream: drop the connection after this many chunks."""
    end_after: int | None = None
    """For a stream: end it cleanly, without ``[DONE]``, after this many chunks."""
    garbage: Any = None
    """For JSON: answer this instead of a chat completion."""


class ScriptedChat(StandInUpstream):
    """Answers ``/v1/chat/completions`` with the next :class:`Answer` of
    ``answers`` (by default a text), as vLLM or llama.cpp's server would."""

    def __init__(self, name: str = "local"):
        super().__init__(name)
        self.answers: deque[Answer] = deque()

    def _next(self) -> Answer:
        return self.answers.popleft() if self.answers else Answer()

    def _completion(self, payload, chat):
        answer = self._next()
        if answer.garbage is not None:
            return answer.garbage
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if answer.calls:
            message["tool_calls"] = [{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
                                     for id, name, arguments in answer.calls]
        choice = {"index": 0, "message": message, "finish_reason": answer.finish, "stop_reason": answer.stop_reason}
        return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": payload["model"],
                "choices": [choice], "usage": answer.usage}

    async def _stream(self, receive, send, payload, chat, fault, extra):
        answer = self._next()

        def chunk(delta, finish=None, **more):
            return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1, "model": payload["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **more}]}

        chunks = [chunk({"role": "assistant", "content": ""})]
        for piece in (answer.reasoning or "").split(" "):
            if piece:
                chunks.append(chunk({"reasoning_content": piece + " "}))
        for piece in (answer.content or "").split(" "):
            if piece:
                chunks.append(chunk({"content": piece + " "}))
        for n, (id, name, arguments) in enumerate(answer.calls):
            chunks.append(chunk({"tool_calls": [{"index": n, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}))
            half = len(arguments) // 2
            for part in (arguments[:half], arguments[half:]):
                chunks.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": part}}]}))
        chunks.append(chunk({}, answer.finish, stop_reason=answer.stop_reason))
        if answer.usage and (payload.get("stream_options") or {}).get("include_usage"):
            chunks.append({**chunk({}), "choices": [], "usage": answer.usage})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), *extra]})
        for i, data in enumerate(chunks):
            if i == answer.drop_after:
                raise ConnectionAbortedError("the stand-in drops the stream")
            if i == answer.end_after:
                await send({"type": "http.response.body", "body": b""})
                return
            if i == answer.error_after:
                error = {"error": {"message": "the engine ran out of memory", "type": "server_error", "param": None, "code": None}}
                await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(error) + b"\n\n"})
                return
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(data) + b"\n\n", "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


# -- plugins the tests use ---------------------------------------------------------------


class Refuse:
    """Refuses requests carrying ``x-refuse: 403`` or ``429``, as a policy or limits plugin does."""

    @comox.hookimpl
    def comox_admit(self, request):
        how = request.header(b"x-refuse")
        if how == b"403":
            raise comox.PermissionDenied("this key may not do that")
        if how == b"429":
            raise comox.RateLimited("slow down", retry_after=7)


class Setup:
    def __init__(self, server, upstream, seen):
        self.server, self.upstream, self.seen = server, upstream, seen
        self.url = server.url

    def client(self, key: str = "unused", **options) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=30, **options)

    def post(self, body: Any = None, *, content: bytes | None = None, path: str = "/v1/messages", **headers) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, content=content, timeout=30,
                          headers={"anthropic-version": "2023-06-01", **headers})

    @property
    def sent(self) -> dict[str, Any]:
        """The chat request the upstream got last."""
        return self.upstream.requests[-1]["body"]

    def usage(self) -> comox.Usage | None:
        """The usage of the last finished request, once it is done."""
        from comox.testing import wait_until

        wait_until(lambda: self.seen.done)
        return self.seen.done[-1][1]


def group(url: str, **backend) -> dict[str, Any]:
    return {"name": "chat", "aliases": ["claude-sonnet-4-5"], "backends": [{"name": "local", "url": url, **backend}]}


@pytest.fixture
def setup(comox_serve, upstreams):
    upstream = upstreams("local", kind=ScriptedChat)
    seen = UsageSeen()
    server = comox_serve({"models": [group(upstream.url)]}, plugins=[seen, Refuse()])
    return Setup(server, upstream, seen)


def events_of(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each server-sent event; name "" for a data-only one."""
    out = []
    for block in raw.split("\n\n"):
        name, data = "", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
        if data is not None:
            out.append((name, data))
    return out


def assert_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}
    return body


# -- translated: requests and answers ---------------------------------------------------------


def test_a_message_is_translated_to_a_chat_completion_and_back(setup):
    setup.upstream.answers.append(Answer(content="Paris.", reasoning="The capital of France is Paris."))
    reply = setup.client().messages.create(
        model="chat", max_tokens=20, stop_sequences=["END"], metadata={"user_id": "u-1"},
        extra_body={"temperature": 0.5, "top_k": 40},  # (no longer parameters of the SDK: still the API's)
        output_config={"format": {"type": "json_schema", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}],
        tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Capital of France?"},
                                               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}])
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "The capital of France is Paris." and reply.content[1].text == "Paris."
    assert reply.model == "chat" and reply.role == "assistant" and reply.type == "message"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    # Anthropic counts cache reads beside input_tokens; OpenAI inside prompt_tokens.
    assert (reply.usage.input_tokens, reply.usage.cache_read_input_tokens, reply.usage.output_tokens) == (10, 20, 4)
    assert setup.upstream.requests[-1]["path"] == "/v1/chat/completions"
    assert setup.sent == {
        "model": "chat", "max_tokens": 20, "temperature": 0.5, "top_k": 40, "stop": ["END"], "user": "u-1",
        "messages": [{"role": "system", "content": "Be brief.\n\nAnswer in English."},
                     {"role": "user", "content": [{"type": "text", "text": "Capital of France?"},
                                                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                    "parameters": WEATHER["input_schema"]}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}}
    assert setup.usage()[:3] == (30, 4, 20)  # what the gateway counted: the internal answer's usage


@pytest.mark.parametrize("finish, matched, stop_reason, stop_sequence", [
    ("stop", None, "end_turn", None), ("length", None, "max_tokens", None), ("tool_calls", None, "tool_use", None),
    ("stop", "END", "stop_sequence", "END")], ids=["end_turn", "max_tokens", "tool_use", "stop_sequence"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_stop_reasons(setup, finish, matched, stop_reason, stop_sequence, stream):
    calls = [("call_1", "get_weather", '{"city":"Paris"}')] if finish == "tool_calls" else []
    setup.upstream.answers.append(Answer(finish=finish, stop_reason=matched, calls=calls))
    client = setup.client()
    body = {"model": "chat", "max_tokens": 10, "messages": HI, "stop_sequences": ["END"], "tools": [WEATHER]}
    if stream:
        with client.messages.stream(**body) as events:
            reply = events.get_final_message()
    else:
        reply = client.messages.create(**body)
    assert (reply.stop_reason, reply.stop_sequence) == (stop_reason, stop_sequence)


def test_a_stream_has_every_event_type_in_the_apis_order(setup):
    setup.upstream.answers.append(Answer(content="It is sunny.", reasoning="Look it up.",
                                         calls=[("call_1", "get_weather", '{"city": "Paris"}')], finish="tool_calls"))
    response = setup.post({"model": "chat", "max_tokens": 50, "stream": True, "messages": HI, "tools": [WEATHER]})
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    events = events_of(response.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    deltas = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 3, "content_block_stop",
                     "content_block_start", *["content_block_delta"] * 3, "content_block_stop",
                     "content_block_start", *["content_block_delta"] * 2, "content_block_stop", "message_delta", "message_stop"]
    assert deltas == ["thinking_delta"] * 3 + ["text_delta"] * 3 + ["input_json_delta"] * 2
    blocks = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert blocks == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}]
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["model"] == "chat" and start["role"] == "assistant" and start["content"] == [] and start["stop_reason"] is None
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}
    # The gateway read the usage from the events it sent.
    assert setup.usage()[:3] == (30, 4, 20)


def test_the_sdk_streams_with_messages_stream_and_create(setup):
    answer = Answer(content="It is sunny.", reasoning="Look it up.", calls=[("call_1", "get_weather", '{"city": "Paris"}')],
                    finish="tool_calls")
    setup.upstream.answers.extend([answer, answer])
    client = setup.client()
    body = {"model": "chat", "max_tokens": 50, "messages": HI, "tools": [WEATHER]}
    with client.messages.stream(**body) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(texts) == "It is sunny. "
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Look it up. " and message.content[2].input == {"city": "Paris"}
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 4 and message.usage.input_tokens == 10
    kinds = [event.type for event in client.messages.create(**body, stream=True)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3


def test_a_stream_without_usage_from_the_server_is_still_counted(setup):
    setup.upstream.answers.append(Answer(content="one two three", usage=None))
    response = setup.post({"model": "chat", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x" * 40}]})
    start, delta = events_of(response.text)[0][1], events_of(response.text)[-2][1]
    # No usage from the server: the input estimated as count_tokens does, one output token per delta.
    assert start["message"]["usage"] == {"input_tokens": 14, "output_tokens": 0}
    assert delta["usage"] == {"input_tokens": 14, "output_tokens": 3}
    assert setup.usage()[:2] == (14, 3)


def test_tool_use_with_tool_results_over_several_turns(setup):
    setup.upstream.answers.extend([
        Answer(content=None, calls=[("call_1", "get_weather", '{"city":"Paris"}')], finish="tool_calls"),
        Answer(content="And Lyon?", calls=[("call_2", "get_weather", '{"city":"Lyon"}')], finish="tool_calls"),
        Answer(content="Sunny in both.")])
    client = setup.client()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
    results = {"call_1": "18°C and sunny", "call_2": [{"type": "text", "text": "21°C"}, {"type": "text", "text": "sunny"}]}
    while True:
        reply = client.messages.create(model="chat", max_tokens=50, tools=[WEATHER], messages=messages)
        messages.append({"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in reply.content]})
        if reply.stop_reason != "tool_use":
            break
        use = next(block for block in reply.content if block.type == "tool_use")
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": results[use.id]}]})
    assert reply.content[0].text == "Sunny in both." and len(setup.upstream.requests) == 3
    assert setup.sent["messages"] == [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C and sunny"},
        {"role": "assistant", "content": "And Lyon?", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "21°C\nsunny"}]


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_a_group_is_reached_by_its_anthropic_alias(setup):
    reply = setup.client().messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=HI)
    assert reply.model == "claude-sonnet-4-5" and reply.content[0].text == "Hello there."
    assert setup.upstream.requests[-1]["path"] == "/v1/chat/completions"
    with setup.client().messages.stream(model="claude-sonnet-4-5", max_tokens=10, messages=HI) as stream:
        assert stream.get_final_message().model == "claude-sonnet-4-5"
    with pytest.raises(anthropic.NotFoundError) as exc:
        setup.client().messages.create(model="claude-opus-4-1", max_tokens=10, messages=HI)
    assert exc.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_response_cache_serves_anthropic_clients_in_their_format(setup, stream):
    # temperature 0: deterministic, so the cache plugin keeps the (internal, OpenAI-shaped) answer
    body = {"model": "chat", "max_tokens": 10, "temperature": 0, "messages": HI, "stream": stream}
    first, second = setup.post(body), setup.post(body)
    assert (first.headers["x-comox-cache"], second.headers["x-comox-cache"]) == ("miss", "hit")
    assert len(setup.upstream.requests) == 1
    if stream:
        assert [name for name, _ in events_of(second.text)] == [name for name, _ in events_of(first.text)]
        assert events_of(second.text)[-1] == ("message_stop", {"type": "message_stop"})
    else:
        assert second.json() == first.json() and second.json()["content"] == [{"type": "text", "text": "Hello there."}]
    # The same request from an OpenAI client is the same entry, in its own format.
    chat = httpx.post(f"{setup.url}/v1/chat/completions", json=anthropic_to_openai_request(body), timeout=30)
    assert chat.headers["x-comox-cache"] == "hit" and len(setup.upstream.requests) == 1


async def _read(stream) -> bytes:
    return b"".join([piece async for piece in stream])


def test_a_json_answer_to_a_stream_request_becomes_its_events():
    api = MessagesAPI()
    request = comox.GatewayRequest(id="r", endpoint="", path="/v1/messages", headers=[])
    endpoint, deferred = api.parse("messages", request, orjson.dumps({"model": "chat", "max_tokens": 5, "messages": HI, "stream": True}))
    request.defer_body(deferred)  # as the core does; nothing read request.json (translate_response makes it)
    completion = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Hi", "reasoning_content": "Hmm",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}], "usage": USAGE}
    answer = asyncio.run(api.translate_response(endpoint, request, comox.BackendResponse(200, body=orjson.dumps(completion))))
    events = events_of(asyncio.run(_read(answer.stream)).decode())
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use" and events[-2][1]["usage"]["output_tokens"] == 4


# -- count_tokens ---------------------------------------------------------------------------


def test_count_tokens_is_answered_without_a_backend(setup):
    client = setup.client()
    # "Be brief." and "Hello there, friend": 28 characters, 7 tokens, and 4 for the one message.
    counted = client.messages.count_tokens(model="chat", system="Be brief.", messages=[{"role": "user", "content": "Hello there, friend"}])
    assert counted.input_tokens == 11
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with_image = client.messages.count_tokens(model="claude-sonnet-4-5", system="Be brief.",
                                              messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there, friend"}, image]}])
    assert with_image.input_tokens == 11 + 1600
    assert setup.upstream.requests == []
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HI)
    assert_error(setup.post({"model": "chat", "messages": []}, path="/v1/messages/count_tokens"), 400, "invalid_request_error")
    assert_error(httpx.get(f"{setup.url}/v1/messages/count_tokens"), 405, "invalid_request_error")


# -- the model list ---------------------------------------------------------------------------


@pytest.fixture
def keyed(comox_serve, upstreams):
    upstream = upstreams("local", kind=ScriptedChat)
    alice = {"id": "alice", "key_sha256": hashlib.sha256(ALICE.encode()).hexdigest(), "models": ["chat"]}
    settings = comox.Settings(auth="keys", models=[group(upstream.url), {"name": "other", "backends": [{"url": upstream.url}]}],
                              sections={"keys": [alice]})
    return Setup(comox_serve(settings), upstream, None)


def test_the_anthropic_sdk_gets_the_model_list_in_its_shape(keyed):
    client = keyed.client(ALICE)
    models = list(client.models.list())
    assert [model.id for model in models] == ["chat", "claude-sonnet-4-5"]  # not "other": alice may not use it
    assert all(model.type == "model" and model.display_name == model.id and model.created_at.year >= 2025 for model in models)
    assert [model.id for model in client.models.list(limit=1)] == ["chat", "claude-sonnet-4-5"]  # page by page
    assert client.models.retrieve("claude-sonnet-4-5").id == "claude-sonnet-4-5"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("other")
    headers = {"x-api-key": ALICE, "anthropic-version": "2023-06-01"}
    page = httpx.get(f"{keyed.url}/v1/models", params={"limit": 1}, headers=headers).json()
    assert page == {"data": [{"type": "model", "id": "chat", "display_name": "chat", "created_at": page["data"][0]["created_at"],
                              "lifecycle": "active"}], "has_more": True, "first_id": "chat", "last_id": "chat"}
    after = httpx.get(f"{keyed.url}/v1/models", params={"after_id": "chat"}, headers=headers).json()
    assert [m["id"] for m in after["data"]] == ["claude-sonnet-4-5"] and after["has_more"] is False
    before = httpx.get(f"{keyed.url}/v1/models", params={"before_id": "claude-sonnet-4-5"}, headers=headers).json()
    assert [m["id"] for m in before["data"]] == ["chat"] and before["has_more"] is False
    assert_error(httpx.get(f"{keyed.url}/v1/models", params={"limit": 0}, headers=headers), 400, "invalid_request_error")
    # Without anthropic-version (the OpenAI SDK): OpenAI's list, as before.
    listed = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=ALICE, max_retries=0).models.list()
    assert [(model.id, model.object, model.owned_by) for model in listed.data] == [("chat", "model", "comox"), ("claude-sonnet-4-5", "model", "comox")]
    with pytest.raises(anthropic.AuthenticationError) as exc:
        keyed.client("cmx-nobody").models.list()
    assert exc.value.body["error"]["type"] == "authentication_error"


# -- errors in Anthropic's format -------------------------------------------------------------


BAD = {
    "malformed JSON": b'{"model": "chat", ',
    "not an object": b"[1, 2]",
    "NaN": b'{"model": "chat", "max_tokens": 5, "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
    "no model": {"max_tokens": 5, "messages": HI},
    "model not a string": {"model": 5, "max_tokens": 5, "messages": HI},
    "no max_tokens": {"model": "chat", "messages": HI},
    "max_tokens a string": {"model": "chat", "max_tokens": "ten", "messages": HI},
    "max_tokens 0": {"model": "chat", "max_tokens": 0, "messages": HI},
    "absurd max_tokens": {"model": "chat", "max_tokens": 10**12, "messages": HI},
    "no messages": {"model": "chat", "max_tokens": 5},
    "empty messages": {"model": "chat", "max_tokens": 5, "messages": []},
    "messages not a list": {"model": "chat", "max_tokens": 5, "messages": "hi"},
    "a system role": {"model": "chat", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]},
    "content a number": {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
    "an unknown block": {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
    "text not a string": {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
    "an image without a source": {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    "a tool_use without input": {"model": "chat", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]},
    "temperature above 1": {"model": "chat", "max_tokens": 5, "temperature": 1.5, "messages": HI},
    "stream not a boolean": {"model": "chat", "max_tokens": 5, "stream": "yes", "messages": HI},
    "system a number": {"model": "chat", "max_tokens": 5, "system": 3, "messages": HI},
    "stop_sequences a string": {"model": "chat", "max_tokens": 5, "stop_sequences": "END", "messages": HI},
    "a tool without input_schema": {"model": "chat", "max_tokens": 5, "tools": [{"name": "f"}], "messages": HI},
    "a server tool": {"model": "chat", "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}], "messages": HI},
    "tool_choice of an unknown tool": {"model": "chat", "max_tokens": 5, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "f"},
                                       "messages": HI},
    "thinking of an unknown type": {"model": "chat", "max_tokens": 5, "thinking": {"type": "maximal"}, "messages": HI},
}


@pytest.mark.parametrize("body", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_400_in_anthropics_format(setup, body):
    response = setup.post(content=body) if isinstance(body, bytes) else setup.post(body)
    assert_error(response, 400, "invalid_request_error")
    assert setup.upstream.requests == []
    assert setup.post({"model": "chat", "max_tokens": 5, "messages": HI}).status_code == 200  # still healthy


def test_each_status_has_its_error_type(comox_serve, setup):
    from comox.testing import Fault

    assert_error(setup.post({"model": "nope", "max_tokens": 5, "messages": HI}), 404, "not_found_error")
    assert_error(httpx.get(f"{setup.url}/v1/messages"), 405, "invalid_request_error")
    assert_error(setup.post({"model": "chat", "max_tokens": 5, "messages": HI}, **{"x-refuse": "403"}), 403, "permission_error")
    limited = assert_error(setup.post({"model": "chat", "max_tokens": 5, "messages": HI}, **{"x-refuse": "429"}), 429, "rate_limit_error")
    assert limited["error"]["message"] == "slow down"
    with pytest.raises(anthropic.RateLimitError) as exc:
        setup.client().messages.create(model="chat", max_tokens=5, messages=HI, extra_headers={"x-refuse": "429"})
    assert exc.value.response.headers["retry-after"] == "7"
    setup.upstream.faults.append(Fault(status=400))
    assert_error(setup.post({"model": "chat", "max_tokens": 5, "messages": HI}), 400, "invalid_request_error")
    setup.upstream.faults.extend([Fault(status=503, headers={"retry-after": "3"})] * 4)
    overloaded = setup.post({"model": "chat", "max_tokens": 5, "messages": HI})
    assert_error(overloaded, 529, "overloaded_error")
    assert overloaded.headers["retry-after"] == "3"
    setup.upstream.faults.clear()
    small = comox_serve({"server": {"max_body_bytes": 200}, "models": [group(setup.upstream.url)]})
    big = httpx.post(f"{small.url}/v1/messages", json={"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 300}]})
    assert_error(big, 413, "request_too_large")
    down = comox_serve({"models": [group("http://127.0.0.1:9")]})  # nothing listens: no backend can answer
    with pytest.raises(anthropic.APIStatusError) as exc:
        anthropic.Anthropic(base_url=down.url, api_key="k", max_retries=0).messages.create(model="chat", max_tokens=5, messages=HI)
    assert exc.value.status_code in (502, 529) and exc.value.body["type"] == "error"


@pytest.mark.parametrize("garbage", [[1, 2], {"choices": {"0": "x"}}, {"choices": [{"message": "text"}]}], ids=["a list", "choices an object", "a message a string"])
def test_an_answer_that_is_no_chat_completion_is_a_502(setup, garbage):
    setup.upstream.answers.append(Answer(garbage=garbage))
    assert_error(setup.post({"model": "chat", "max_tokens": 5, "messages": HI}), 502, "api_error")


def test_keys_come_as_x_api_key_or_bearer_and_a_missing_one_is_401(keyed):
    assert keyed.client(ALICE).messages.create(model="chat", max_tokens=5, messages=HI).content[0].text == "Hello there."
    body = {"model": "chat", "max_tokens": 5, "messages": HI}
    assert keyed.post(body, **{"x-api-key": ALICE}).status_code == 200
    assert keyed.post(body, authorization=f"Bearer {ALICE}").status_code == 200
    assert_error(keyed.post(body), 401, "authentication_error")
    assert_error(keyed.post(body, **{"x-api-key": "cmx-wrong"}), 401, "authentication_error")
    assert_error(keyed.post({**body, "model": "other"}, **{"x-api-key": ALICE}), 404, "not_found_error")  # not alice's
    assert_error(keyed.post({**body, "model": "other"}, **{"x-api-key": ALICE}, path="/v1/messages/count_tokens"), 404, "not_found_error")
    assert len(keyed.upstream.requests) == 3


def test_the_keys_limits_hold_for_messages_requests(comox_serve, upstreams):
    upstream = upstreams("local", kind=ScriptedChat)
    alice = {"id": "alice", "key_sha256": hashlib.sha256(ALICE.encode()).hexdigest(), "rpm": 2}
    server = comox_serve(comox.Settings(auth="keys", models=[group(upstream.url)], sections={"keys": [alice]}))
    client = anthropic.Anthropic(base_url=server.url, api_key=ALICE, max_retries=0)
    for _ in range(2):
        reply = client.messages.with_raw_response.create(model="chat", max_tokens=5, messages=HI)
        assert reply.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model="chat", max_tokens=5, messages=HI)
    assert exc.value.body["error"]["type"] == "rate_limit_error" and int(exc.value.response.headers["retry-after"]) > 0
    assert len(upstream.requests) == 2


def test_a_stream_that_breaks_off_ends_with_an_error_event(setup):
    setup.upstream.answers.append(Answer(content="one two three four", drop_after=3))
    response = setup.post({"model": "chat", "max_tokens": 10, "stream": True, "messages": HI})
    named = [(name, data) for name, data in events_of(response.text) if name]
    assert [name for name, _ in named][:3] == ["message_start", "content_block_start", "ping"]
    assert named[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "the backend failed in the middle of the response"}})
    assert "message_stop" not in response.text
    # One error, Anthropic's: no OpenAI-format `data: {"error": …}` line after it (no event is nameless).
    events = events_of(response.text)
    assert [name for name, _ in events].count("error") == 1 and all(name for name, _ in events)
    assert 'data: {"error"' not in response.text and response.text.endswith("\n\n")
    setup.upstream.answers.append(Answer(content="one two three four", drop_after=3))
    with pytest.raises(anthropic.APIStatusError) as exc:
        with setup.client().messages.stream(model="chat", max_tokens=10, messages=HI) as stream:
            stream.get_final_message()
    assert exc.value.body["error"]["type"] == "api_error"


def test_a_stream_that_ends_before_its_answer_ends_with_an_error_event(setup):
    setup.upstream.answers.append(Answer(content="one two three four", end_after=3))  # no finish, no [DONE]
    response = setup.post({"model": "chat", "max_tokens": 10, "stream": True, "messages": HI})
    events = events_of(response.text)
    assert events[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "the backend's stream ended before its answer did"}})
    assert [name for name, _ in events].count("error") == 1 and all(name for name, _ in events)
    assert "message_stop" not in response.text and 'data: {"error"' not in response.text


def test_the_backends_error_event_becomes_an_error_event(setup):
    setup.upstream.answers.append(Answer(content="one two three", error_after=2))
    response = setup.post({"model": "chat", "max_tokens": 10, "stream": True, "messages": HI})
    events = events_of(response.text)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "the engine ran out of memory"}})
    assert [name for name, _ in events].count("message_stop") == 0


# -- native pass-through ---------------------------------------------------------------------


@pytest.fixture
def native(comox_serve):
    standin = AnthropicStandIn(native=True, model="local-model").start()
    seen = UsageSeen()
    server = comox_serve({"models": [group(standin.url, type="openai", native_apis=["messages"])]}, plugins=[seen])
    yield Setup(server, standin, seen)
    standin.stop()


def thinking_reply() -> Reply:
    return Reply(content=[ThinkingBlock(type="thinking", thinking="Let me think.", signature="sig-abc"), text("Hi from the engine")],
                 usage=Usage(input_tokens=12, cache_read_input_tokens=30, output_tokens=5))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_native_backend_gets_the_clients_bytes_and_the_client_its_answer(native, stream):
    native.upstream.replies.append(thinking_reply())
    # Odd spacing and a field the translation leaves out (thinking): forwarded as they are.
    raw = (b'{ "model" : "chat",  "max_tokens": 20, "stream": %s, "thinking": {"type": "enabled", "budget_tokens": 1024},'
           b' "messages": [ {"role": "user", "content": "hi"} ] }' % (b"true" if stream else b"false"))
    reply = native.post(content=raw, **{"content-type": "application/json"})
    assert reply.status_code == 200
    received = native.upstream.requests[-1]
    assert received["path"] == "/v1/messages" and received["raw"] == raw
    assert reply.content == bytes(native.upstream.sent[-1])  # the engine's answer, byte for byte
    usage = native.usage()  # read in Anthropic's own shape: cache reads beside input_tokens
    # (a stream's last events, message_delta, say only what the engine puts there: here the output)
    assert usage[:3] == ((None, 5, None) if stream else (42, 5, 30))


def test_the_anthropic_sdk_through_a_native_backend(native):
    sdk_bytes = []
    http = httpx2.Client(event_hooks={"request": [lambda request: sdk_bytes.append(request.read())]})  # (the SDK's httpx)
    client = native.client(http_client=http)
    native.upstream.replies.extend([thinking_reply(), thinking_reply(), thinking_reply()])
    reply = client.messages.create(model="chat", max_tokens=20, messages=HI)
    assert native.upstream.requests[-1]["raw"] == sdk_bytes[-1]
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].signature == "sig-abc" and reply.model == "chat"  # what the engine said, not re-made
    with client.messages.stream(model="chat", max_tokens=20, messages=HI) as stream:
        message = stream.get_final_message()
    assert native.upstream.requests[-1]["raw"] == sdk_bytes[-1]
    assert message.content[0].thinking == "Let me think." and message.content[0].signature == "sig-abc"
    assert message.content[1].text == "Hi from the engine"
    kinds = [event.type for event in client.messages.create(model="chat", max_tokens=20, messages=HI, stream=True)]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and len(native.upstream.requests) == 3
    assert all(request["path"] == "/v1/messages" for request in native.upstream.requests)


def test_a_native_stream_that_breaks_off_ends_with_an_anthropic_error_event(native):
    native.upstream.replies.append(Reply(content=[text("one two three")], drop_after_events=3))
    response = native.post({"model": "chat", "max_tokens": 10, "stream": True, "messages": HI})
    events = events_of(response.text)
    assert events[0][0] == "message_start" and "content_block_start" in [name for name, _ in events]
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "the backend failed in the middle of the response"}})
    assert [name for name, _ in events].count("error") == 1 and all(name for name, _ in events)
    assert 'data: {"error"' not in response.text and "message_stop" not in response.text
    native.upstream.replies.append(Reply(content=[text("one two three")], drop_after_events=3))
    with pytest.raises(anthropic.APIStatusError) as exc:
        with native.client().messages.stream(model="chat", max_tokens=10, messages=HI) as stream:
            stream.get_final_message()
    assert exc.value.body["error"]["type"] == "api_error"


def test_a_native_backend_judges_what_routing_and_limits_do_not_read(native):
    """Passed through natively, a request is checked here only as far as
    routing and limits read it; the backend answers the rest in the API's
    own terms (as the translation's check would, on a translated path)."""
    response = native.post({"model": "chat", "max_tokens": 10, "temperature": 7, "messages": HI})
    assert native.upstream.requests[-1]["body"]["temperature"] == 7  # the engine got it, and judged it
    assert response.status_code == 400 and response.json()["error"] == {
        "type": "invalid_request_error", "message": "temperature: range: 0..1"}
    for body, param in (({"max_tokens": 10, "messages": HI}, "model"), ({"model": "chat", "messages": HI}, "max_tokens"),
                        ({"model": "chat", "max_tokens": 0, "messages": HI}, "max_tokens"),
                        ({"model": "chat", "max_tokens": 10, "stream": "yes", "messages": HI}, "stream")):
        sent = len(native.upstream.requests)
        response = native.post(body)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith(f"{param}: "), body
        assert len(native.upstream.requests) == sent  # refused here: routing and limits read these


def test_a_native_request_translated_after_all_is_checked_in_full(native):
    """A native request that a stage translates after all (here the cache's
    key, for a deterministic request) is checked in full first: a 400 in
    Anthropic's format, never a 500 from translating a malformed body."""
    sent = len(native.upstream.requests)
    for messages in ("hi", [{"role": "user", "content": 5}]):
        response = native.post({"model": "chat", "max_tokens": 10, "temperature": 0, "messages": messages})
        assert response.status_code == 400, response.text
        assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["message"].startswith("messages")
    assert len(native.upstream.requests) == sent
    native.upstream.replies.append(thinking_reply())
    assert native.post({"model": "chat", "max_tokens": 10, "temperature": 0, "messages": HI}).status_code == 200


@pytest.mark.parametrize("served", ["native", "setup"], ids=["native", "translated"])
def test_a_request_leaves_no_reference_cycle(served, request):
    """Every request is freed when it ends, not at the cyclic GC's next pass."""
    served = request.getfixturevalue(served)

    def send(stream):
        assert served.post({"model": "chat", "max_tokens": 10, "messages": HI, "stream": stream}).status_code == 200

    assert requests_left_in_cycles(send) == []


def test_an_anthropic_backend_gets_an_anthropic_clients_bytes(comox_serve, monkeypatch):
    """Not translated twice: Claude (the stand-in, checking keys and versions as
    the API does) gets the client's request, only its model named for it."""
    claude = AnthropicStandIn(api_key="sk-ant-backend").start()
    try:
        monkeypatch.setenv("COMOX_TEST_CLAUDE_KEY", "sk-ant-backend")
        backend = {"name": "claude", "type": "anthropic", "url": claude.url, "model": "claude-sonnet-4-5",
                   "api_key_env": "COMOX_TEST_CLAUDE_KEY"}
        server = comox_serve({"models": [{"name": "chat", "backends": [backend]}]})
        claude.replies.extend([thinking_reply(), thinking_reply()])
        raw = b'{"model": "chat", "max_tokens": 20, "thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": [{"role": "user", "content": "hi"}]}'
        reply = httpx.post(f"{server.url}/v1/messages", content=raw, headers={"x-api-key": "client-key", "anthropic-version": "2023-06-01"})
        assert reply.status_code == 200 and reply.content == bytes(claude.sent[-1])
        received = claude.requests[-1]
        assert orjson.loads(received["raw"]) == {**orjson.loads(raw), "model": "claude-sonnet-4-5"}
        assert received["headers"]["x-api-key"] == "sk-ant-backend" and "client-key" not in str(received["headers"])
        client = anthropic.Anthropic(base_url=server.url, api_key="client-key", max_retries=0)
        with client.messages.stream(model="chat", max_tokens=20, messages=HI) as stream:
            message = stream.get_final_message()
        assert message.content[0].signature == "sig-abc" and claude.requests[-1]["body"]["stream"] is True
    finally:
        claude.stop()


# -- a real llama_cpp.server fleet ------------------------------------------------------------


def test_the_anthropic_sdk_against_a_llama_cpp_server_fleet(comox_serve, llama_processes):
    """Shapes and flow, not wisdom: the model is a small base model."""
    nodes = [llama_processes(), llama_processes()]
    for node in nodes:
        wait_for_http(f"{node.url}/v1/models", proc=node.proc, timeout=120)
    seen = UsageSeen()
    backends = [{"name": f"llama-{i}", "url": node.url, "timeout_s": 120} for i, node in enumerate(nodes)]
    server = comox_serve({"models": [{"name": "gemma", "aliases": ["claude-haiku-local"], "policy": "round_robin",
                                      "backends": backends}]}, plugins=[seen])
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    reply = client.messages.create(model="gemma", max_tokens=8, system="Be brief.", messages=[{"role": "user", "content": "Say hi."}])
    assert reply.type == "message" and reply.content[0].type == "text" and reply.model == "gemma"
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8
    count = [{"role": "user", "content": "Count: 1, 2,"}]
    with client.messages.stream(model="claude-haiku-local", max_tokens=8, messages=count) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == streamed and final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    kinds = [event.type for event in client.messages.create(model="gemma", max_tokens=6, messages=count, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    # A conversation with a tool call and its result, as an agent sends it after running the tool.
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C and sunny"}]}]
    answered = client.messages.create(model="gemma", max_tokens=8, tools=[WEATHER], messages=turns)
    assert answered.type == "message" and answered.stop_reason in ("end_turn", "max_tokens", "tool_use")
    turns += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in answered.content]},
              {"role": "user", "content": "And tomorrow?"}]
    again = client.messages.create(model="gemma", max_tokens=8, tools=[WEATHER], messages=turns)
    assert again.type == "message" and again.usage.input_tokens > answered.usage.input_tokens
    assert client.messages.count_tokens(model="gemma", messages=HI).input_tokens > 0
    assert [model.id for model in client.models.list()] == ["gemma", "claude-haiku-local"]
    done = [usage for status, usage in seen.done if status == 200 and usage is not None]
    assert len(done) == 5 and all(usage.prompt > 0 and usage.completion is not None for usage in done)
    gateway = server.app.gateway
    assert gateway.backend("llama-0").requests > 0 and gateway.backend("llama-1").requests > 0
