"""The secrets check (tests/secrets_check.py, docs/reliability.md "Secrets")
can fail: a run of its own (pytester, a fresh process with the check loaded)
where a key reaches a log line, an error body from a real gateway, a span, a
``comox serve``-style stderr and a /metrics text, each flagged with its kind,
its test and where it appeared; a clean test and an explicitly allowed one
pass; a secret seen only after the test that logged it fails the session."""

from pathlib import Path

import pytest

from tests import secrets_check
from tests.secrets_check import Capture, Registry

ROOT = Path(__file__).parent.parent

INNER = '''
import logging
import subprocess
import sys

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import comox
from tests.secrets_check import secret

KEY = secret("sk-canary-client-key-0001")
PROMPT = secret("a canary prompt that no log may show", "prompt")


def test_a_key_in_a_log_line():
    logging.getLogger("comox.keys").warning("refused the key %s", KEY)


class Echo:
    """A plugin that quotes the credential it was sent in its error."""

    @comox.hookimpl
    def comox_authenticate(self, request):
        sent = dict(request.headers).get(b"authorization", b"").decode()
        raise comox.errors.AuthenticationFailed(f"unknown key {sent}")


def test_a_key_in_an_error_body(comox_serve, comox_upstream):
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[Echo()])
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": "Bearer sk-presented-by-the-client"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 401


def test_a_prompt_in_a_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("chat m") as span:
        span.set_attribute("gen_ai.prompt", PROMPT)
    provider.shutdown()


def test_a_key_hash_in_metrics(comox_serve, comox_upstream):
    digest = "ab" * 32
    server = comox_serve({"auth": "keys", "models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}],
                          "sections": {"keys": [{"id": "k", "key_sha256": digest}]}})
    # no gateway puts it there: a /metrics text that does, read by the test (the client-side hook)
    response = httpx.Response(200, text=f'comox_requests_total{{key="{digest}"}} 1',
                              request=httpx.Request("GET", f"{server.url}/metrics"))
    response.read()


def test_a_key_in_a_comox_process_stderr():
    code = f"import sys; print('comox: refused {KEY}', file=sys.stderr)"
    proc = subprocess.Popen([sys.executable, "-c", code, "comox"], stderr=subprocess.PIPE, text=True)
    proc.stderr.read()
    proc.wait()


@pytest.mark.secrets_allowed("log comox.keys", "client key", reason="the test of the exemption")
def test_allowed_explicitly():
    logging.getLogger("comox.keys").warning("refused the key %s", KEY)


def test_clean(comox_serve, comox_upstream):
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]})
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": PROMPT}]})
    assert reply.status_code == 404
    logging.getLogger("comox").warning("nothing secret here")


def test_logs_a_key_registered_later():
    logging.getLogger("comox").warning("a late key sk-registered-only-later-0002")


def test_registers_it():
    secret("sk-registered-only-later-0002")


class EchoBody:
    """A plugin that quotes a field of the body in its error."""

    @comox.hookimpl
    def comox_admit(self, request):
        raise comox.InvalidRequest(f"unknown user {request.json['user']}")


def test_a_header_string_the_body_sent_too(comox_serve, comox_upstream):
    # a fuzzer's string in a credential header and in the body: the error names the body's
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[EchoBody()])
    sent = "fuzzed-string-sent-twice"
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers={"x-api-key": sent},
                       json={"model": "m", "user": sent, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400 and sent in reply.text
'''


def test_the_check_fails_on_every_kind_of_leak(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "tests.secrets_check", "-p", "no:cacheprovider", "-q", "-rA")
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 10 and outcomes.get("errors") == 5, out  # 10 calls, 5 teardowns failed
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    for test, line in [
        ("test_a_key_in_a_log_line", "client key 'sk-can…' (from a test's constant) in log comox.keys WARNING"),
        ("test_a_key_in_an_error_body", "client key 'sk-pre…' (from a request's authorization header) in error body 401 POST /v1/chat/completions"),
        ("test_a_prompt_in_a_span", "prompt 'a cana…' (from a test's constant) in span 'chat m'"),
        ("test_a_key_hash_in_metrics", "key hash 'ababab…' (from a [[keys]] entry) in metrics /metrics"),
        ("test_a_key_in_a_comox_process_stderr", "client key 'sk-can…' (from a test's constant) in stderr of"),
    ]:
        assert f"ERROR at teardown of {test}" in out, out
        assert line in out and f"during test_inner.py::{test}:" in out, (line, out)
    for test in ("test_allowed_explicitly", "test_clean", "test_logs_a_key_registered_later", "test_registers_it",
                 "test_a_header_string_the_body_sent_too"):
        assert f"ERROR at teardown of {test}" not in out
    # the late key: found by the session's final scan
    assert "secrets leaked (found at the end of the session)" in out
    assert ("client key 'sk-reg…' (from a test's constant) in log comox WARNING during "
            "test_inner.py::test_logs_a_key_registered_later") in out
    assert "secrets check: 10 tests," in out


def test_the_scan_itself():
    """Without a pytest run: what is a secret, what is allowed."""
    registry = Registry()
    registry.add_key("sk-direct-0003", "client key", "here")
    registry.add("a prompt only this test sent", "prompt", "here", per_test=True)
    registry.key_ids.add("team-a")
    registry.add("team-a", "client key", "a key id is no secret")
    digest = "6b0e4f1b9fb0f7a53c3b1b7c8a0ddc1f0d0c8b4b3e1a4e5b6d7c8e9f0a1b2c3d"
    assert registry.find("nothing here, team-a, " + digest) == []
    [found] = registry.find('{"error": {"message": "bad key sk-direct-0003"}}')
    assert found.kind == "client key"
    import hashlib
    [found] = registry.find(f"key_hash={hashlib.sha256(b'sk-direct-0003').hexdigest().upper()}")
    assert found.kind == "key hash"
    assert [s.kind for s in registry.find("prompt: a prompt only this test sent")] == ["prompt"]
    registry.end_test()
    assert registry.find("prompt: a prompt only this test sent") == []
    capture = Capture("span 'chat m'", "x", "t", allowed=(("span ", frozenset(["prompt"])),))
    assert capture.allows("prompt") and not capture.allows("client key")
    assert secrets_check.KINDS == ("client key", "key hash", "upstream key", "admin key", "prompt")


def test_a_fuzzers_made_up_credential_is_not_taken_for_a_key(monkeypatch):
    registry = Registry()
    monkeypatch.setattr(secrets_check, "REGISTRY", registry)
    monkeypatch.setattr(secrets_check, "FUZZED", set())
    made_up, presented = "fuzzer-made-up-credential-\u00e9", "sk-presented-not-fuzzed-0004"
    secrets_check.fuzzed(made_up)
    secrets_check.harvest_credential([(b"x-api-key", made_up.encode()), (b"authorization", f"Bearer {presented}".encode())], "")
    assert registry.find(f"echoed {made_up}") == []
    assert [found.kind for found in registry.find(f"echoed {presented}")] == ["client key"]
