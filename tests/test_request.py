"""comox.request: what a plugin reads of a request."""

import os
import random

import pytest

import comox
from comox.request import request_id_from


def test_header_is_the_first_value_of_that_name_or_none():
    request = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[
        (b"content-type", b"application/json"), (b"x-tenant", b"first"), (b"x-tenant", b"second"), (b"x-empty", b""),
    ])
    assert request.header(b"x-tenant") == b"first"
    assert request.header(b"x-empty") == b""  # present but empty: not None
    assert request.header(b"content-type") == b"application/json"
    assert request.header(b"x-missing") is None
    assert request.header(b"X-Tenant") is None  # names are matched as the server gives them: lower-case
    request.headers.append((b"x-late", b"added"))  # a plugin's change to the list is seen
    assert request.header(b"x-late") == b"added"
    assert comox.GatewayRequest(id="r", endpoint="", path="/", headers=[]).header(b"x-tenant") is None


def test_request_id_from_keeps_a_sane_client_id_and_makes_a_fresh_one_otherwise():
    assert request_id_from(b"trace-1.2:3_x") == "trace-1.2:3_x"
    fresh = {request_id_from(header) for header in (None, b"", b"bad id", b"\xff", b"x" * 129) for _ in range(200)}
    assert len(fresh) == 1000
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in fresh)


def test_request_ids_do_not_follow_the_shared_random_generators_seed():
    # A library seeding Python's shared generator must not make ids repeat.
    random.seed(1234)
    first = request_id_from(None)
    random.seed(1234)
    assert request_id_from(None) != first


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_workers_make_different_request_ids():
    # Ids come from the process's random generator: a forked worker must not
    # repeat its parent's sequence.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out at once
        os.write(write, request_id_from(None).encode())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 32 and child != request_id_from(None)


def test_response_header_is_the_first_value_a_stage_added_or_none():
    request = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[])
    assert request.response_header(b"x-comox-cache") is None
    request.response_headers += [(b"x-ratelimit-limit-requests", b"5"), (b"x-comox-cache", b"skip"),
                                 (b"x-comox-cache", b"hit")]
    assert request.response_header(b"x-comox-cache") == b"skip"
    assert request.response_header(b"x-ratelimit-limit-tokens") is None
