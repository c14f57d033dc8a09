"""The limits plugin (plugins/comox_limits): rpm, tpm and max_concurrency per
key, on real gateways whose shared state runs on a clock the test moves."""

import contextlib
import re
from pathlib import Path

import httpx
import openai
import pytest

import comox
from comox import GatewayRequest, Principal
from comox.testing import Fault, wait_until
from comox_limits import LimitSettings, duration, estimate
from tests.plugins.fixed_principal import FixedPrincipal

DOCS = Path(__file__).parent.parent / "docs"
TEXT = "x" * 40  # with the role "user": 44 characters, 11 estimated tokens
RATELIMIT = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
             "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


class Clock:
    """The shared state's clock: it moves when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class BatchedState(comox.MemoryState):
    """A MemoryState the plugin does not know as this process's own: it asks
    it through ``apply``, as it asks Redis, instead of keeping the key's
    counters on one object (comox_limits/local.py)."""


class ClockedState:
    """Gives the gateway a MemoryState on the test's clock."""

    state_class = comox.MemoryState

    def __init__(self, clock):
        self.clock = clock

    @comox.hookimpl
    def comox_shared_state(self, gateway):
        return self.state_class(clock=self.clock)


@pytest.fixture(autouse=True, params=["one object per key", "batches of ops"])
def counted(request, monkeypatch):
    """Every test twice: the key's counters on one object (the in-process
    state) and as ops on the state's string keys (as with Redis), which must agree."""
    monkeypatch.setattr(ClockedState, "state_class", comox.MemoryState if request.param == "one object per key" else BatchedState)
    return request.param


class Done:
    """Counts finished requests, after every other comox_request_done (the
    limits' settlement included): a test waits for it, not for a duration."""

    def __init__(self):
        self.count = 0

    @comox.hookimpl(trylast=True)
    def comox_request_done(self):
        self.count += 1


class CannedCache:
    """Answers every request from a 'cache' whose answer used 20 + 30 tokens."""

    @comox.hookimpl
    def comox_cache_lookup(self, request):
        body = b'{"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 30}}'
        return comox.BackendResponse(200, body=body)


class Gateway:
    """A gateway serving the model ``m`` from ``upstream`` to ``sk-alice``
    (key ``alice`` with ``limits``), ``sk-bob`` (key ``bob``, no limits) and
    anyone else (anonymous)."""

    def __init__(self, comox_serve, upstream, limits, *, settings=None, plugins=(), principals=None):
        self.clock = Clock()
        self.done = Done()
        principals = principals or {"sk-alice": Principal(key_id="alice", limits=limits), "sk-bob": Principal(key_id="bob")}
        config = {"models": [{"name": "m", "backends": [{"url": upstream.url}]}], **(settings or {})}
        self.server = comox_serve(config, plugins=[FixedPrincipal(principals), ClockedState(self.clock), self.done, *plugins])
        self.url = self.server.url

    def chat(self, key="sk-alice", content=TEXT, **body):
        """One chat completion, returned once the gateway is done with it."""
        before = self.done.count
        response = httpx.post(f"{self.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "m", "messages": [{"role": "user", "content": content}], **body})
        wait_until(lambda: self.done.count > before)
        return response

    def stream(self, stack, key="sk-alice", **body):
        """Open a streaming chat completion (headers and first chunk in)."""
        return stack.enter_context(httpx.stream(
            "POST", f"{self.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
            json={"model": "m", "messages": [{"role": "user", "content": TEXT}], "stream": True, **body}))

    def close(self, response):
        """The client leaves mid-stream; back once the gateway is done with it."""
        before = self.done.count
        response.close()
        wait_until(lambda: self.done.count > before)


def ratelimit_headers(response):
    return {name: response.headers[name] for name in RATELIMIT if name in response.headers}


def test_rpm_refuses_the_request_over_the_limit_until_the_bucket_refills(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 3})
    for left in ("2", "1", "0"):
        response = gateway.chat()
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-requests"] == left

    refused = gateway.chat()
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "20"  # one request refills every 60 / 3 s
    assert ratelimit_headers(refused) == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                                          "x-ratelimit-reset-requests": "1m0s"}
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per min (RPM): Limit 3" in error["message"]
    assert len(comox_upstream.requests) == 3

    gateway.clock.now += 19.9
    assert gateway.chat().status_code == 429
    gateway.clock.now += 0.1
    assert gateway.chat().status_code == 200
    assert gateway.chat().status_code == 429
    assert len(comox_upstream.requests) == 4


