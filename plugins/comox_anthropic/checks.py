"""A Messages request checked in the Messages API's own terms (what the API
answers 400 ``invalid_request_error`` to), and its input tokens estimated
without a tokenizer (``count_tokens``, and ``message_start`` when the server
reports no usage)."""

from __future__ import annotations

import math
from typing import Any

import orjson

import comox

__all__ = ["check_request", "parse_body", "check_routing", "check_body", "estimate_input_tokens",
           "CHARS_PER_TOKEN", "IMAGE_TOKENS", "MESSAGE_TOKENS"]

Json = dict[str, Any]

MAX_TOKENS = 1_000_000
CHARS_PER_TOKEN = 4
"""Characters of text per estimated token (as the limits plugin's estimate)."""
IMAGE_TOKENS = 1600
"""Tokens counted per image or document: Anthropic's own upper bound for an
image (about width × height / 750, resized to at most 1.15 megapixels)."""
MESSAGE_TOKENS = 4
"""Tokens counted per message for its role and turn markers."""

USER_BLOCKS = frozenset({"text", "image", "document", "tool_result"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
THINKING = frozenset({"enabled", "disabled", "adaptive"})


def _bad(message: str, param: str | None = None) -> comox.InvalidRequest:
    return comox.InvalidRequest(f"{param}: {message}" if param else message, param=param)


def _one_of(value: Any, names: frozenset[str]) -> bool:
    return isinstance(value, str) and value in names


def _string(body: Json, key: str, where: str, *, required: bool = False) -> None:
    value = body.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value):
        raise _bad("Field required" if value is None else "Input should be a non-empty string" if required
                   else "Input should be a valid string", f"{where}{key}")


def _number(body: Json, key: str, low: float, high: float, *, integer: bool = False) -> None:
    if body.get(key) is None:
        return  # (most are absent: no call more)
    try:
        comox.check_number(body, key, low, high, integer=integer)
    except comox.InvalidRequest as exc:
        raise _bad(exc.message.replace(f"'{key}' ", "Input ", 1), key) from None


def check_request(raw: bytes, *, count: bool = False) -> Json:
    """The body of ``POST /v1/messages`` (``count``: of ``/v1/messages/count_tokens``,
    which takes no ``max_tokens`` nor ``stream``), parsed and checked; raises
    :class:`comox.InvalidRequest` naming the field. Fields it does not know
    are left alone (the translation takes what it knows; a native backend
    gets them all)."""
    return check_body(parse_body(raw), count=count)


def parse_body(raw: bytes) -> Json:
    """The body's JSON object, not yet checked."""
    try:
        body = orjson.loads(raw)  # refuses NaN, Infinity and nesting deeper than 1024
    except orjson.JSONDecodeError as exc:
        raise comox.InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise comox.InvalidRequest("The request body must be a JSON object")
    return body


def check_routing(body: Json, *, count: bool = False) -> Json:
    """Only what routing and limits read (``model``, ``max_tokens``,
    ``stream``): enough for a request passed through to a backend that
    speaks the Messages API itself, which judges the rest in the API's own
    terms. :func:`check_body` checks it all."""
    _string(body, "model", "", required=True)
    if not count:
        if body.get("max_tokens") is None:
            raise _bad("Field required", "max_tokens")
        _number(body, "max_tokens", 1, MAX_TOKENS, integer=True)
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise _bad("Input should be a valid boolean", "stream")
    return body


def check_body(body: Json, *, count: bool = False) -> Json:
    """A parsed body (:func:`parse_body`) checked as :func:`check_request` does."""
    check_routing(body, count=count)
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    _number(body, "top_k", 0, 1_000_000, integer=True)
    _check_system(body.get("system"))
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise _bad("Input should be a list of non-empty strings", "stop_sequences")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or not isinstance(metadata.get("user_id") or "", str)):
        raise _bad("Input should be an object with a string user_id", "metadata")
    thinking = body.get("thinking")
    if thinking is not None and (not isinstance(thinking, dict) or not _one_of(thinking.get("type"), THINKING)):
        raise _bad(f"Input should be an object whose type is one of {', '.join(sorted(THINKING))}", "thinking")
    output = body.get("output_config")
    if output is not None:
        form = output.get("format") if isinstance(output, dict) else None
        if not isinstance(output, dict) or (form is not None and (
                not isinstance(form, dict) or form.get("type") != "json_schema" or not isinstance(form.get("schema"), dict))):
            raise _bad("Input should be an object whose format, if any, is {\"type\": \"json_schema\", \"schema\": {...}}",
                       "output_config")
    tools = _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"), tools)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("at least one message is required", "messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages.{i}")
    return body


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _bad("Input should be a string or a list of text blocks", "system")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad("Input should be a text block", f"system.{i}")


