"""Property-based tests (hypothesis) of what the gateway does to bytes it did
not write: request parsing, SSE relaying, usage reading, and the
Anthropic / Responses translations.

* ``parse_body``: any JSON object (and any bytes) is either a checked dict —
  a non-empty ``model``, no field that redirects the upstream, every checked
  number in range — or :class:`comox.InvalidRequest`, never another exception.
* SSE relaying: a stream cut into chunks anywhere (empty chunks too) reaches
  the client through the whole gateway byte for byte, and reading its usage
  never raises.
* Translations keep what they must: roles, text, tool calls and tool results
  through OpenAI → Anthropic → OpenAI, and through a Responses input and a
  chat answer as stored output items.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import comox
from comox.request import FORBIDDEN_FIELDS, parse_body
from comox.usage import parse_usage, usage_of_body, usage_of_events

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# -- JSON values -------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=20)
TEXT = st.text(min_size=1, max_size=30)

# Keys parse_body looks at, so the generated objects hit its branches, with any value or a typical one.
TYPICAL = {
    "model": st.one_of(st.just("m"), TEXT),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": TEXT}), max_size=3),
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "input": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "query": TEXT,
    "documents": st.lists(st.one_of(TEXT, st.fixed_dictionaries({"text": TEXT})), max_size=3),
    "top_n": st.integers(-2, 5),
    "stream": st.booleans(),
    "max_tokens": st.integers(-1, 2_000_000),
    "max_completion_tokens": st.integers(-1, 2_000_000),
    "n": st.integers(-1, 200),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-1, 2),
    **{key: TEXT for key in FORBIDDEN_FIELDS},
}
BODIES = st.fixed_dictionaries({}, optional={key: st.one_of(value, JSON) for key, value in TYPICAL.items()}).flatmap(
    lambda known: st.dictionaries(st.text(max_size=8), JSON, max_size=3).map(lambda extra: {**extra, **known}))
ENDPOINTS = ["chat/completions", "completions", "embeddings", "rerank"]
NUMBERS = {"max_tokens": (1, 1_000_000), "max_completion_tokens": (1, 1_000_000), "n": (1, 128),
           "temperature": (0, 2), "top_p": (0, 1)}


def _parsed_or_refused(endpoint: str, raw: bytes) -> dict[str, Any] | None:
    try:
        body = parse_body(endpoint, raw)
    except comox.InvalidRequest as exc:
        assert exc.status in (400, 413) and exc.message
        return None
    assert isinstance(body, dict)
    return body


@PROPERTY
@given(endpoint=st.sampled_from(ENDPOINTS), body=BODIES)
def test_parse_body_of_any_object_is_a_checked_dict_or_invalid_request(endpoint, body):
    parsed = _parsed_or_refused(endpoint, orjson.dumps(body))
    if parsed is None:
        return
    assert isinstance(parsed["model"], str) and parsed["model"]
    assert not set(FORBIDDEN_FIELDS) & set(parsed)
    assert parsed.get("stream") in (None, True, False)
    for key, (low, high) in NUMBERS.items():
        value = parsed.get(key)
        if value is not None:
            assert not isinstance(value, bool) and low <= value <= high and math.isfinite(value)
    if endpoint == "chat/completions":
        assert parsed["messages"] and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in parsed["messages"])


@PROPERTY
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.one_of(st.binary(max_size=200), JSON.map(orjson.dumps),
                                                          st.text(max_size=200).map(str.encode)))
def test_parse_body_of_any_bytes_is_a_dict_or_invalid_request(endpoint, raw):
    _parsed_or_refused(endpoint, raw)


# -- usage -------------------------------------------------------------------------

USAGE_KEYS = ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cached_tokens",
              "prompt_tokens_details", "input_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens"]
TIMING_KEYS = ["cache_n", "prompt_n", "predicted_n", "prompt_per_second", "predicted_per_second"]
NUMBER_OR_ANY = st.one_of(st.integers(-5, 10**9), st.floats(allow_nan=False), JSON)
USAGE = st.dictionaries(st.sampled_from(USAGE_KEYS), st.one_of(NUMBER_OR_ANY, st.dictionaries(
    st.just("cached_tokens"), NUMBER_OR_ANY)), max_size=6)
TIMINGS = st.dictionaries(st.sampled_from(TIMING_KEYS), NUMBER_OR_ANY, max_size=5)
ANSWERS = st.fixed_dictionaries({}, optional={"usage": st.one_of(USAGE, JSON), "timings": st.one_of(TIMINGS, JSON),
                                              "response": st.fixed_dictionaries({"usage": USAGE})})


@PROPERTY
@given(answer=ANSWERS)
def test_parse_usage_never_raises_and_counts_no_negative_tokens(answer):
    usage = parse_usage(answer)
    if usage is not None:
        for count in (usage.prompt, usage.completion, usage.cached):
            assert count is None or (isinstance(count, int) and count >= 0)
        for rate in (usage.prefill_tps, usage.decode_tps):
            assert rate is None or rate > 0


@PROPERTY
@given(events=st.lists(st.one_of(ANSWERS.map(lambda a: b"data: " + orjson.dumps(a)), st.binary(max_size=60),
                                 st.just(b"data: [DONE]")), max_size=4),
       cut=st.integers(0, 400))
def test_usage_of_any_stream_end_never_raises(events, cut):
    end = b"\n\n".join(events)
    for tail in (end, end[cut:], end[:cut]):
        usage_of_events(tail)


@PROPERTY
@given(body=st.one_of(ANSWERS.map(orjson.dumps), st.binary(max_size=100)))
def test_usage_of_a_body_is_usage_none_or_a_json_error(body):
    try:
        usage_of_body(body)
    except orjson.JSONDecodeError:
        pass  # record_body catches it: the body was not JSON


# -- SSE through the whole gateway -------------------------------------------------


class Chunks:
    """A backend type that streams the chunks the test gives it."""

    settings_model = comox.BackendSettings
    health_check_default = False
    next: list[bytes] = []

    def __init__(self, settings: comox.BackendSettings):
        self.name = settings.name

    async def handle(self, request: comox.GatewayRequest) -> comox.BackendResponse:
        chunks = list(Chunks.next)

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return comox.BackendResponse(200, [(b"content-type", b"text/event-stream")], stream=stream())

    async def aclose(self) -> None:
        pass


class ChunksPlugin:
    @comox.hookimpl
    def comox_backend_types(self) -> dict[str, type]:
        return {"chunks": Chunks}


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    """The Comox app (ASGI, called directly) over a ``chunks`` backend, and a loop to run it in."""
    settings = comox.Settings(auth="none", models=[{"name": "m", "backends": [{"name": "c", "type": "chunks"}]}])
    app = comox.create_app(settings, plugins=[ChunksPlugin()])
    loop = asyncio.new_event_loop()
    yield loop, app
    loop.run_until_complete(app.gateway.aclose())
    loop.close()


async def _post(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    over = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await over.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    try:
        await app(scope, receive, send)
    finally:
        over.set()
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:])


EVENT_DATA = st.one_of(JSON.map(lambda value: orjson.dumps({"choices": [{"delta": {"content": value}}]})),
                       st.text(max_size=30).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
                       ANSWERS.map(orjson.dumps))
STREAMS = st.lists(EVENT_DATA, min_size=1, max_size=6).map(
    lambda datas: b"".join(b"data: " + data + b"\n\n" for data in datas) + b"data: [DONE]\n\n")


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(stream=STREAMS, data=st.data())
def test_any_chunking_of_a_stream_reaches_the_client_byte_identical(relay, stream, data):
    loop, app = relay
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]  # empty ones too
    Chunks.next = chunks
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    status, received = loop.run_until_complete(_post(app, "/v1/chat/completions", body))
    assert status == 200
    assert received == stream


# -- translations ------------------------------------------------------------------

anthropic_translate = pytest.importorskip("comox_anthropic.translate")

ARGUMENTS = st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-100, 100), st.text(max_size=10), st.booleans()),
                            max_size=3)
NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An OpenAI chat: a system message maybe, then turns of a user, an
    assistant (text, tool calls or both), and a result for each call; it ends
    with a user's message or tool results, as a request does."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    calls = 0
    turns = draw(st.integers(1, 3))
    for turn in range(turns):
        messages.append({"role": "user", "content": draw(TEXT)})
        if turn == turns - 1 and draw(st.booleans()):
            break  # (two user messages in a row would be one Anthropic turn)
        tool_calls = []
        for _ in range(draw(st.integers(0, 2))):
            calls += 1
            tool_calls.append({"id": f"call_{calls}", "type": "function",
                               "function": {"name": draw(NAMES), "arguments": orjson.dumps(draw(ARGUMENTS)).decode()}})
        text = draw(TEXT) if not tool_calls or draw(st.booleans()) else None
        assistant: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            assistant["tool_calls"] = tool_calls
        messages.append(assistant)
        for call in tool_calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(TEXT)})
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": draw(TEXT)})
    return messages


def _essentials(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a translation must keep of each message: role, text, tool calls
    (id, name, arguments as JSON), the call a tool result answers."""
    out = []
    for message in messages:
        calls = tuple((call["id"], call["function"]["name"], orjson.loads(call["function"]["arguments"]))
                      for call in message.get("tool_calls") or ())
        out.append((message["role"], message.get("content") or "", calls, message.get("tool_call_id")))
    return out


