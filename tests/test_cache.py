"""The response cache (plugins/comox_cache) on a real gateway: stand-in upstreams
that count what reaches them, the official openai SDK as the client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
from comox.testing import Fault, StandInUpstream, wait_until

import comox

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL_ARGUMENTS = ['{"city": ', '"Paris"}']
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}



class Upstream(StandInUpstream):
    """The stand-in, with what real servers add to a stream: a role delta, a
    finish reason, a tool call in pieces when the request has tools, and the
    usage chunk ``stream_options.include_usage`` asks for."""

    def _completion(self, payload, chat):
        answer = super()._completion(payload, chat)
        if chat and payload.get("tools"):
            call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "".join(CALL_ARGUMENTS)}}
            answer["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": [call]},
                                        finish_reason="tool_calls")
        return answer

    async def _stream(self, receive, send, payload, chat, fault, extra):
        head = {"id": "chatcmpl-standin" if chat else "cmpl-standin", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1, "model": payload.get("model")}
        tools = chat and payload.get("tools")
        if chat:
            deltas = [{"role": "assistant", "content": None if tools else ""}]
            if tools:
                deltas.append({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}]})
                deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in CALL_ARGUMENTS]
            else:
                deltas += [{"content": f"tok{i} "} for i in range(self.stream_chunks)]
            chunks = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
            chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if tools else "stop"}]})
        else:
            chunks = [{**head, "choices": [{"index": 0, "text": f"tok{i} ", "logprobs": None, "finish_reason": None}]}
                      for i in range(self.stream_chunks)]
            chunks.append({**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]})
        if (payload.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": USAGE})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), *extra]})
        for i, chunk in enumerate(chunks):
            if fault.close_after_chunks is not None and i >= fault.close_after_chunks:
                raise ConnectionAbortedError("stand-in drops the connection mid-stream")
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@pytest.fixture
def upstream():
    started = Upstream("upstream").start()
    yield started
    started.stop()


class Done:
    """Records each finished request's status and usage (comox_request_done runs
    after comox_cache_store: once it ran, the answer is stored)."""

    def __init__(self):
        self.requests = []

    @comox.hookimpl
    def comox_request_done(self, request, status):
        self.requests.append((status, request.usage))


class Clock:
    """A clock the test moves, behind the gateway's shared state."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    @comox.hookimpl
    def comox_shared_state(self):
        return comox.MemoryState(clock=self)


class TwoKeys:
    """Bearer tokens naming key ids: ``a1`` and ``a2`` are two tokens of key ``a``
    (rotation), ``b1`` is key ``b``."""

    @comox.hookimpl
    def comox_authenticate(self, request):
        token = (request.header(b"authorization") or b"").removeprefix(b"Bearer ").decode()
        return {"a1": comox.Principal(key_id="a"), "a2": comox.Principal(key_id="a"), "b1": comox.Principal(key_id="b")}.get(token)