def test_headers_on_a_success_count_down(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 5, "tpm": 1000})
    first = gateway.chat(max_tokens=50)
    assert first.status_code == 200
    # 11 prompt tokens + max_tokens 50 reserved; the answer used 5 + 3: 53 given back.
    assert ratelimit_headers(first) == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4", "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "939", "x-ratelimit-reset-tokens": "3.66s",
    }
    second = gateway.chat(max_tokens=50)
    assert ratelimit_headers(second) == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "24s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "931", "x-ratelimit-reset-tokens": "4.14s",
    }


def test_tokens_given_back_when_the_answer_used_fewer_let_the_next_request_in(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"tpm": 100})
    first = gateway.chat(max_tokens=60)  # 11 + 60 = 71 reserved, 29 left
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "29"
    second = gateway.chat(max_tokens=60)  # fits only because 63 of the 71 came back
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == "21"


def test_tpm_refuses_with_the_wait_until_the_estimate_fits(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"tpm": 100})
    assert gateway.chat(max_tokens=60).status_code == 200  # settled at 8: 92 left
    refused = gateway.chat(max_tokens=85)  # 96 wanted
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"  # 4 tokens at 100 / 60 a second: 2.4 s
    assert refused.headers["x-ratelimit-remaining-tokens"] == "92"
    assert "tokens per min (TPM): Limit 100, Remaining 92, Requested 96" in refused.json()["error"]["message"]
    assert len(comox_upstream.requests) == 1
    gateway.clock.now += 3
    assert gateway.chat(max_tokens=85).status_code == 200


def test_a_request_larger_than_the_whole_tpm_is_refused_without_retry_after(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"tpm": 100})
    refused = gateway.chat(max_tokens=200)
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    message = refused.json()["error"]["message"]
    assert message.startswith("Request too large for key 'alice' on tokens per min (TPM): Limit 100, Requested 211.")
    assert refused.headers["x-ratelimit-remaining-tokens"] == "100"
    assert gateway.chat(content="x" * 500).status_code == 429  # the prompt alone is too large
    # No max_tokens: the default reservation is cut to the limit, the request goes.
    unbounded = gateway.chat()
    assert unbounded.status_code == 200 and unbounded.headers["x-ratelimit-remaining-tokens"] == "0"
    assert gateway.chat(max_tokens=10).headers["x-ratelimit-remaining-tokens"] == "71"  # settled at 8 before
    assert len(comox_upstream.requests) == 2


def test_the_default_completion_reservation_is_a_setting(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"tpm": 1000},
                      settings={"plugins": {"limits": {"default_completion_tokens": 100}}})
    assert gateway.chat().headers["x-ratelimit-remaining-tokens"] == "889"  # 11 + 100


def test_a_stream_is_settled_with_what_it_sent(comox_serve, upstreams):
    upstream = upstreams("u", stream_chunks=3)
    gateway = Gateway(comox_serve, upstream, {"tpm": 1000})
    before = gateway.done.count
    with contextlib.ExitStack() as stack:
        reply = gateway.stream(stack, max_tokens=50)
        assert reply.headers["x-ratelimit-remaining-tokens"] == "939"
        assert reply.read().endswith(b"data: [DONE]\n\n")
    wait_until(lambda: gateway.done.count > before)
    # The stream reported no usage: 3 events, and the prompt as estimated (11): 14 used.
    assert gateway.chat(max_tokens=50).headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 61)


def test_a_cache_hit_is_settled_with_its_cached_usage(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"tpm": 1000}, plugins=[CannedCache()])
    assert gateway.chat(max_tokens=100).headers["x-ratelimit-remaining-tokens"] == "889"
    assert gateway.chat(max_tokens=100).headers["x-ratelimit-remaining-tokens"] == str(1000 - 50 - 111)
    assert comox_upstream.requests == []


