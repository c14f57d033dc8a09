"""The access log: one line per API request, refused ones included, on the
logger ``comox.access`` through the fleet events' formatters; and ``comox
serve --access-log`` (docs/telemetry.md). No line of this module's runs —
access lines, fleet events, warnings — holds a key or prompt content
(:func:`no_secret_in_any_line`)."""

import hashlib
import json
import logging
import subprocess
import sys

import httpx
import pytest

import comox
from comox.events import JsonFormatter, TextFormatter
from comox.testing import Fault, free_port, stop_process, wait_for_http, wait_until
from tests.secrets_check import secret

KEY = secret("cmx-accesslog-test-key-7f3a9c")
PROMPT = secret("the-prompt-says-pineapple-4242", "prompt")
SECRETS = (KEY, PROMPT, "pineapple", secret("wrong-key-9d1e"))
# The prompt text is sent as a model name and a path too, which a 404 names back to its
# client; the access log must not show them (checked here).
pytestmark = pytest.mark.secrets_allowed("error body 404", "prompt", reason="a 404 names the path or model it was asked")
CHAT = {"model": "chat", "messages": [{"role": "user", "content": PROMPT}]}
FIELDS = {"event", "request_id", "key_id", "method", "endpoint", "model", "stream", "status", "route", "backend",
          "cache", "retries", "latency_ms", "ttft_ms", "overhead_ms", "prompt_tokens", "completion_tokens",
          "cached_tokens", "error"}


