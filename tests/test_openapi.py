"""``GET /openapi.json``: the OpenAPI 3.1 description of every path the app
serves, each plugin describing its own (docs/plugin_hooks.md, comox_openapi)."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import comox
from comox.request import parse_body

schemathesis = pytest.importorskip("schemathesis")

DOCS = Path(__file__).parent.parent / "docs"
OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/models",
                "/v1/models/{id}", "/healthz", "/readyz", "/openapi.json"}
RESPONSES_PATHS = {"/v1/responses", "/v1/responses/{id}", "/v1/responses/{id}/cancel", "/v1/responses/{id}/input_items"}
ADMIN_PATHS = {"/admin/backends", "/admin/backends/{name}/drain", "/admin/backends/{name}/undrain", "/admin/spend"}


def settings_for(url: str = "http://127.0.0.1:9", **more) -> comox.Settings:
    return comox.Settings(**{"auth": "none", "models": [{"name": "m", "backends": [{"name": "b", "url": url}]}], **more})


def document(monkeypatch=None, admin_key: str | None = None, plugins=(), **more) -> dict:
    if monkeypatch is not None:
        if admin_key:
            monkeypatch.setenv("COMOX_ADMIN_KEY", admin_key)
        else:
            monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    return comox.create_app(settings_for(**more), plugins=plugins).openapi.document


def test_the_document_is_valid_openapi_3_1(monkeypatch):
    validator = pytest.importorskip("openapi_spec_validator")
    doc = document(monkeypatch, admin_key="adm")
    validator.validate(doc)
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == comox.__version__
    schemathesis.openapi.from_dict(doc)  # and schemathesis takes it


def test_it_lists_the_core_paths_and_those_of_the_plugins_loaded(monkeypatch):
    paths = set(document(monkeypatch, admin_key="adm")["paths"])
    assert OPENAI_PATHS | RESPONSES_PATHS | ADMIN_PATHS <= paths
    # Without the admin key the admin API does not exist, and is not described.
    assert not ADMIN_PATHS & set(document(monkeypatch)["paths"])


def test_security_follows_auth(monkeypatch):
    keyless = document(monkeypatch, admin_key="adm")
    assert "security" not in keyless["paths"]["/v1/chat/completions"]["post"]
    assert keyless["paths"]["/admin/backends"]["get"]["security"] == [{"AdminKey": []}]
    keyed = comox.create_app(comox.Settings(auth="keys", sections={"keys": [{"id": "a", "key_sha256": "ab" * 32}]},
                                            models=settings_for().models)).openapi.document
    for path in ("/v1/chat/completions", "/v1/responses"):
        assert keyed["paths"][path]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in keyed["paths"]["/healthz"]["get"]


def test_the_document_holds_no_model_name_and_nothing_from_the_request(comox_serve, comox_upstream):
    server = comox_serve({"models": [{"name": "secret-model-name", "aliases": ["other-secret"],
                                      "backends": [{"url": comox_upstream.url}]}]})
    response = httpx.get(f"{server.url}/openapi.json", headers={"host": "evil.example/x?y=1"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert b"secret" not in response.content and b"evil" not in response.content
    assert "servers" not in response.json()  # relative to where it was fetched from


def test_mounted_its_servers_is_the_mount_path(comox_upstream):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    host = Starlette(routes=[Mount("/llm", comox.create_app(settings_for(comox_upstream.url)))])
    with TestClient(host, base_url="http://evil.example") as client:
        doc = client.get("/llm/openapi.json").json()
    assert doc["servers"] == [{"url": "/llm"}]
    assert "evil" not in orjson.dumps(doc).decode()


def test_other_methods_are_405_in_openai_format(comox_gateway):
    response = httpx.post(f"{comox_gateway.url}/openapi.json")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"


def _docs_fragment() -> types.ModuleType:
    """The comox_openapi example of docs/plugin_hooks.md, as a module."""
    text = (DOCS / "plugin_hooks.md").read_text()
    section = text[text.index("\n## comox_openapi\n"):text.index("\n## comox_startup\n")]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    module = types.ModuleType("openapi_route")
    exec(compile(code[1], "<docs plugin_hooks.md comox_openapi>", "exec"), module.__dict__)
    return module


def test_the_documented_example_describes_its_route(comox_serve, comox_upstream):
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[_docs_fragment()])
    assert httpx.get(f"{server.url}/-/version").json() == {"version": comox.__version__}
    operation = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/-/version"]["get"]
    assert operation["summary"] == "The version of Comox"
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["required"] == ["version"]


class Undescribed:
    @comox.hookimpl
    def comox_routes(self, gateway):
        async def hello(request):
            return PlainTextResponse("hi")

        return [Route("/-/items/{item_id:int}/{rest:path}", hello, methods=["GET", "POST"])]


def test_a_route_nobody_describes_is_listed_with_its_methods_and_parameters():
    doc = document(plugins=[Undescribed()])
    item = doc["paths"]["/-/items/{item_id}/{rest}"]
    assert set(item) == {"get", "post"}
    assert [p["name"] for p in item["get"]["parameters"]] == ["item_id", "rest"]
    assert "comox_openapi" in item["get"]["summary"]


class Describes:
    def __init__(self, fragment):
        self.fragment = fragment

    @comox.hookimpl
    def comox_openapi(self, gateway):
        return self.fragment


SCHEME = {"type": "http", "scheme": "bearer"}


def test_fragments_merge_and_conflicts_are_configuration_errors():
    one = {"paths": {"/-/x": {"get": {"responses": {"200": {"description": "x"}}}}},
           "components": {"securitySchemes": {"Same": SCHEME}}, "tags": [{"name": "X"}]}
    other = {"paths": {"/-/x": {"post": {"responses": {"200": {"description": "y"}}}}},
             "components": {"securitySchemes": {"Same": SCHEME}}, "tags": [{"name": "X"}]}
    doc = document(plugins=[Describes(one), Describes(other)])
    assert set(doc["paths"]["/-/x"]) == {"get", "post"}
    assert doc["components"]["securitySchemes"]["Same"] == SCHEME
    assert [tag["name"] for tag in doc["tags"]].count("X") == 1
    clash = {"paths": {"/-/x": {"get": {"responses": {"200": {"description": "another"}}}}}}
    with pytest.raises(comox.ConfigError, match="GET /-/x is described twice"):
        document(plugins=[Describes(one), Describes(clash)])
    with pytest.raises(comox.ConfigError, match="components.securitySchemes.Same is defined twice"):
        document(plugins=[Describes(one), Describes({"components": {"securitySchemes": {"Same": {"type": "apiKey"}}}})])
    with pytest.raises(comox.ConfigError, match="OpenAPI fragment"):
        document(plugins=[Describes({"openapi": "3.0.0"})])
    with pytest.raises(comox.ConfigError, match="GET /v1/models is described twice"):
        document(plugins=[Describes({"paths": {"/v1/models": {"get": {"responses": {}}}}})])


class Inbound:
    """An inbound API that describes itself (InboundAPI.openapi)."""

    name = "echo"

    def match(self, path, method):
        return "echo" if path == "/v1/echo" else None

    def openapi(self):
        return {"paths": {"/v1/echo": {"post": {"responses": {"200": {"description": "the same"}}}}}}

    @comox.hookimpl
    def comox_inbound_apis(self, gateway):
        return [self]


def test_an_inbound_api_describes_its_own_paths():
    assert document(plugins=[Inbound()])["paths"]["/v1/echo"]["post"]["responses"]["200"]["description"] == "the same"


# -- the request schemas say what the gateway accepts --------------------------------

INTEGERS = ("max_tokens", "max_completion_tokens", "n", "top_n", "max_output_tokens")
BODY_OPERATIONS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
                   "/v1/embeddings": "embeddings", "/v1/rerank": "rerank"}


@pytest.fixture(scope="module")
def schema():
    from tests.test_fuzz import bounded

    return schemathesis.openapi.from_dict(bounded(comox.create_app(settings_for()).openapi.document))


@pytest.mark.parametrize("path", list(BODY_OPERATIONS) + ["/v1/responses"])
def test_every_body_the_schema_allows_gets_past_the_gateways_checks(schema, path):
    """The request schemas are no looser than the gateway: whatever they allow
    it accepts (so a fuzzer's valid bodies reach the backend)."""
    from comox_responses.translate import parse_request

    strategy = schema[path]["POST"].as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def accepted(case):
        # JSON Schema's integers include 5.0; the gateway wants 5 (docs/reliability.md, Hostile input).
        assume(not any(isinstance(case.body.get(key), float) for key in INTEGERS))
        raw = json.dumps(case.body).encode()  # as a client sends it (big integers too)
        if path == "/v1/responses":
            parse_request(orjson.loads(raw), {})
        else:
            parse_body(BODY_OPERATIONS[path], raw)

    accepted()
