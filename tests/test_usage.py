import httpx
import orjson
import pytest

from comox.fleet import BackendState
from comox.request import GatewayRequest
from comox.settings import BackendSettings
from comox.usage import WHOLE_PARSE_MAX, Usage, parse_usage, record_body, record_stream, usage_of_body, usage_of_events

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 4}}
BIG = "x" * (WHOLE_PARSE_MAX + 1000)  # makes a body take the search path


def chat_body(content, **top):
    return orjson.dumps({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}], **top})


def test_parse_usage_reads_openai_usage_and_llamacpp_timings():
    usage = parse_usage({"timings": {"cache_n": 120, "prompt_n": 30, "prompt_per_second": 900.0, "predicted_n": 20, "predicted_per_second": 50.0}})
    assert usage._asdict() == {"prompt": 150, "completion": 20, "cached": 120, "prefill_tps": 900.0, "decode_tps": 50.0}
    openai_usage = parse_usage({"usage": {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 64}}})
    assert openai_usage.cached == 64 and openai_usage.prompt == 100
    assert parse_usage({"usage": "lots"}) is None and parse_usage({}) is None


@pytest.mark.parametrize("content", ["short", BIG], ids=["parsed-whole", "searched"])
def test_usage_of_body_small_and_large(content):
    usage = usage_of_body(chat_body(content, usage=USAGE))
    assert usage._asdict() == {"prompt": 9, "completion": 3, "cached": 4, "prefill_tps": None, "decode_tps": None}


def test_usage_text_inside_a_string_is_not_taken_for_the_key():
    # The model's answer quotes a usage object; the real one comes before it.
    trap = ',"usage": {"prompt_tokens": 999, "completion_tokens": 999} ' + BIG
    body = orjson.dumps({"usage": USAGE, "choices": [{"message": {"content": trap}}]})
    assert usage_of_body(body).prompt == 9
    # ... and after it.
    assert usage_of_body(chat_body(trap, usage=USAGE)).prompt == 9


def test_usage_far_from_the_end_of_a_large_body_is_still_found():
    body = orjson.dumps({"usage": USAGE, "data": [{"embedding": [0.25] * 64, "index": i} for i in range(2000)]})
    assert len(body) > 8 * WHOLE_PARSE_MAX
    assert usage_of_body(body).completion == 3


def test_llamacpp_timings_in_a_large_body():
    timings = {"cache_n": 10, "prompt_n": 50, "prompt_per_second": 800.0, "predicted_n": 40, "predicted_per_second": 30.0}
    usage = usage_of_body(chat_body(BIG, usage={"prompt_tokens": 60, "completion_tokens": 40}, timings=timings))
    assert usage._asdict() == {"prompt": 60, "completion": 40, "cached": 10, "prefill_tps": 800.0, "decode_tps": 30.0}


@pytest.mark.parametrize("body", [
    chat_body(BIG, usage=None),
    chat_body(BIG, usage=[1, 2]),
    chat_body(BIG) + b'"usage":{"prompt_tokens":',  # cut short
    chat_body(BIG),
])
def test_large_bodies_without_a_usable_usage_give_none(body):
    assert usage_of_body(body) is None


def test_usage_of_events_reads_the_last_events():
    end = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    assert usage_of_events(end).prompt == 7
    assert usage_of_events(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n') is None
    assert usage_of_events(b'data: {"usage": broken\n\n') is None


def test_usage_of_events_the_last_line_that_says_one_wins():
    # Searched from the end: a later usage wins, a later line that names usage
    # without one (null, broken JSON, not a data line) does not hide an earlier one.
    first = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    second = b'data: {"usage":{"prompt_tokens":5,"completion_tokens":3}}\r\n\r\n'
    assert usage_of_events(first + second).prompt == 5
    end = second + b'data: {"usage":null}\n\ndata: {"usage": broken\n\nevent: "usage"\n\ndata: [DONE]'
    assert usage_of_events(end).completion == 3
    assert usage_of_events(b'data: {"timings":{"prompt_n":4,"cache_n":2,"predicted_n":6}}') == (6, 6, 2, None, None)


def test_usage_of_responses_api_events():
    # OpenAI's Responses API names the counts input/output tokens, and puts them
    # in the response object of its last event.
    usage = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 4, "total_tokens": 15}
    end = (b'event: response.output_text.done\ndata: {"type":"response.output_text.done","text":"hi"}\n\n'
           b'event: response.completed\ndata: ' + orjson.dumps({"type": "response.completed", "response": {"id": "resp_1", "usage": usage}}) + b'\n\n')
    assert usage_of_events(end)._asdict() == {"prompt": 11, "completion": 4, "cached": 8, "prefill_tps": None, "decode_tps": None}
    created = b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","usage":null}}\n\n'
    assert usage_of_events(created) is None



