"""Schemathesis against a live gateway, from the gateway's own ``GET /openapi.json``.

Every operation the document describes (the OpenAI endpoints, the Responses
API, the admin API, health, and whatever else a plugin adds) gets at least
``CASES`` generated requests — schema-valid and schema-breaking bodies,
parameters and headers (schemathesis' positive and negative modes), each with
an ``Authorization`` drawn from: the right key, the other key (the API key on
the admin API, the admin key on the API), none, or anything. Three bodies in four
name the served model and three stored-response ids in four and backend names are
real ones, so requests get past the gateway's checks and reach the stand-in
upstream, which answers at once.

Every answer must be: not a 5xx (the stand-in never fails, so a 5xx is
Comox's), an error in the operation's own format when it is one (OpenAI's
error body; Anthropic's on Anthropic's paths), and as the document says
(status, content type, body schema) — and the gateway still healthy after.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import load_all_checks  # noqa: E402

from comox import Settings, create_app  # noqa: E402
from comox.testing import ServerThread, StandInUpstream  # noqa: E402
from tests.secrets_check import fuzzed, secret  # noqa: E402

CASES = int(os.environ.get("COMOX_FUZZ_CASES", "1000"))
"""Generated requests per operation, at least."""

API_KEY = secret("sk-fuzz-client-key")
ADMIN_KEY = secret("sk-fuzz-admin-key", "admin key")
MODEL = "test-model"
SPARE = "spare-node"  # the backend the admin API may drain: never the one the API uses
ADMIN_ENV = "COMOX_FUZZ_ADMIN_KEY"
# schemathesis sends one string as the prompt and as other fields (the model, a path
# parameter) which an error names back: its prompts are checked in logs and spans only.
pytestmark = [
    pytest.mark.secrets_allowed("error body", "prompt", reason="a fuzzer's string is the prompt and the model"),
    # and a made-up credential too: one sent as x-api-key by one case is a tool's name in
    # another, which a 400 names back (clean-clone CI, count_tokens); the gateway's own
    # keys in error bodies are checked by every other test.
    pytest.mark.secrets_allowed("error body", "client key", reason="a fuzzer's string is a credential and a field"),
]
ENDPOINTS = ["chat/completions", "completions", "embeddings", "rerank"]


def fuzz_settings(upstream_url: str) -> Settings:
    return Settings(
        auth="keys",
        sections={"keys": [{"id": "fuzzer", "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]},
        models=[{"name": MODEL, "backends": [{"name": "upstream", "url": upstream_url, "endpoints": ENDPOINTS}]},
                {"name": "spare", "backends": [{"name": SPARE, "url": upstream_url}]}],
        plugins={"admin": {"key_env": ADMIN_ENV}},
    )


def _document() -> dict[str, Any]:
    """The document the live gateway serves, built offline (for the test ids)."""
    os.environ[ADMIN_ENV] = ADMIN_KEY
    try:
        return create_app(fuzz_settings("http://127.0.0.1:9")).openapi.document
    finally:
        del os.environ[ADMIN_ENV]


OPERATIONS = [(method.upper(), path) for path, item in _document()["paths"].items()
              for method in item if method in ("get", "post", "put", "delete", "patch")]


class Live:
    """The gateway under fuzzing and what the cases need of it."""

    def __init__(self, upstream: StandInUpstream, server: ServerThread):
        self.upstream = upstream
        self.server = server
        self.url = server.url
        self.session = requests.Session()
        document = self.session.get(f"{self.url}/openapi.json").json()
        self.schema = schemathesis.openapi.from_dict(bounded(document))
        self.document = document
        self.response_id = self.store_one()

    def store_one(self) -> str:
        """The id of a new stored response."""
        created = self.session.post(f"{self.url}/v1/responses", json={"model": MODEL, "input": "hi"},
                                    headers={"authorization": f"Bearer {API_KEY}"})
        assert created.status_code == 200, created.text
        return str(created.json()["id"])


@pytest.fixture(scope="module")
def live():
    os.environ[ADMIN_ENV] = ADMIN_KEY
    upstream = StandInUpstream("fuzz", stream_chunks=2).start()
    try:
        server = ServerThread(create_app(fuzz_settings(upstream.url))).start()
        try:
            yield Live(upstream, server)
        finally:
            server.stop()
    finally:
        upstream.stop()
        os.environ.pop(ADMIN_ENV, None)


def bounded(document: dict[str, Any]) -> dict[str, Any]:
    """The document with the request bodies' open-ended arrays and objects
    kept small (at most 3 items, 4 properties), for generation's sake: a chat
    request with unbounded messages costs 4 times as long to generate, and
    big bodies have tests of their own (tests/test_hostile_input.py). The
    document served says nothing of the kind; schemas a response uses too are
    left as they are (responses are checked against them)."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]

    def refs(node: Any, seen: set[str]) -> set[str]:
        """The component schemas ``node`` refers to, transitively."""
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] not in seen:
                seen.add(ref.rsplit("/", 1)[1])
                refs(schemas.get(ref.rsplit("/", 1)[1]), seen)
            for value in node.values():
                refs(value, seen)
        elif isinstance(node, list):
            for value in node:
                refs(value, seen)
        return seen

    def bound(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "array":
                node.setdefault("maxItems", 3)
            elif node.get("type") == "object" and not node.get("required"):
                node.setdefault("maxProperties", 4)
            for value in node.values():
                bound(value)
        elif isinstance(node, list):
            for value in node:
                bound(value)

    operations = [op for item in document["paths"].values() for op in item.values() if isinstance(op, dict)]
    answered = set().union(*(refs(op.get("responses"), set()) for op in operations))
    bodies = [media.get("schema") for op in operations for media in op.get("requestBody", {}).get("content", {}).values()]
    for name in refs(bodies, set()) - answered:
        bound(schemas[name])
    for body in bodies:
        if isinstance(body, dict) and "$ref" not in body:
            bound(body)
    return document


# Authorization values: the right key, the other key, none, or anything (latin-1, no line breaks).
ODD = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)
AUTH = st.integers(0, 9).flatmap(lambda n: st.just("right") if n < 6 else st.sampled_from(["other", None]) if n < 8
                                  else ODD.map(lambda text: ("raw", text.strip())))


