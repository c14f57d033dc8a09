"""The bad-input list of the design (shared/DESIGN.md, "Bad input"), each case
against a real gateway under uvicorn on 127.0.0.1, plus what issue 16 adds:
nothing built from the ``Host`` header (redirects included), path tricks
that never reach the admin API without its key, and request-smuggling
shapes refused — with raw sockets, so no client tidies the bytes first.

tests/test_api.py has the first cases of the list on chat completions; these
extend them to every endpoint, the Responses API and the admin API.
docs/reliability.md ("Hostile input") says what each test tries and found.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

import comox
from comox.request import FORBIDDEN_FIELDS
from comox.server_protocol import SERVER_OPTIONS
from comox.testing import ServerThread, StandInUpstream
from tests.secrets_check import secret

KEY = secret("sk-hostile-client-key")
ADMIN_KEY = secret("sk-hostile-admin-key", "admin key")
ADMIN_ENV = "COMOX_HOSTILE_ADMIN_KEY"
LIMIT = 64 * 1024
CHAT = [{"role": "user", "content": "hi"}]
# A valid body per endpoint: each case below breaks one thing in it.
VALID = {
    "/v1/chat/completions": {"model": "m", "messages": CHAT},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/embeddings": {"model": "m", "input": "hi"},
    "/v1/rerank": {"model": "m", "query": "q", "documents": ["a", "b"]},
    "/v1/responses": {"model": "m", "input": "hi"},
}
AUTH = {"authorization": f"Bearer {KEY}"}


def hostile_settings(upstream_url: str) -> comox.Settings:
    return comox.Settings(
        auth="keys", sections={"keys": [{"id": "client", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
        server={"max_body_bytes": LIMIT},
        models=[{"name": "m", "backends": [{"name": "node", "url": upstream_url,
                                             "endpoints": ["chat/completions", "completions", "embeddings", "rerank"]}]}],
        plugins={"admin": {"key_env": ADMIN_ENV}},
    )


class Live:
    def __init__(self, upstream: StandInUpstream, server: ServerThread, app: comox.ComoxApp):
        self.upstream, self.server, self.app = upstream, server, app
        self.url, self.port = server.url, server.port

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
             ) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()  # as a client sends it (2**64 too)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json", **AUTH,
                                                                     **(headers or {})}, timeout=30)

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/healthz").status_code == 200 and self.post(
            "/v1/chat/completions", VALID["/v1/chat/completions"]).status_code == 200


def _serve(http: str = "auto") -> Iterator[Live]:
    os.environ[ADMIN_ENV] = ADMIN_KEY
    upstream = StandInUpstream("hostile").start()
    try:
        app = comox.create_app(hostile_settings(upstream.url))
        server = ServerThread(app, **(SERVER_OPTIONS if http == "comox" else {"http": http})).start()
        try:
            yield Live(upstream, server, app)
        finally:
            server.stop()
    finally:
        upstream.stop()
        os.environ.pop(ADMIN_ENV, None)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The gateway under uvicorn's default HTTP parser (httptools)."""
    yield from _serve()


@pytest.fixture(scope="module")
def live_h11() -> Iterator[Live]:
    """The same under uvicorn's pure-Python parser (h11, ``--http h11``)."""
    yield from _serve("h11")


@pytest.fixture(scope="module")
def live_comox() -> Iterator[Live]:
    """The same under ``comox serve``'s own protocol (its parser is httptools too)."""
    yield from _serve("comox")


