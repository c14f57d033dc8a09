"""comox_anthropic.openapi: the Messages API's paths in the gateway's OpenAPI
description — a valid fragment, bodies the gateway takes validate against it,
and bodies generated from it (as a schemathesis-style fuzzer would) never get
a 5xx."""

import json

import httpx
import pytest
import schemathesis
from comox_anthropic import MessagesAPI
from comox_anthropic.openapi import fragment
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from comox.testing import ServerThread, StandInUpstream

HI = [{"role": "user", "content": "hi"}]
CORE = {"parameters": {"RequestId": {"name": "x-request-id", "in": "header", "schema": {"type": "string"}}},
        "securitySchemes": {"ApiKey": {"type": "http", "scheme": "bearer"}}}
"""What the fragment refers to in the core's document."""


def document(auth_required: bool = True) -> dict:
    part = fragment(auth_required=auth_required)
    components = {kind: {**CORE.get(kind, {}), **entries} for kind, entries in part["components"].items()}
    return {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": part["paths"],
            "components": {**CORE, **components}, "tags": part["tags"]}


def schema(name: str) -> dict:
    """A component as a self-contained JSON schema (its refs resolved in the document)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": document()["components"],
            "$ref": f"#/components/schemas/{name}"}


@pytest.mark.parametrize("auth_required", [True, False])
def test_the_fragment_is_valid_openapi(auth_required):
    validate(document(auth_required))
    assert MessagesAPI(auth_required=auth_required).openapi() == fragment(auth_required=auth_required)
    post = fragment(auth_required=auth_required)["paths"]["/v1/messages"]["post"]
    assert ("security" in post) is auth_required


GOOD = [
    {"model": "chat", "max_tokens": 5, "messages": HI},
    {"model": "chat", "max_tokens": 20, "stream": True, "system": [{"type": "text", "text": "Be brief."}], "stop_sequences": ["END"],
     "temperature": 0.5, "top_k": 40, "metadata": {"user_id": "u"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
     "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "f"},
     "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
     "messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                               {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                    {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "r"}]}]}]},
]


@pytest.mark.parametrize("body", GOOD)
def test_bodies_the_gateway_takes_validate(body):
    Draft202012Validator(schema("AnthropicMessagesRequest")).validate(body)
    Draft202012Validator(schema("AnthropicCountTokensRequest")).validate({k: v for k, v in body.items() if k != "max_tokens"})


def test_a_missing_max_tokens_does_not_validate():
    assert not Draft202012Validator(schema("AnthropicMessagesRequest")).is_valid({"model": "chat", "messages": HI})


@pytest.fixture(scope="module")
def gateway():
    from comox import Settings, create_app

    upstream = StandInUpstream("local").start()
    server = ServerThread(create_app(Settings(auth="none", models=[{"name": "chat", "backends": [{"url": upstream.url}]}]))).start()
    yield server
    server.stop()
    upstream.stop()


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_bodies_generated_from_the_schema_never_get_a_5xx(gateway, path):
    seen = set()
    operation = schemathesis.openapi.from_dict(document(auth_required=False))[path]["POST"]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(operation.as_strategy())
    def post(case):
        body = case.body
        body["model"] = "chat" if len(body["model"]) % 2 else body["model"]  # a known model often enough
        response = httpx.post(f"{gateway.url}{path}", content=json.dumps(body).encode(), timeout=30)  # (ints beyond 64 bits too)
        seen.add(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["type"] == "error"

    post()
    assert 200 in seen


def test_the_gateway_describes_the_messages_api(gateway):
    response = httpx.get(f"{gateway.url}/openapi.json")
    if response.status_code == 404:
        pytest.skip("this gateway serves no OpenAPI description")
    described = response.json()
    validate(described)
    assert described["paths"]["/v1/messages"] == fragment(auth_required=False)["paths"]["/v1/messages"]
    assert "/v1/messages/count_tokens" in described["paths"] and "AnthropicMessage" in described["components"]["schemas"]
