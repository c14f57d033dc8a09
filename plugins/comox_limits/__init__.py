"""The ``limits`` plugin: requests per minute, tokens per minute and
concurrent requests per key, as ``principal.limits`` says (``rpm``, ``tpm``,
``max_concurrency``: ints, or None for no limit), whichever plugin
authenticated the caller.

* ``rpm`` — token bucket ``limits:rpm:<key id>`` holding ``rpm`` requests,
  refilling ``rpm / 60`` a second; each request takes one.
* ``tpm`` — token bucket ``limits:tpm:<key id>`` holding ``tpm`` tokens,
  refilling ``tpm / 60`` a second. A request takes its estimate when admitted
  (:func:`estimate`) and is settled with its real usage when done.
* ``max_concurrency`` — counter ``limits:conc:<key id>``, capped, with a time
  to live so that the slots of a replica that died are forgotten.

Everything lives in ``gateway.shared_state``, so the limits hold across every
replica sharing it. Over a limit: 429 with ``retry-after``; every answer to a
key with an ``rpm`` or ``tpm`` carries OpenAI's ``x-ratelimit-*`` headers.
Settings: ``[plugins.limits]`` (:class:`LimitSettings`). See docs/limits.md.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import comox
from comox import Bucket, GatewayRequest, Principal, RateLimited, SharedState

__all__ = ["LimitSettings", "estimate", "duration"]

# Body fields whose text is the prompt, on every endpoint Comox serves or will.
PROMPT_FIELDS = ("messages", "prompt", "input", "tools", "functions", "system", "instructions", "query", "documents")
# Body fields that bound the completion, in order of precedence.
MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Parts whose strings are not text (base64 images, audio, files): not counted.
BINARY_PARTS = frozenset({"image_url", "input_audio", "file", "image"})
NO_COMPLETION = frozenset({"embeddings", "rerank"})


class LimitSettings(BaseModel):
    """``[plugins.limits]``"""

    model_config = ConfigDict(extra="forbid")

    default_completion_tokens: int = Field(1024, ge=0)
    """Completion tokens reserved for a request that names no ``max_tokens``
    (nor ``max_completion_tokens``); settled with the real count when done."""
    chars_per_token: float = Field(4.0, gt=0)
    """Characters of prompt text per estimated token."""
    concurrency_ttl_s: float = Field(600.0, gt=0)
    """A key's concurrency count is forgotten this long after its last change
    (so the slots of a replica that died do not stay taken for ever)."""


DEFAULTS = LimitSettings()


class Held:
    """What one request took, for :func:`comox_request_done` to settle."""

    __slots__ = ("key_id", "tpm", "tokens", "prompt", "slot")

    def __init__(self, key_id: str, tpm: int | None):
        self.key_id = key_id
        self.tpm = tpm
        self.tokens = 0  # taken from the tpm bucket
        self.prompt = 0  # of which the prompt's estimate
        self.slot = False  # holds a concurrency slot


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return LimitSettings


@comox.hookimpl
async def comox_admit(request: GatewayRequest, principal: Principal) -> None:
    limits = principal.limits
    key_id = principal.key_id
    gateway = request.gateway
    if not limits or key_id is None or gateway is None:
        return
    rpm, tpm, concurrency = _limit(limits, "rpm"), _limit(limits, "tpm"), _limit(limits, "max_concurrency")
    if rpm is None and tpm is None and concurrency is None:
        return
    for name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrency", concurrency)):
        if value == 0:
            raise RateLimited(f"Key {key_id!r} is allowed no requests ({name} is 0).")
    settings: LimitSettings = gateway.plugin_settings("limits") or DEFAULTS
    shared = gateway.shared_state
    held = request.state["limits"] = Held(key_id, tpm)
    refusal: RateLimited | None = None
    if rpm is not None:
        requests = await shared.take(f"limits:rpm:{key_id}", 1, capacity=rpm, per_s=rpm / 60)
        _headers(request, b"requests", rpm, requests)
        if not requests.allowed:
            refusal = RateLimited(
                f"Rate limit reached for key {key_id!r} on requests per min (RPM): Limit {rpm}. "
                f"Please try again in {duration(requests.retry_after_s)}.", retry_after=_seconds(requests.retry_after_s))
    if tpm is not None:
        tpm_key = f"limits:tpm:{key_id}"
        if refusal is None:
            refusal = await _take_tokens(request, shared, held, tpm, settings)
        if not held.tokens:  # nothing taken: the headers show the bucket as it is
            _headers(request, b"tokens", tpm, await shared.take(tpm_key, 0, capacity=tpm, per_s=tpm / 60))
    if refusal is not None:
        raise refusal
    if concurrency is not None:
        added, now = await shared.add(f"limits:conc:{key_id}", 1, cap=concurrency, ttl_s=settings.concurrency_ttl_s)
        if not added:
            raise RateLimited(f"Concurrency limit reached for key {key_id!r}: {int(now)} requests in flight, "
                              f"max_concurrency {concurrency}. Please try again when one has finished.", retry_after=1)
        held.slot = True


async def _take_tokens(request: GatewayRequest, shared: SharedState, held: Held, tpm: int,
                       settings: LimitSettings) -> RateLimited | None:
    """Take the request's estimate from the tpm bucket, recording it in
    ``held`` and the headers; the refusal if it does not fit (nothing taken)."""
    prompt, completion, bounded = estimate(request, settings)
    amount = prompt + completion
    if amount > tpm and (bounded or prompt > tpm):
        return RateLimited(  # OpenAI's answer: 429, and no retry-after (waiting cannot help)
            f"Request too large for key {held.key_id!r} on tokens per min (TPM): Limit {tpm}, Requested {amount}. "
            "The input or output tokens must be reduced in order to run successfully.")
    amount = max(1, min(amount, tpm))  # a guessed completion never makes a request too large
    tokens = await shared.take(f"limits:tpm:{held.key_id}", amount, capacity=tpm, per_s=tpm / 60)
    if not tokens.allowed:
        return RateLimited(
            f"Rate limit reached for key {held.key_id!r} on tokens per min (TPM): Limit {tpm}, "
            f"Remaining {int(tokens.remaining)}, Requested {amount}. Please try again in {duration(tokens.retry_after_s)}.",
            retry_after=_seconds(tokens.retry_after_s))
    held.tokens, held.prompt = amount, prompt
    _headers(request, b"tokens", tpm, tokens)
    return None


@comox.hookimpl
async def comox_request_done(request: GatewayRequest, status: int) -> None:
    held: Held | None = request.state.pop("limits", None)
    if held is None or request.gateway is None:
        return
    shared = request.gateway.shared_state
    try:
        if held.slot:
            key = f"limits:conc:{held.key_id}"
            ttl = (request.gateway.plugin_settings("limits") or DEFAULTS).concurrency_ttl_s
            _, now = await shared.add(key, -1, ttl_s=ttl)
            if now < 0:  # the count expired while this request ran: back to zero, not below
                await shared.add(key, -now, ttl_s=ttl)
    finally:
        if held.tokens and held.tpm is not None:
            usage = request.usage
            if usage is not None:  # an answer (from a backend or the cache): what it really cost
                used = (usage.prompt if usage.prompt is not None else held.prompt) + (usage.completion or 0)
            elif status == 200:  # a stream cut short: the backend may have done it all
                used = held.tokens
            else:  # refused, failed, or the client left before the answer started
                used = 0
            if used != held.tokens:
                await shared.take(f"limits:tpm:{held.key_id}", used - held.tokens, capacity=held.tpm,
                                  per_s=held.tpm / 60, force=True)


def estimate(request: GatewayRequest, settings: LimitSettings = DEFAULTS) -> tuple[int, int, bool]:
    """``(prompt tokens, completion tokens, bounded)`` a request is expected to
    cost before it is sent: its prompt text (``messages``, ``prompt``,
    ``input``, ``tools``, … — every string in them, less images and audio)
    over ``chars_per_token``, plus one token per token id given as a number;
    its completion bound (``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens``, times ``n``), or ``default_completion_tokens`` when
    it names none (``bounded`` False), or 0 for embeddings."""
    body = request.json
    chars = ids = 0
    stack: list[Any] = [body[name] for name in PROMPT_FIELDS if name in body]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, dict):
            stack.extend(item for key, item in value.items() if key not in BINARY_PARTS)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            ids += 1
    prompt = math.ceil(chars / settings.chars_per_token) + ids
    if request.endpoint in NO_COMPLETION:
        return prompt, 0, True
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    for name in MAX_FIELDS:
        bound = body.get(name)
        if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 0:
            return prompt, bound * choices, True
    return prompt, settings.default_completion_tokens * choices, False


def duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes ``x-ratelimit-reset-*`` (Go's durations):
    ``120ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h0m0s``; rounded up to the
    millisecond."""
    ms = math.ceil(round(seconds * 1000, 6))
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _headers(request: GatewayRequest, kind: bytes, limit: int, bucket: Bucket) -> None:
    request.response_headers += [
        (b"x-ratelimit-limit-" + kind, b"%d" % limit),
        (b"x-ratelimit-remaining-" + kind, b"%d" % bucket.remaining),
        (b"x-ratelimit-reset-" + kind, duration(bucket.reset_s).encode()),
    ]


def _seconds(retry_after_s: float) -> float | None:
    """Whole seconds for ``retry-after`` (rounded up: a client that waits that
    long fits); None when waiting cannot help."""
    return float(max(1, math.ceil(retry_after_s))) if math.isfinite(retry_after_s) else None


def _limit(limits: dict[str, Any], name: str) -> int | None:
    """A limit as an int ≥ 0, None for none; a value that is not a number
    counts as 0 (nothing allowed: a broken limit must not mean unlimited)."""
    value = limits.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return 0
    return int(value) if math.isfinite(value) else None
