"""The ``responses`` plugin (plugins/comox_responses): OpenAI's Responses API on
a real gateway, with the official ``openai`` SDK as client, translated to chat
completions for a stand-in that records what it receives (tests/responses_standin.py),
or passed through to one that serves ``/v1/responses`` itself."""

import httpx
import openai
import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

import comox
from comox.testing import Fault
from tests.cycles import requests_left_in_cycles
from tests.responses_standin import Answer, ScriptedUpstream

DAY_S = 86_400
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def scripted():
    started = []

    def make(name="upstream"):
        upstream = ScriptedUpstream(name).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


class Observed:
    """The shared state as a fake clock and a record of what was stored, and
    the usage every request ended with."""

    def __init__(self):
        self.now = 1000.0
        self.sets = []
        self.usage = []

    @comox.hookimpl
    def comox_shared_state(self):
        observed = self

        class State(comox.MemoryState):
            async def set(self, key, value, *, ttl_s):
                observed.sets.append((key, ttl_s))
                await super().set(key, value, ttl_s=ttl_s)

        return State(clock=lambda: self.now)

    @comox.hookimpl
    def comox_request_done(self, request, status):
        if request.endpoint == "chat/completions":
            self.usage.append((status, request.usage))


class TwoKeys:
    @comox.hookimpl
    def comox_authenticate(self, request):
        keys = {b"Bearer key-a": comox.Principal(key_id="a"), b"Bearer key-b": comox.Principal(key_id="b")}
        return keys.get(request.header(b"authorization"))


def serve(comox_serve, upstream, *plugins, settings=None, **backend):
    config = {"models": [{"name": "m", "aliases": ["gpt-4.1"], "backends": [{"url": upstream.url, **backend}]}], **(settings or {})}
    return comox_serve(config, plugins=list(plugins))


