"""comox_anthropic.checks: a Messages request checked in the API's own terms,
and its input tokens estimated."""

import orjson
import pytest
from comox_anthropic.checks import CHARS_PER_TOKEN, IMAGE_TOKENS, MESSAGE_TOKENS, check_request, estimate_input_tokens

import comox

HI = [{"role": "user", "content": "hi"}]
TOOL = {"name": "f", "input_schema": {"type": "object"}}


def body(**fields):
    return orjson.dumps({"model": "m", "max_tokens": 5, "messages": HI, **fields})


def test_a_good_request_is_returned_parsed_with_fields_it_does_not_know():
    checked = check_request(body(system=[{"type": "text", "text": "s"}], tools=[TOOL], tool_choice={"type": "tool", "name": "f"},
                                 thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "u"},
                                 stop_sequences=["END"], temperature=1, top_k=5, stream=True, service_tier="auto"))
    assert checked["service_tier"] == "auto" and checked["tools"] == [TOOL]


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"model": ""}, "model"), ({"stream": 1}, "stream"), ({"top_k": -1}, "top_k"), ({"top_p": 2}, "top_p"),
    ({"system": [{"type": "image"}]}, "system.0"), ({"metadata": {"user_id": 5}}, "metadata"),
    ({"tools": [{"name": "", "input_schema": {}}]}, "tools.0.name"), ({"tools": {"name": "f"}}, "tools"),
    ({"tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}}, "tool_choice.disable_parallel_tool_use"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_use"}]}]}]},
     "messages.0.content.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]}, "messages.0.content.0.source.data"),
    ({"messages": ["hi"]}, "messages.0"),
    # values that are not strings where names are expected (no TypeError: unhashable)
    ({"tool_choice": {"type": {"a": 1}}}, "tool_choice"), ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": ["f"]}}, "tool_choice.name"),
    ({"thinking": {"type": []}}, "thinking"), ({"messages": [{"role": "user", "content": [{"type": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages.0.role")])
def test_bad_fields_are_named(fields, param):
    with pytest.raises(comox.InvalidRequest) as exc:
        check_request(orjson.dumps({k: v for k, v in {"model": "m", "max_tokens": 5, "messages": HI, **fields}.items() if v is not None}))
    assert exc.value.param == param and exc.value.message.startswith(f"{param}: ") and exc.value.status == 400


def test_count_tokens_takes_no_max_tokens():
    assert check_request(orjson.dumps({"model": "m", "messages": HI}), count=True)["model"] == "m"


def test_the_estimate():
    text = "x" * 40
    plain = {"system": "Be brief.", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
    assert estimate_input_tokens(plain) == -(-(9 + 40 + 2) // CHARS_PER_TOKEN) + 2 * MESSAGE_TOKENS
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 10_000}}
    call = {"type": "tool_use", "id": "toolu_x", "name": "f", "input": {"city": "Paris"}}
    rich = {"tools": [TOOL], "messages": [
        {"role": "user", "content": [{"type": "text", "text": text}, image]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "not counted " * 50, "signature": "s"}, call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": [{"type": "text", "text": "18"}]}]}]}
    chars = len(orjson.dumps([TOOL])) + 40 + len("f") + len('{"city":"Paris"}') + 2
    assert estimate_input_tokens(rich) == -(-chars // CHARS_PER_TOKEN) + 3 * MESSAGE_TOKENS + IMAGE_TOKENS
