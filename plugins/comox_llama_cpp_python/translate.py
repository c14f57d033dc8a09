"""OpenAI request bodies → llama-cpp-python call arguments. Whatever this
backend cannot do is refused here, as an OpenAI-format 400 naming the
parameter, before a copy of the model is taken."""

from __future__ import annotations

import math
from typing import Any

from comox import InvalidRequest, check_number

__all__ = ["chat_kwargs", "completion_kwargs", "embedding_kwargs", "include_usage", "trim_top_logprobs", "wants_logprobs"]

_NUMBERS = ("temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "tfs_z", "mirostat_tau", "mirostat_eta")
_INTEGERS = ("top_k", "seed", "mirostat_mode")
_SAMPLING = frozenset(_NUMBERS + _INTEGERS + ("stop", "logit_bias", "max_tokens"))
_IGNORED = frozenset({"model", "stream", "user", "n", "stream_options"})
_COMPLETION = _SAMPLING | _IGNORED | {"prompt", "suffix", "echo", "logprobs", "best_of"}
_CHAT = _SAMPLING | _IGNORED | {
    "messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
    "functions", "function_call", "logprobs", "top_logprobs",
}
_EMBEDDING = frozenset({"model", "input", "encoding_format", "user"})


def _unsupported(body: dict[str, Any], allowed: frozenset[str] | set[str], endpoint: str) -> None:
    for key, value in body.items():
        if key not in allowed and value is not None:
            raise InvalidRequest(
                f"'{key}' is not supported by llama-cpp-python backends on /v1/{endpoint}",
                param=key, code="unsupported_parameter",
            )


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("'n' must be 1: a llama-cpp-python backend generates one choice", param="n", code="unsupported_value")
    for key in _NUMBERS:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"'{key}' must be a number", param=key, code="invalid_type")
            kwargs[key] = float(value)
    for key in _INTEGERS:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"'{key}' must be an integer", param=key, code="invalid_type")
            kwargs[key] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
        kwargs["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest("'logit_bias' must be an object of token id → bias", param="logit_bias", code="invalid_type")
        parsed = {}
        for token, value in bias.items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise InvalidRequest(f"'logit_bias' key {token!r} is not a token id", param="logit_bias", code="invalid_value") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise InvalidRequest("'logit_bias' values must be numbers between -100 and 100", param="logit_bias", code="invalid_value")
            parsed[token_id] = float(value)
        kwargs["logit_bias"] = parsed
    return kwargs


def completion_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``create_completion`` arguments for a /v1/completions body, or InvalidRequest."""
    _unsupported(body, _COMPLETION, "completions")
    kwargs = _sampling(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            pass  # one prompt given as token ids
        else:
            raise InvalidRequest("'prompt' must be a string, or an array of token ids (one prompt per request)",
                                 param="prompt", code="unsupported_value")
    kwargs["prompt"] = prompt
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequest("'best_of' must be 1", param="best_of", code="unsupported_value")
    for key, kind, what in (("suffix", str, "a string"), ("echo", bool, "a boolean")):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, kind):
                raise InvalidRequest(f"'{key}' must be {what}", param=key, code="invalid_type")
            kwargs[key] = value
    check_number(body, "logprobs", 0, 20, integer=True)
    if body.get("logprobs") is not None:
        kwargs["logprobs"] = body["logprobs"]
    # OpenAI's default for legacy completions is 16 tokens, as llama_cpp.server's.
    kwargs["max_tokens"] = body.get("max_tokens") or 16
    return kwargs


def chat_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``create_chat_completion`` arguments for a /v1/chat/completions body, or InvalidRequest."""
    _unsupported(body, _CHAT, "chat/completions")
    kwargs = _sampling(body)
    kwargs["messages"] = body["messages"]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    kwargs["max_tokens"] = max_tokens  # None: up to the end of the context window
    for key in ("tools", "functions"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise InvalidRequest(f"'{key}' must be an array", param=key, code="invalid_type")
            kwargs[key] = value
    for key in ("tool_choice", "function_call"):
        if body.get(key) is not None:
            kwargs[key] = body[key]
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                                 param="response_format", code="invalid_value")
        if response_format["type"] == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        elif response_format["type"] == "json_schema":
            # OpenAI's shape → llama-cpp-python's (a grammar built from the schema)
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest("'response_format.json_schema.schema' must be an object",
                                     param="response_format", code="invalid_value")
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("'logprobs' must be a boolean", param="logprobs", code="invalid_type")
    check_number(body, "top_logprobs", 0, 20, integer=True)
    top = body.get("top_logprobs")
    if top is not None and not logprobs:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    if logprobs:
        # llama-cpp-python computes none when top_logprobs is None; OpenAI's default is 0
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = top or 0
    return kwargs


def wants_logprobs(kwargs: dict[str, Any]) -> bool:
    """Whether a completion or chat call asks for log probabilities (which only
    a copy loaded with ``logits_all`` computes)."""
    logprobs = kwargs.get("logprobs")
    return logprobs is not None and logprobs is not False


def include_usage(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``: end the stream with a ``usage`` chunk."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options", code="invalid_type")
    wanted = options.get("include_usage")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options", code="invalid_type")
    return bool(wanted)


def trim_top_logprobs(chunk: dict[str, Any], count: int) -> dict[str, Any]:
    """A chat answer or chunk with at most ``count`` ``top_logprobs`` per token,
    most likely first, as OpenAI gives them (llama-cpp-python always adds the
    chosen token to the list)."""
    for choice in chunk.get("choices") or ():
        content = (choice.get("logprobs") or {}).get("content")
        for item in content or ():
            ranked = sorted(item.get("top_logprobs") or (), key=lambda top: top["logprob"], reverse=True)
            item["top_logprobs"] = ranked[:count]
    return chunk


def embedding_kwargs(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``create_embedding`` arguments and the encoding format, or InvalidRequest."""
    _unsupported(body, _EMBEDDING, "embeddings")
    value = body["input"]
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise InvalidRequest("'input' must be a string or an array of strings", param="input", code="unsupported_value")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format", code="invalid_value")
    return {"input": value}, encoding
