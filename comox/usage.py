"""What a finished response says about tokens, read without parsing the whole
response, and recorded on the backend that served it.

The core calls :func:`record_body` / :func:`record_stream` after the response
has been sent to the client, so reading usage never delays it. Only the small
``usage`` and ``timings`` objects are parsed: an embeddings answer of several
megabytes costs the same as a one-line chat answer.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

if TYPE_CHECKING:
    from .fleet import BackendState
    from .request import GatewayRequest

__all__ = ["Usage", "parse_usage", "usage_of_body", "usage_of_events", "record_body", "record_stream"]


class Usage(NamedTuple):
    """What a response said about tokens; ``None`` where it said nothing.

    :param prompt: prompt tokens, cached ones included.
    :param completion: generated tokens.
    :param cached: prompt tokens served from the backend's prompt cache
        (``usage.prompt_tokens_details.cached_tokens`` or llama.cpp's
        ``timings.cache_n``).
    :param prefill_tps: prompt tokens per second, when the backend reports it.
    :param decode_tps: generated tokens per second, when the backend reports it.
    """

    prompt: int | None = None
    completion: int | None = None
    cached: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None


_new_usage = tuple.__new__  # a NamedTuple's own __new__ is a Python call: this is the C one
_NOTHING = Usage()

log = logging.getLogger("comox")

_KEYS = (b'"usage"', b'"timings"')
WHOLE_PARSE_MAX = 32 * 1024  # bodies up to this size are parsed whole (faster than searching)
_MAX_TRIES = 16  # closing braces tried before giving up on one object
_SPACE = b" \t\r\n"
_BEFORE_KEY = b"{,"
LONG_EVENT = 512  # an event line longer than this has its usage object parsed alone
_DECODER = json.JSONDecoder()  # raw_decode: one value and no more (orjson has no such call)


def parse_usage(obj: dict[str, Any]) -> Usage | None:
    """The :class:`Usage` of a response object (its ``usage`` and llama.cpp's
    ``timings``); None when it says nothing."""
    usage = obj.get("usage")
    timings = obj.get("timings")
    if not isinstance(usage, dict) and not isinstance(timings, dict):
        return None
    prompt: int | None = None
    completion: int | None = None
    cached: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    if isinstance(usage, dict):
        # OpenAI's chat names, else its Responses API's (input/output tokens).
        prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
        if isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        elif prompt is not None and "prompt_tokens" not in usage:
            # Anthropic's Messages API counts cache reads and writes beside input_tokens.
            read = _int(usage.get("cache_read_input_tokens"))
            prompt += (read or 0) + (_int(usage.get("cache_creation_input_tokens")) or 0)
            if read is not None:
                cached = read
    if isinstance(timings, dict):
        cache_n = _int(timings.get("cache_n"))
        if cache_n is not None:
            cached = cache_n
            prompt_n = _int(timings.get("prompt_n"))
            if prompt is None and prompt_n is not None:
                prompt = prompt_n + cache_n
        if completion is None:
            completion = _int(timings.get("predicted_n"))
        pps = timings.get("prompt_per_second")
        dps = timings.get("predicted_per_second")
        if isinstance(pps, (int, float)) and pps > 0 and (_int(timings.get("prompt_n")) or 0) > 1:
            prefill_tps = float(pps)
        if isinstance(dps, (int, float)) and dps > 0 and (_int(timings.get("predicted_n")) or 0) > 1:
            decode_tps = float(dps)
    return _new_usage(Usage, (prompt, completion, cached, prefill_tps, decode_tps))


def _int(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None  # (type: a bool is no count)


def _object_after(body: bytes, key: bytes) -> Any:
    """The JSON value of the last ``key`` in ``body`` that is really a key (not
    text inside a string), if it is an object; else None."""
    end = len(body)
    while True:
        at = body.rfind(key, 0, end)
        if at < 0:
            return None
        end = at
        # A real key follows '{' or ',' and precedes ':'. Inside a string its
        # quotes are escaped, so the byte before it is a backslash.
        i = at - 1
        while i >= 0 and body[i] in _SPACE:
            i -= 1
        colon = at + len(key)
        while colon < len(body) and body[colon] in _SPACE:
            colon += 1
        if i < 0 or body[i] not in _BEFORE_KEY or body[colon:colon + 1] != b":":
            continue
        start = colon + 1
        while start < len(body) and body[start] in _SPACE:
            start += 1
        if body[start:start + 1] != b"{":
            return None  # the value is not an object
        close = start
        for _ in range(_MAX_TRIES):
            close = body.find(b"}", close + 1)
            if close < 0:
                return None
            try:
                return orjson.loads(body[start:close + 1])
            except orjson.JSONDecodeError:
                continue  # a nested object or a brace in a string: try the next one
        return None


def usage_of_body(body: bytes) -> Usage | None:
    """:func:`parse_usage` of a JSON response body. A small body is parsed
    whole; of a large one only the ``usage`` and ``timings`` objects are,
    found from its end, where every OpenAI-compatible server puts them."""
    if len(body) <= WHOLE_PARSE_MAX:
        obj = orjson.loads(body)
        return parse_usage(obj) if isinstance(obj, dict) else None
    found = {}
    tail = body[-WHOLE_PARSE_MAX:]
    for key in _KEYS:
        value = _object_after(tail, key)
        if value is None and key == b'"usage"':
            value = _object_after(body, key)  # not in the tail: look everywhere, once
        if value is not None:
            found[key[1:-1].decode()] = value
    return parse_usage(found) if found else None


def usage_of_events(end: bytes) -> Usage | None:
    """:func:`parse_usage` of the last SSE events of a stream (``end`` holds its
    last two chunks), where OpenAI servers put ``usage`` and llama.cpp ``timings``
    (the Responses API: in the ``response`` of its ``response.completed`` event).
    The last ``data:`` line that says one wins; lines are searched from the end
    and only those naming ``usage`` or ``timings`` are parsed (a stream's end
    can hold dozens of events, and a Responses stream repeats its whole
    response object in three of them)."""
    stop = None  # (rfind's end: None is the end of end)
    while True:
        at = end.rfind(b'"usage"', 0, stop)
        # A "timings" line before the last "usage" line would lose to it: not searched
        # for (from at + 1: 0 when none was found, and "timings" cannot start at "usage").
        timings = end.rfind(b'"timings"', at + 1, stop)
        if timings > at:
            at = timings
        if at < 0:
            return None
        start = end.rfind(b"\n", 0, at) + 1
        line_end = end.find(b"\n", at)
        stop = start  # the next search: the lines before this one
        if not end.startswith(b"data:", start):
            continue
        if line_end < 0:
            line_end = len(end)
        if line_end - start > LONG_EVENT:
            usage = _usage_alone(end, start, at, line_end)
            if usage is not None:
                return usage
        try:
            obj = orjson.loads(end[start + 5:line_end])
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            # A Responses API event carries it in its response object.
            usage = parse_usage(obj)
            if usage is None:
                inner = obj.get("response")
                if isinstance(inner, dict):
                    usage = parse_usage(inner)
            if usage is not None:
                return usage


def _usage_alone(end: bytes, start: int, at: int, line_end: int) -> Usage | None:
    """The usage of a long event line (``end[start:line_end]``; a Responses
    API ``response.completed`` repeats the whole response) from its
    ``"usage"`` object at ``at``, parsed alone: a third of the cost of the
    line. None to parse the line whole."""
    if end[at - 1] == 0x5C or end.find(b'"timings"', start, line_end) >= 0:  # in a string (\"usage\"); llama.cpp's pair
        return None
    try:
        value = end[at + 7:line_end].decode().lstrip()
        if not value.startswith(":"):
            return None  # "usage" was a value, not a key
        obj, _ = _DECODER.raw_decode(value[1:].lstrip())
    except ValueError:  # not UTF-8, not JSON: the whole line decides
        return None
    return parse_usage({"usage": obj}) if isinstance(obj, dict) else None


def record_body(request: GatewayRequest, state: BackendState | None, body: bytes, parsed: object = None) -> None:
    """Read the usage of a JSON answer into ``request.usage``, and record its
    tokens on ``state``, the backend that answered in ``request.answered_at -
    request.sent_at`` (prefill and decode together), if one did. ``parsed``:
    the body already parsed, if it was."""
    try:
        usage = request.usage = parse_usage(parsed) if isinstance(parsed, dict) else usage_of_body(body)
        if usage is None or state is None:
            return
        prompt, completion, cached, prefill_tps, decode_tps = usage
        elapsed = request.answered_at - request.sent_at
        decode_s: float | None = elapsed
        if prompt and state.prefill_tps:
            prefill_s = (prompt - (cached or 0)) / state.prefill_tps
            decode_s = elapsed - prefill_s if elapsed - prefill_s > 0.2 * elapsed else None
        state.record_tokens(prompt, cached, completion, prefill_tps, decode_tps, decode_s=decode_s)
        _tell_policy(request, state, usage)
    except Exception:
        log.debug("could not read usage from the response to %s", request.id, exc_info=True)


def record_stream(request: GatewayRequest, state: BackendState | None, first: float, last: float,
                  counted: int, end: bytes) -> None:
    """Read the usage of a finished SSE stream into ``request.usage`` (counting
    its events when it reported none), and record it on ``state`` if a backend
    answered: the first chunk came at ``first`` (≈ the end of prefill), the
    last at ``last`` (``time.perf_counter()``), ``end`` is its last two
    chunks, and the chunks before them held ``counted`` ``data:`` lines."""
    try:
        usage = usage_of_events(end)
        prompt, generated, cached, prefill_tps, decode_tps = usage or _NOTHING  # (a Usage is never false)
        if not generated:  # count events: one per token, less the [DONE] line
            generated = max(counted + end.count(b"data:") - 1, 0)
        request.usage = usage or _new_usage(Usage, (None, generated, None, None, None))
        if state is None:
            return
        decode_s = last - first
        if decode_tps is None and generated > 1 and decode_s > 0:
            decode_tps = (generated - 1) / decode_s  # tokens after the first, over the time after it
        state.record_tokens(prompt, cached, generated, prefill_tps, decode_tps, ttft_s=first - request.sent_at)
        if usage is not None:
            _tell_policy(request, state, usage)
    except Exception:
        log.debug("could not read usage from the stream answering %s", request.id, exc_info=True)


def _tell_policy(request: GatewayRequest, state: BackendState, usage: Usage) -> None:
    group = state.group
    if group is not None and group.observer is not None:
        group.observer(request, state, usage)
