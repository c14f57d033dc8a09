"""Inbound APIs (comox.InboundAPI): another API's request translated to the
internal one and answered through the same stages, errors in its own format,
answers without a backend, and native pass-through byte for byte."""

import httpx
import orjson

import comox


class EchoAPI:
    """A toy API: POST /v1/echo {"model", "say"} answered as {"echoed": text}."""

    name = "echo"

    def match(self, path, method):
        return {"/v1/echo": "echo", "/v1/echo/info": "info"}.get(path)

    async def serve(self, endpoint, request):
        if endpoint == "info":
            return comox.BackendResponse(200, body=b'{"api": "echo", "caller": "%s"}' % (request.principal.key_id or "-").encode())
        return None

    def parse(self, endpoint, request, raw):
        body = orjson.loads(raw)
        if not isinstance(body.get("say"), str):
            raise comox.InvalidRequest("'say' must be a string", param="say")
        return "chat/completions", {"model": body["model"], "messages": [{"role": "user", "content": body["say"]}]}

    def translate_response(self, endpoint, request, response):
        answer = orjson.loads(response.body)
        return comox.BackendResponse(response.status, [(b"content-type", b"application/json")],
                                     body=orjson.dumps({"echoed": answer["choices"][0]["message"]["content"]}))

    def render_error(self, exc):
        return exc.status, [(b"content-type", b"application/json")], orjson.dumps({"echo_error": exc.message})

    def render_stream_error(self, request, exc):
        return b"event: echo_error\ndata: " + orjson.dumps({"echo_error": exc.message}) + b"\n\n"


class Plugin:
    @comox.hookimpl
    def comox_inbound_apis(self, gateway):
        return [EchoAPI()]


class Key:
    @comox.hookimpl
    def comox_authenticate(self, request):
        return comox.Principal(key_id="k1") if request.header(b"x-api-key") == b"good" else None


def serve(comox_serve, upstream, **backend):
    return comox_serve({"auth": "keys", "models": [{"name": "m", "aliases": ["alias"], "backends": [{"url": upstream.url, **backend}]}]},
                       plugins=[Plugin(), Key()])