def assert_openai_error(response: httpx.Response, status: int | tuple[int, ...], param: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# -- broken JSON, NaN/Infinity, nesting ---------------------------------------------

BROKEN = [
    b"", b"{", b'{"model": "m"', b'{"model": "m",}', b"{'model': 'm'}", b'{"model": "m"} {"model": "m"}',
    b"\xff\xfe{}", b'{"model": "m\xff"}', b"null", b"42", b'"m"', b"[]", b"[{}]", b"\x00",
    b'{"model": "m", "temperature": NaN}', b'{"model": "m", "temperature": Infinity}',
    b'{"model": "m", "temperature": -Infinity}', b'{"model": "m", "temperature": 1e400}',
    b'{"model": "m", "x": ' + b"[" * 1025 + b"]" * 1025 + b"}",
    b'{"model": "m", "x": ' + b'{"a":' * 1025 + b"1" + b"}" * 1025 + b"}",
]


@pytest.mark.parametrize("path", list(VALID))
def test_broken_json_nan_infinity_and_deep_nesting_are_400_on_every_endpoint(live, path):
    before = len(live.upstream.requests)
    for raw in BROKEN:
        error = assert_openai_error(live.post(path, raw=raw), 400)
        assert error["type"] == "invalid_request_error"
    assert len(live.upstream.requests) == before
    assert live.healthy()


def test_nesting_json_allows_goes_through_and_the_gateway_stays_healthy(live):
    deep = orjson.loads(b"[" * 200 + b"]" * 200)
    response = live.post("/v1/chat/completions", {**VALID["/v1/chat/completions"], "metadata_x": deep})
    assert response.status_code == 200
    assert live.healthy()


# -- huge bodies ---------------------------------------------------------------------


def raw_request(port: int, data: bytes, *, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection; what came back, and whether the
    server closed the connection afterwards (rather than waiting for more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        closed = False
        try:
            while True:
                piece = conn.recv(65536)
                if not piece:
                    closed = True
                    break
                received += piece
                if _complete(received):
                    conn.settimeout(0.5)  # a complete answer: is the connection closed after it?
        except (socket.timeout, ConnectionResetError):
            pass
    return received, closed


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("path", list(VALID))
def test_huge_bodies_are_413_before_they_are_read(live, path):
    big = orjson.dumps({**VALID[path], "user": "x" * LIMIT})
    assert_openai_error(live.post(path, raw=big), 413)
    # A declared length over the limit is refused at once, without waiting for the body.
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {10**15}\r\n\r\n").encode()
    answer, _ = raw_request(live.port, head + b'{"model"', wait=5)
    assert status_of(answer) == 413 and orjson.loads(body_of(answer))["error"]["code"] == "request_too_large"
    # Just under the limit is served.
    fits = orjson.dumps({**VALID[path], "user": "x" * (LIMIT - 200)})
    assert len(fits) <= LIMIT and live.post(path, raw=fits).status_code == 200
    assert live.healthy()


# -- absurd numbers --------------------------------------------------------------------

ABSURD = [("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**7), ("max_tokens", 2**64), ("max_tokens", 1.5),
          ("max_tokens", "100"), ("max_tokens", True), ("max_completion_tokens", 10**9), ("n", 0), ("n", 129),
          ("n", 10**6), ("n", 2.0), ("temperature", -0.01), ("temperature", 2.01), ("temperature", 1e308),
          ("temperature", "1"), ("temperature", [1]), ("top_p", 1.01), ("top_p", -1e-9), ("stream", "true"),
          ("stream", 1)]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"])
def test_absurd_max_tokens_n_and_temperature_are_400_naming_the_field(live, path):
    before = len(live.upstream.requests)
    for key, value in ABSURD:
        assert_openai_error(live.post(path, {**VALID[path], key: value}), 400, param=key)
    assert len(live.upstream.requests) == before


def test_absurd_numbers_on_the_responses_api(live):
    for key, value in [("max_output_tokens", 0), ("max_output_tokens", 10**7), ("temperature", 3), ("top_p", 2),
                       ("temperature", "hot"), ("stream", "yes")]:
        assert_openai_error(live.post("/v1/responses", {**VALID["/v1/responses"], key: value}), 400, param=key)


# -- unknown models ------------------------------------------------------------------------

UNKNOWN = ["nope", "M", "m ", " m", "m\u200b", "x" * 10_000, "../m", "m/../m", "*", "m*", "%6d", "m\x00"]


@pytest.mark.parametrize("path", list(VALID))
def test_unknown_models_are_404_and_odd_ones_400(live, path):
    before = len(live.upstream.requests)
    for model in UNKNOWN:
        error = assert_openai_error(live.post(path, {**VALID[path], "model": model}), 404, param="model")
        assert error["code"] == "model_not_found"
    for model in ["", None, 7, ["m"], {"name": "m"}]:
        assert_openai_error(live.post(path, {**VALID[path], "model": model}), 400, param="model")
    assert len(live.upstream.requests) == before
    for model in UNKNOWN[:4]:
        assert_openai_error(httpx.get(f"{live.url}/v1/models/{model}", headers=AUTH), 404)


# -- fields that would redirect the upstream ------------------------------------------------


@pytest.mark.parametrize("path", list(VALID))
@pytest.mark.parametrize("field", FORBIDDEN_FIELDS)
def test_fields_that_redirect_the_upstream_are_refused_everywhere(live, path, field):
    before = len(live.upstream.requests)
    for value in ("http://evil.example/v1", {"authorization": "Bearer stolen"}, None):
        body = {**VALID[path], field: value}
        assert_openai_error(live.post(path, body), 400, param=field)
    assert len(live.upstream.requests) == before


# -- odd Authorization values ----------------------------------------------------------------

ODD_AUTHORIZATION: list[list[tuple[bytes, bytes]]] = [
    [], [(b"authorization", b"")], [(b"authorization", b"Bearer")], [(b"authorization", b"Bearer ")],
    [(b"authorization", b"Basic " + KEY.encode())], [(b"authorization", KEY.encode())],
    [(b"authorization", f"Bearer {KEY}x".encode())], [(b"authorization", f"Bearer {KEY[:-1]}".encode())],
    [(b"authorization", b"Bearer \xff\xfe\xfd")], [(b"authorization", b"Bearer " + b"k" * 16_000)],
    [(b"authorization", f"Bearer {KEY}, Bearer other".encode())], [(b"authorization", f"Bearer {KEY} x".encode())],
    [(b"authorization", f"Bearer {ADMIN_KEY}".encode())],
    [(b"authorization", f"Bearer {KEY}".encode()), (b"authorization", b"Bearer other")],
    [(b"authorization", b"Bearer other"), (b"authorization", f"Bearer {KEY}".encode())],
    [(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", b"other")],
    [(b"x-api-key", b"")], [(b"x-api-key", f"{KEY}\x01".encode())],
]


SERVER_REFUSED = b"Invalid HTTP request received."


def _get(port: int, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: 127.0.0.1", b"content-length: 0", b"connection: close"]
    lines += [name + b": " + value for name, value in headers]
    answer, _ = raw_request(port, b"\r\n".join(lines) + b"\r\n\r\n")
    return answer


@pytest.mark.parametrize("index", range(len(ODD_AUTHORIZATION)))
def test_odd_authorization_values_are_401_never_5xx(live, index):
    headers = ODD_AUTHORIZATION[index]
    admin_key = headers == [(b"authorization", f"Bearer {ADMIN_KEY}".encode())]  # the admin key is no API key
    for path in ("/v1/models",) if admin_key else ("/v1/models", "/admin/backends"):
        answer = _get(live.port, path, headers)
        if body_of(answer) == SERVER_REFUSED:
            assert status_of(answer) == 400  # a control byte in a header: uvicorn refuses it before Comox
            continue
        assert status_of(answer) == 401, answer[:300]
        error = orjson.loads(body_of(answer))["error"]
        assert error["type"] == "authentication_error"
        assert KEY.encode() not in answer and ADMIN_KEY.encode() not in answer
    assert live.healthy()


def test_the_right_keys_in_their_accepted_forms(live):
    for headers in ([(b"authorization", f"Bearer {KEY}".encode())], [(b"authorization", f"bearer  {KEY} ".encode())],
                    [(b"x-api-key", KEY.encode())], [(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", KEY.encode())]):
        assert status_of(_get(live.port, "/v1/models", headers)) == 200
    assert status_of(_get(live.port, "/admin/backends", [(b"authorization", f"Bearer {ADMIN_KEY}".encode())])) == 200


# -- the Host header -----------------------------------------------------------------------------

EVIL_HOSTS = [b"evil.example", b"evil.example/x?y=1", b"evil.example:443/admin?", b"evil.example\\@x", b"/evil", b"?evil"]


@pytest.mark.parametrize("path", ["/admin/backends/", "/admin/backends", "/admin/spend/", "/admin/backends/node/drain/",
                                  "/v1/models/", "/v1/chat/completions/", "/nothing/", "/openapi.json", "/healthz/",
                                  "/metrics/", "/dashboard/", "/dashboard", "/dashboard/logout"])
def test_no_response_is_built_from_the_host_header(live, path):
    for host in EVIL_HOSTS:
        for method in ("GET", "POST"):
            lines = [f"{method} {path} HTTP/1.1".encode(), b"host: " + host, b"content-length: 0", b"connection: close"]
            answer, _ = raw_request(live.port, b"\r\n".join(lines) + b"\r\n\r\n")
            assert status_of(answer) and status_of(answer) < 500, answer[:300]
            assert b"evil" not in answer, answer[:500]
            # The only redirects are the fleet page's, to a path of its own (never a URL with a host).
            locations = [line.split(b":", 1)[1].strip() for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")
                         if line.lower().startswith(b"location:")]
            assert (300 <= status_of(answer) < 400) == bool(locations)
            assert all(where.startswith(b"/dashboard") for where in locations), locations


def test_a_trailing_slash_on_an_admin_path_is_404_not_a_redirect(live):
    response = httpx.get(f"{live.url}/admin/backends/", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert_openai_error(response, 404)
    assert "location" not in response.headers


def test_plugin_routes_answer_404_and_405_in_openai_format(live):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    error = assert_openai_error(httpx.get(f"{live.url}/admin/backends/node/drain", headers=admin), 405)
    assert error["code"] == "method_not_allowed"
    assert httpx.get(f"{live.url}/admin/backends/node/drain", headers=admin).headers["allow"] == "POST"
    assert_openai_error(httpx.get(f"{live.url}/admin/nothing", headers=admin), 404)


# -- path tricks never reach the admin API without the admin key --------------------------------

PATH_TRICKS = [
    "//admin/backends", "/admin//backends", "/admin/./backends", "/x/../admin/backends", "/admin/backends/.",
    "/%61dmin/backends", "/admin/%62ackends", "/admin%2Fbackends", "/%2Fadmin/backends", "/ADMIN/backends",
    "/Admin/Backends", "/admin/backends;x", "/admin/backends%00", "/admin/backends%20", "/admin/backends?x=1",
    "/v1/../admin/backends", "/v1/%2e%2e/admin/backends", "/./admin/backends", "/admin/backends/%2e",
    "http://127.0.0.1/admin/backends", "/admin/backends#x", "/admin\\backends",
]
DRAIN_TRICKS = ["/admin/backends/node/drain", "/admin/backends/node%2Fdrain", "//admin/backends/node/drain",
                "/admin/backends/./node/drain", "/admin/backends/node/drain/", "/ADMIN/backends/node/drain",
                "/admin/backends/%6eode/drain", "/admin/backends/node/%64rain", "/admin/backends/node/drain?x"]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_path_tricks_never_reach_the_admin_api_without_the_key(request, http):
    live = request.getfixturevalue("live" if http == "httptools" else "live_h11")
    for path in PATH_TRICKS:
        for headers in ([], [(b"authorization", f"Bearer {KEY}".encode())]):
            answer = _get(live.port, path, headers)
            assert status_of(answer) in (400, 401, 404), (path, answer[:300])
            assert b'"groups"' not in answer and b"node" not in body_of(answer), (path, answer[:300])
    for path in DRAIN_TRICKS:
        answer = _get(live.port, path, [], method="POST")
        assert status_of(answer) in (400, 401, 404, 405), (path, answer[:300])
    assert all(state.state != "draining" for state in live.app.gateway.backends())
    # With the key, the real path answers (the tricks above were refused for the tricks, not by accident).
    answer = _get(live.port, "/admin/backends", [(b"authorization", f"Bearer {ADMIN_KEY}".encode())])
    assert status_of(answer) == 200 and b'"groups"' in answer


# -- request smuggling ------------------------------------------------------------------------------


def smuggle(key: str) -> bytes:
    """A request the front end would not see: if the gateway read it, the stand-in would get a chat."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "smuggled"}]})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


SMUGGLING = {
    "content-length and transfer-encoding": lambda s: (
        b"POST /v1/models HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" + s),
    "transfer-encoding and content-length": lambda s: (
        b"POST /v1/models HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n" + s),
    "two different content-lengths": lambda s: (
        b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: " + str(len(s)).encode()
        + b"\r\n\r\n" + s),
    "transfer-encoding obfuscated": lambda s: (
        b"POST /v1/models HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n" + s),
    "transfer-encoding twice": lambda s: (
        b"POST /v1/models HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n0\r\n\r\n" + s),
}


LIVE = {"httptools": "live", "h11": "live_h11", "comox": "live_comox"}


@pytest.mark.parametrize("http", list(LIVE))
@pytest.mark.parametrize("shape", list(SMUGGLING))
def test_request_smuggling_shapes_are_refused_and_the_connection_closed(request, http, shape):
    live = request.getfixturevalue(LIVE[http])
    before = len(live.upstream.requests)
    answer, closed = raw_request(live.port, SMUGGLING[shape](smuggle(KEY)))
    assert status_of(answer) == 400, answer[:300]
    assert closed, "the connection stays open after an ambiguous request"
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer: the smuggled request was never read
    assert len(live.upstream.requests) == before
    assert live.healthy()


@pytest.mark.parametrize("http", list(LIVE))
def test_two_equal_content_lengths(request, http):
    """Refused by httptools (comox serve's parser too); h11 folds equal values
    into one before the app sees them (RFC 9110 allows it: the length is not
    ambiguous), so it is served."""
    live = request.getfixturevalue(LIVE[http])
    body = orjson.dumps(VALID["/v1/chat/completions"])
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    answer, _ = raw_request(live.port, head + body)
    assert status_of(answer) == (200 if http == "h11" else 400), answer[:300]


def test_the_middleware_and_the_app_refuse_ambiguous_lengths_themselves(comox_upstream):
    """What uvicorn's h11 parser passes on, Comox refuses (ASGI, whatever the server)."""
    settings = comox.Settings(auth="none", models=[{"name": "m", "backends": [{"url": comox_upstream.url}]}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def host_app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("passed to the host app")

    for app in (comox.create_app(settings), comox.ComoxMiddleware(host_app, settings)):
        for headers in ([(b"content-length", b"2"), (b"transfer-encoding", b"chunked")],
                        [(b"content-length", b"2"), (b"content-length", b"2")]):
            sent.clear()
            scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
                     "headers": headers, "query_string": b""}
            asyncio.run(app(scope, receive, send))
            assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"]
            assert orjson.loads(sent[1]["body"])["error"]["code"] == "invalid_framing"