def test_usage_of_a_long_event_is_read_from_its_usage_object_alone():
    # A response.completed repeats the whole response (LONG_EVENT bytes and more):
    # its usage object is parsed alone, and must give what parsing the line whole gives.
    from comox.usage import LONG_EVENT

    usage = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 4,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
    text = "Grüße, 世界 {\"usage\": 1} " * 40  # not ASCII, braces and an escaped "usage" in a string
    response = {"id": "resp_1", "output": [{"content": [{"text": text}]}], "usage": usage}
    line = orjson.dumps({"type": "response.completed", "response": response, "sequence_number": 9})
    assert len(line) > LONG_EVENT
    want = {"prompt": 11, "completion": 4, "cached": 8, "prefill_tps": None, "decode_tps": None}
    assert usage_of_events(b"event: response.completed\ndata: " + line + b"\n\n")._asdict() == want
    # Its usage null: the line says none, and an earlier line's usage counts.
    earlier = b'data: {"usage":{"input_tokens":2,"output_tokens":1}}\n\n'
    unknown = orjson.dumps({"type": "response.completed", "response": {**response, "usage": None}})
    assert usage_of_events(earlier + b"data: " + unknown + b"\n\n")._asdict()["prompt"] == 2
    # "usage" as a value, not a key; and llama.cpp's timings beside it: the line is parsed whole.
    valued = orjson.dumps({"usage": usage, "note": text, "kind": "usage"})
    assert usage_of_events(b"data: " + valued + b"\n\n")._asdict() == want
    timed = orjson.dumps({"note": text, "usage": {"prompt_tokens": 3}, "timings": {"cache_n": 2, "prompt_n": 1}})
    assert usage_of_events(b"data: " + timed + b"\n\n")._asdict()["cached"] == 2


def test_usage_of_anthropic_messages_events():
    # Anthropic's Messages API counts cache reads and writes beside input_tokens;
    # its message_delta event carries the usage.
    usage = {"input_tokens": 5, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 2, "output_tokens": 4}
    end = (b'event: message_delta\ndata: ' + orjson.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage})
           + b'\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert usage_of_events(end)._asdict() == {"prompt": 37, "completion": 4, "cached": 30, "prefill_tps": None, "decode_tps": None}
    # The anthropic backend type's OpenAI usage keeps both figures beside prompt_tokens: not counted twice.
    openai = {"prompt_tokens": 37, "completion_tokens": 4, "cache_read_input_tokens": 30, "prompt_tokens_details": {"cached_tokens": 30}}
    assert parse_usage({"usage": openai})[:3] == (37, 4, 30)