def test_translated_through_the_same_stages(comox_serve, upstreams):
    upstream = upstreams("local")
    server = serve(comox_serve, upstream)
    reply = httpx.post(f"{server.url}/v1/echo", json={"model": "alias", "say": "hi"}, headers={"x-api-key": "good"})
    assert reply.status_code == 200 and reply.json() == {"echoed": "hello from local"}
    assert reply.headers["x-comox-route"] == "local"
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_errors_come_in_the_apis_own_format(comox_serve, upstreams):
    server = serve(comox_serve, upstreams("local"))
    unauthenticated = httpx.post(f"{server.url}/v1/echo", json={"model": "m", "say": "hi"})
    assert unauthenticated.status_code == 401 and "echo_error" in unauthenticated.json()
    bad = httpx.post(f"{server.url}/v1/echo", json={"model": "m", "say": 3}, headers={"x-api-key": "good"})
    assert bad.status_code == 400 and bad.json() == {"echo_error": "'say' must be a string"}
    unknown = httpx.post(f"{server.url}/v1/echo", json={"model": "nope", "say": "x"}, headers={"x-api-key": "good"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["echo_error"]


def test_an_api_may_answer_without_a_backend_after_authentication(comox_serve, upstreams):
    upstream = upstreams("local")
    server = serve(comox_serve, upstream)
    assert httpx.get(f"{server.url}/v1/echo/info").status_code == 401
    assert httpx.get(f"{server.url}/v1/echo/info", headers={"x-api-key": "good"}).json() == {"api": "echo", "caller": "k1"}
    assert upstream.requests == []


def test_a_native_backend_gets_the_clients_bytes_and_answers_untranslated(comox_serve, upstreams):
    upstream = upstreams("native")
    server = serve(comox_serve, upstream, native_apis=["echo"])
    raw = b'{"model": "m",   "say": "hi"}'  # odd spacing: byte for byte, not re-serialised
    reply = httpx.post(f"{server.url}/v1/echo", content=raw, headers={"x-api-key": "good", "content-type": "application/json"})
    assert upstream.requests[-1]["path"] == "/v1/echo" and upstream.requests[-1]["raw"] == raw
    # The stand-in has no /v1/echo: its own 404 body comes back as it was, not translated.
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "not found"


class DeferredEchoAPI(EchoAPI):
    """EchoAPI returning a comox.DeferredBody, counting the translations made."""

    def __init__(self):
        self.translated = 0

    def parse(self, endpoint, request, raw):
        body = orjson.loads(raw)

        def translate():
            self.translated += 1
            return {"model": body["model"], "messages": [{"role": "user", "content": body["say"]}]}

        return "chat/completions", comox.DeferredBody(body["model"], False, body, translate)


def test_a_deferred_body_is_made_once_on_first_read():
    made = []
    request = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/echo", headers=[])
    request.defer_body(comox.DeferredBody("m", True, {"model": "m", "say": "hi"}, lambda: made.append(1) or {"model": "m"}))
    assert (request.model, request.stream, request.inbound_json, made) == ("m", True, {"model": "m", "say": "hi"}, [])
    assert not request.body_made() and made == []  # asking does not make it
    assert request.raw == b'{"model":"m"}' and request.json == {"model": "m"} and made == [1]
    assert type(request) is comox.GatewayRequest  # a plain request again, its body in its slots
    assert request.body_made()
    assert comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/x", headers=[]).body_made()
    other = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/echo", headers=[])
    other.defer_body(comox.DeferredBody("m", False, {}, lambda: {"model": "m", "n": 1}))
    other.set_json({"model": "m", "n": 2})  # a plugin replacing a body not made yet
    assert other.json == {"model": "m", "n": 2} and other.raw == b'{"model":"m","n":2}'


def test_a_request_passed_through_natively_is_never_translated(comox_serve, upstreams):
    """Keys with limits and the cache judge it from request.inbound_json; only a
    stage that needs the OpenAI-shaped body (a chat-only backend, a cache key) makes it."""
    api = DeferredEchoAPI()

    class Plugin:
        @comox.hookimpl
        def comox_inbound_apis(self, gateway):
            return [api]

    class LimitedKey:
        @comox.hookimpl
        def comox_authenticate(self, request):
            return comox.Principal(key_id="k1", limits={"rpm": 1000, "tpm": 100_000})

    native, chat = upstreams("native"), upstreams("chat")
    server = comox_serve({"auth": "keys", "models": [
        {"name": "native", "backends": [{"url": native.url, "native_apis": ["echo"]}]},
        {"name": "chat", "backends": [{"url": chat.url}]}]}, plugins=[Plugin(), LimitedKey()])
    for temperature in (0.5, 1):
        reply = httpx.post(f"{server.url}/v1/echo", json={"model": "native", "say": "hi " * 40, "temperature": temperature})
        assert native.requests[-1]["path"] == "/v1/echo" and reply.headers["x-comox-cache"] == "skip"
        assert int(reply.headers["x-ratelimit-remaining-tokens"]) < 100_000  # its estimate was taken
    assert api.translated == 0
    reply = httpx.post(f"{server.url}/v1/echo", json={"model": "chat", "say": "hi"})
    assert reply.json() == {"echoed": "hello from chat"} and api.translated == 1
    assert chat.requests[-1]["body"]["messages"] == [{"role": "user", "content": "hi"}]
    httpx.post(f"{server.url}/v1/echo", json={"model": "native", "say": "hi", "temperature": 0})
    assert api.translated == 2  # deterministic: the cache's key is made from the translation


class HeaderAPI:
    """Claims GET /v1/models only from clients that send x-echo-version
    (match_request), and answers POST /v1/echo/count from the body in serve."""

    name = "header"

    def match(self, path, method):
        return "count" if path == "/v1/echo/count" else None

    def match_request(self, request):
        if request.path == "/v1/models" and request.header(b"x-echo-version") is not None:
            return "models"
        return self.match(request.path, request.method)

    async def serve(self, endpoint, request):
        if endpoint == "models":
            return comox.BackendResponse(200, body=b'{"echo_models": true}')
        return comox.BackendResponse(200, body=b'{"bytes": %d}' % len(request.inbound_raw))

    def render_error(self, exc):
        return exc.status, [(b"content-type", b"application/json")], orjson.dumps({"header_error": exc.message})

    def render_stream_error(self, request, exc):
        return b"event: header_error\ndata: " + orjson.dumps({"header_error": exc.message}) + b"\n\n"


def test_an_api_may_claim_a_shared_path_by_the_requests_headers_and_answer_from_the_body(comox_serve, upstreams):
    class Plugin:
        @comox.hookimpl
        def comox_inbound_apis(self, gateway):
            return [HeaderAPI()]

    server = comox_serve({"models": [{"name": "m", "backends": [{"url": upstreams("local").url}]}]}, plugins=[Plugin()])
    assert httpx.get(f"{server.url}/v1/models", headers={"x-echo-version": "1"}).json() == {"echo_models": True}
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "m"  # everyone else: the core's list
    assert httpx.post(f"{server.url}/v1/echo/count", content=b"12345").json() == {"bytes": 5}


def test_an_error_in_a_started_stream_is_an_event_in_the_apis_format():
    """Responder.error once a stream has started: the request's API renders the
    event (render_stream_error); an OpenAI request gets OpenAI's ``data:`` line."""
    import asyncio
    from types import SimpleNamespace

    from comox.asgi_io import Responder

    def ended(request):
        sent = []

        async def send(message):
            sent.append(message)

        responder = Responder(send, request)
        responder.started = responder.streaming = True
        asyncio.run(responder.error(comox.UpstreamError("it broke"), b"rid"))
        assert responder.finished and len(sent) == 1
        return sent[0]["body"]

    assert ended(SimpleNamespace(api=EchoAPI())) == b'\n\nevent: echo_error\ndata: {"echo_error":"it broke"}\n\n'
    assert ended(SimpleNamespace(api=None)) == (b'\n\ndata: {"error":{"message":"it broke","type":"upstream_error",'
                                                b'"param":null,"code":"bad_gateway"}}\n\n')
    assert ended(None) == ended(SimpleNamespace(api=None))
