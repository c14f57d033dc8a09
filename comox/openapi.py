"""``GET /openapi.json``: the OpenAPI 3.1 description of every path the app
serves, built once when the app is built.

* The core describes its own: OpenAI's endpoints (``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/rerank``, ``/v1/models``,
  ``/v1/models/{id}``), ``/healthz``, ``/readyz`` and ``/openapi.json`` —
  request bodies with the fields, types and ranges the gateway itself
  enforces (:func:`comox.request.parse_body`), so a fuzzer generates bodies
  that get past it, and every error as OpenAI's error body.
* An inbound API describes its paths with an optional ``openapi()`` method
  (:class:`comox.InboundAPI`); a plugin that adds routes describes them with
  ``comox_openapi(gateway)``. Both return a fragment ``{"paths": {...},
  "components": {...}, "tags": [...]}`` merged into the document; a fragment
  may refer to the core's components (``#/components/schemas/Error``,
  ``#/components/responses/Error``, ``#/components/parameters/RequestId``,
  ``#/components/securitySchemes/ApiKey``).
* A route a plugin adds (``comox_routes``) and nobody describes is still
  listed, with its methods and path parameters.

Nothing in the document comes from a request: not the ``Host`` header (no
absolute URL is ever built), and not the model names (``GET /v1/models``,
behind the keys, lists those).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .errors import ConfigError
from .request import FORBIDDEN_FIELDS
from .version import __version__

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["OpenAPI", "build_document", "merge_fragment", "METHODS"]

Json = dict[str, Any]

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
FRAGMENT_KEYS = frozenset({"paths", "components", "tags"})
_CONVERTOR = re.compile(r"{(\w+)(?::\w+)?}")


def _ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def _int(low: int, high: int) -> Json:
    return {"type": "integer", "minimum": low, "maximum": high}


def _number(low: float, high: float) -> Json:
    return {"type": "number", "minimum": low, "maximum": high}


_STRING = {"type": "string"}
_NONEMPTY = {"type": "string", "minLength": 1}
# Fields that would redirect the upstream call: refused (400 forbidden_field) wherever they appear.
_FORBIDDEN = {key: False for key in FORBIDDEN_FIELDS}
# What every API body shares (parse_body): a model, an optional boolean stream, the checked numbers.
_COMMON = {
    "model": {**_NONEMPTY, "description": "A model group or one of its aliases (GET /v1/models lists them)."},
    "stream": {"type": "boolean"},
    "max_tokens": _int(1, 1_000_000),
    "max_completion_tokens": _int(1, 1_000_000),
    "n": _int(1, 128),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    **_FORBIDDEN,
}

_CONTENT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string", "enum": ["text", "image_url", "input_audio", "file", "refusal"]},
                   "text": _STRING},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [_STRING, {"type": "array", "items": _CONTENT_PART}, {"type": "null"}]},
        "name": _STRING,
        "tool_call_id": _STRING,
        "tool_calls": {"type": "array", "items": {"type": "object"}},
    },
}
_USAGE = {
    "type": "object",
    "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                   "total_tokens": {"type": "integer"}},
}

SCHEMAS: Json = {
    "Error": {
        "description": "OpenAI's error format: what every error of an OpenAI path, and of the gateway's own "
                       "paths, is answered with.",
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": _STRING, "type": _STRING, "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "null"]}},
        }},
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_COMMON,
            "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "stop": {"anyOf": [_STRING, {"type": "array", "items": _STRING}, {"type": "null"}]},
            "tools": {"type": "array", "items": {"type": "object"}},
            "response_format": {"type": "object"},
            "user": _STRING,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {**_COMMON, "prompt": {"anyOf": [_STRING, {"type": "array"}]},
                       "stop": {"anyOf": [_STRING, {"type": "array", "items": _STRING}, {"type": "null"}]}},
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {**_COMMON, "input": {"anyOf": [_NONEMPTY, {"type": "array", "minItems": 1}]},
                       "encoding_format": {"type": "string", "enum": ["float", "base64"]}},
    },
    "RerankRequest": {
        "description": "The Cohere/Jina rerank shape that llama.cpp's server, vLLM and TEI serve.",
        "type": "object",
        "required": ["model", "query", "documents"],
        "properties": {
            **_COMMON,
            "query": _NONEMPTY,
            "documents": {"type": "array", "minItems": 1, "items": {"anyOf": [
                _STRING, {"type": "object", "required": ["text"], "properties": {"text": _STRING}}]}},
            "top_n": {"type": "integer", "minimum": 1, "maximum": 2**64 - 1},  # larger: orjson reads a float
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["choices"],
        "properties": {"id": _STRING, "object": _STRING, "model": _STRING, "usage": _USAGE,
                       "choices": {"type": "array", "items": {"type": "object"}}},
    },
    "Completion": {
        "type": "object",
        "required": ["choices"],
        "properties": {"id": _STRING, "object": _STRING, "model": _STRING, "usage": _USAGE,
                       "choices": {"type": "array", "items": {"type": "object"}}},
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["data"],
        "properties": {"object": _STRING, "model": _STRING, "usage": _USAGE, "data": {"type": "array", "items": {
            "type": "object", "properties": {"index": {"type": "integer"}, "embedding": {}}}}},
    },
    "RerankResult": {
        "type": "object",
        "required": ["results"],
        "properties": {"model": _STRING, "usage": _USAGE, "results": {"type": "array", "items": {
            "type": "object", "properties": {"index": {"type": "integer"}, "relevance_score": {"type": "number"}}}}},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": _STRING, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STRING},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("schemas", "Model")}},
    },
}

RESPONSES: Json = {
    "Error": {
        "description": "An error, in OpenAI's format (``retry-after`` on 429 and 503).",
        "content": {"application/json": {"schema": _ref("schemas", "Error")}},
    },
}

PARAMETERS: Json = {
    "RequestId": {
        "name": "x-request-id", "in": "header", "required": False,
        "description": "Kept as the request's id when it is 1–128 of ``A-Za-z0-9._:-``; else a fresh one. "
                       "Sent back, and upstream.",
        "schema": _STRING,
    },
    "LocalOnly": {
        "name": "x-comox-local-only", "in": "header", "required": False,
        "description": "``true``: the request never leaves for a cloud backend.",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
}

SECURITY_SCHEMES: Json = {
    "ApiKey": {"type": "http", "scheme": "bearer", "description": "An API key: ``Authorization: Bearer <key>``."},
}


SSE_EVENT: Json = {
    "description": "Each server-sent event (OpenAPI before 3.2: ``schema`` of an event stream describes one "
                   "event): ``data: <chunk JSON>``, the last ``data: [DONE]``; a stream that fails midway ends "
                   "with ``data: <OpenAI error>`` and no ``[DONE]``.",
    "type": "object",
    "required": ["data"],
    "properties": {"data": _STRING, "event": _STRING, "id": _STRING},
}


def _json(schema: Json, description: str = "OK") -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(answer: Json) -> Json:
    return {**answer, "4XX": _ref("responses", "Error"), "5XX": _ref("responses", "Error")}


def _api_post(summary: str, request: str, answer: str, *, streams: bool, security: list[Json]) -> Json:
    ok = _json(_ref("schemas", answer))
    if streams:
        ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    operation = {
        "tags": ["OpenAI"],
        "summary": summary,
        "parameters": [_ref("parameters", "RequestId"), _ref("parameters", "LocalOnly")],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("schemas", request)}}},
        "responses": _errors({"200": ok}),
    }
    if security:
        operation["security"] = security
    return {"post": operation}


def core_paths(security: list[Json]) -> Json:
    """The paths the core serves itself; ``security`` goes on the ``/v1`` ones."""
    secured = {"security": security} if security else {}
    paths: Json = {
        "/v1/chat/completions": _api_post("A chat completion", "ChatCompletionRequest", "ChatCompletion",
                                          streams=True, security=security),
        "/v1/completions": _api_post("A completion", "CompletionRequest", "Completion", streams=True, security=security),
        "/v1/embeddings": _api_post("Embeddings", "EmbeddingRequest", "EmbeddingList", streams=False, security=security),
        "/v1/rerank": _api_post("Documents ranked by relevance to a query", "RerankRequest", "RerankResult",
                                streams=False, security=security),
        "/v1/models": {"get": {
            "tags": ["OpenAI"], "summary": "The models the caller may use",
            "parameters": [_ref("parameters", "RequestId")],
            "responses": _errors({"200": _json(_ref("schemas", "ModelList"))}), **secured,
        }},
        "/v1/models/{id}": {"get": {
            "tags": ["OpenAI"], "summary": "One model",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STRING},
                           _ref("parameters", "RequestId")],
            "responses": _errors({"200": _json(_ref("schemas", "Model"))}), **secured,
        }},
        "/healthz": {"get": {
            "tags": ["Health"], "summary": "Liveness: the process serves",
            "responses": {"200": _json({"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})},
        }},
        "/readyz": {"get": {
            "tags": ["Health"], "summary": "Readiness: started, and its shared state usable",
            "responses": {
                "200": _json({"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}),
                "503": _json({"type": "object", "required": ["ready"], "properties": {"ready": {"const": False}}},
                             "Not ready (starting, or its shared state unusable)"),
            },
        }},
        "/openapi.json": {"get": {
            "tags": ["Health"], "summary": "This document",
            "responses": _errors({"200": _json({"type": "object", "required": ["openapi", "paths"]})}),
        }},
    }
    return paths


def merge_fragment(document: Json, fragment: Any, source: str) -> None:
    """Merge a plugin's ``fragment`` into ``document``. An operation (path and
    method) described twice, or a component defined twice differently, is a
    :class:`comox.ConfigError` naming ``source``."""
    if fragment is None:
        return
    if not isinstance(fragment, Mapping) or not FRAGMENT_KEYS.issuperset(fragment):
        raise ConfigError(f"{source}: an OpenAPI fragment is a dict with only {', '.join(sorted(FRAGMENT_KEYS))}; "
                          f"got {fragment!r:.200}")
    paths = document["paths"]
    for path, item in (fragment.get("paths") or {}).items():
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(item, Mapping):
            raise ConfigError(f"{source}: OpenAPI paths map '/…' to path items; got {path!r}")
        known = paths.setdefault(path, {})
        for key, value in item.items():
            if key in known and known[key] != value:
                what = f"{key.upper()} {path}" if key in METHODS else f"{path} ({key})"
                raise ConfigError(f"{source}: {what} is described twice")
            known[key] = value
    components = document["components"]
    for kind, entries in (fragment.get("components") or {}).items():
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{source}: components.{kind} must be a dict")
        known = components.setdefault(kind, {})
        for name, value in entries.items():
            if name in known and known[name] != value:
                raise ConfigError(f"{source}: components.{kind}.{name} is defined twice, differently")
            known[name] = value
    tags = document["tags"]
    for tag in fragment.get("tags") or ():
        if isinstance(tag, Mapping) and tag not in tags:
            tags.append(dict(tag))


def route_paths(routes: Iterable[Any]) -> Json:
    """Path items for Starlette routes (``comox_routes``): their methods and
    path parameters, for those no plugin describes."""
    paths: Json = {}
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str) or not hasattr(route, "endpoint"):
            continue  # a Mount: what it serves is its own app's to say
        template = _CONVERTOR.sub(r"{\1}", path)
        parameters = [{"name": match[1], "in": "path", "required": True, "schema": _STRING}
                      for match in _CONVERTOR.finditer(path)]
        methods = sorted({m.lower() for m in (getattr(route, "methods", None) or {"GET"})} - {"head"})
        item = paths.setdefault(template, {})
        for method in methods:
            item[method] = {
                "summary": "Added by a plugin (comox_routes) that does not describe it (comox_openapi)",
                **({"parameters": parameters} if parameters else {}),
                "responses": {"default": {"description": "What the plugin answers"}},
            }
    return paths


def build_document(gateway: Gateway, routes: Iterable[Any] = ()) -> Json:
    """The OpenAPI document of an app serving ``gateway`` and ``routes``."""
    security: list[Json] = [{"ApiKey": []}] if gateway.auth_required else []
    document: Json = {
        "openapi": "3.1.0",
        "info": {"title": "Comox", "version": __version__,
                 "description": "A self-hosted AI gateway: OpenAI's API (and the APIs its plugins add) in front "
                                "of an inference fleet."},
        "paths": core_paths(security),
        "components": {"schemas": dict(SCHEMAS), "responses": dict(RESPONSES), "parameters": dict(PARAMETERS),
                       "securitySchemes": dict(SECURITY_SCHEMES)},
        "tags": [{"name": "OpenAI", "description": "OpenAI's API"},
                 {"name": "Health", "description": "Liveness, readiness and this description"}],
    }
    for api in gateway.inbound.apis:
        describe = getattr(api, "openapi", None)  # optional: see InboundAPI
        if describe is not None:
            merge_fragment(document, describe(), f"inbound API {api.name!r}")
    for fragment in gateway.pm.hook.comox_openapi(gateway=gateway):
        merge_fragment(document, fragment, "comox_openapi")
    for path, item in route_paths(routes).items():
        known = document["paths"].setdefault(path, {})
        for method, operation in item.items():
            known.setdefault(method, operation)
    document["paths"] = dict(sorted(document["paths"].items()))
    return document


class OpenAPI:
    """The document of one app, serialised once per mount point (``servers``
    is the mount's ``root_path``, never a URL from the request's ``Host``)."""

    __slots__ = ("document", "_bytes")

    def __init__(self, document: Json):
        self.document = document
        self._bytes: dict[str, bytes] = {}

    def body(self, root_path: str = "") -> bytes:
        body = self._bytes.get(root_path)
        if body is None:
            document = self.document
            if root_path:
                document = {**document, "servers": [{"url": root_path}]}
            body = self._bytes[root_path] = orjson.dumps(document)
        return body
