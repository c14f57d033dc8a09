"""Cached answers in the shape a request wants: a stored stream (its SSE events)
replayed as it was or assembled into one JSON answer, and a stored JSON answer
replayed as it was or cut into the chunks a stream of it would have held.

Only OpenAI's chat completions and (legacy) completions stream; an embeddings
answer is always JSON. Every function here is pure: bytes and dicts in, bytes
out, ``None`` when the conversion cannot be faithful (the caller then treats the
request as a miss).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DONE", "split_events", "event_data", "usage_event", "sse", "chunks_of", "assemble", "with_usage"]

DONE = b"data: [DONE]"


def split_events(body: bytes) -> list[bytes] | None:
    """The events of a complete SSE answer (each block as sent, without its
    blank line), ``[DONE]`` and comments left out; ``None`` unless it ended
    with ``data: [DONE]`` and carried no error event."""
    blocks = [block.strip(b"\n") for block in body.replace(b"\r\n", b"\n").split(b"\n\n")]
    events = [block for block in blocks if block and not block.startswith(b":")]
    if not events or events[-1] != DONE:
        return None
    events.pop()
    for event in events:
        if event == DONE or (b'"error"' in event and "error" in _parsed(event)):
            return None
    return events


def event_data(event: bytes) -> bytes:
    """The data of one event (its ``data:`` lines joined, as SSE says)."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def _parsed(event: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(event_data(event))
    except orjson.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def usage_event(event: bytes) -> dict[str, Any] | None:
    """The usage of the event that carries nothing else (``choices: []``, as
    ``stream_options.include_usage`` asks), else None."""
    if b'"usage"' not in event:
        return None
    obj = _parsed(event)
    usage = obj.get("usage")
    return usage if isinstance(usage, dict) and not obj.get("choices") else None


def sse(objects: list[dict[str, Any]] | list[bytes]) -> bytes:
    """A whole SSE answer: one ``data:`` event per chunk (JSON objects, or events
    as stored), then ``data: [DONE]``."""
    parts = [item if isinstance(item, bytes) else b"data: " + orjson.dumps(item) for item in objects]
    parts.append(DONE)
    return b"\n\n".join(parts) + b"\n\n"


def with_usage(events: list[bytes], include_usage: bool) -> list[bytes] | None:
    """A stored stream's events for a request that asked (``include_usage``) or
    did not ask for a usage chunk. A stream that had one keeps it, or, when it
    was not asked for, has its usage moved onto the last chunk (so the answer
    is still settled against limits by what it cost); one that had none serves
    only a request that does not ask. ``None``: it cannot serve this request."""
    usage = usage_event(events[-1]) if events else None
    if usage is None:
        return None if include_usage else events
    if include_usage:
        return events
    if len(events) < 2:
        return None
    last = _parsed(events[-2])
    if not last:
        return None
    return [*events[:-2], b"data: " + orjson.dumps({**last, "usage": usage})]


# -- JSON answer → stream chunks ---------------------------------------------------