def _auth(path: str, choice: Any) -> str | None:
    admin = path.startswith("/admin/")
    if choice == "right":
        return f"Bearer {ADMIN_KEY if admin else API_KEY}"
    if choice == "other":
        return f"Bearer {API_KEY if admin else ADMIN_KEY}"
    if isinstance(choice, tuple):
        return choice[1]
    return None


ERROR = {"$ref": "#/components/responses/Error"}


def openai_errors(document: dict[str, Any], method: str, path: str, status: int) -> bool:
    """Whether the document says this error is OpenAI's error body (the
    core's ``Error`` response). Other formats (Anthropic's on its paths) are
    checked against the schema the document gives them; a route a plugin
    does not describe has no format to keep, only the no-5xx rule."""
    responses = document["paths"][path][method.lower()]["responses"]
    return (responses.get(str(status)) or responses.get(f"{status // 100}XX") or responses.get("default")) == ERROR


def assert_openai_error(response: Any) -> None:
    """OpenAI's error body, exactly (``response``: schemathesis')."""
    content_type = {name.lower(): values for name, values in response.headers.items()}.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), response.headers
    body = orjson.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and isinstance(error["type"], str), body


def steer(case: Any, live: Live, path: str, on: bool) -> None:
    """Three cases in four name what exists: the model, a stored response, the spare backend."""
    if not on:
        return
    if isinstance(case.body, dict) and "model" in case.body:
        case.body = {**case.body, "model": MODEL}
    params = case.path_parameters
    if params is not None:
        if "id" in params:
            params["id"] = MODEL if path.startswith("/v1/models/") else live.response_id
        if "name" in params:
            params["name"] = SPARE


def may_not_end(operation: dict[str, Any], method: str) -> bool:
    """An operation whose answer may be a stream that lasts (a dashboard's
    live events), or that its plugin does not describe: only its status is
    read, so a case costs milliseconds, not the stream's life."""
    responses = operation["responses"]
    if set(responses) == {"default"} and "content" not in responses["default"]:
        return True
    ok = responses.get("200", {})
    return method == "GET" and "text/event-stream" in ok.get("content", {})


def _status_only(case: Any, live: Live) -> int:
    kwargs = case.as_transport_kwargs(base_url=live.url)
    kwargs.pop("timeout", None)
    with live.session.request(**kwargs, stream=True, timeout=30) as response:
        return int(response.status_code)


def _checks() -> list[Any]:
    load_all_checks()
    from schemathesis.specs.openapi import checks

    return [checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(live, method, path):
    operation = live.schema[path][method]
    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    checks = _checks()
    endless = may_not_end(live.document["paths"][path][method.lower()], method)
    statuses: Counter[int] = Counter()
    sent = 0

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=strategy, auth=AUTH, steered=st.integers(0, 3).map(bool))
    def run(case: Any, auth: Any, steered: bool) -> None:
        nonlocal sent
        steer(case, live, path, steered)
        headers = dict(case.headers or {})
        value = _auth(path, auth)
        if not isinstance(auth, tuple):  # the drawn key decides, not one generated for a security scheme
            headers = {key: v for key, v in headers.items() if key.lower() not in ("authorization", "x-api-key")}
        if value is not None:
            headers = {key: v for key, v in headers.items() if key.lower() != "authorization"}
            headers["Authorization"] = value
        case.headers = headers
        if isinstance(auth, tuple):  # made-up credentials: the check must not take them for keys
            fuzzed(*(str(v) for key, v in headers.items() if key.lower() in ("authorization", "x-api-key")))
        if endless:
            status = _status_only(case, live)
            sent += 1
            statuses[status] += 1
            assert status < 500, f"{method} {path}: {status}"
            return
        response = case.call(base_url=live.url, session=live.session, timeout=30)
        sent += 1
        statuses[response.status_code] += 1
        if method == "DELETE" and response.status_code == 200:
            live.response_id = live.store_one()  # deleted: another for the next cases
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.content[:500]!r}"
        if response.status_code >= 400 and openai_errors(live.document, method, path, response.status_code):
            assert_openai_error(response)
        case.validate_response(response, checks=checks)

    started = time.monotonic()
    run()
    elapsed = time.monotonic() - started
    print(f"\n{method} {path}: {sent} cases in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}")
    assert sent >= CASES
    assert live.session.get(f"{live.url}/healthz").status_code == 200


def test_every_operation_of_the_document_is_fuzzed(live):
    served = {(method.upper(), path) for path, item in live.document["paths"].items()
              for method in item if method in ("get", "post", "put", "delete", "patch")}
    assert served == set(OPERATIONS)
    assert {"/v1/chat/completions", "/v1/responses", "/admin/backends", "/admin/spend", "/healthz"} <= {p for _, p in OPERATIONS}
