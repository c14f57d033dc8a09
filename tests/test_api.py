"""End to end: the official OpenAI SDK → a real Comox server → stand-in upstreams."""

import time

import httpx
import openai
import orjson
import pytest

from comox.testing import Fault, free_port

CHAT = [{"role": "user", "content": "hi"}]


def group(name, *backends, **server):
    settings = {"models": [{"name": name, "backends": list(backends)}]}
    if server:
        settings["server"] = server
    return settings


def test_chat_completion(comox_gateway, comox_upstream, client_for):
    reply = client_for(comox_gateway).chat.completions.create(model="test-model", messages=CHAT)
    assert reply.choices[0].message.content == "hello from upstream"
    assert reply.usage.total_tokens == 8
    assert comox_upstream.requests[-1]["path"] == "/v1/chat/completions"


def test_chat_completion_stream(comox_gateway, client_for):
    stream = client_for(comox_gateway).chat.completions.create(model="test-model", messages=CHAT, stream=True)
    assert [chunk.choices[0].delta.content for chunk in stream] == ["tok0 ", "tok1 ", "tok2 "]


def test_completions_stream_and_not(comox_gateway, client_for):
    client = client_for(comox_gateway)
    assert client.completions.create(model="test-model", prompt="x").choices[0].text == "hello from upstream"
    assert "".join(c.choices[0].text for c in client.completions.create(model="test-model", prompt="x", stream=True)) == "tok0 tok1 tok2 "


def test_embeddings(comox_gateway, client_for):
    result = client_for(comox_gateway).embeddings.create(model="test-model", input=["a", "bbb"])
    assert [d.embedding for d in result.data] == [[0.1, 0.2, 1.0], [0.1, 0.2, 3.0]]