@pytest.mark.parametrize("usage, want", [
    # Counts that are not plain non-negative ints (a bool, a float, a negative) are no counts.
    ({"prompt_tokens": True, "completion_tokens": 2}, (None, 2, None)),
    ({"prompt_tokens": 5.0, "completion_tokens": 2}, (None, 2, None)),
    ({"prompt_tokens": -1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}, (None, 2, 1)),
    ({"prompt_tokens": 5, "completion_tokens": False, "output_tokens": 3}, (5, None, None)),
    ({"prompt_tokens": 5, "completion_tokens": 2.0}, (5, None, None)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": True}}, (5, 2, None)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4.0}}, (5, 2, None)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -4}}, (5, 2, None)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": "4"}, (5, 2, None)),
    # Names mixed across APIs: a chat name, present, wins even when null.
    ({"prompt_tokens": 5, "output_tokens": 3}, (5, 3, None)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "input_tokens_details": {"cached_tokens": 2}}, (5, 1, 2)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None,
      "input_tokens_details": {"cached_tokens": 2}}, (5, 1, None)),
    ({"prompt_tokens": None, "input_tokens": 4, "output_tokens": 1}, (None, 1, None)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "cache_read_input_tokens": 30}, (5, 1, None)),
    # Anthropic's: only valid cache counts are added; a message_delta may carry output_tokens alone.
    ({"input_tokens": 5, "cache_read_input_tokens": True, "cache_creation_input_tokens": 2, "output_tokens": 1}, (7, 1, None)),
    ({"input_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 2.0, "output_tokens": 1}, (5, 1, 0)),
    ({"input_tokens": -1, "cache_read_input_tokens": 3, "output_tokens": 1}, (None, 1, None)),
    ({"input_tokens": 5.0, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": True}, (None, None, 3)),
    ({"output_tokens": 8}, (None, 8, None)),
    ({}, (None, None, None)),
])
def test_parse_usage_of_odd_counts(usage, want):
    # The common shapes are read by a fast path; these fall off it (or through it) to the same answer.
    assert parse_usage({"usage": usage}) == (*want, None, None)
    assert parse_usage({"usage": usage, "timings": None}) == (*want, None, None)  # a null timings says nothing
    assert usage_of_events(b"data: " + orjson.dumps({"usage": usage}) + b"\n\n") == (*want, None, None)


def test_record_body_of_garbage_records_nothing_and_does_not_raise():
    state = BackendState(object(), BackendSettings(name="a"))
    request = GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[], raw=b"{}",
                             json={"model": "m"})
    record_body(request, state, b"<html>not json</html>")
    assert state.prompt_tokens == 0 and state.decode_tps is None
    request.sent_at, request.answered_at = 1.0, 1.5
    record_body(request, state, chat_body("hi", usage=USAGE))
    assert state.prompt_tokens == 9 and state.cached_tokens == 4 and state.decode_tps == pytest.approx(3 / 0.5)


def test_usage_of_a_large_real_embeddings_answer_is_recorded(comox_serve, upstreams):
    up = upstreams("a")
    server = comox_serve({"models": [{"name": "m", "backends": [{"name": "a", "url": up.url}]}]})
    inputs = [f"text {i}" for i in range(3000)]
    reply = httpx.post(f"{server.url}/v1/embeddings", json={"model": "m", "input": inputs}, timeout=30)
    assert reply.status_code == 200 and len(reply.content) > 4 * WHOLE_PARSE_MAX
    assert server.app.gateway.backend("a").prompt_tokens == 3000  # read from the searched tail


def test_record_stream_counts_events_without_usage_and_measures_both_phases():
    state = BackendState(object(), BackendSettings(name="a"))
    request = GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[], raw=b"{}",
                             json={"model": "m"})
    request.sent_at = 1.0
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    # No usage: 3 data lines before the end, 2 in it, less [DONE]: 4 tokens, 3 of them after the first.
    record_stream(request, state, 1.5, 3.0, 3, chunk + b"data: [DONE]\n\n")
    assert request.usage == Usage(completion=4) and state.prompt_tokens == 0 and state.prefill_tps is None
    assert state.decode_tps == pytest.approx(3 / 1.5) and state.group is None
    # With usage: its counts, prefill over the time to the first chunk (uncached tokens only).
    end = b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}\n\n'
    record_stream(request, state, 2.0, 4.0, 9, end + b"data: [DONE]\n\n")
    assert request.usage == Usage(12, 7, 2) and (state.prompt_tokens, state.cached_tokens) == (12, 2)
    assert state.prefill_tps == pytest.approx(10 / 1.0)
    assert state.decode_tps == pytest.approx(2.0 + 0.3 * (6 / 2.0 - 2.0))  # blended: TPS_ALPHA of the new sample
    # A usage without a completion count: the events are counted, the usage kept as said.
    end = b'data: {"usage":{"prompt_tokens":3}}\n\ndata: [DONE]\n\n'
    record_stream(request, state, 2.0, 2.0, 0, end)
    assert request.usage == Usage(3) and state.prompt_tokens == 15