def client(server, key="sk-unused"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def events_of(server, body):
    """The SSE events of a streamed create, each checked against the SDK's own
    (strict) event models."""
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    events = events_of_raw(raw_stream(server, body))
    for event in events:
        adapter.validate_python(event)
    return events


def raw_stream(server, body):
    """The bytes of a streamed create."""
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "text/event-stream"
        return b"".join(reply.iter_bytes())


def events_of_raw(raw):
    """The ``data`` of each SSE event in ``raw``, each named by its ``event:`` line."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            event = orjson.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            events.append(event)
    return events


# -- create, translated ---------------------------------------------------------------


def test_create_is_a_chat_completion_and_back(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed)
    upstream.answers.append(Answer(content="Hi there", reasoning="The user greets me."))
    response = client(server).responses.create(
        model="gpt-4.1", instructions="Be brief.", input="Say hi", max_output_tokens=50, temperature=0.5, top_p=0.9,
        reasoning={"effort": "low"}, metadata={"run": "1"}, user="u1")
    assert response.status == "completed" and response.output_text == "Hi there"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "The user greets me."
    assert response.id.startswith("resp_") and response.model == "gpt-4.1" and response.instructions == "Be brief."
    assert response.metadata == {"run": "1"} and response.max_output_tokens == 50 and response.reasoning.effort == "low"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 5, 17)
    assert usage.input_tokens_details.cached_tokens == 4 and usage.output_tokens_details.reasoning_tokens == 2
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"] == {"model": "gpt-4.1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
                            "max_tokens": 50, "temperature": 0.5, "top_p": 0.9, "reasoning_effort": "low", "user": "u1"}
    # The wire body is a Response by the SDK's own model, validated strictly.
    raw = httpx.post(f"{server.url}/v1/responses", json={"model": "m", "input": "again"})
    Response.model_validate(raw.json())
    assert observed.usage[-1] == (200, comox.Usage(prompt=12, completion=5, cached=4))


def test_input_items_become_chat_messages(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Un chat."}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": [{"type": "input_text", "text": "sunny"}]},
    ]
    client(server).responses.create(model="m", input=items)
    assert upstream.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]},
        {"role": "assistant", "content": "Un chat.", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
    ]


def test_stream_sends_the_typed_events_in_order(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed)
    upstream.answers.append(Answer(content="Hello there friend", reasoning="greet back"))
    events = events_of(server, {"model": "m", "input": "Say hi"})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello there friend" == events[14]["text"]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["input_tokens"] == 12
    assert [item["type"] for item in done["output"]] == ["reasoning", "message"]
    assert done["output"][1]["content"][0]["text"] == text and done["output"][1]["id"] == events[9]["item"]["id"]
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    # The usage of a translated stream is read from its response.completed event.
    assert observed.usage[-1] == (200, comox.Usage(prompt=12, completion=5, cached=4))
    # The SDK's own accumulator takes the stream as OpenAI's.
    upstream.answers.append(Answer(content="Hello there friend"))
    with client(server).responses.stream(model="m", input="Say hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Hello there friend" and final.status == "completed"


def test_a_stream_cut_short_by_max_output_tokens_is_incomplete(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    upstream.answers.append(Answer(content="Hello there", finish_reason="length"))
    events = events_of(server, {"model": "m", "input": "Say hi", "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    upstream.answers.append(Answer(content="Hello there", finish_reason="length"))
    response = client(server).responses.create(model="m", input="Say hi", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


# -- function tools ----------------------------------------------------------------------


def test_function_call_then_its_output_through_previous_response_id(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    sdk = client(server)
    upstream.answers.append(Answer(content=None, tool_calls=[("call_1", "get_weather", '{"city":"Paris"}')]))
    first = sdk.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
    [call] = first.output
    assert call.type == "function_call" and call.call_id == "call_1" and call.name == "get_weather"
    assert call.arguments == '{"city":"Paris"}' and call.id.startswith("fc_")
    sent = upstream.requests[-1]["body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["parameters"]}}]
    assert sent["tool_choice"] == "required"

    upstream.answers.append(Answer(content="It is sunny in Paris."))
    second = sdk.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER],
                                  tool_choice={"type": "function", "name": "get_weather"},
                                  input=[{"type": "function_call_output", "call_id": "call_1", "output": "sunny, 24C"}])
    assert second.output_text == "It is sunny in Paris." and second.previous_response_id == first.id
    sent = upstream.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # The whole conversation is the second response's input.
    items = list(sdk.responses.input_items.list(second.id, order="asc"))
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]


def test_streamed_function_calls(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    upstream.answers.append(Answer(content="Let me look.", tool_calls=[("call_a", "get_weather", '{"city":"Paris"}'),
                                                                         ("call_b", "get_weather", '{"city":"Rome"}')]))
    events = events_of(server, {"model": "m", "input": "Paris and Rome?", "tools": [WEATHER]})
    kinds = [e["type"] for e in events]
    call_events = ["response.output_item.added", "response.function_call_arguments.delta",
                   "response.function_call_arguments.delta", "response.function_call_arguments.done",
                   "response.output_item.done"]
    assert kinds[-11:] == [*call_events, *call_events, "response.completed"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [(0, "message"), (1, "function_call"), (2, "function_call")]
    assert added[1]["item"]["call_id"] == "call_a" and added[1]["item"]["arguments"] == ""
    args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in args_done] == ['{"city":"Paris"}', '{"city":"Rome"}']
    output = events[-1]["response"]["output"]
    assert [(i["type"], i.get("call_id")) for i in output] == [("message", None), ("function_call", "call_a"), ("function_call", "call_b")]
    assert output[2]["arguments"] == '{"city":"Rome"}' and output[2]["status"] == "completed"


# -- structured output -----------------------------------------------------------------


class City(pydantic.BaseModel):
    name: str
    population: int


def test_structured_output_is_chats_response_format(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    upstream.answers.append(Answer(content='{"name": "Paris", "population": 2100000}'))
    parsed = client(server).responses.parse(model="m", input="The biggest city of France?", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2100000)
    format_sent = upstream.requests[-1]["body"]["response_format"]
    assert format_sent["type"] == "json_schema" and format_sent["json_schema"]["name"] == "City"
    assert format_sent["json_schema"]["strict"] is True
    assert format_sent["json_schema"]["schema"]["properties"] == {"name": {"title": "Name", "type": "string"},
                                                                   "population": {"title": "Population", "type": "integer"}}
    assert parsed.text.format.type == "json_schema"
    client(server).responses.create(model="m", input="JSON please", text={"format": {"type": "json_object"}})
    assert upstream.requests[-1]["body"]["response_format"] == {"type": "json_object"}


# -- stored responses ------------------------------------------------------------------


def test_retrieve_list_input_items_cancel_and_delete(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed)
    sdk = client(server)
    items = [{"role": "user", "content": f"message {n}"} for n in range(5)]
    created = sdk.responses.create(model="m", input=items)
    assert sdk.responses.retrieve(created.id).model_dump() == created.model_dump()
    assert observed.sets == [(f"responses:-:{created.id}", 30 * DAY_S)]  # 30 days by default

    newest_first = sdk.responses.input_items.list(created.id)
    assert [i.content[0].text for i in newest_first.data] == [f"message {n}" for n in (4, 3, 2, 1, 0)]
    assert newest_first.has_more is False
    page = sdk.responses.input_items.list(created.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["message 0", "message 1"] and page.has_more is True
    assert page.first_id == page.data[0].id and page.last_id == page.data[1].id
    assert [i.content[0].text for i in page] == [f"message {n}" for n in range(5)]  # the SDK pages through `after`
    for item in page.data:
        pydantic.TypeAdapter(ResponseItem).validate_python(item.model_dump())

    with pytest.raises(openai.BadRequestError) as cancel:
        sdk.responses.cancel(created.id)
    assert cancel.value.body["message"] == "Cannot cancel a synchronous response."
    deleted = httpx.delete(f"{server.url}/v1/responses/{created.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    for call in (lambda: sdk.responses.retrieve(created.id), lambda: sdk.responses.delete(created.id),
                 lambda: sdk.responses.input_items.list(created.id)):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.body["message"] == f"Response with id '{created.id}' not found."


def test_store_false_is_never_stored(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed)
    sdk = client(server)
    plain = sdk.responses.create(model="m", input="hi", store=False)
    with sdk.responses.create(model="m", input="hi", store=False, stream=True) as stream:
        streamed = [e for e in stream if e.type == "response.completed"][0].response
    assert plain.store is False and streamed.store is False
    assert observed.sets == []
    for response in (plain, streamed):
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(response.id)
        with pytest.raises(openai.BadRequestError) as follow_up:
            sdk.responses.create(model="m", input="more", previous_response_id=response.id)
        assert follow_up.value.code == "previous_response_not_found" and follow_up.value.param == "previous_response_id"
    assert len(upstream.requests) == 2  # the follow-ups never reached a backend
    stored = sdk.responses.create(model="m", input="hi", stream=True)
    completed = [e for e in stored if e.type == "response.completed"][0].response
    assert observed.sets == [(f"responses:-:{completed.id}", 30 * DAY_S)]


def test_a_stored_response_expires_after_ttl_s(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed, settings={"plugins": {"responses": {"ttl_s": 60}}})
    sdk = client(server)
    created = sdk.responses.create(model="m", input="hi")
    assert observed.sets == [(f"responses:-:{created.id}", 60)]
    observed.now += 59
    assert sdk.responses.retrieve(created.id).id == created.id
    observed.now += 2
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_another_key_gets_404(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream, TwoKeys(), settings={"auth": "keys"})
    a, b = client(server, "key-a"), client(server, "key-b")
    created = a.responses.create(model="m", input="secret plans")
    for call in (lambda: b.responses.retrieve(created.id), lambda: b.responses.delete(created.id),
                 lambda: b.responses.input_items.list(created.id), lambda: b.responses.cancel(created.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as follow_up:
        b.responses.create(model="m", input="and?", previous_response_id=created.id)
    assert follow_up.value.code == "previous_response_not_found"
    assert len(upstream.requests) == 1
    assert a.responses.retrieve(created.id).output_text == "hello from upstream"  # still there for its owner
    with pytest.raises(openai.AuthenticationError):
        client(server, "no-such-key").responses.retrieve(created.id)


# -- pass-through --------------------------------------------------------------------


def test_a_backend_that_serves_responses_gets_the_clients_bytes(comox_serve, scripted):
    upstream = scripted("native")
    observed = Observed()
    server = serve(comox_serve, upstream, observed, native_apis=["responses"])
    # Odd spacing, a built-in tool and a parameter Comox does not translate: sent as they are.
    raw = (b'{"model": "m",  "input": "hi", "tools": [{"type": "web_search"}], "previous_response_id": "resp_theirs",'
           b' "prompt": {"id": "pmpt_1"}}')
    reply = httpx.post(f"{server.url}/v1/responses", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["id"] == "resp_native"
    assert reply.json()["output"][0]["content"][0]["text"] == "hello natively from native"
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/responses" and sent["raw"] == raw
    with client(server).responses.create(model="m", input="hi", stream=True) as stream:
        events = list(stream)
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", "response.completed"]
    assert events[-1].response.id == "resp_native"
    assert upstream.requests[-1]["body"] == {"model": "m", "input": "hi", "stream": True}
    assert observed.sets == []  # their responses are theirs to keep
    assert [status for status, _ in observed.usage] == [200, 200]


# -- failures and bad input ---------------------------------------------------------------


def test_a_stream_that_breaks_off_ends_failed_and_is_not_stored(comox_serve, scripted):
    upstream = scripted()
    observed = Observed()
    server = serve(comox_serve, upstream, observed)
    upstream.answers.append(Answer(content="one two three four"))
    upstream.faults.append(Fault(close_after_chunks=3))
    # As from OpenAI: events the SDK yields, the error's and then the failed response.
    events = list(client(server).responses.create(model="m", input="count", stream=True))
    seen = [event.type for event in events]
    assert seen[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in seen
    assert seen[-2:] == ["error", "response.failed"] and "response.completed" not in seen
    assert events[-2].code == "stream_interrupted" and events[-2].message == "the backend failed in the middle of the response"
    assert events[-1].response.status == "failed" and events[-1].response.error.message == events[-2].message
    assert observed.sets == []
    # On the wire: typed events only, numbered on without a gap; no OpenAI `data: {"error": …}` line.
    upstream.answers.append(Answer(content="one two three four"))
    upstream.faults.append(Fault(close_after_chunks=3))
    raw = raw_stream(server, {"model": "m", "input": "count"})
    assert b'data: {"error"' not in raw
    typed = events_of_raw(raw)
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    for event in typed:
        adapter.validate_python(event)  # the SDK's own (strict) event models
    assert [event["sequence_number"] for event in typed] == list(range(len(typed)))
    assert [event["type"] for event in typed][-2:] == ["error", "response.failed"]
    assert [event["type"] for event in typed].count("error") == 1
    assert observed.sets == []


def test_a_native_backend_judges_what_routing_and_limits_do_not_read(comox_serve, scripted):
    upstream = scripted("native")
    server = serve(comox_serve, upstream, native_apis=["responses"])
    url = f"{server.url}/v1/responses"
    reply = httpx.post(url, json={"model": "m", "input": "hi", "temperature": 7, "metadata": {"n": 1}})
    assert reply.status_code == 200 and upstream.requests[-1]["body"]["temperature"] == 7  # the backend's to judge
    for body, param in (({"model": "m", "input": "hi", "stream": "yes"}, "stream"),
                        ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
                        ({"model": "m"}, "input")):
        sent = len(upstream.requests)
        reply = httpx.post(url, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
        assert len(upstream.requests) == sent  # routing and limits read these: refused here
    # Translated after all (a deterministic request's cache key): checked in full first, a 400 and not a 500.
    sent = len(upstream.requests)
    for body, param in (({"tools": "x"}, "tools"), ({"metadata": {"n": 1}}, "metadata"), ({"top_p": 3}, "top_p")):
        reply = httpx.post(url, json={"model": "m", "input": "hi", "temperature": 0, **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert len(upstream.requests) == sent


@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_a_request_leaves_no_reference_cycle(comox_serve, scripted, native):
    """Every request is freed when it ends, not at the cyclic GC's next pass
    (a request passed through natively kept its own deferred translation,
    which held it: a cycle per request)."""
    upstream = scripted("native")
    server = serve(comox_serve, upstream, **({"native_apis": ["responses"]} if native else {}))

    def send(stream):
        reply = httpx.post(f"{server.url}/v1/responses", json={"model": "m", "input": "hi", "stream": stream})
        assert reply.status_code == 200

    assert requests_left_in_cycles(send) == []


def test_a_native_stream_that_breaks_off_ends_with_a_responses_error_event(comox_serve, scripted):
    upstream = scripted("native")
    server = serve(comox_serve, upstream, native_apis=["responses"])
    upstream.faults.append(Fault(close_after_chunks=2))
    raw = raw_stream(server, {"model": "m", "input": "hi"})
    assert b'data: {"error"' not in raw
    events = events_of_raw(raw)
    assert [event["type"] for event in events] == ["response.created", "response.output_text.delta", "error"]
    assert events[-1] == {"type": "error", "code": "stream_interrupted", "param": None,
                          "message": "the backend failed in the middle of the response"}
    upstream.faults.append(Fault(close_after_chunks=2))
    seen = [event.type for event in client(server).responses.create(model="m", input="hi", stream=True)]
    assert seen == ["response.created", "response.output_text.delta", "error"]


BAD = [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"input": "hi"}, "model", "missing_required_parameter"),
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"model": "m", "input": 3}, "input", "invalid_type"),
    ({"model": "m", "input": "hi", "frobnicate": True}, "frobnicate", "unknown_parameter"),
    ({"model": "m", "input": "hi", "api_base": "http://evil"}, "api_base", "forbidden_field"),
    ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name", "missing_required_parameter"),
    ({"model": "m", "input": "hi", "background": True}, "background", "unsupported_parameter"),
    ({"model": "m", "input": "hi", "temperature": 9}, "temperature", "invalid_value"),
    ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"model": "m", "input": "hi", "tool_choice": {"type": "web_search"}}, "tool_choice", "invalid_value"),
    ({"model": "m", "input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "invalid_value"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "missing_required_parameter"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "unsupported_value"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type", "unsupported_value"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0].image_url", "unsupported_value"),
    ({"model": "m", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "invalid_value"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", "missing_required_parameter"),
    ({"model": "m", "input": ["hi"]}, "input[0]", "invalid_type"),
    ({"model": "m", "input": [{"content": "hi"}]}, "input[0].type", "missing_required_parameter"),
    ({"model": "m", "input": []}, "input", "empty_array"),
    ({"model": "m", "input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id", "previous_response_not_found"),
    ({"model": "m", "input": "hi", "previous_response_id": "../etc"}, "previous_response_id", "previous_response_not_found"),
    ({"model": "nope", "input": "hi"}, "model", "model_not_found"),
]


@pytest.mark.parametrize("body, param, code", BAD, ids=[f"{n}-{case[2]}" for n, case in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(comox_serve, scripted, body, param, code):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    reply = httpx.post(f"{server.url}/v1/responses", content=content, headers={"content-type": "application/json"})
    assert 400 <= reply.status_code < 500
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert upstream.requests == []
    assert httpx.post(f"{server.url}/v1/responses", json={"model": "m", "input": "hi"}).status_code == 200


def test_wrong_paths_methods_and_queries(comox_serve, scripted):
    upstream = scripted()
    server = serve(comox_serve, upstream)
    created = httpx.post(f"{server.url}/v1/responses", json={"model": "m", "input": "hi"}).json()["id"]
    cases = [
        ("GET", "/v1/responses", 405), ("PUT", f"/v1/responses/{created}", 405),
        ("GET", f"/v1/responses/{created}/cancel", 405), ("POST", f"/v1/responses/{created}/input_items", 405),
        ("GET", "/v1/responses/resp_%00%ff", 404), ("GET", f"/v1/responses/{created}/other", 404),
        ("GET", f"/v1/responses/{created}/input_items?limit=0", 400),
        ("GET", f"/v1/responses/{created}/input_items?limit=abc", 400),
        ("GET", f"/v1/responses/{created}/input_items?order=sideways", 400),
        ("GET", f"/v1/responses/{created}/input_items?after=msg_unknown", 400),
        ("GET", f"/v1/responses/{created}?stream=true", 400),
    ]
    for method, path, status in cases:
        reply = httpx.request(method, f"{server.url}{path}")
        assert reply.status_code == status, (method, path, reply.text)
        assert reply.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/responses/{created}").status_code == 200


def test_the_documented_settings_are_the_defaults():
    import re
    import tomllib
    from pathlib import Path

    from comox_responses import ResponsesSettings

    docs = Path(__file__).resolve().parent.parent / "docs"
    table = (docs / "configuration.md").read_text().split("### `[plugins.responses]`")[1].split("\n### ")[0]
    assert re.findall(r"^\| `(\w+)` \| `([^`]+)`", table, re.M) == [
        (name, f"{value:.0f}") for name, value in ResponsesSettings().model_dump().items()]
    block = re.search(r"## Settings\n\n```toml\n(.*?)```", (docs / "responses.md").read_text(), re.S)[1]
    assert tomllib.loads(block)["plugins"]["responses"] == ResponsesSettings().model_dump()
