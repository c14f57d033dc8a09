"""A Responses API request in chat-completion terms.

:func:`parse_request` checks the client's body in the Responses API's own
terms (its parameter names in every error), normalises its ``input`` into
items with ids (as ``GET /v1/responses/{id}/input_items`` lists them) and
builds the chat completion that answers it (:func:`chat_messages`):

* ``instructions`` → a system message first; ``developer`` messages → system.
* ``input_text`` / ``input_image`` parts → ``text`` / ``image_url`` parts;
  ``function_call`` items → the assistant's ``tool_calls``;
  ``function_call_output`` items → ``tool`` messages; ``reasoning`` items are
  left out (chat completions take none back).
* function tools (flat ``{"type": "function", "name", "parameters"}``) → chat's
  nested ``{"type": "function", "function": {...}}``; ``tool_choice`` likewise.
* ``text.format`` → ``response_format``; ``reasoning.effort`` →
  ``reasoning_effort``; ``max_output_tokens`` → ``max_tokens``.

What chat completions cannot carry is refused with a clear 400 (built-in
tools, files, background mode…), or dropped when it never changes the answer
(:data:`DROPPED`). For a model group whose backends all serve the Responses
API themselves (``native``), the body reaches them as sent: only what routing
and limits need is checked, and nothing is refused for want of a translation.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import comox
from comox import InvalidRequest

__all__ = ["Pending", "parse_request", "check_request", "check_types", "translate_request", "chat_messages", "new_id",
           "DROPPED"]

# What the core refuses in any body: fields that try to pick the upstream.
FORBIDDEN = ("api_base", "base_url", "api_key", "extra_headers", "api_version", "organization")
TRANSLATED = frozenset({
    "model", "input", "instructions", "stream", "store", "previous_response_id", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "max_output_tokens", "temperature", "top_p", "user", "metadata",
    "background", "conversation", "prompt",
})
DROPPED = frozenset({
    "include", "truncation", "service_tier", "top_logprobs", "max_tool_calls", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier", "stream_options",
})
"""Accepted and not sent on: they never change a local model's answer."""
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
ROLES = ("user", "assistant", "system", "developer")
DETAILS = ("auto", "low", "high", "original")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class Pending:
    """One create request on its way (``request.state["responses"]``)."""

    id: str
    body: dict[str, Any]
    """The client's body as sent."""
    items: list[dict[str, Any]]
    """Its input, normalised."""
    store: bool
    native: bool
    """Its model group's backends serve the Responses API themselves."""
    context: list[dict[str, Any]] = field(default_factory=list)
    """The items of ``previous_response_id``'s conversation, before ``items``."""
    created_at: int = field(default_factory=lambda: int(time.time()))


