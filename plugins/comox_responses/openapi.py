"""The Responses API in ``GET /openapi.json`` (:meth:`ResponsesAPI.openapi`):
the create request as the translation accepts it (:mod:`comox_responses.translate`:
its fields, types and ranges; unknown fields are refused), and the stored
responses' paths. Errors are OpenAI's error body, as for chat completions."""

from __future__ import annotations

from typing import Any

from .translate import DETAILS, DROPPED, EFFORTS, FORBIDDEN, ROLES

__all__ = ["responses_openapi"]

Json = dict[str, Any]

_STRING = {"type": "string"}
_ERRORS = {"4XX": {"$ref": "#/components/responses/Error"}, "5XX": {"$ref": "#/components/responses/Error"}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": _STRING}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
               "properties": {"type": {"const": "input_image"}, "image_url": {"type": "string", "minLength": 1},
                              "detail": {"enum": list(DETAILS)}}}


def _message(roles: list[str], parts: list[Json]) -> Json:
    return {"type": "object", "required": ["role", "content"],
            "properties": {"type": {"const": "message"}, "role": {"enum": roles},
                           "content": {"anyOf": [_STRING, {"type": "array", "items": {"anyOf": parts}}]}}}


_ITEM = {"anyOf": [
    _message([role for role in ROLES if role != "assistant"], [_TEXT_PART, _IMAGE_PART]),
    _message(["assistant"], [_TEXT_PART]),
    {"type": "object", "required": ["type", "call_id", "name", "arguments"],
     "properties": {"type": {"const": "function_call"}, "call_id": _STRING, "name": _STRING, "arguments": _STRING}},
    {"type": "object", "required": ["type", "call_id", "output"],
     "properties": {"type": {"const": "function_call_output"}, "call_id": _STRING,
                    "output": {"anyOf": [_STRING, {"type": "array", "items": _TEXT_PART}]}}},
]}
_TOOL = {"type": "object", "required": ["type", "name"],
         "properties": {"type": {"const": "function"}, "name": {"type": "string", "minLength": 1},
                        "description": _STRING, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
_FORMAT = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"],
     "properties": {"type": {"const": "json_schema"}, "name": {"type": "string", "minLength": 1},
                    "schema": {"type": "object"}, "strict": {"type": "boolean"}, "description": _STRING}},
]}

CREATE: Json = {
    "description": "A create request as Comox translates it to a chat completion (a model group whose backends "
                   "serve the Responses API themselves gets the body as sent).",
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": False,
    "properties": {
        **{key: {} for key in sorted(DROPPED)},
        **{key: False for key in FORBIDDEN},
        "model": {"type": "string", "minLength": 1},
        "input": {"anyOf": [_STRING, {"type": "array", "minItems": 1, "items": _ITEM}]},
        "instructions": _STRING,
        "stream": {"type": "boolean"},
        "store": {"type": "boolean"},
        "background": {"const": False},
        "previous_response_id": _STRING,
        "tools": {"type": "array", "items": _TOOL},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                                  {"type": "object", "required": ["type", "name"],
                                   "properties": {"type": {"const": "function"}, "name": _STRING}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "text": {"type": "object", "properties": {"format": _FORMAT}},
        "reasoning": {"type": "object", "properties": {"effort": {"enum": list(EFFORTS)}}},
        "max_output_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "user": _STRING,
        "metadata": {"type": "object", "additionalProperties": _STRING},
    },
}

RESPONSE: Json = {
    "type": "object",
    "required": ["id", "object", "status", "output"],
    "properties": {"id": _STRING, "object": {"const": "response"}, "status": _STRING, "model": _STRING,
                   "output": {"type": "array", "items": {"type": "object"}}, "usage": {"type": ["object", "null"]}},
}


def _json(schema: Json, description: str = "OK") -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def responses_openapi(*, secured: bool) -> Json:
    """The fragment: ``secured`` when the gateway wants an API key."""
    security: Json = {"security": [{"ApiKey": []}]} if secured else {}
    tags = ["Responses"]
    ok = _json({"$ref": "#/components/schemas/Response"})
    event = {"description": "Each of the Responses API's typed events (``event:`` and ``data:``)", "type": "object",
             "required": ["event", "data"], "properties": {"event": _STRING, "data": _STRING}}
    stream = {**ok, "content": {**ok["content"], "text/event-stream": {"schema": event}}}
    listing = _json({"type": "object", "required": ["object", "data", "has_more"],
                     "properties": {"object": {"const": "list"}, "data": {"type": "array"},
                                    "has_more": {"type": "boolean"}}})
    return {
        "paths": {
            "/v1/responses": {"post": {
                "tags": tags, "summary": "Create a response", **security,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ResponseCreateRequest"}}}},
                "responses": {"200": stream, **_ERRORS},
            }},
            "/v1/responses/{id}": {
                "get": {"tags": tags, "summary": "A stored response", **security,
                        "parameters": [_ID, {"name": "stream", "in": "query", "required": False,
                                             "schema": {"enum": ["false"]}}],
                        "responses": {"200": ok, **_ERRORS}},
                "delete": {"tags": tags, "summary": "Delete a stored response", **security, "parameters": [_ID],
                           "responses": {"200": _json({"type": "object", "required": ["id", "deleted"],
                                                       "properties": {"id": _STRING, "deleted": {"const": True}}}),
                                         **_ERRORS}},
            },
            "/v1/responses/{id}/cancel": {"post": {
                "tags": tags, "summary": "Cancel a background response (Comox runs none: 400 or 404)", **security,
                "parameters": [_ID], "responses": {"200": ok, **_ERRORS},
            }},
            "/v1/responses/{id}/input_items": {"get": {
                "tags": tags, "summary": "A stored response's input items", **security,
                "parameters": [
                    _ID,
                    {"name": "order", "in": "query", "required": False, "schema": {"enum": ["asc", "desc"]}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "after", "in": "query", "required": False, "schema": _STRING},
                    {"name": "before", "in": "query", "required": False, "schema": _STRING},
                ],
                "responses": {"200": listing, **_ERRORS},
            }},
        },
        "components": {"schemas": {"ResponseCreateRequest": CREATE, "Response": RESPONSE}},
        "tags": [{"name": "Responses", "description": "OpenAI's Responses API (the responses plugin)"}],
    }
