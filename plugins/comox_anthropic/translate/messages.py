"""Requests, answers, errors and usage, both ways (streams: :mod:`.streams`)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import orjson

import comox

__all__ = [
    "JSON_TOOL", "FINISH", "STOP", "ERRORS", "Translated", "drop_prefix", "openai_to_anthropic_request", "anthropic_to_openai_response",
    "anthropic_to_openai_error", "openai_usage", "finish_reason", "anthropic_to_openai_request",
    "openai_to_anthropic_response", "openai_to_anthropic_error", "anthropic_usage", "reasoning_of", "stop_of",
]

JSON_TOOL = "json_response"
"""The tool that carries a ``response_format`` JSON schema (a suffix ``_`` is
added while a client's own tool has the name)."""
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
# Anthropic error type: (Anthropic status, OpenAI status, OpenAI type, OpenAI code)
ERRORS: dict[str, tuple[int, int, str, str | None]] = {
    "invalid_request_error": (400, 400, "invalid_request_error", None),
    "authentication_error": (401, 401, "authentication_error", "invalid_api_key"),
    "billing_error": (402, 402, "insufficient_quota", "insufficient_quota"),
    "permission_error": (403, 403, "permission_error", None),
    "not_found_error": (404, 404, "invalid_request_error", "not_found"),
    "request_too_large": (413, 413, "invalid_request_error", "request_too_large"),
    "rate_limit_error": (429, 429, "rate_limit_error", "rate_limit_exceeded"),
    "api_error": (500, 500, "server_error", None),
    "timeout_error": (504, 504, "server_error", "timeout"),
    "overloaded_error": (529, 503, "service_unavailable", "overloaded"),
}
_BY_STATUS = {status: kind for kind, (status, *_) in ERRORS.items()}
_BY_OPENAI_TYPE = {"invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
                   "permission_error": "permission_error", "rate_limit_error": "rate_limit_error",
                   "insufficient_quota": "billing_error", "service_unavailable": "overloaded_error"}

Json = dict[str, Any]


def _bad(message: str, param: str | None = None) -> comox.InvalidRequest:
    return comox.InvalidRequest(message, param=param, code="unsupported_parameter")


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _object(arguments: Any, param: str | None = None) -> Json:
    """A tool call's ``arguments`` (a JSON string) as an object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    if param is None:  # an answer: keep what the model wrote
        return {"_raw_arguments": arguments}
    raise comox.InvalidRequest("tool call arguments must be a JSON object", param=param, code="invalid_value")


# -- OpenAI request → Anthropic request --------------------------------------------


class Translated(NamedTuple):
    """A Messages request, and what translating its answer back needs."""

    body: Json
    json_tool: str | None = None
    """The tool that carries a ``response_format`` schema: its input is the
    answer's content. None without one."""
    prefill_space: str = ""
    """Whitespace taken off the end of a final assistant message (a prefill,
    which the API refuses with trailing whitespace). The answer continues
    after it, so as much of it as the answer starts with is dropped from the
    answer (:func:`drop_prefix`): the client sees the continuation of its own
    text."""


def drop_prefix(space: str, text: str) -> tuple[str, str]:
    """``text`` without as much of ``space`` as it starts with, and what is
    left of ``space`` to drop from the next piece of text (when all of
    ``text`` matched)."""
    n = 0
    while n < len(space) and n < len(text) and space[n] == text[n]:
        n += 1
    return text[n:], space[n:] if n == len(text) else ""


def openai_to_anthropic_request(body: Json, *, model: str | None = None, default_max_tokens: int = 4096) -> Translated:
    """An OpenAI chat completion request as a Messages request for ``model``
    (default: the request's)."""
    for key in ("functions", "function_call", "audio"):
        if body.get(key) is not None:
            raise _bad(f"'{key}' is not supported by the Anthropic API; use 'tools'" if key != "audio"
                       else "audio output is not supported by the Anthropic API", key)
    if (body.get("n") or 1) != 1:
        raise _bad("'n' must be 1: the Anthropic API returns one choice", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("log probabilities are not available from the Anthropic API", "logprobs")
    system, messages, space = _messages_to_anthropic(body.get("messages") or [])
    out: Json = {"model": model or body["model"], "messages": messages,
                 "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens}
    if system:
        plain = len(system) == 1 and set(system[0]) == {"type", "text"}
        out["system"] = system[0]["text"] if plain else system
    stop = body.get("stop")
    if stop:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s.strip() for s in stops):
            raise _bad("the Anthropic API takes no empty or whitespace-only stop sequence", "stop")
        out["stop_sequences"] = stops
    if body.get("temperature") is not None:
        out["temperature"] = min(float(body["temperature"]), 1.0)  # Anthropic's range is 0-1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True
    tools = [_tool_to_anthropic(tool, i) for i, tool in enumerate(body.get("tools") or [])]
    choice = _choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    json_tool = None
    schema = _response_schema(body.get("response_format"))
    if schema is not None:
        json_tool = JSON_TOOL
        while any(tool["name"] == json_tool for tool in tools):
            json_tool += "_"
        kind = choice.get("type") if choice else "auto"
        if kind != "tool":  # a forced function stays forced; otherwise the model may call a tool or answer
            keep = {"disable_parallel_tool_use": True} if choice and choice.get("disable_parallel_tool_use") else {}
            choice = {"type": "any", **keep} if tools and kind != "none" else {"type": "tool", "name": json_tool, **keep}
        tools.append({"name": json_tool, "description": "Answer with this tool: its input is the response.",
                      "input_schema": schema})
    if tools:
        out["tools"] = tools
        if choice:
            out["tool_choice"] = choice
    return Translated(out, json_tool, space)


def _messages_to_anthropic(messages: list[Json]) -> tuple[list[Json], list[Json], str]:
    system: list[Json] = []
    out: list[Json] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), f"{where}.content")
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), f"{where}.content")
        elif role == "assistant":
            blocks = _text_blocks(message.get("content"), f"{where}.content", refusal=True)
            for j, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                               "input": _object(function.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")})
        elif role == "tool":
            role = "user"
            content = message.get("content")
            result = content if isinstance(content, str) else _text_blocks(content, f"{where}.content")
            blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"), "content": result}]
        else:
            raise _bad(f"messages with role {role!r} are not supported by the Anthropic API", f"{where}.role")
        if not blocks:
            continue
        if out and out[-1]["role"] == role:  # Anthropic's turns alternate: merge
            out[-1]["content"] += blocks
        else:
            out.append({"role": role, "content": blocks})
    for message in out:  # tool results come first in their turn
        message["content"].sort(key=lambda block: block["type"] != "tool_result")
    space = ""
    if out and out[-1]["role"] == "assistant":  # a prefill: the API refuses trailing whitespace
        last = out[-1]["content"][-1]
        if last["type"] == "text":
            text = last["text"].rstrip()
            space = last["text"][len(text):]
            last["text"] = text
            if not text:
                out[-1]["content"].pop()
                if not out[-1]["content"]:
                    out.pop()
    return system, out, space


def _text_blocks(content: Any, where: str, *, refusal: bool = False) -> list[Json]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind not in ("text", "refusal") or (kind == "refusal" and not refusal):
            raise _bad(f"content of type {kind!r} is not supported here", f"{where}[{i}]")
        text = part.get("text") if kind == "text" else part.get("refusal")
        if text:
            blocks.append({"type": "text", "text": text, **_cache_control(part)})
    return blocks


def _cache_control(part: Json) -> Json:
    return {"cache_control": part["cache_control"]} if part.get("cache_control") else {}


def _user_blocks(content: Any, where: str) -> list[Json]:
    if not isinstance(content, list):
        return _text_blocks(content, where)
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            blocks += _text_blocks([part], where)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else str(image or "")
            if url.startswith("data:"):
                media_type, data = _data_url(url, f"{where}[{i}].image_url.url")
                if media_type not in IMAGE_TYPES:
                    raise _bad(f"the Anthropic API takes images of type {', '.join(sorted(IMAGE_TYPES))}, not {media_type}",
                               f"{where}[{i}].image_url.url")
                source = {"type": "base64", "media_type": media_type, "data": data}
            elif url.startswith(("https://", "http://")):
                source = {"type": "url", "url": url}
            else:
                raise _bad("an image must be a data: URL or an http(s) URL", f"{where}[{i}].image_url.url")
            blocks.append({"type": "image", "source": source, **_cache_control(part)})
        elif kind == "file" and str((part.get("file") or {}).get("file_data", "")).startswith("data:application/pdf"):
            media_type, data = _data_url(part["file"]["file_data"], f"{where}[{i}].file.file_data")
            blocks.append({"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}})
        else:
            raise _bad(f"content of type {kind!r} is not supported by the Anthropic API", f"{where}[{i}]")
    return blocks


def _data_url(url: str, param: str) -> tuple[str, str]:
    head, _, data = url.partition(",")
    if not head.endswith(";base64") or not data:
        raise _bad("a data: URL must be base64-encoded (data:<type>;base64,<data>)", param)
    return head[5:-7], data


def _tool_to_anthropic(tool: Json, i: int) -> Json:
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise _bad(f"tools of type {tool.get('type')!r} are not supported by the Anthropic API", f"tools[{i}]")
    function = tool["function"]
    out = {"name": function.get("name"), "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _choice_to_anthropic(choice: Any, parallel: Any) -> Json | None:
    if choice is None:
        out: Json | None = None
    elif choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise _bad(f"tool_choice {choice!r} is not supported by the Anthropic API", "tool_choice")
    if parallel is False and (out is None or out["type"] != "none"):
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def _response_schema(response_format: Any) -> Json | None:
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
        if schema.get("type") == "object":
            return dict(schema)
        raise _bad("the JSON schema must describe an object", "response_format.json_schema.schema")
    raise _bad(f"response_format {response_format.get('type')!r} is not supported", "response_format")


# -- Anthropic answers → OpenAI answers ----------------------------------------------


def openai_usage(usage: Json) -> Json:
    """Anthropic usage as OpenAI usage: prompt tokens count cache reads and
    writes once each; cached tokens are the reads."""
    read = usage.get("cache_read_input_tokens") or 0
    write = usage.get("cache_creation_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + read + write
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read},
            "cache_read_input_tokens": read, "cache_creation_input_tokens": write}


def finish_reason(stop_reason: Any, tool_calls: bool) -> str:
    finish = FINISH.get(stop_reason, "stop")
    return "stop" if finish == "tool_calls" and not tool_calls else finish


def anthropic_to_openai_response(message: Json, *, json_tool: str | None = None, prefill_space: str = "",
                                 created: int | None = None) -> Json:
    """A Message as an OpenAI chat completion; the input of ``json_tool``
    becomes the content (see :class:`Translated` for both options). Thinking
    and server-tool blocks are left out."""
    texts: list[str] = []
    calls: list[Json] = []
    for block in message.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use" and block.get("name") == json_tool:
            texts.append(_dumps(block.get("input") or {}))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": _dumps(block.get("input") or {})}})
    answer: Json = {"role": "assistant", "content": drop_prefix(prefill_space, "".join(texts))[0] if texts or not calls else None}
    if calls:
        answer["tool_calls"] = calls
    choice = {"index": 0, "message": answer, "logprobs": None, "finish_reason": finish_reason(message.get("stop_reason"), bool(calls))}
    return {"id": message.get("id"), "object": "chat.completion", "created": created or int(time.time()),
            "model": message.get("model"), "choices": [choice], "usage": openai_usage(message.get("usage") or {})}


def anthropic_to_openai_error(status: int | None, body: Any) -> tuple[int, Json]:
    """An Anthropic error (an HTTP status and its body, or an ``error`` event
    with ``status`` None) as ``(status, OpenAI error body)``: the same status,
    but 529 overloaded → 503."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    if kind not in ERRORS:
        kind = _BY_STATUS.get(status or 500, "invalid_request_error" if status and status < 500 else "api_error")
    _, mapped, openai_type, code = ERRORS[kind]
    message = error.get("message") if isinstance(error, dict) else None
    out_status = mapped if status is None or status == 529 else status
    return out_status, {"error": {"message": message or f"the Anthropic API answered HTTP {status} ({kind})",
                                  "type": openai_type, "param": None, "code": code}}


# -- Anthropic request → OpenAI request (an inbound /v1/messages) --------------------


def anthropic_usage(usage: Json) -> Json:
    """OpenAI usage as Anthropic usage (the inverse of :func:`openai_usage`)."""
    details = usage.get("prompt_tokens_details") or {}
    read = usage.get("cache_read_input_tokens", details.get("cached_tokens")) or 0
    write = usage.get("cache_creation_input_tokens") or 0
    return {"input_tokens": max((usage.get("prompt_tokens") or 0) - read - write, 0),
            "output_tokens": usage.get("completion_tokens") or 0,
            "cache_read_input_tokens": read, "cache_creation_input_tokens": write}


def _openai_text(content: Any) -> Any:
    """Anthropic text (a string or text blocks) as OpenAI content."""
    if isinstance(content, str):
        return content
    parts = [{"type": "text", "text": block.get("text", "")} for block in content or [] if block.get("type") == "text"]
    return parts[0]["text"] if len(parts) == 1 else parts


def anthropic_to_openai_request(body: Json) -> Json:
    """A Messages request as an OpenAI chat completion request."""
    messages: list[Json] = []
    system = body.get("system")
    if system:  # one string: not every server takes a list of parts in a system message
        text = system if isinstance(system, str) else "\n\n".join(b.get("text", "") for b in system if b.get("type") == "text")
        messages.append({"role": "system", "content": text})
    for i, message in enumerate(body.get("messages") or []):
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif role == "assistant":
            texts = [block.get("text", "") for block in content if block.get("type") == "text"]
            calls = [{"id": block.get("id"), "type": "function",
                      "function": {"name": block.get("name"), "arguments": _dumps(block.get("input") or {})}}
                     for block in content if block.get("type") == "tool_use"]
            # Thinking blocks are the model's own, not input for another one: left out.
            # "" rather than null beside tool calls: some servers (llama-cpp-python) take only a string.
            answer: Json = {"role": "assistant", "content": "".join(texts) if texts or calls else None}
            if calls:
                answer["tool_calls"] = calls
            messages.append(answer)
        else:
            parts: list[Json] = []
            for j, block in enumerate(content or []):
                kind, source = block.get("type"), block.get("source") or {}
                if kind == "tool_result":
                    # Text only (a tool message is a string for some servers); images in a result are left out.
                    result = block.get("content", "")
                    text = result if isinstance(result, str) else "\n".join(
                        part.get("text", "") for part in result or [] if part.get("type") == "text")
                    messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
                elif kind == "text":
                    parts.append({"type": "text", "text": block.get("text", "")})
                elif kind == "image":
                    url = source.get("url") or f"data:{source.get('media_type')};base64,{source.get('data')}"
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                elif kind == "document" and source.get("type") == "text":
                    parts.append({"type": "text", "text": source.get("data", "")})
                elif kind == "document" and source.get("type") == "base64":
                    parts.append({"type": "file", "file": {"file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}})
                else:
                    raise _bad(f"content of type {kind!r} is not supported here", f"messages[{i}].content[{j}]")
            if parts:
                plain = len(parts) == 1 and parts[0]["type"] == "text"
                messages.append({"role": role, "content": parts[0]["text"] if plain else parts})
    out: Json = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_tokens")}
    for key, to in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("stop_sequences", "stop")):
        if body.get(key) is not None:
            out[to] = body[key]
    if (body.get("metadata") or {}).get("user_id"):
        out["user"] = body["metadata"]["user_id"]
    if body.get("stream"):
        out.update(stream=True, stream_options={"include_usage": True})
    if body.get("tools"):
        out["tools"] = [{"type": "function", "function": {"name": tool.get("name"), "parameters": tool.get("input_schema"),
                                                          **({"description": tool["description"]} if tool.get("description") else {})}}
                        for tool in body["tools"]]
    output = body.get("output_config") or {}
    schema = output.get("format") if isinstance(output, dict) else None
    if isinstance(schema, dict) and schema.get("type") == "json_schema":  # structured output
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema.get("schema")}}
    choice = body.get("tool_choice") or {}
    kind = choice.get("type")
    if kind in ("auto", "none", "any"):
        out["tool_choice"] = "required" if kind == "any" else kind
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


def reasoning_of(message: Json) -> str:
    """The reasoning text of an OpenAI message or delta: ``reasoning_content``
    (llama.cpp's server, vLLM, DeepSeek) or ``reasoning`` (vLLM's newer name,
    Ollama, OpenRouter)."""
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


def stop_of(choice: Json, stop_sequences: Any = ()) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` of an OpenAI choice. A stop sequence
    shows only where the server says which one matched: vLLM's
    ``stop_reason``, SGLang's ``matched_stop`` (others: ``end_turn``)."""
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason", choice.get("matched_stop"))
    if finish == "stop" and isinstance(matched, str) and matched in (stop_sequences or ()):
        return "stop_sequence", matched
    return STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn", None


def openai_to_anthropic_response(completion: Json, *, model: str | None = None, stop_sequences: Any = ()) -> Json:
    """An OpenAI chat completion as a Message (its first choice): reasoning
    content as a ``thinking`` block first (with an empty ``signature``: there
    is none to give), then the text, then the tool calls."""
    choice = (completion.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    text = _openai_text(answer.get("content")) if answer.get("content") else ""
    if isinstance(text, list):
        text = "".join(part["text"] for part in text)
    reasoning = reasoning_of(answer)
    content: list[Json] = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    if text:
        content.append({"type": "text", "text": text})
    for call in answer.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": _object(function.get("arguments"))})
    stop_reason, stop_sequence = stop_of(choice, stop_sequences)
    return {"id": completion.get("id"), "type": "message", "role": "assistant", "model": model or completion.get("model"),
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": anthropic_usage(completion.get("usage") or {})}


def openai_to_anthropic_error(status: int | None, body: Any) -> tuple[int, Json]:
    """An OpenAI error (status and body; ``status`` None for an error in a
    stream) as ``(status, Anthropic error body)``; 503 → 529 overloaded."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    if status is None:
        kind = _BY_OPENAI_TYPE.get(str(error.get("type")), "api_error")
    else:
        kind = "overloaded_error" if status == 503 else _BY_STATUS.get(
            status, "invalid_request_error" if status < 500 else "api_error")
    out_status = ERRORS[kind][0] if status is None or status == 503 else status
    message = error.get("message") or f"HTTP {status}"
    return out_status, {"type": "error", "error": {"type": kind, "message": message}}