class Gateway:
    """A served gateway with one model, ``m``, on ``upstream``; ``done`` records
    finished requests."""

    def __init__(self, comox_serve, upstream, cache=None, plugins=(), **settings):
        if cache is not None:
            settings["plugins"] = {"cache": cache}
        self.done = Done()
        self.server = comox_serve({"models": [{"name": "m", "backends": [{"name": "up", "url": upstream.url}]}], **settings},
                                  plugins=[self.done, *plugins])
        self.url = self.server.url

    def client(self, key="unused"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def post(self, body, path="chat/completions", **kwargs):
        """POST and wait until the request is done (stored, if it is to be)."""
        before = len(self.done.requests)
        response = httpx.post(f"{self.url}/v1/{path}", json=body, timeout=30, **kwargs)
        wait_until(lambda: len(self.done.requests) > before)
        return response

    def settled(self, count):
        wait_until(lambda: len(self.done.requests) >= count)


def sse_data(response: httpx.Response) -> list[bytes]:
    return [line for line in response.content.split(b"\n\n") if line]


# -- what is cached -----------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.7, "seed": 7}])
def test_a_deterministic_chat_is_a_miss_then_a_hit(comox_serve, upstream, sampling):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(model="m", messages=CHAT["messages"], **sampling)
    gateway.settled(1)
    second = client.chat.completions.with_raw_response.create(model="m", messages=CHAT["messages"], **sampling)
    assert first.headers["x-comox-cache"] == "miss" and second.headers["x-comox-cache"] == "hit"
    assert second.content == first.content
    assert second.parse().choices[0].message.content == "hello from upstream"
    assert len(upstream.requests) == 1
    # A hit is settled as the cached usage says.
    gateway.settled(2)
    assert gateway.done.requests[1] == (200, comox.Usage(prompt=5, completion=3))


def test_sampled_requests_are_skipped_unless_configured(comox_serve, upstream, upstreams):
    gateway = Gateway(comox_serve, upstream)
    for body in ({**CHAT, "temperature": 0.7}, CHAT, {**CHAT, "temperature": 0.7}):
        assert gateway.post(body).headers["x-comox-cache"] == "skip"
    assert len(upstream.requests) == 3

    other = upstreams("other")
    everything = Gateway(comox_serve, other, cache={"deterministic_only": False})
    assert everything.post({**CHAT, "temperature": 0.7}).headers["x-comox-cache"] == "miss"
    assert everything.post({**CHAT, "temperature": 0.7}).headers["x-comox-cache"] == "hit"
    assert len(other.requests) == 1


def test_disabled(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream, cache={"enabled": False})
    for _ in range(2):
        assert "x-comox-cache" not in gateway.post({**CHAT, "temperature": 0}).headers
    assert len(upstream.requests) == 2


def test_embeddings_are_cached(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    first = client.embeddings.with_raw_response.create(model="m", input=["one", "three"])
    gateway.settled(1)
    second = client.embeddings.with_raw_response.create(model="m", input=["one", "three"])
    third = client.embeddings.with_raw_response.create(model="m", input=["one", "four"])
    assert [r.headers["x-comox-cache"] for r in (first, second, third)] == ["miss", "hit", "miss"]
    assert second.content == first.content
    assert second.parse().data[1].embedding == [0.1, 0.2, 5.0]
    assert len(upstream.requests) == 2


def test_the_key_leaves_out_only_what_does_not_change_the_answer(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0}
    assert gateway.post({**ask, "user": "alice", "stream": False}).headers["x-comox-cache"] == "miss"
    assert gateway.post({**ask, "user": "bob"}).headers["x-comox-cache"] == "hit"
    for changed in ({"max_tokens": 5}, {"stop": ["x"]}, {"tools": TOOLS}, {"response_format": {"type": "json_object"}},
                    {"messages": [{"role": "user", "content": "hi!"}]}, {"top_p": 0.5}):
        assert gateway.post({**ask, **changed}).headers["x-comox-cache"] == "miss", changed
    assert gateway.post({"model": "m", "prompt": "hi", "temperature": 0}, "completions").headers["x-comox-cache"] == "miss"
    assert len(upstream.requests) == 8


# -- x-comox-cache: skip | refresh ----------------------------------------------------------


def test_skip_and_refresh(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0}
    assert gateway.post(ask, headers={"x-comox-cache": "skip"}).headers["x-comox-cache"] == "skip"
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"  # skip stored nothing
    assert gateway.post(ask, headers={"x-comox-cache": "skip"}).headers["x-comox-cache"] == "skip"  # nor read
    assert len(upstream.requests) == 3
    assert gateway.post(ask, headers={"x-comox-cache": "Refresh"}).headers["x-comox-cache"] == "miss"
    assert len(upstream.requests) == 4
    upstream.name = "renewed"
    assert gateway.post(ask, headers={"x-comox-cache": "refresh"}).json()["choices"][0]["message"]["content"] == "hello from renewed"
    hit = gateway.post(ask)
    assert hit.headers["x-comox-cache"] == "hit" and hit.json()["choices"][0]["message"]["content"] == "hello from renewed"
    assert len(upstream.requests) == 5

    bad = gateway.post(ask, headers={"x-comox-cache": "please"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_header"
    assert len(upstream.requests) == 5


# -- tenants -----------------------------------------------------------------------------


def test_two_keys_never_share_an_entry(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream, plugins=[TwoKeys()], auth="keys")
    ask = {"model": "m", "messages": CHAT["messages"], "temperature": 0}
    a, b = gateway.client("a1"), gateway.client("b1")
    assert a.chat.completions.with_raw_response.create(**ask).headers["x-comox-cache"] == "miss"
    gateway.settled(1)
    assert b.chat.completions.with_raw_response.create(**ask).headers["x-comox-cache"] == "miss"
    gateway.settled(2)
    assert len(upstream.requests) == 2
    assert a.chat.completions.with_raw_response.create(**ask).headers["x-comox-cache"] == "hit"
    assert b.chat.completions.with_raw_response.create(**ask).headers["x-comox-cache"] == "hit"
    # The key id makes the entry, not the secret: another token of key a shares a's answers.
    assert gateway.client("a2").chat.completions.with_raw_response.create(**ask).headers["x-comox-cache"] == "hit"
    assert len(upstream.requests) == 2


# -- streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_is_replayed_event_for_event(comox_serve, upstream, include_usage):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0, "stream": True}
    if include_usage:
        ask["stream_options"] = {"include_usage": True}
    first = gateway.post(ask)
    second = gateway.post(ask)
    assert (first.headers["x-comox-cache"], second.headers["x-comox-cache"]) == ("miss", "hit")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert sse_data(second) == sse_data(first) and sse_data(first)[-1] == b"data: [DONE]"
    assert len(sse_data(first)) == 6 + include_usage  # role, 3 pieces, finish, [usage], [DONE]
    assert len(upstream.requests) == 1
    if include_usage:
        assert gateway.done.requests[1] == (200, comox.Usage(prompt=5, completion=3))


def test_a_json_answer_serves_a_stream(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    ask = {"model": "m", "messages": CHAT["messages"], "temperature": 0}
    answer = client.chat.completions.create(**ask)
    gateway.settled(1)
    raw = client.chat.completions.with_raw_response.create(**ask, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-comox-cache"] == "hit"
    chunks = list(raw.parse())
    assert [chunk.object for chunk in chunks] == ["chat.completion.chunk"] * 4
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == answer.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert {chunk.id for chunk in chunks} == {answer.id}
    # Without include_usage there is no usage chunk: the usage rides on the last one, and the hit is settled by it.
    plain = list(client.chat.completions.create(**ask, stream=True))
    assert len(plain) == 3 and plain[-1].choices[0].finish_reason == "stop" and plain[-1].usage == answer.usage
    gateway.settled(3)
    assert gateway.done.requests[2] == (200, comox.Usage(prompt=5, completion=3))
    assert len(upstream.requests) == 1


def test_a_json_tool_call_serves_a_stream(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    ask = {"model": "m", "messages": CHAT["messages"], "temperature": 0, "tools": TOOLS}
    answer = client.chat.completions.create(**ask)
    gateway.settled(1)
    with client.beta.chat.completions.stream(**ask) as stream:  # the SDK's own accumulation of the chunks
        final = stream.get_final_completion()
    call, expected = final.choices[0].message.tool_calls[0], answer.choices[0].message.tool_calls[0]
    assert (call.id, call.type, call.function.name, call.function.arguments) == ("call_1", "function", "lookup", '{"city": "Paris"}')
    assert (call.id, call.function.arguments) == (expected.id, expected.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    assert len(upstream.requests) == 1


def test_a_json_text_completion_serves_a_stream(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    ask = {"model": "m", "prompt": "Once", "temperature": 0, "max_tokens": 4}
    answer = client.completions.create(**ask)
    gateway.settled(1)
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == answer.choices[0].text == "hello from upstream"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage == answer.usage
    assert len(upstream.requests) == 1


def test_a_stream_serves_a_json_answer(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    client = gateway.client()
    ask = {"model": "m", "messages": CHAT["messages"], "temperature": 0}
    streamed = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    gateway.settled(1)
    raw = client.chat.completions.with_raw_response.create(**ask)
    assert raw.headers["x-comox-cache"] == "hit"
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.id == streamed[0].id
    assert answer.choices[0].message.content == "tok0 tok1 tok2 " and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop" and answer.usage == streamed[-1].usage
    # Tool-call deltas merge into one call.
    tools = list(client.chat.completions.create(**ask, tools=TOOLS, stream=True, stream_options={"include_usage": True}))
    gateway.settled(3)
    assert len(tools) == 6
    call = client.chat.completions.create(**ask, tools=TOOLS).choices[0]
    assert call.finish_reason == "tool_calls"
    assert [c.model_dump() for c in call.message.tool_calls] == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}]
    # Text completions too.
    ask = {"model": "m", "prompt": "Once", "temperature": 0}
    list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    gateway.settled(5)
    text = client.completions.create(**ask)
    assert text.choices[0].text == "tok0 tok1 tok2 " and text.choices[0].finish_reason == "length" and text.usage.total_tokens == 8
    assert len(upstream.requests) == 3


def test_a_stream_without_usage_does_not_serve_json(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0}
    assert [gateway.post({**ask, "stream": True}).headers["x-comox-cache"] for _ in range(2)] == ["miss", "hit"]
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"  # a JSON answer has usage: this stream had none
    assert gateway.post(ask).headers["x-comox-cache"] == "hit"  # the JSON answer replaced it...
    assert gateway.post({**ask, "stream": True}).headers["x-comox-cache"] == "hit"  # ...and serves streams too
    assert len(upstream.requests) == 2


def test_a_broken_stream_is_not_cached(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0, "stream": True}
    upstream.faults.append(Fault(close_after_chunks=2))
    broken = gateway.post(ask)
    assert b'"stream_interrupted"' in broken.content and broken.headers["x-comox-cache"] == "miss"
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"
    assert gateway.post(ask).headers["x-comox-cache"] == "hit"
    assert len(upstream.requests) == 2


# -- bounds -------------------------------------------------------------------------------


def test_entries_expire_after_ttl(comox_serve, upstream):
    clock = Clock()
    gateway = Gateway(comox_serve, upstream, cache={"ttl_s": 60}, plugins=[clock])
    ask = {**CHAT, "temperature": 0}
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"
    clock.now += 59
    assert gateway.post(ask).headers["x-comox-cache"] == "hit"
    clock.now += 2
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"
    assert len(upstream.requests) == 2


def test_max_entry_bytes(comox_serve, upstream, upstreams):
    size = len(Gateway(comox_serve, upstream).post({**CHAT, "temperature": 0}).content)
    other = upstreams("upstream")  # the same answers
    gateway = Gateway(comox_serve, other, cache={"max_entry_bytes": size - 1})
    ask = {**CHAT, "temperature": 0}
    assert [gateway.post(ask).headers["x-comox-cache"] for _ in range(2)] == ["miss", "miss"]
    fits = Gateway(comox_serve, other, cache={"max_entry_bytes": size})
    assert [fits.post(ask).headers["x-comox-cache"] for _ in range(2)] == ["miss", "hit"]


def test_max_bytes_drops_the_least_recently_used(comox_serve, upstream):
    size = len(Gateway(comox_serve, upstream).post({**CHAT, "temperature": 0}).content) + 64  # an entry, with room
    gateway = Gateway(comox_serve, upstream, cache={"max_bytes": 2 * size})

    def ask(text):
        return gateway.post({"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0}).headers["x-comox-cache"]

    assert [ask("a"), ask("b"), ask("a")] == ["miss", "miss", "hit"]  # a is now the most recently used
    assert ask("c") == "miss"  # drops b
    assert [ask("a"), ask("c"), ask("b")] == ["hit", "hit", "miss"]


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 400])
def test_an_error_answer_is_never_cached(comox_serve, upstream, status):
    gateway = Gateway(comox_serve, upstream)
    ask = {**CHAT, "temperature": 0}
    upstream.faults.append(Fault(status=status))
    error = gateway.post(ask)
    assert error.status_code == status and error.headers["x-comox-cache"] == "miss"
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"
    assert gateway.post(ask).headers["x-comox-cache"] == "hit"
    assert len(upstream.requests) == 2


class Refuse:
    @comox.hookimpl
    def comox_admit(self, request):
        if request.json.get("user") == "over":
            raise comox.RateLimited("over the limit", retry_after=1)


def test_a_refused_request_says_skip(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream, plugins=[Refuse()])
    ask = {**CHAT, "temperature": 0}
    assert gateway.post(ask).headers["x-comox-cache"] == "miss"
    refused = gateway.post({**ask, "user": "over"})  # the same key: it would be a hit
    assert refused.status_code == 429 and refused.headers["x-comox-cache"] == "skip"


class Limited:
    """Key ``t`` with a tpm limit, key ``r`` with one request a minute (the limits plugin's)."""

    @comox.hookimpl
    def comox_authenticate(self, request):
        token = (request.header(b"authorization") or b"").removeprefix(b"Bearer ").decode()
        return {"t": comox.Principal(key_id="t", limits={"tpm": 1000}),
                "r": comox.Principal(key_id="r", limits={"rpm": 1})}.get(token)


def test_hits_are_settled_against_limits_by_the_cached_usage(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream, plugins=[Clock(), Limited()], auth="keys")  # a clock that stands still
    ask = {**CHAT, "temperature": 0, "max_tokens": 100}
    remaining = []
    for stream in (False, False, False, True, True, False):
        answer = gateway.post({**ask, "stream": stream}, headers={"authorization": "Bearer t"})
        assert answer.status_code == 200
        remaining.append(int(answer.headers["x-ratelimit-remaining-tokens"]))  # after this one's estimate was taken
    # Each request's estimate is taken, then settled to what its answer says it cost: 5 + 3 tokens, the
    # cached usage for the hits (JSON, and streams made from it) as for the miss.
    assert [before - after for before, after in zip(remaining, remaining[1:])] == [8] * 5
    assert len(upstream.requests) == 1

    assert gateway.post(ask, headers={"authorization": "Bearer r"}).headers["x-comox-cache"] == "miss"
    refused = gateway.post(ask, headers={"authorization": "Bearer r"})  # it would be a hit
    assert refused.status_code == 429 and refused.headers["x-comox-cache"] == "skip"


# -- the key -------------------------------------------------------------------------------


def test_the_cache_key():
    from comox_cache import cache_key

    def key(body, key_id="a", group="m", endpoint="chat/completions"):
        request = comox.GatewayRequest(id="r", endpoint=endpoint, path="/v1/" + endpoint, headers=[],
                                       raw=orjson.dumps(body), json=body)
        request.principal = comox.Principal(key_id=key_id)
        request.model_group = group
        return cache_key(request)

    ask = {**CHAT, "temperature": 0, "tools": TOOLS}
    same = dict(reversed(list(ask.items())))  # other key order, same request
    assert key(ask) == key(same) == key({**ask, "stream": True, "stream_options": {"include_usage": True}, "user": "u"})
    assert key({**ask, "model": "alias"}) == key(ask)  # the group counts, not the name it was asked by
    assert len({key(ask), key(ask, key_id="b"), key(ask, key_id=None), key(ask, group="n"),
                key(ask, endpoint="completions"), key({**ask, "seed": 1})}) == 6
    assert key(ask).startswith("cache:") and len(key(ask)) == len("cache:") + 64


def test_entries_are_in_the_shared_state(comox_serve, upstream):
    gateway = Gateway(comox_serve, upstream)
    gateway.post({**CHAT, "temperature": 0})
    state = gateway.server.app.gateway.shared_state
    from comox_cache import cache_key

    request = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[],
                                   json={**CHAT, "temperature": 0})
    request.model_group = "m"
    assert asyncio.run(state.get(cache_key(request))) is not None


def test_the_documented_settings_are_the_defaults():
    import re
    import tomllib
    from pathlib import Path

    from comox_cache import CacheSettings

    docs = Path(__file__).resolve().parent.parent / "docs"
    block = re.search(r"## Settings\n\n```toml\n(.*?)```", (docs / "cache.md").read_text(), re.S)[1]
    assert tomllib.loads(block)["plugins"]["cache"] == CacheSettings().model_dump()
    table = (docs / "configuration.md").read_text().split("### `[plugins.cache]`")[1].split("\n### ")[0]
    assert re.findall(r"^\| `(\w+)` \| `([^`]+)`", table, re.M) == [
        (name, str(value).lower() if isinstance(value, bool) else f"{value:.0f}") for name, value in CacheSettings().model_dump().items()]