def _check_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise _bad("Input should be a list", "tools")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad("Input should be an object", where)
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"tools of type {tool['type']!r} are Anthropic's server tools, which this gateway does not run; "
                       "give custom tools (name, input_schema)", f"{where}.type")
        _string(tool, "name", f"{where}.", required=True)
        _string(tool, "description", f"{where}.")
        if not isinstance(tool.get("input_schema"), dict):
            raise _bad("Field required" if "input_schema" not in tool else "Input should be an object",
                       f"{where}.input_schema")
        names.add(tool["name"])
    return names


def _check_tool_choice(choice: Any, tools: set[str]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or not _one_of(choice.get("type"), TOOL_CHOICES):
        raise _bad(f"Input should be an object whose type is one of {', '.join(sorted(TOOL_CHOICES))}", "tool_choice")
    if choice["type"] == "tool" and not _one_of(choice.get("name"), frozenset(tools)):
        raise _bad(f"tool {choice.get('name')!r} is not among the tools given", "tool_choice.name")
    if choice.get("disable_parallel_tool_use") is not None and not isinstance(choice["disable_parallel_tool_use"], bool):
        raise _bad("Input should be a valid boolean", "tool_choice.disable_parallel_tool_use")


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise _bad("Input should be an object with a role and content", where)
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant"):
        raise _bad("Input should be 'user' or 'assistant'", f"{where}.role")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or (role == "user" and not content):
        raise _bad("Input should be a string or a non-empty list of content blocks", f"{where}.content")
    allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
    for j, block in enumerate(content):
        _check_block(block, allowed, f"{where}.content.{j}")


def _check_block(block: Any, allowed: frozenset[str], where: str) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if not _one_of(kind, allowed):
        raise _bad(f"content blocks here are of type {', '.join(sorted(allowed))}, not {kind!r}", f"{where}.type")
    assert isinstance(block, dict)
    if kind == "text":
        _string(block, "text", f"{where}.", required=True)
    elif kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, dict) or source.get("type") not in ("base64", "url", "text"):
            raise _bad("Input should be a source object of type base64, url or text", f"{where}.source")
        _string(source, "url" if source["type"] == "url" else "data", f"{where}.source.", required=True)
    elif kind == "tool_use":
        _string(block, "id", f"{where}.", required=True)
        _string(block, "name", f"{where}.", required=True)
        if not isinstance(block.get("input"), dict):
            raise _bad("Input should be an object", f"{where}.input")
    elif kind == "tool_result":
        _string(block, "tool_use_id", f"{where}.", required=True)
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise _bad("Input should be a string or a list of content blocks", f"{where}.content")
            for k, part in enumerate(content):
                _check_block(part, frozenset({"text", "image", "document"}), f"{where}.content.{k}")


def estimate_input_tokens(body: Json) -> int:
    """The input tokens of a checked Messages request, estimated: the
    characters of its text (system, messages, tool calls and results, and the
    tool definitions as JSON) over :data:`CHARS_PER_TOKEN`, plus
    :data:`IMAGE_TOKENS` per image or PDF and :data:`MESSAGE_TOKENS` per
    message. Thinking blocks are not counted: they are not passed on."""
    chars = len(orjson.dumps(body["tools"])) if body.get("tools") else 0
    extra = 0
    stack: list[Any] = [body.get("system"), *(body.get("messages") or [])]
    extra += MESSAGE_TOKENS * (len(stack) - 1)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            kind = value.get("type")
            source = value.get("source")
            if kind == "text":
                stack.append(value.get("text"))
            elif kind in ("image", "document") and isinstance(source, dict):
                if source.get("type") == "text":
                    stack.append(source.get("data"))
                else:
                    extra += IMAGE_TOKENS
            elif kind == "tool_use":
                chars += len(str(value.get("name", ""))) + len(orjson.dumps(value.get("input")))
            elif kind == "tool_result" or "role" in value:
                stack.append(value.get("content"))
    return math.ceil(chars / CHARS_PER_TOKEN) + extra
