"""A chat completion as a Responses API ``response`` object: the assistant's
reasoning, text and tool calls as output items (``reasoning``, ``message``,
``function_call`` with the tool call's id as ``call_id``), the finish reason as
``status`` / ``incomplete_details``, and the usage in the Responses API's
names."""

from __future__ import annotations

import time
from typing import Any

import orjson

from .translate import Pending, new_id

__all__ = ["obj", "response_object", "from_chat", "output_items", "usage_of", "status_of", "message_item", "call_item",
           "reasoning_item", "reasoning_of"]


def response_object(pending: Pending, *, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                    incomplete: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``response`` object, echoing the request's parameters as OpenAI does."""
    body = pending.body
    text = body.get("text") or {}
    reasoning = body.get("reasoning") or {}
    done = status not in ("in_progress", "queued")
    return {
        "id": pending.id,
        "object": "response",
        "created_at": pending.created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "metadata": body.get("metadata") or {},
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": pending.store,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage if done else None,
        "user": body.get("user"),
    }


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(chat: dict[str, Any]) -> dict[str, Any] | None:
    """A chat completion's ``usage`` (and llama.cpp's ``timings.cache_n``) in
    the Responses API's names; None when it has none."""
    usage = chat.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    timings = chat.get("timings")
    if not cached and isinstance(timings, dict):
        cached = _count(timings.get("cache_n"))
    completion_details = usage.get("completion_tokens_details")
    reasoning = _count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def status_of(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    """``(status, incomplete_details)`` of a chat finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def message_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal is not None:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def reasoning_of(message: dict[str, Any]) -> str | None:
    """The reasoning text of a chat message or delta: ``reasoning_content``
    (vLLM, SGLang, llama.cpp's server) or ``reasoning``."""
    text = message.get("reasoning_content")
    if not isinstance(text, str):
        text = message.get("reasoning")
    return text if isinstance(text, str) and text else None


def output_items(chat: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The output items of a chat completion's first choice, and its finish reason."""
    choices = chat.get("choices")
    choice = obj(choices[0]) if isinstance(choices, list) and choices else {}
    message = obj(choice.get("message"))
    finish_reason = choice.get("finish_reason")
    item_status = "incomplete" if status_of(finish_reason)[0] == "incomplete" else "completed"
    items: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning:
        items.append(reasoning_item(new_id("rs"), reasoning))
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    tool_calls = [call for call in message.get("tool_calls") or () if isinstance(call, dict)]
    if text or refusal is not None or not tool_calls:
        items.append(message_item(new_id("msg"), text, item_status, refusal))
    for call in tool_calls:
        function = obj(call.get("function"))
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # an engine that sends them as an object
            arguments = orjson.dumps(arguments).decode() if arguments is not None else "{}"
        items.append(call_item(new_id("fc"), str(call.get("id") or new_id("call")), str(function.get("name") or ""),
                               arguments, "completed"))
    return items, finish_reason


def from_chat(pending: Pending, chat: dict[str, Any]) -> dict[str, Any]:
    """The ``response`` object answering ``pending``, from a chat completion."""
    items, finish_reason = output_items(chat)
    status, incomplete = status_of(finish_reason)
    return response_object(pending, status=status, output=items, usage=usage_of(chat), incomplete=incomplete)