def test_max_concurrency_frees_a_slot_when_a_stream_ends_and_when_its_client_leaves(comox_serve, upstreams):
    upstream = upstreams("slow", stream_chunks=3, chunk_delay=1.0)
    gateway = Gateway(comox_serve, upstream, {"max_concurrency": 2})
    with contextlib.ExitStack() as stack:
        ending = gateway.stream(stack)  # ends by itself, 3 s from now
        upstream.faults.extend([Fault(stall_after_chunks=1), Fault(stall_after_chunks=1)])
        held = gateway.stream(stack)  # never ends: its client will leave
        refused = gateway.chat()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "max_concurrency 2" in refused.json()["error"]["message"]
        assert not ratelimit_headers(refused)  # no rpm nor tpm: nothing to say in x-ratelimit-*

        before = gateway.done.count
        assert ending.read().endswith(b"data: [DONE]\n\n")
        wait_until(lambda: gateway.done.count > before)
        other = gateway.stream(stack)  # the slot the ended stream freed
        assert other.status_code == 200
        assert gateway.chat().status_code == 429  # still two in flight

        gateway.close(held)
        assert gateway.chat().status_code == 200  # the slot the leaving client freed
        assert gateway.chat().status_code == 200
        gateway.close(other)
    wait_until(lambda: upstream.disconnects == 2)  # both streams the clients left were cut upstream too


def test_a_refused_request_takes_no_tokens_and_counts_as_a_request(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 10, "tpm": 1000, "max_concurrency": 1})
    with contextlib.ExitStack() as stack:
        comox_upstream.faults.append(Fault(stall_after_chunks=1))
        held = gateway.stream(stack, max_tokens=50)  # 1 request, 61 tokens, the slot
        refused = gateway.chat(max_tokens=50)  # fits the rpm and the tpm, but no slot is free
        assert refused.status_code == 429 and "Concurrency limit reached" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-requests"] == "8"  # as OpenAI counts unsuccessful requests
        assert refused.headers["x-ratelimit-remaining-tokens"] == "939"  # its 61 were never taken
        gateway.close(held)  # a stream cut short keeps its whole estimate
    answered = gateway.chat(max_tokens=50)
    assert answered.headers["x-ratelimit-remaining-requests"] == "7"
    assert answered.headers["x-ratelimit-remaining-tokens"] == str(1000 - 61 - 61)


def test_a_request_refused_on_tokens_takes_none_and_counts_as_a_request(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 3, "tpm": 100})
    assert gateway.chat(max_tokens=85).status_code == 200  # settled at 8: 92 tokens left
    for left in ("1", "0"):
        refused = gateway.chat(max_tokens=85)  # 96 tokens wanted: refused
        assert refused.status_code == 429 and "tokens per min" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-requests"] == left
        assert refused.headers["x-ratelimit-remaining-tokens"] == "92"
    assert "requests per min" in gateway.chat(max_tokens=85).json()["error"]["message"]


def test_a_concurrency_count_left_behind_expires_and_never_goes_below_zero(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"max_concurrency": 1},
                      settings={"plugins": {"limits": {"concurrency_ttl_s": 60}}})
    with contextlib.ExitStack() as stack:
        comox_upstream.faults.append(Fault(stall_after_chunks=1))
        stuck = gateway.stream(stack)  # as if its replica had died holding the slot
        assert gateway.chat().status_code == 429
        gateway.clock.now += 61
        assert gateway.chat().status_code == 200  # the count expired
        gateway.close(stuck)  # its release must not leave the count at -1
        comox_upstream.faults.append(Fault(stall_after_chunks=1))
        gateway.stream(stack)
        assert gateway.chat().status_code == 429


def test_keys_without_limits_get_no_headers_and_no_limits(comox_serve, comox_upstream):
    principals = {"sk-alice": Principal(key_id="alice", limits={"rpm": 1}),
                  "sk-bob": Principal(key_id="bob"),
                  "sk-nobody": Principal(limits={"rpm": 1})}  # no key id: nothing to count against
    gateway = Gateway(comox_serve, comox_upstream, None, principals=principals)
    for key in ("sk-bob", "sk-nobody", "no-such-key"):
        for _ in range(3):
            response = gateway.chat(key=key)
            assert response.status_code == 200
            assert not ratelimit_headers(response)
    assert gateway.chat(key="sk-alice").status_code == 200
    assert gateway.chat(key="sk-alice").status_code == 429


