"""comox.request: what a plugin reads of a request."""

import comox


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
