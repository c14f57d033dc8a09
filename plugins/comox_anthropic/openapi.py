"""The OpenAPI description of the Messages API's paths (``MessagesAPI.openapi()``,
merged into the gateway's ``GET /openapi.json``): request bodies with the
fields, types and ranges :mod:`.checks` enforces, answers and errors in
Anthropic's shapes. ``GET /v1/models`` is the core's to describe (its
Anthropic shape is for clients that send ``anthropic-version``)."""

from __future__ import annotations

from typing import Any

from .checks import MAX_TOKENS

__all__ = ["fragment"]

Json = dict[str, Any]

TAG = "Anthropic"
STRING: Json = {"type": "string"}
NAME: Json = {"type": "string", "minLength": 1}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: Json) -> Json:
    return {"type": "object", "required": required, "properties": properties}


def _block(kind: str, required: list[str], **properties: Json) -> Json:
    return _object(["type", *required], type={"const": kind}, **properties)


TEXT = _block("text", ["text"], text=NAME)
IMAGE = _block("image", ["source"], source={"oneOf": [
    _object(["type", "media_type", "data"], type={"const": "base64"},
            media_type={"enum": ["image/jpeg", "image/png", "image/gif", "image/webp"]}, data=NAME),
    _object(["type", "url"], type={"const": "url"}, url=NAME)]})
DOCUMENT = _block("document", ["source"], source={"oneOf": [
    _object(["type", "media_type", "data"], type={"const": "base64"}, media_type={"const": "application/pdf"}, data=NAME),
    _object(["type", "media_type", "data"], type={"const": "text"}, media_type={"const": "text/plain"}, data=NAME)]})
TOOL_USE = _block("tool_use", ["id", "name", "input"], id=NAME, name=NAME, input={"type": "object"})
TOOL_RESULT = _block("tool_result", ["tool_use_id"], tool_use_id=NAME, is_error={"type": "boolean"},
                     content={"oneOf": [STRING, {"type": "array", "items": {"oneOf": [_ref("AnthropicTextBlock"), _ref("AnthropicImageBlock")]}}]})
THINKING = _block("thinking", ["thinking", "signature"], thinking=STRING, signature=STRING)
USAGE = _object(["input_tokens", "output_tokens"], input_tokens={"type": "integer"}, output_tokens={"type": "integer"},
                cache_read_input_tokens={"type": "integer"}, cache_creation_input_tokens={"type": "integer"})

SCHEMAS: Json = {
    "AnthropicTextBlock": TEXT,
    "AnthropicImageBlock": IMAGE,
    "AnthropicMessageParam": {"oneOf": [
        _object(["role", "content"], role={"const": "user"}, content={"oneOf": [STRING, {
            "type": "array", "minItems": 1, "items": {"oneOf": [_ref("AnthropicTextBlock"), _ref("AnthropicImageBlock"), DOCUMENT, TOOL_RESULT]}}]}),
        _object(["role", "content"], role={"const": "assistant"}, content={"oneOf": [STRING, {
            "type": "array", "items": {"oneOf": [_ref("AnthropicTextBlock"), TOOL_USE, THINKING]}}]})]},
    "AnthropicCountTokensRequest": _object(
        ["model", "messages"],
        model=NAME,
        messages={"type": "array", "minItems": 1, "items": _ref("AnthropicMessageParam")},
        system={"oneOf": [STRING, {"type": "array", "items": _ref("AnthropicTextBlock")}]},
        tools={"type": "array", "items": _object(["name", "input_schema"], name=NAME, description=STRING,
                                                 input_schema={"type": "object"})},
        tool_choice={"oneOf": [_object(["type"], type={"enum": ["auto", "any", "none"]}, disable_parallel_tool_use={"type": "boolean"}),
                               _object(["type", "name"], type={"const": "tool"}, name=NAME, disable_parallel_tool_use={"type": "boolean"})]},
        thinking=_object(["type"], type={"enum": ["enabled", "disabled", "adaptive"]}, budget_tokens={"type": "integer"}),
        output_config=_object([], format=_object(["type", "schema"], type={"const": "json_schema"}, schema={"type": "object"})),
    ),
    "AnthropicMessage": _object(
        ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"],
        id=STRING, type={"const": "message"}, role={"const": "assistant"}, model=STRING,
        content={"type": "array", "items": {"oneOf": [TEXT, TOOL_USE, THINKING]}},
        stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", None]},
        stop_sequence={"type": ["string", "null"]}, usage=USAGE),
    "AnthropicError": _object(["type", "error"], type={"const": "error"}, error=_object(["type", "message"], type={"enum": [
        "invalid_request_error", "authentication_error", "billing_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "api_error", "timeout_error", "overloaded_error"]}, message=STRING)),
}
MESSAGES_REQUEST: Json = {"allOf": [_ref("AnthropicCountTokensRequest"), _object(
    ["max_tokens"], max_tokens={"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}, stream={"type": "boolean"},
    stop_sequences={"type": "array", "items": NAME}, temperature={"type": "number", "minimum": 0, "maximum": 1},
    top_p={"type": "number", "minimum": 0, "maximum": 1}, top_k={"type": "integer", "minimum": 0},
    metadata=_object([], user_id={"type": ["string", "null"]}))]}
SCHEMAS["AnthropicMessagesRequest"] = MESSAGES_REQUEST

EVENTS: Json = {
    "description": "Each server-sent event: ``event: <type>`` and its ``data:`` — message_start, content_block_start, "
                   "ping, content_block_delta (text_delta, thinking_delta, input_json_delta), content_block_stop, "
                   "message_delta (stop_reason, usage), message_stop; an ``error`` event ends a stream that fails. "
                   "(Before OpenAPI 3.2, ``schema`` of an event stream describes one event.)",
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": STRING, "data": STRING},
}
VERSION: Json = {"name": "anthropic-version", "in": "header", "required": False, "schema": STRING,
                 "description": "Accepted whatever its value, and not required."}
ERRORS: Json = {"description": "An error, in Anthropic's format (``retry-after`` on 429 and 529).",
                "content": {"application/json": {"schema": _ref("AnthropicError")}}}
SECURITY_SCHEMES: Json = {"AnthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                              "description": "An API key as Anthropic's clients send it (or ``Authorization: Bearer``)."}}


def _post(summary: str, request: str, answer: Json, security: list[Json]) -> Json:
    return {"post": {
        "tags": [TAG], "summary": summary,
        "parameters": [VERSION, {"$ref": "#/components/parameters/RequestId"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "OK", "content": answer}, "4XX": ERRORS, "5XX": ERRORS},
        **({"security": security} if security else {}),
    }}


def fragment(*, auth_required: bool) -> Json:
    """The paths of the Messages API, and their components."""
    security: list[Json] = [{"ApiKey": []}, {"AnthropicApiKey": []}] if auth_required else []
    message = {"application/json": {"schema": _ref("AnthropicMessage")}, "text/event-stream": {"schema": EVENTS}}
    count = {"application/json": {"schema": _object(["input_tokens"], input_tokens={"type": "integer", "minimum": 0})}}
    return {
        "paths": {
            "/v1/messages": _post("Create a Message (Anthropic's Messages API), as JSON or its events", "AnthropicMessagesRequest",
                                  message, security),
            "/v1/messages/count_tokens": _post("Estimate the input tokens of a Messages request", "AnthropicCountTokensRequest",
                                               count, security),
        },
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES if auth_required else {}},
        "tags": [{"name": TAG, "description": "Anthropic's Messages API (docs/anthropic_api.md)"}],
    }
