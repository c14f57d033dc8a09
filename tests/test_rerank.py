"""POST /v1/rerank (the Cohere/Jina shape llama.cpp's server, vLLM and TEI
serve), routed only to backends that declare it."""

import httpx
import pytest

RERANK = {"model": "m", "query": "capital of france", "documents": ["Paris is the capital of France", "bananas", {"text": "France"}]}


def serve(comox_serve, *backends):
    return comox_serve({"server": {"expose_backend_header": True}, "models": [{"name": "m", "backends": list(backends)}]})


def test_rerank_goes_only_to_backends_that_declare_it(comox_serve, upstreams):
    chat, ranker = upstreams("chat"), upstreams("ranker")
    server = serve(comox_serve, {"name": "chat", "url": chat.url},
                   {"name": "ranker", "url": ranker.url, "endpoints": ["rerank", "chat/completions"]})
    for _ in range(4):
        reply = httpx.post(f"{server.url}/v1/rerank", json={**RERANK, "top_n": 2})
        assert reply.status_code == 200 and reply.headers["x-comox-backend"] == "ranker"
        body = reply.json()
        assert [r["index"] for r in body["results"]] == [0, 2] and body["results"][0]["relevance_score"] == 3.0
    assert ranker.requests[-1]["path"] == "/v1/rerank" and ranker.requests[-1]["body"]["top_n"] == 2
    assert not chat.requests
    chats = {httpx.post(f"{server.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
             .headers["x-comox-backend"] for _ in range(4)}
    assert chats == {"chat", "ranker"}  # the ranker also chats, as it said


def test_a_group_without_a_reranker_says_so(comox_serve, upstreams):
    server = serve(comox_serve, {"url": upstreams("chat").url})
    reply = httpx.post(f"{server.url}/v1/rerank", json=RERANK)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "unsupported_endpoint"


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "documents": ["a"]}, "query"),
    ({"model": "m", "query": "q", "documents": []}, "documents"),
    ({"model": "m", "query": "q", "documents": ["a", 3]}, "documents[1]"),
    ({"model": "m", "query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
])
def test_bad_rerank_bodies_get_a_clear_400(comox_serve, upstreams, body, param):
    server = serve(comox_serve, {"url": upstreams("r").url, "endpoints": ["rerank"]})
    reply = httpx.post(f"{server.url}/v1/rerank", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