def test_models_lists_groups(comox_serve, comox_upstream, client_for):
    server = comox_serve({"models": [
        {"name": "chat", "backends": [{"url": comox_upstream.url}]},
        {"name": "embed", "backends": [{"name": "e", "url": comox_upstream.url}]},
    ]})
    client = client_for(server)
    assert [m.id for m in client.models.list()] == ["chat", "embed"]
    assert client.models.retrieve("embed").id == "embed"
    listed = {m.id: m.created for m in client.models.list()}
    assert client.models.retrieve("embed").created == listed["embed"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_body_and_response_pass_through_unchanged(comox_gateway, comox_upstream):
    raw = b'{ "messages" : [{"role":"user","content":"hi"}],   "model":"test-model", "x_custom": 1 }'
    comox_upstream.faults.append(Fault(headers={"x-upstream-extra": "kept", "keep-alive": "timeout=5"}))
    response = httpx.post(f"{comox_gateway.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert comox_upstream.requests[-1]["raw"] == raw
    direct = httpx.post(f"{comox_upstream.url}/v1/chat/completions", content=raw)
    assert response.content == direct.content
    assert response.headers["x-upstream-extra"] == "kept"
    assert "keep-alive" not in response.headers


def test_sse_headers_and_done(comox_gateway):
    body = {"model": "test-model", "messages": CHAT, "stream": True}
    with httpx.stream("POST", f"{comox_gateway.url}/v1/chat/completions", json=body) as response:
        text = response.read()
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert text.endswith(b"data: [DONE]\n\n")


def test_request_id_echoed_or_made(comox_gateway):
    url = f"{comox_gateway.url}/v1/chat/completions"
    body = {"model": "test-model", "messages": CHAT}
    assert httpx.post(url, json=body, headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = httpx.post(url, json=body).headers["x-request-id"]
    assert len(made) == 32
    error = httpx.post(url, json={"model": "missing", "messages": CHAT}, headers={"x-request-id": "err-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"


def test_client_credentials_and_hop_headers_never_reach_backend(comox_serve, comox_upstream, client_for, monkeypatch):
    monkeypatch.setenv("NODE_A_KEY", "sk-backend-key")
    server = comox_serve(group("m", {"url": comox_upstream.url, "api_key_env": "NODE_A_KEY"}))
    client = client_for(server).with_options(default_headers={"proxy-authorization": "Basic x", "te": "trailers", "cookie": "a=b"})
    client.chat.completions.create(model="m", messages=CHAT)
    seen = comox_upstream.requests[-1]["headers"]
    assert seen["authorization"] == "Bearer sk-backend-key"
    assert "sk-client-secret" not in str(seen)
    for header in ("proxy-authorization", "te", "cookie"):
        assert header not in seen


def test_upstream_model_name_rewritten(comox_serve, comox_upstream, client_for):
    server = comox_serve(group("public-name", {"url": comox_upstream.url + "/v1/", "model": "llama-3.1-8b"}))
    client_for(server).chat.completions.create(model="public-name", messages=CHAT)
    assert comox_upstream.requests[-1]["body"]["model"] == "llama-3.1-8b"


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key", "extra_headers"])
def test_redirecting_fields_rejected(comox_gateway, comox_upstream, field):
    response = httpx.post(f"{comox_gateway.url}/v1/chat/completions", json={"model": "test-model", "messages": CHAT, field: "http://evil"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert comox_upstream.requests == []


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"model": "test-model", "messages": [], "temperature": NaN}', 400, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, 400, "invalid_json"),
        (b'["a list"]', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_model"),
        (b'{"model": "test-model"}', 400, "invalid_messages"),
        (b'{"model": "test-model", "messages": ["x"]}', 400, "invalid_messages"),
        (b'{"model": "test-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000}', 400, "invalid_value"),
        (b'{"model": "test-model", "messages": [{"role": "user", "content": "x"}], "n": 10000}', 400, "invalid_value"),
        (b'{"model": "test-model", "messages": [{"role": "user", "content": "x"}], "temperature": 1e308}', 400, "invalid_value"),
        (b'{"model": "test-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "invalid_type"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
    ],
)
def test_bad_input_gets_openai_error(comox_gateway, comox_upstream, raw, status, code):
    response = httpx.post(f"{comox_gateway.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert comox_upstream.requests == []
    # the gateway stays healthy
    assert httpx.get(f"{comox_gateway.url}/healthz").status_code == 200


def test_body_over_limit_is_413(comox_serve, comox_upstream):
    server = comox_serve(group("m", {"url": comox_upstream.url}, max_body_bytes=1000))
    big = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
    response = httpx.post(f"{server.url}/v1/chat/completions", content=big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"

    def chunked():
        yield big[:500]
        yield big[500:]

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunked())
    assert response.status_code == 413


def test_wrong_method_and_unknown_path(comox_gateway):
    assert httpx.get(f"{comox_gateway.url}/v1/chat/completions").status_code == 405
    response = httpx.post(f"{comox_gateway.url}/v1/nothing-here", json={})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_all_backends_down_is_503_with_retry_after(comox_serve, client_for):
    server = comox_serve(group("m", {"url": f"http://127.0.0.1:{free_port()}"}, {"url": f"http://127.0.0.1:{free_port()}"}))
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "no_backend_available"
    with pytest.raises(openai.InternalServerError):
        client_for(server).chat.completions.create(model="m", messages=CHAT)


def test_failed_backend_retried_once_elsewhere(comox_serve, upstreams, client_for):
    a, b = upstreams("a"), upstreams("b")
    server = comox_serve(group("m", {"name": "a", "url": a.url}, {"name": "b", "url": b.url}, expose_backend_header=True))
    client = client_for(server)
    a.faults.extend([Fault(status=500), Fault(status=502)])
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CHAT)
        assert raw.parse().choices[0].message.content == "hello from b"
        assert raw.headers["x-comox-backend"] == "b"
    assert len(a.requests) == 2 and len(b.requests) == 2  # each request: a fails, b answers


def test_connection_refused_retried_elsewhere(comox_serve, comox_upstream, client_for):
    dead = f"http://127.0.0.1:{free_port()}"
    server = comox_serve(group("m", {"name": "dead", "url": dead}, {"name": "live", "url": comox_upstream.url}, expose_backend_header=True))
    client = client_for(server)
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=CHAT)
        assert raw.headers["x-comox-backend"] == "live"


def test_5xx_from_every_backend_passes_through_with_retry_after(comox_serve, upstreams):
    a = upstreams("a")
    server = comox_serve(group("m", {"url": a.url}))
    a.faults.append(Fault(status=503))
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "a injected 503"
    assert response.headers["retry-after"] == "1"


def test_failure_after_first_byte_ends_with_error_event(comox_gateway, comox_upstream, client_for):
    comox_upstream.faults.append(Fault(close_after_chunks=1))
    with httpx.stream("POST", f"{comox_gateway.url}/v1/chat/completions", json={"model": "test-model", "messages": CHAT, "stream": True}) as response:
        text = response.read()
    assert b"tok0" in text
    assert b"[DONE]" not in text
    events = [line for line in text.split(b"\n\n") if line.startswith(b"data: ")]
    assert orjson.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    # OpenAI's format, byte for byte: one nameless `data:` event ends the stream.
    assert text.endswith(b'\n\ndata: {"error":{"message":"the backend failed in the middle of the response",'
                         b'"type":"upstream_error","param":null,"code":"stream_interrupted"}}\n\n')
    assert b"event:" not in text and text.count(b'data: {"error"') == 1

    comox_upstream.faults.append(Fault(close_after_chunks=2))
    stream = client_for(comox_gateway).chat.completions.create(model="test-model", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_client_disconnect_cancels_upstream(comox_serve, upstreams):
    slow = upstreams("slow", stream_chunks=50, chunk_delay=0.2)
    server = comox_serve(group("m", {"url": slow.url}))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as response:
        first = next(response.iter_raw())
        assert b"tok0" in first
    deadline = time.monotonic() + 5
    while slow.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.disconnects == 1
    # the gateway keeps serving
    assert httpx.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200


def test_backend_header_only_when_enabled(comox_gateway, comox_serve, comox_upstream):
    body = {"model": "test-model", "messages": CHAT}
    assert "x-comox-backend" not in httpx.post(f"{comox_gateway.url}/v1/chat/completions", json=body).headers
    server = comox_serve(group("test-model", {"name": "node-a", "url": comox_upstream.url}, expose_backend_header=True))
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body).headers["x-comox-backend"] == "node-a"


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "evil.example/path?x=1"},
        {"authorization": "Bearer " + "A" * 8000},
        {"authorization": "Basic \u00e9\u00e8"},
        {"authorization": "Bearer sk-one, Bearer sk-two"},
    ],
)
def test_odd_headers_are_harmless(comox_gateway, comox_upstream, headers):
    raw_headers = [(k.encode(), v.encode("utf-8")) for k, v in headers.items()]
    response = httpx.post(f"{comox_gateway.url}/v1/chat/completions", json={"model": "test-model", "messages": CHAT}, headers=raw_headers)
    assert response.status_code == 200
    seen = comox_upstream.requests[-1]["headers"]
    assert "evil" not in seen["host"] and "authorization" not in seen


def test_unknown_path_outside_api(comox_gateway):
    response = httpx.get(f"{comox_gateway.url}/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert len(response.headers["x-request-id"]) == 32