def test_a_limit_of_zero_refuses_everything(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 0})
    refused = gateway.chat()
    assert refused.status_code == 429 and "retry-after" not in refused.headers
    assert "allowed no requests (rpm is 0)" in refused.json()["error"]["message"]


def test_the_openai_sdk_sees_a_rate_limit_error_with_retry_after(comox_serve, comox_upstream):
    gateway = Gateway(comox_serve, comox_upstream, {"rpm": 1, "tpm": 10_000})
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-alice", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=10)
    assert raw.parse().choices[0].message.content == "hello from upstream"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2 - 10)  # "user" + "hi": 2 tokens
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=messages, max_tokens=10)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "60"
    assert caught.value.code == "rate_limit_exceeded"


def test_estimate_counts_prompt_text_and_the_completion_bound():
    def request(endpoint, **body):
        return GatewayRequest(id="r", endpoint=endpoint, path=f"/v1/{endpoint}", headers=[], json={"model": "m", **body})

    chat = request("chat/completions", messages=[{"role": "user", "content": [
        {"type": "text", "text": "x" * 36}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9999}}]}],
        max_completion_tokens=7, max_tokens=99, n=2)
    # "user", "text", 36 x and "image_url" (a part's type): 53 characters; the image itself is not text.
    assert estimate(chat) == (14, 14, True)  # max_completion_tokens first, times n
    # MAX_FIELDS in order; a field that is not a count (a string, a bool, below 0) is passed over.
    for bounds, completion in [({"max_completion_tokens": "7", "max_tokens": 9, "max_output_tokens": 5}, 9),
                               ({"max_completion_tokens": -1, "max_tokens": True, "max_output_tokens": 5}, 5),
                               ({"max_output_tokens": 0}, 0), ({"max_tokens": 3, "max_output_tokens": 5}, 3)]:
        assert estimate(request("responses", input="abcd", **bounds)) == (1, completion, True)
    assert estimate(request("responses", input="abcd", max_tokens=False, max_output_tokens=-2)) == (1, 1024, False)
    assert estimate(request("completions", prompt=[[1, 2, 3], "abcd"])) == (4, 1024, False)
    assert estimate(request("completions", prompt="abcd"), LimitSettings(default_completion_tokens=5, chars_per_token=2)) == (2, 5, False)
    assert estimate(request("embeddings", input=["abcd", "efgh"])) == (2, 0, True)


def test_estimate_counts_plain_messages_and_other_shapes_alike():
    """Messages of plain text are counted in C; any other shape in them (tool
    calls, a part that is not text) is walked, to the same count."""
    def prompt(messages):
        body = {"model": "m", "messages": messages, "max_tokens": 1}
        return estimate(GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions",
                                       headers=[], json=body), LimitSettings(chars_per_token=1))[0]

    plain = [{"role": "system", "content": "x" * 30}, {"role": "user", "content": "y" * 7, "name": "al"}]
    assert prompt(plain) == 6 + 30 + 4 + 7 + 2  # every string: roles, contents, the name
    called = [*plain, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert prompt(called) == prompt(plain) + 9 + 2 + 8 + 1 + 2  # None is nothing; the call's strings count
    with_image = [*plain, {"role": "user", "image_url": "data:image/png;base64," + "A" * 999}]
    assert prompt(with_image) == prompt(plain) + 4  # "user"; the image is not text
    assert prompt([*plain, "stray"]) == prompt(plain) + 5  # not a dict: walked


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (1, "1s"), (8.64, "8.64s"), (12.0, "12s"),
    (60, "1m0s"), (360, "6m0s"), (90.5, "1m30.5s"), (3600, "1h0m0s"), (3723.25, "1h2m3.25s"),
])
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("page", ["limits.md", "configuration.md"])
def test_the_documented_settings_are_the_plugins(page):
    text = (DOCS / page).read_text()
    section = text[text.index("`[plugins.limits]`"):]
    section = section[:section.index("\n#", 1)]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section, re.M))
    assert {name: float(value) for name, value in rows.items()} == {
        name: float(field.default) for name, field in LimitSettings.model_fields.items()}
