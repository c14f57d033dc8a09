"""comox.parse: a request's headers read and its body parsed and checked
(compiled with mypyc when installed: these run against what the install built)."""

import itertools

import orjson
import pytest

import comox
from comox.parse import FORBIDDEN_FIELDS, first_header, parse_body


def test_first_header_is_the_first_value_of_that_name_or_none():
    headers = [(b"content-type", b"application/json"), (b"x-tenant", b"first"), (b"x-tenant", b"second"), (b"x-empty", b"")]
    assert first_header(headers, b"x-tenant") == b"first"
    assert first_header(headers, b"x-empty") == b""
    assert first_header(headers, b"x-missing") is None
    assert first_header([], b"x-tenant") is None
    # ASGI's pairs may be lists, in any iterable
    assert first_header(tuple([name, value] for name, value in headers), b"x-tenant") == b"first"


@pytest.mark.parametrize("raw, code", [(b"{", "invalid_json"), (b"[1]", "invalid_json"), (b'{"messages": []}', "missing_model"),
                                       (b'{"model": "m", "stream": 1, "messages": [{"role": "user"}]}', "invalid_type")])
def test_parse_body_refuses_what_is_no_request(raw, code):
    with pytest.raises(comox.InvalidRequest) as exc:
        parse_body("chat/completions", raw)
    assert exc.value.code == code


def test_parse_body_refuses_every_field_that_would_pick_the_upstream():
    for field in FORBIDDEN_FIELDS:
        with pytest.raises(comox.InvalidRequest) as exc:
            parse_body("chat/completions", orjson.dumps({"model": "m", "messages": [{"role": "user"}], field: "x"}))
        assert (exc.value.param, exc.value.code) == (field, "forbidden_field")


def test_parse_body_names_the_first_bad_field_in_a_fixed_order():
    bad = {"max_tokens": 0, "n": 0, "temperature": 9, "top_p": -1}
    # Whatever order the body lists them in, the first of the checked order is named.
    for order in itertools.permutations(bad):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **{key: bad[key] for key in order}}
        with pytest.raises(comox.InvalidRequest) as exc:
            parse_body("chat/completions", orjson.dumps(body))
        assert exc.value.param == "max_tokens"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 2, "temperature": None, "n": 3,
            "max_tokens": 5}
    with pytest.raises(comox.InvalidRequest) as exc:
        parse_body("chat/completions", orjson.dumps(body))
    assert exc.value.param == "top_p"
    assert parse_body("chat/completions", orjson.dumps({**body, "top_p": 0.5}))["n"] == 3  # null is no value


def test_parse_body_names_the_message_that_is_not_an_object_with_a_role():
    for messages, where in (([{"role": "user"}, "hi"], "messages[1]"), ([{"role": "user"}, {"role": 5}], "messages[1]"),
                            ([{"content": "x"}, {"role": "user"}], "messages[0]"), ([[]], "messages[0]")):
        with pytest.raises(comox.InvalidRequest) as exc:
            parse_body("chat/completions", orjson.dumps({"model": "m", "messages": messages}))
        assert exc.value.param == where, messages
    assert parse_body("chat/completions", orjson.dumps({"model": "m", "messages": [{"role": "user"}] * 3}))