@PROPERTY
@given(messages=conversations())
def test_openai_to_anthropic_and_back_keeps_roles_text_tool_calls_and_results(messages):
    body = {"model": "m", "messages": messages, "max_tokens": 100}
    anthropic = anthropic_translate.openai_to_anthropic_request(body).body
    back = anthropic_translate.anthropic_to_openai_request(anthropic)
    assert _essentials(back["messages"]) == _essentials(messages)


responses_translate = pytest.importorskip("comox_responses.translate")
responses_output = pytest.importorskip("comox_responses.output")


@st.composite
def responses_inputs(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Responses input items: messages of every role, function calls and their outputs."""
    items: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["message", "message", "function_call", "function_call_output"]))
        if kind == "message":
            items.append({"role": draw(st.sampled_from(["user", "assistant", "system", "developer"])), "content": draw(TEXT)})
        elif kind == "function_call":
            items.append({"type": "function_call", "call_id": f"call_{i}", "name": draw(NAMES),
                          "arguments": orjson.dumps(draw(ARGUMENTS)).decode()})
        else:
            items.append({"type": "function_call_output", "call_id": f"call_{i}", "output": draw(TEXT)})
    return items


def _flat_chat(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Chat messages as a sequence of texts, calls and results, in order."""
    out: list[tuple[Any, ...]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            out.append(("result", message["tool_call_id"], message["content"]))
            continue
        if message.get("content"):
            out.append(("text", role, message["content"]))
        for call in message.get("tool_calls") or ():
            out.append(("call", call["id"], call["function"]["name"], call["function"]["arguments"]))
    return out


def _flat_items(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item["role"], item["role"])
            content = item["content"]
            text = content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)
            if text:
                out.append(("text", role, text))
        elif kind == "function_call":
            out.append(("call", item["call_id"], item["name"], item["arguments"]))
        elif kind == "function_call_output":
            out.append(("result", item["call_id"], item["output"]))
    return out


@PROPERTY
@given(items=responses_inputs(), instructions=st.one_of(st.none(), TEXT))
def test_a_responses_input_becomes_chat_messages_keeping_roles_text_calls_and_outputs(items, instructions):
    body = {"model": "m", "input": items, **({"instructions": instructions} if instructions else {})}
    _, chat = responses_translate.parse_request(body, {})
    expected = ([("text", "system", instructions)] if instructions else []) + _flat_items(items)
    assert _flat_chat(chat["messages"]) == expected


@PROPERTY
@given(text=st.one_of(st.none(), TEXT),
       calls=st.lists(st.tuples(NAMES, ARGUMENTS), max_size=3), follow=TEXT)
def test_a_chat_answer_stored_as_output_items_is_the_same_assistant_turn_next_time(text, calls, follow):
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": orjson.dumps(args).decode()}}
                  for i, (name, args) in enumerate(calls)]
    answer = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": answer, "finish_reason": "tool_calls" if tool_calls else "stop"}]}
    pending, _ = responses_translate.parse_request({"model": "m", "input": "first"}, {})
    response = responses_output.from_chat(pending, chat)
    # The next turn continues it (previous_response_id): the stored output comes back as chat messages.
    following, _ = responses_translate.parse_request({"model": "m", "input": follow}, {})
    following.context = [*pending.items, *response["output"]]
    messages = responses_translate.chat_messages(following)
    assert _flat_chat(messages) == [("text", "user", "first"), *_flat_chat([answer]), ("text", "user", follow)]