def _head(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    head = {"id": obj.get("id"), "object": kind, "created": obj.get("created"), "model": obj.get("model")}
    if obj.get("system_fingerprint") is not None:
        head["system_fingerprint"] = obj["system_fingerprint"]
    return head


def chunks_of(body: bytes, endpoint: str, include_usage: bool) -> list[dict[str, Any]] | None:
    """The stream chunks of a JSON chat completion or text completion: per
    choice, for chat a role delta, a delta with the content (tool calls,
    refusal and any other message field), and the finish reason; for text the
    text, then the finish reason. The usage comes in a chunk of its own
    (``choices: []``) when ``include_usage``, else on the last chunk.
    ``None`` when the body is not such an answer, or ``include_usage`` asks for
    a usage it does not have."""
    obj = orjson.loads(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return None
    usage = obj.get("usage")
    if include_usage and not isinstance(usage, dict):
        return None
    chunks: list[dict[str, Any]] = []
    if endpoint == "chat/completions":
        head = _head(obj, "chat.completion.chunk")
        for n, choice in enumerate(obj["choices"]):
            index = choice.get("index", n)
            message = choice.get("message") or {}
            role: dict[str, Any] = {"role": message.get("role") or "assistant"}
            if isinstance(message.get("content"), str):
                role["content"] = ""
            chunks.append({**head, "choices": [{"index": index, "delta": role, "logprobs": None, "finish_reason": None}]})
            delta = {k: v for k, v in message.items() if k not in ("role", "tool_calls") and v not in (None, "")}
            calls = message.get("tool_calls")
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            if delta or choice.get("logprobs"):
                chunks.append({**head, "choices": [{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                                    "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                "finish_reason": choice.get("finish_reason")}]})
    elif endpoint == "completions":
        head = _head(obj, "text_completion")
        for n, choice in enumerate(obj["choices"]):
            index = choice.get("index", n)
            chunks.append({**head, "choices": [{"index": index, "text": choice.get("text") or "",
                                                "logprobs": choice.get("logprobs"), "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": choice.get("finish_reason")}]})
    else:
        return None
    if isinstance(usage, dict):
        if include_usage:
            chunks.append({**head, "choices": [], "usage": usage})
        elif chunks:
            chunks[-1]["usage"] = usage
    return chunks


# -- stream chunks → JSON answer ---------------------------------------------------


def _merge_logprobs(into: dict[str, Any], piece: Any) -> None:
    if not isinstance(piece, dict):
        return
    for key, value in piece.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        elif value is not None:
            into[key] = value


def _merge_calls(calls: dict[int, dict[str, Any]], pieces: Any) -> None:
    for n, piece in enumerate(pieces if isinstance(pieces, list) else []):
        if not isinstance(piece, dict):
            continue
        call = calls.setdefault(piece.get("index", n), {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
        for key, value in piece.items():
            if key == "function" and isinstance(value, dict):
                for part, text in value.items():
                    if isinstance(text, str):
                        call["function"][part] = call["function"].get(part, "") + text
            elif key != "index" and value is not None:
                call[key] = value


def assemble(events: list[bytes], endpoint: str) -> bytes | None:
    """The JSON answer a stream of chat or text completion chunks adds up to:
    per choice the content (or text) concatenated, tool-call deltas merged by
    their index, logprobs joined, the last finish reason; the stream's usage.
    ``None`` when the stream carried no usage (a JSON answer always has one;
    the request is then a miss, and its JSON answer replaces the stream)."""
    chat = endpoint == "chat/completions"
    if not chat and endpoint != "completions":
        return None
    first: dict[str, Any] | None = None
    usage = None
    choices: dict[int, dict[str, Any]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    for event in events:
        chunk = _parsed(event)
        if not chunk:
            return None
        first = first or chunk
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for n, piece in enumerate(chunk.get("choices") or []):
            index = piece.get("index", n)
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = {"index": index}
                if chat:
                    choice["message"] = {"role": "assistant", "content": None}
                else:
                    choice["text"] = ""
                choice["logprobs"] = None
                choice["finish_reason"] = None
            if chat:
                message = choice["message"]
                for key, value in (piece.get("delta") or {}).items():
                    if key == "tool_calls":
                        _merge_calls(calls.setdefault(index, {}), value)
                    elif key == "role" and value:
                        message["role"] = value
                    elif isinstance(value, str):
                        message[key] = (message.get(key) or "") + value
                    elif value is not None:
                        message[key] = value
            elif isinstance(piece.get("text"), str):
                choice["text"] += piece["text"]
            if piece.get("logprobs"):
                if choice["logprobs"] is None:
                    choice["logprobs"] = {}
                _merge_logprobs(choice["logprobs"], piece["logprobs"])
            if piece.get("finish_reason") is not None:
                choice["finish_reason"] = piece["finish_reason"]
    if first is None or usage is None:
        return None
    for index, merged in calls.items():
        choices[index]["message"]["tool_calls"] = [merged[i] for i in sorted(merged)]
    head = _head(first, "chat.completion" if chat else "text_completion")
    return orjson.dumps({**head, "choices": [choices[i] for i in sorted(choices)], "usage": usage})