@pytest.fixture(autouse=True)
def no_secret_in_any_line(caplog):
    """Every test logs at DEBUG; no line of any Comox logger, written by either
    formatter, holds the key or the prompt."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)
               if r.name == "comox" or r.name.startswith("comox.")]
    for formatter in (TextFormatter(), JsonFormatter()):
        written = "\n".join(formatter.format(record) for record in records)
        assert [secret for secret in SECRETS if secret in written] == []


@pytest.fixture
def access():
    """The ``comox.access`` records, as a list; the logger on at INFO."""
    logger = logging.getLogger("comox.access")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def fields(records):
    return [record.comox_event for record in records]


def keyed(upstream, **more):
    return {"auth": "keys", "server": {"max_body_bytes": 4096},
            "models": [{"name": "chat", "policy": "round_robin",
                        "backends": [{"name": "a", "url": upstream.url}, {"name": "b", "url": upstream.url}]}],
            "sections": {"keys": [{"id": "team-a", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}, **more}


AUTH = {"authorization": f"Bearer {KEY}"}


def test_one_line_per_api_request_refused_or_answered(comox_serve, upstreams, access):
    up = upstreams("up", stream_chunks=4, chunk_delay=0.01)
    server = comox_serve(keyed(up))
    url = f"{server.url}/v1/chat/completions"
    answered = httpx.post(url, json=CHAT, headers=AUTH)
    with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=AUTH) as streamed:
        "".join(streamed.iter_text())
    up.faults.append(Fault(status=503))
    retried = httpx.post(url, json=CHAT, headers=AUTH)
    statuses = [
        httpx.post(url, json=CHAT).status_code,  # no key
        httpx.post(url, json=CHAT, headers={"authorization": "Bearer wrong-key-9d1e"}).status_code,
        httpx.post(url, json={**CHAT, "model": f"no-{PROMPT}"}, headers=AUTH).status_code,
        httpx.post(url, content=b"{" + PROMPT.encode(), headers=AUTH).status_code,  # broken JSON
        httpx.post(url, json={**CHAT, "temperature": PROMPT}, headers=AUTH).status_code,
        httpx.post(url, json={**CHAT, "pad": "x" * 5000}, headers=AUTH).status_code,  # too large
        httpx.get(url, headers=AUTH).status_code,
        httpx.post(f"{server.url}/v1/{PROMPT}", json=CHAT, headers=AUTH).status_code,
        httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code,
    ]
    assert statuses == [401, 401, 404, 400, 400, 413, 405, 404, 200]
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # not an API request: no line

    lines = fields(access)
    assert len(lines) == 12
    assert all(set(line) == FIELDS and line["event"] == "request" for line in lines)
    json_line, stream_line, retry_line = lines[:3]
    assert json_line == json_line | {
        "request_id": answered.headers["x-request-id"], "key_id": "team-a", "method": "POST",
        "endpoint": "chat/completions", "model": "chat", "stream": False, "status": 200, "route": "local",
        "backend": "a", "retries": 0, "prompt_tokens": 5, "completion_tokens": 3, "error": None}
    assert json_line["cache"] in ("miss", "skip")
    assert 0 < json_line["overhead_ms"] <= json_line["ttft_ms"] <= json_line["latency_ms"]
    assert json_line["overhead_ms"] == pytest.approx(float(answered.headers["x-comox-overhead-ms"]), abs=0.001)
    assert stream_line == stream_line | {"stream": True, "status": 200, "route": "local", "backend": "b",
                                         "completion_tokens": 4}
    assert stream_line["latency_ms"] - stream_line["ttft_ms"] >= 25  # three more chunks, 10 ms apart
    assert retry_line == retry_line | {"request_id": retried.headers["x-request-id"], "status": 200, "retries": 1}
    refused = lines[3:]
    assert [(line["status"], line["endpoint"], line["key_id"], line["error"]) for line in refused] == [
        (401, "chat/completions", None, "invalid_api_key"),
        (401, "chat/completions", None, "invalid_api_key"),
        (404, "chat/completions", "team-a", "model_not_found"),
        (400, "chat/completions", "team-a", refused[3]["error"]),
        (400, "chat/completions", "team-a", refused[4]["error"]),
        (413, "chat/completions", "team-a", refused[5]["error"]),
        (405, "chat/completions", None, "method_not_allowed"),  # decided before the key is read
        (404, None, None, refused[7]["error"]),
        (200, "models", "team-a", None),
    ]
    assert all(line["route"] is None and line["backend"] is None and line["ttft_ms"] is not None
               for line in refused[:-1])
    # What the message says: method, endpoint, status, time; no path.
    assert access[0].getMessage().startswith("POST chat/completions 200 in ")
    assert access[10].getMessage().startswith("POST unknown 404 in ")


def test_a_client_that_leaves_mid_stream_still_gets_its_line(comox_serve, upstreams, access):
    up = upstreams("up")
    server = comox_serve(keyed(up))
    up.faults.append(Fault(stall_after_chunks=1))
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH,
                          timeout=0.5) as response:
            for _ in response.iter_bytes():
                pass
    wait_until(lambda: len(access) == 1)
    line = fields(access)[0]
    assert line["status"] == 200 and line["stream"] is True and line["backend"] == "a"
    assert line["ttft_ms"] < 500 <= line["latency_ms"]


def test_off_unless_the_logger_is_on(comox_serve, upstreams, caplog):
    up = upstreams("up")
    server = comox_serve(keyed(up))
    logging.getLogger("comox.access").setLevel(logging.WARNING)
    try:
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    finally:
        logging.getLogger("comox.access").setLevel(logging.NOTSET)
    assert [r for r in caplog.records if r.name == "comox.access"] == []


def test_both_formats_write_every_field(comox_serve, upstreams, access):
    up = upstreams("up")
    server = comox_serve(keyed(up))
    httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH)
    record = access[0]
    as_json = json.loads(JsonFormatter().format(record))
    assert as_json["logger"] == "comox.access" and set(as_json) == FIELDS | {"time", "level", "logger", "message"}
    text = TextFormatter().format(record)
    assert " INFO comox.access: POST chat/completions 200 in " in text
    assert "event=request" in text and "key_id=team-a" in text and "route=local" in text


# -- comox serve --access-log ------------------------------------------------------------


def serve(tmp_path, upstream, *flags):
    config = tmp_path / "comox.toml"
    config.write_text(f'[[keys]]\nid = "team-a"\nkey_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
                      f'[[models]]\nname = "chat"\n[[models.backends]]\nname = "a"\nurl = "{upstream.url}"\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", proc=proc, detail=proc.stderr.read)
    try:
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                          headers={"authorization": "Bearer wrong-key-9d1e"}).status_code == 401
        assert httpx.post(f"{url}/v1/{PROMPT}", json=CHAT, headers=AUTH).status_code == 404
    finally:
        stop_process(proc)
    return proc.stderr.read()


def test_comox_serve_access_log_in_json(tmp_path, upstreams):
    log = serve(tmp_path, upstreams("up"), "--log-format", "json", "--access-log")
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "comox.access"]
    assert [(line["status"], line["key_id"], line["route"]) for line in access] == [
        (200, "team-a", "local"), (401, None, None), (404, None, None)]
    assert all(set(line) == FIELDS | {"time", "level", "logger", "message"} for line in access)
    assert "HTTP/1.1" not in log  # uvicorn's own access log is off
    assert [secret for secret in SECRETS if secret in log] == []


def test_comox_serve_without_access_log_writes_none(tmp_path, upstreams):
    log = serve(tmp_path, upstreams("up"), "--log-format", "text")
    assert "comox.access" not in log and "HTTP/1.1" not in log
    assert "comox.events" in log  # the fleet events still are
