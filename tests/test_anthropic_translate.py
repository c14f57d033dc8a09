"""comox_anthropic.translate: OpenAI chat completions ⇄ Anthropic Messages,
every mapping as a table, both directions, and round trips."""

import orjson
import pytest
from comox_anthropic.translate import (
    AnthropicStreamTranslator,
    OpenAIStreamTranslator,
    SSEDecoder,
    anthropic_sse,
    anthropic_to_openai_error,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    anthropic_usage,
    openai_sse,
    openai_to_anthropic_error,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
    openai_usage,
)

import comox

PNG = "iVBORw0KGgo="
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def to_anthropic(**body):
    return openai_to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
                                       model="claude", default_max_tokens=321)


def messages_of(*messages):
    return to_anthropic(messages=list(messages))[0]


def refused(param, **body):
    with pytest.raises(comox.InvalidRequest) as exc:
        to_anthropic(**body)
    assert exc.value.param == param and exc.value.status == 400
    return exc.value.message


# -- OpenAI request → Anthropic request -------------------------------------------------


def test_system_and_developer_messages_become_system():
    out = messages_of({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    assert out["system"] == "Be brief." and out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    out = messages_of({"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                      {"role": "user", "content": "hi"})
    assert out["system"] == [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    assert "system" not in messages_of({"role": "user", "content": "hi"})


def test_consecutive_turns_of_one_role_are_merged():
    out = messages_of({"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"})
    assert [(m["role"], [b["text"] for b in m["content"]]) for m in out["messages"]] == [
        ("user", ["a", "b"]), ("assistant", ["c", "d"]), ("user", ["e"])]


def test_empty_messages_are_dropped_and_a_final_assistant_turn_loses_trailing_whitespace():
    translated = to_anthropic(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "The answer is \n "}])
    assert translated.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]
    assert translated.prefill_space == " \n " and to_anthropic().prefill_space == ""


@pytest.mark.parametrize("space, answer, expected", [
    (" ", " 42.", "42."), (" ", "42.", "42."), ("\n", "\n\nNext", "\nNext"), ("  ", " ", ""), ("", " 42", " 42")])
def test_the_answer_to_a_prefill_continues_after_its_whitespace(space, answer, expected):
    reply = anthropic_to_openai_response(message([{"type": "text", "text": answer}]), prefill_space=space)
    assert reply["choices"][0]["message"]["content"] == expected
    pieces = [answer[:1], answer[1:]]  # in a stream, the whitespace may end one delta and go on in the next
    events = [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in pieces]
    assert "".join(d.get("content", "") for d in deltas(run([START, *events], prefill_space=space)[1][1:])) == expected


@pytest.mark.parametrize("url, source", [
    (f"data:image/png;base64,{PNG}", {"type": "base64", "media_type": "image/png", "data": PNG}),
    ("https://example.com/cat.jpg", {"type": "url", "url": "https://example.com/cat.jpg"}),
])
def test_images(url, source):
    out = messages_of({"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                   {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]})
    assert out["messages"][0]["content"] == [{"type": "text", "text": "what is it?"}, {"type": "image", "source": source}]


@pytest.mark.parametrize("url, says", [("data:image/bmp;base64,AAAA", "image/bmp"), ("data:image/png,raw", "base64"),
                                       ("file:///etc/passwd", "data: URL or an http(s) URL")])
def test_images_the_api_cannot_take(url, says):
    part = {"type": "image_url", "image_url": {"url": url}}
    assert says in refused("messages[0].content[0].image_url.url", messages=[{"role": "user", "content": [part]}])


def test_a_pdf_becomes_a_document():
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBER", "filename": "a.pdf"}}
    out = messages_of({"role": "user", "content": [part]})
    assert out["messages"][0]["content"] == [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]


def test_tools_tool_calls_and_tool_results():
    out = messages_of({"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": ""}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
                      {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "sunny"}]},
                      {"role": "user", "content": "And so?"})
    assert out["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And so?"}]}]
    body, *_ = to_anthropic(tools=[TOOL, {"type": "function", "function": {"name": "now"}}])
    assert body["tools"] == [{"name": "get_weather", "description": "Weather in a city", "input_schema": TOOL["function"]["parameters"]},
                             {"name": "now", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_results_come_first_in_their_turn():
    out = messages_of({"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [CALL]},
                      {"role": "user", "content": "(also this)"}, {"role": "tool", "tool_call_id": "call_1", "content": "done"})
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]


def test_bad_tool_call_arguments():
    message = {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{not json"}}]}
    refused("messages[1].tool_calls[0].function.arguments", messages=[{"role": "user", "content": "x"}, message])


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_tool_choice(choice, parallel, expected):
    body, *_ = to_anthropic(tools=[TOOL], tool_choice=choice, parallel_tool_calls=parallel)
    assert body.get("tool_choice") == expected


@pytest.mark.parametrize("stop, expected", [("END", ["END"]), (["a", "b\n"], ["a", "b\n"]), (None, None), ([], None)])
def test_stop_sequences(stop, expected):
    assert to_anthropic(stop=stop)[0].get("stop_sequences") == expected


def test_whitespace_stop_sequences_are_refused_clearly():
    assert "whitespace" in refused("stop", stop=["\n"])


@pytest.mark.parametrize("given, expected", [({}, 321), ({"max_tokens": 50}, 50), ({"max_completion_tokens": 60, "max_tokens": 50}, 60)])
def test_max_tokens(given, expected):
    assert to_anthropic(**given)[0]["max_tokens"] == expected


@pytest.mark.parametrize("given, expected", [
    ({"temperature": 0.3, "top_p": 0.9}, {"temperature": 0.3, "top_p": 0.9}),
    ({"temperature": 1.7}, {"temperature": 1.0}),
    ({"temperature": 0}, {"temperature": 0.0}),
    ({"user": "u-1"}, {"metadata": {"user_id": "u-1"}}),
    ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True}),
    ({"presence_penalty": 1, "frequency_penalty": 1, "seed": 4, "logit_bias": {}, "store": True}, {}),
])
def test_sampling_and_other_parameters(given, expected):
    body, *_ = to_anthropic(**given)
    assert {k: v for k, v in body.items() if k not in ("model", "messages", "max_tokens")} == expected
    assert body["model"] == "claude"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize("tools, choice, tool_choice", [
    (None, None, {"type": "tool", "name": "json_response"}),
    ([TOOL], None, {"type": "any"}),
    ([TOOL], "none", {"type": "tool", "name": "json_response"}),
    ([TOOL], {"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
def test_response_format_json_schema_is_a_forced_tool(tools, choice, tool_choice):
    body, json_tool, _ = to_anthropic(tools=tools, tool_choice=choice,
                                   response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert json_tool == "json_response"
    assert body["tools"][-1]["name"] == "json_response" and body["tools"][-1]["input_schema"] == SCHEMA
    assert body["tool_choice"] == tool_choice


def test_response_format_json_object_and_a_name_taken_by_a_client_tool():
    taken = {"type": "function", "function": {"name": "json_response"}}
    body, json_tool, _ = to_anthropic(tools=[taken], tool_choice="none", response_format={"type": "json_object"})
    assert json_tool == "json_response_" and body["tools"][-1] == {"name": "json_response_", "description": body["tools"][-1]["description"],
                                                                  "input_schema": {"type": "object"}}
    assert to_anthropic(response_format={"type": "text"}) == to_anthropic()
    assert "object" in refused("response_format.json_schema.schema",
                               response_format={"type": "json_schema", "json_schema": {"schema": {"type": "array"}}})


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"functions": [{"name": "f"}]}, "functions"),
    ({"audio": {"voice": "x"}}, "audio"), ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0]"),
    ({"tool_choice": "sometimes", "tools": [TOOL]}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
])
def test_what_the_api_cannot_express_is_a_400_naming_the_parameter(body, param):
    refused(param, **body)


# -- Anthropic answers → OpenAI answers -----------------------------------------------------


def message(content, stop_reason="end_turn", **usage):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 4, **usage}}


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
])
def test_stop_reasons(stop_reason, finish):
    content = [{"type": "tool_use", "id": "t", "name": "f", "input": {}}] if stop_reason == "tool_use" else [{"type": "text", "text": "x"}]
    assert anthropic_to_openai_response(message(content, stop_reason))["choices"][0]["finish_reason"] == finish