def fail(message: str, param: str | None, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def parse_request(body: Any, native_models: dict[str, bool]) -> tuple[Pending, dict[str, Any]]:
    """The checked request and the chat completion body that answers it."""
    return translate_request(body, check_request(body, native_models))


def check_request(body: Any, native_models: dict[str, bool]) -> bool:
    """Check what routing and limits need (all of it unless ``body``'s model
    group is native); whether it is native."""
    if not isinstance(body, dict):
        raise fail("request body must be a JSON object", None, "invalid_json")
    if not _FORBIDDEN.isdisjoint(body):  # one C-level check in the common case
        key = next(key for key in FORBIDDEN if key in body)
        raise fail(f"'{key}' is not allowed: the gateway chooses the upstream", key, "forbidden_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise fail("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    native = native_models.get(model, False)
    strict = not native
    if strict:
        for key in body:
            if key not in TRANSLATED and key not in DROPPED:
                raise fail(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
    if strict:
        check_types(body)
    else:  # the backend judges the rest, in its API's own terms (check_types before a translation)
        _check_fields(body, ROUTED)
    if body.get("background"):
        raise fail("background mode is not supported: Comox answers while the client waits (or streams)",
                   "background", "unsupported_parameter")
    if strict:
        for key in ("conversation", "prompt"):
            if body.get(key) is not None:
                raise fail(f"'{key}' is not supported: Comox keeps no {key}s; send the input itself", key,
                           "unsupported_parameter")
    if body.get("input") is None and not body.get("previous_response_id"):
        raise fail("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    return native


def translate_request(body: dict[str, Any], native: bool) -> tuple[Pending, dict[str, Any]]:
    """A body :func:`check_request` passed, and the chat completion that
    answers it (its input items checked too, unless ``native``)."""
    strict = not native
    model = body["model"]
    raw_input = body.get("input")
    items = normalise_input(raw_input, strict) if raw_input is not None else []
    if not items and not body.get("previous_response_id") and strict:
        raise fail("Invalid 'input': expected a string or at least one input item.", "input", "empty_array")
    pending = Pending(id=new_id("resp"), body=body, items=items, store=body.get("store", True) is not False, native=native)
    chat: dict[str, Any] = {"model": model, "messages": chat_messages(pending)}
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = chat_tools(body.get("tools"), strict)
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        choice = chat_tool_choice(body["tool_choice"], strict)
        if choice is not None:
            chat["tool_choice"] = choice
    response_format = chat_response_format(body.get("text"), strict)
    if response_format is not None:
        chat["response_format"] = response_format
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    return pending, chat


# Each typed field's check, looked up for the fields a body has (fewer than these):
# the types it may have and how an error says them, or the numeric range it
# must be in (and whether only an integer will do).
_FORBIDDEN = frozenset(FORBIDDEN)
_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "stream": (bool, "a boolean"), "store": (bool, "a boolean"), "background": (bool, "a boolean"),
    "parallel_tool_calls": (bool, "a boolean"), "instructions": (str, "a string"),
    "previous_response_id": (str, "a string"), "user": (str, "a string"), "metadata": (dict, "an object"),
    "tools": (list, "an array"), "text": (dict, "an object"), "reasoning": (dict, "an object"),
    "input": ((str, list), "a string or an array of input items"),
}
_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0, 2, False), "top_p": (0, 1, False), "max_output_tokens": (1, 1_000_000, True),
}
_CHECKS: dict[str, Any] = {**_KINDS, **_RANGES}  # one lookup per field: a (types, words) or a (low, high, integer)


ROUTED = ("stream", "max_output_tokens")
"""The typed fields routing and limits read of a request passed through natively."""


def check_types(body: dict[str, Any]) -> None:
    """The type (or range) of every field of ``body`` that has one."""
    _check_fields(body, body)
    metadata = body.get("metadata")
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise fail("Invalid 'metadata': values must be strings.", "metadata", "invalid_type")
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if reasoning else None
    if effort is not None and effort not in EFFORTS:
        raise fail(f"Invalid value for 'reasoning.effort': expected one of {', '.join(EFFORTS)}.", "reasoning.effort")


def _check_fields(body: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        check = _CHECKS.get(key)
        value = body.get(key)
        if check is None or value is None:
            continue
        if len(check) == 2:
            if not isinstance(value, check[0]):
                raise fail(f"Invalid type for '{key}': expected {check[1]}.", key, "invalid_type")
            continue
        low, high, integer = check
        comox.check_number(body, key, low, high, integer=integer)


# -- input items -------------------------------------------------------------------


def normalise_input(value: str | list[Any], strict: bool) -> list[dict[str, Any]]:
    """``input`` as items, each with an ``id`` and its content as parts."""
    if isinstance(value, str):
        return [_message("user", value, "input")]
    items = []
    for i, item in enumerate(value):
        normal = _item(item, f"input[{i}]", strict)
        if normal is not None:
            items.append(normal)
    return items


def _item(item: Any, where: str, strict: bool) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        raise fail(f"Invalid type for '{where}': expected an input item object.", where, "invalid_type")
    kind = item.get("type", "message" if "role" in item else None)
    given_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else None
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise fail(f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}.", f"{where}.role")
        message = _message(role, item.get("content"), f"{where}.content", strict)
        if given_id:
            message["id"] = given_id
        return message
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise fail(f"Missing required parameter: '{where}.{key}'.", f"{where}.{key}", "missing_required_parameter")
        return {"type": "function_call", "id": given_id or new_id("fc"), "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"], "status": "completed"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise fail(f"Missing required parameter: '{where}.call_id'.", f"{where}.call_id", "missing_required_parameter")
        output = item.get("output")
        if not isinstance(output, (str, list)):
            raise fail(f"Invalid type for '{where}.output': expected a string or an array.", f"{where}.output", "invalid_type")
        if isinstance(output, list):
            _tool_output_text(output, f"{where}.output", strict)  # checked now, read when sent
        return {"type": "function_call_output", "id": given_id or new_id("fco"), "call_id": item["call_id"],
                "output": output, "status": "completed"}
    if kind == "reasoning":
        return {"type": "reasoning", "id": given_id or new_id("rs"), "summary": item.get("summary") or [],
                **({"content": item["content"]} if isinstance(item.get("content"), list) else {})}
    if kind is None:
        raise fail(f"Missing required parameter: '{where}.type' (or 'role', for a message).", f"{where}.type",
                   "missing_required_parameter")
    if strict:
        raise fail(f"Input items of type {kind!r} are not supported: Comox translates messages, function calls and their "
                   "outputs to chat completions", f"{where}.type", "unsupported_value")
    return None


def _message(role: str, content: Any, where: str, strict: bool = True) -> dict[str, Any]:
    assistant = role == "assistant"
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [_text_part(content, assistant)]
    elif isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            normal = _part(part, f"{where}[{i}]", assistant, strict)
            if normal is not None:
                parts.append(normal)
    else:
        raise fail(f"Invalid type for '{where}': expected a string or an array of content parts.", where, "invalid_type")
    return {"type": "message", "id": new_id("msg"), "role": role, "content": parts, "status": "completed"}


def _text_part(text: str, assistant: bool) -> dict[str, Any]:
    if assistant:
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def _part(part: Any, where: str, assistant: bool, strict: bool) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise fail(f"Invalid type for '{where}': expected a content part object.", where, "invalid_type")
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise fail(f"Missing required parameter: '{where}.text'.", f"{where}.text", "missing_required_parameter")
        return _text_part(part["text"], assistant)
    if kind == "refusal" and assistant and isinstance(part.get("refusal"), str):
        return {"type": "refusal", "refusal": part["refusal"]}
    if kind == "input_image" and not assistant:
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            if strict:
                raise fail(f"'{where}': only images given by 'image_url' (an http(s) or data: URL) are supported; "
                           "Comox has no Files API for 'file_id'", f"{where}.image_url", "unsupported_value")
            return None
        detail = part.get("detail", "auto")
        if detail not in DETAILS:
            raise fail(f"Invalid value for '{where}.detail': expected one of {', '.join(DETAILS)}.", f"{where}.detail")
        return {"type": "input_image", "image_url": url, "detail": detail}
    if strict:
        raise fail(f"Content parts of type {kind!r} are not supported here: Comox translates text and images "
                   "to chat completions", f"{where}.type", "unsupported_value")
    return None


def _tool_output_text(output: list[Any], where: str, strict: bool) -> str:
    texts = []
    for i, part in enumerate(output):
        if isinstance(part, dict) and part.get("type") in ("input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif strict:
            raise fail(f"'{where}[{i}]': a function call's output is sent to the model as text; only input_text parts "
                       "are supported", f"{where}[{i}]", "unsupported_value")
    return "".join(texts)


# -- chat messages -----------------------------------------------------------------


def chat_messages(pending: Pending) -> list[dict[str, Any]]:
    """The chat messages of ``instructions``, the previous conversation and the input."""
    messages: list[dict[str, Any]] = []
    instructions = pending.body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    joins = False  # the last message is an assistant's that a function call may join
    for item in (*pending.context, *pending.items):
        kind = item.get("type")
        if kind == "message":
            role = item["role"]
            if role == "assistant":
                text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
                messages.append({"role": "assistant", "content": text})
                joins = True
                continue
            messages.append(_chat_message("system" if role == "developer" else role, item["content"]))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if joins:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            joins = True
            continue
        elif kind == "function_call_output":
            output = item["output"]
            text = output if isinstance(output, str) else _tool_output_text(output, "output", False)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        else:
            continue  # reasoning: chat completions take none back
        joins = False
    return messages


def _chat_message(role: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    if all(p["type"] == "input_text" for p in parts):
        # Plain text as a string: what every engine's chat template takes.
        return {"role": role, "content": "\n".join(p["text"] for p in parts)}
    content = [{"type": "text", "text": p["text"]} if p["type"] == "input_text"
               else {"type": "image_url", "image_url": {"url": p["image_url"], "detail": p["detail"]}} for p in parts]
    return {"role": role, "content": content}


# -- tools and formats -------------------------------------------------------------


def chat_tools(tools: list[Any] | None, strict: bool) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise fail(f"Invalid type for '{where}': expected a tool object.", where, "invalid_type")
        if tool.get("type") != "function":
            if strict:
                raise fail(f"Tools of type {tool.get('type')!r} are not supported: Comox serves function tools, which "
                           "your code runs (built-in tools run only on OpenAI's servers)", f"{where}.type", "unsupported_value")
            continue
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise fail(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
        function: dict[str, Any] = {"name": tool["name"]}
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            value = tool.get(key)
            if value is not None:
                if not isinstance(value, kind):
                    raise fail(f"Invalid type for '{where}.{key}'.", f"{where}.{key}", "invalid_type")
                function[key] = value
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any, strict: bool) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if strict:
        raise fail("Invalid value for 'tool_choice': Comox supports 'none', 'auto', 'required' and "
                   "{\"type\": \"function\", \"name\": ...}", "tool_choice")
    return None


def chat_response_format(text: dict[str, Any] | None, strict: bool) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise fail("Missing required parameter: 'text.format.name'.", "text.format.name", "missing_required_parameter")
        if not isinstance(fmt.get("schema"), dict):
            raise fail("Missing required parameter: 'text.format.schema'.", "text.format.schema", "missing_required_parameter")
        schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    if strict:
        raise fail("Invalid value for 'text.format.type': expected 'text', 'json_object' or 'json_schema'.", "text.format.type")
    return None