def test_a_response_with_text_and_tool_calls():
    out = anthropic_to_openai_response(message([
        {"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}], "tool_use"), created=7)
    assert out == {"id": "msg_1", "object": "chat.completion", "created": 7, "model": "claude-x", "choices": [{
        "index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Paris"}'}}]}}], "usage": openai_usage(message([])["usage"])}
    only_calls = anthropic_to_openai_response(message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"))
    assert only_calls["choices"][0]["message"]["content"] is None


def test_the_json_tool_input_is_the_content():
    out = anthropic_to_openai_response(message([{"type": "tool_use", "id": "t", "name": "json_response", "input": {"name": "Ada"}}],
                                               "tool_use"), json_tool="json_response")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": '{"name":"Ada"}'}
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("usage, prompt, cached, write", [
    ({"input_tokens": 10, "output_tokens": 4}, 10, 0, 0),
    ({"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 1000}, 1010, 1000, 0),
    ({"input_tokens": 10, "output_tokens": 4, "cache_creation_input_tokens": 500}, 510, 0, 500),
    ({"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 500}, 1510, 1000, 500),
    ({"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": None}, 10, 0, 0),
])
def test_usage_counts_cached_tokens_once(usage, prompt, cached, write):
    out = openai_usage(usage)
    assert out == {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4,
                   "prompt_tokens_details": {"cached_tokens": cached}, "cache_read_input_tokens": cached,
                   "cache_creation_input_tokens": write}
    assert anthropic_usage(out) == {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": cached,
                                    "cache_creation_input_tokens": write}


@pytest.mark.parametrize("status, kind, out_status, out_type, code", [
    (400, "invalid_request_error", 400, "invalid_request_error", None),
    (401, "authentication_error", 401, "authentication_error", "invalid_api_key"),
    (403, "permission_error", 403, "permission_error", None),
    (404, "not_found_error", 404, "invalid_request_error", "not_found"),
    (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
    (429, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
    (500, "api_error", 500, "server_error", None),
    (529, "overloaded_error", 503, "service_unavailable", "overloaded"),
    (None, "overloaded_error", 503, "service_unavailable", "overloaded"),
    (None, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
    (418, "teapot_error", 418, "invalid_request_error", None),
    (502, None, 502, "server_error", None),
])
def test_errors(status, kind, out_status, out_type, code):
    body = {"type": "error", "error": {"type": kind, "message": "why"}} if kind else None
    assert anthropic_to_openai_error(status, body) == (out_status, {"error": {
        "message": "why" if kind else "the Anthropic API answered HTTP 502 (api_error)", "type": out_type, "param": None, "code": code}})
    back_status, back = openai_to_anthropic_error(out_status, {"error": {"message": "why", "type": out_type}})
    assert back_status == (status or {503: 529}.get(out_status, out_status))


# -- streams: Anthropic events → OpenAI chunks ------------------------------------------------

START = {"type": "message_start", "message": message([], None, cache_read_input_tokens=100) | {"usage": {
    "input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 100}}}
END = [{"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9}},
       {"type": "message_stop"}]


def run(events, **options):
    translator = AnthropicStreamTranslator(created=5, **options)
    return translator, [chunk for event in events for chunk in translator.feed(event)]


def deltas(chunks):
    return [c["choices"][0]["delta"] for c in chunks if c.get("choices")]


def test_stream_of_text_and_tool_calls():
    events = [START, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, {"type": "ping"},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
              {"type": "content_block_stop", "index": 0},
              {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
              {"type": "content_block_stop", "index": 1},
              {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}},
              {"type": "content_block_stop", "index": 2}, *END]
    translator, chunks = run(events)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {}]
    assert translator.finished and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert {c["id"] for c in chunks} == {"msg_1"} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    # Usage always rides on the last chunk (the gateway reads it), counted once.
    assert chunks[-1]["usage"] == openai_usage({"input_tokens": 10, "output_tokens": 9, "cache_read_input_tokens": 100})
    assert chunks[-1]["usage"]["prompt_tokens"] == 110


def test_stream_usage_chunk_when_the_client_asked_for_it():
    _, chunks = run([START, *END], include_usage=True)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9


def test_stream_usage_in_message_delta_wins():
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 3, "input_tokens": 12, "cache_read_input_tokens": None, "cache_creation_input_tokens": 4}}
    _, chunks = run([START, delta, {"type": "message_stop"}])
    assert chunks[-1]["usage"]["prompt_tokens"] == 12 + 100 + 4 and chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}


def test_stream_json_tool_becomes_content():
    events = [START, {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "json_response", "input": {}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"name": "Ada"}'}},
              {"type": "content_block_stop", "index": 0}, *END]
    _, chunks = run(events, json_tool="json_response")
    assert deltas(chunks)[1:] == [{"content": '{"name": "Ada"}'}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_error_event():
    translator, chunks = run([START, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}])
    assert chunks[-1] == {"error": {"message": "Overloaded", "type": "service_unavailable", "param": None, "code": "overloaded"}}
    assert translator.error == (503, chunks[-1]) and not translator.finished
    assert openai_sse(chunks[-1:]) == b"data: " + orjson.dumps(chunks[-1]) + b"\n\n"


def test_sse_decoder_joins_events_split_anywhere():
    data = b"event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\nevent: message_stop\ndata: {\"type\":\ndata: \"message_stop\"}\n\n: comment\n\n"
    decoder = SSEDecoder()
    events = [event for i in range(len(data)) for event in decoder.feed(data[i:i + 1])]
    assert events == [("ping", '{"type": "ping"}'), ("message_stop", '{"type":\n"message_stop"}')]


# -- the other way: an Anthropic client, an OpenAI-format upstream ----------------------------


def test_anthropic_request_to_openai():
    body = {"model": "chat", "max_tokens": 100, "system": "Be brief.", "stop_sequences": ["END"], "temperature": 0.5,
            "top_k": 40, "metadata": {"user_id": "u"}, "stream": True,
            "tools": [{"name": "get_weather", "description": "Weather in a city", "input_schema": TOOL["function"]["parameters"]}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                             {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                                                  {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18"}]},
                                             {"type": "text", "text": "Thanks"}]}]}
    out = anthropic_to_openai_request(body)
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": "Looking.", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "18"},
        {"role": "user", "content": "Thanks"}]
    assert {k: v for k, v in out.items() if k != "messages"} == {
        "model": "chat", "max_tokens": 100, "stop": ["END"], "temperature": 0.5, "top_k": 40, "user": "u", "stream": True,
        "stream_options": {"include_usage": True}, "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False}


@pytest.mark.parametrize("choice, expected", [({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
                                              ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})])
def test_anthropic_tool_choice_to_openai(choice, expected):
    assert anthropic_to_openai_request({"model": "m", "messages": [], "tool_choice": choice})["tool_choice"] == expected


@pytest.mark.parametrize("finish, stop_reason", [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
                                                 ("content_filter", "refusal"), (None, "end_turn")])
def test_openai_response_to_anthropic(finish, stop_reason):
    completion = {"id": "chatcmpl-1", "model": "gemma", "choices": [{"index": 0, "finish_reason": finish, "message": {
        "role": "assistant", "content": "Hi", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "not json"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 20}}}
    assert openai_to_anthropic_response(completion, model="chat") == {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "chat", "stop_reason": stop_reason, "stop_sequence": None,
        "content": [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "call_1", "name": "f", "input": {"_raw_arguments": "not json"}}],
        "usage": {"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}}


def test_openai_chunks_to_anthropic_events():
    translator = OpenAIStreamTranslator(model="chat", message_id="msg_x", input_tokens=7)
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}]
    events = [event for chunk in chunks for event in translator.feed(chunk)] + translator.finish()
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                           "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[4] == {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "c1", "name": "f", "input": {}}}
    assert events[5]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert events[7]["delta"]["stop_reason"] == "tool_use" and events[7]["usage"]["output_tokens"] == 3
    assert anthropic_sse(events[-1:]) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    error = OpenAIStreamTranslator(model="m", message_id="x").feed({"error": {"message": "gone", "type": "service_unavailable"}})
    assert error == [{"type": "error", "error": {"type": "overloaded_error", "message": "gone"}}]


def test_anthropic_request_to_openai_for_servers_that_take_strings():
    # System blocks joined into one string, "" beside tool calls, tool results
    # as text, a plain-text document as text, structured output as response_format.
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    out = anthropic_to_openai_request({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                                       "output_config": {"format": {"type": "json_schema", "schema": schema}}, "messages": [
        {"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a note"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [
            {"type": "text", "text": "line 1"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "line 2"}]}]}]})
    assert out["messages"] == [{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "a note"},
                               {"role": "assistant", "content": "", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                               {"role": "tool", "tool_call_id": "t1", "content": "line 1\nline 2"}]
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_openai_reasoning_becomes_a_thinking_block(key):
    completion = {"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "42", key: "Think."}}]}
    assert openai_to_anthropic_response(completion)["content"] == [{"type": "thinking", "thinking": "Think.", "signature": ""},
                                                                   {"type": "text", "text": "42"}]
    translator = OpenAIStreamTranslator(model="m", message_id="x")
    events = translator.feed({"choices": [{"index": 0, "delta": {key: "Think."}}]}) + translator.feed(
        {"choices": [{"index": 0, "delta": {"content": "42"}}]})
    assert [(e["type"], e.get("delta", e.get("content_block"))) for e in events[1:]] == [
        ("content_block_start", {"type": "thinking", "thinking": "", "signature": ""}),
        ("content_block_delta", {"type": "thinking_delta", "thinking": "Think."}),
        ("content_block_stop", None), ("content_block_start", {"type": "text", "text": ""}),
        ("content_block_delta", {"type": "text_delta", "text": "42"})]


@pytest.mark.parametrize("choice, expected", [
    ({"finish_reason": "stop", "stop_reason": "END"}, ("stop_sequence", "END")),  # vLLM
    ({"finish_reason": "stop", "matched_stop": "END"}, ("stop_sequence", "END")),  # SGLang
    ({"finish_reason": "stop", "stop_reason": 106}, ("end_turn", None)),  # a stop token id, not a sequence
    ({"finish_reason": "stop", "stop_reason": "OTHER"}, ("end_turn", None)),
    ({"finish_reason": "stop"}, ("end_turn", None))])
def test_a_stop_sequence_shows_where_the_server_says_which_matched(choice, expected):
    completion = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, **choice}]}
    message = openai_to_anthropic_response(completion, stop_sequences=["END"])
    assert (message["stop_reason"], message["stop_sequence"]) == expected
    translator = OpenAIStreamTranslator(model="m", message_id="x", stop_sequences=("END",))
    translator.feed({"choices": [{"index": 0, "delta": {}, **choice}]})
    assert translator.finish()[-2]["delta"] == {"stop_reason": expected[0], "stop_sequence": expected[1]}


def test_a_stream_without_usage_counts_its_deltas():
    translator = OpenAIStreamTranslator(model="m", message_id="x", input_tokens=9)
    for piece in ("a", "b", "c"):
        translator.feed({"choices": [{"index": 0, "delta": {"content": piece}}]})
    translator.feed({"choices": [{"index": 1, "delta": {"content": "another choice"}}]})  # a Message is one choice
    assert translator.finish()[-2]["usage"] == {"input_tokens": 9, "output_tokens": 3}


# -- round trips -------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C and sunny"},
    {"role": "user", "content": "Thanks. Tomorrow?"},
]


def test_openai_to_anthropic_to_openai_keeps_messages_tools_and_results():
    request = {"model": "m", "messages": CONVERSATION, "tools": [TOOL], "tool_choice": "required", "max_tokens": 64, "stop": ["END"]}
    anthropic, *_ = openai_to_anthropic_request(request)
    back = anthropic_to_openai_request(anthropic)
    assert back["tools"] == [TOOL] and back["tool_choice"] == "required" and back["stop"] == ["END"] and back["max_tokens"] == 64
    assert back["messages"][:2] == CONVERSATION[:2] and back["messages"][3:] == CONVERSATION[3:]
    call = back["messages"][2]["tool_calls"][0]
    assert orjson.loads(call["function"]["arguments"]) == orjson.loads(CALL["function"]["arguments"])
    assert back["messages"][2] == {**CONVERSATION[2], "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": call["function"]["arguments"]}}]}


def test_anthropic_to_openai_to_anthropic_keeps_messages():
    anthropic, *_ = openai_to_anthropic_request({"model": "m", "messages": CONVERSATION, "tools": [TOOL]})
    again, *_ = openai_to_anthropic_request(anthropic_to_openai_request(anthropic))
    assert again == anthropic


def test_responses_round_trip():
    original = message([{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1]}}], "tool_use",
                       cache_read_input_tokens=5, cache_creation_input_tokens=6)
    assert openai_to_anthropic_response(anthropic_to_openai_response(original)) == original
