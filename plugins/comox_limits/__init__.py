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


@comox.hookimpl
def comox_plugin_settings() -> type[BaseModel]:
    return LimitSettings


class Plan:
    """One key's limits, worked out once per ``principal.limits`` (its
    buckets' names, refill rates and header values), not on every request."""

    __slots__ = ("limits", "key_id", "rpm", "tpm", "concurrency", "zero", "rpm_key", "tpm_key", "conc_key",
                 "rpm_per_s", "tpm_per_s", "rpm_header", "tpm_header")

    def __init__(self, limits: dict[str, Any], key_id: str):
        self.limits = limits  # kept, so that its id() is not reused while planned
        self.key_id = key_id
        self.rpm, self.tpm, self.concurrency = _limit(limits, "rpm"), _limit(limits, "tpm"), _limit(limits, "max_concurrency")
        self.zero = next((name for name, value in (("rpm", self.rpm), ("tpm", self.tpm),
                                                   ("max_concurrency", self.concurrency)) if value == 0), None)
        self.rpm_key, self.tpm_key, self.conc_key = f"limits:rpm:{key_id}", f"limits:tpm:{key_id}", f"limits:conc:{key_id}"
        self.rpm_per_s = (self.rpm or 0) / 60
        self.tpm_per_s = (self.tpm or 0) / 60
        self.rpm_header = (b"x-ratelimit-limit-requests", b"%d" % (self.rpm or 0))
        self.tpm_header = (b"x-ratelimit-limit-tokens", b"%d" % (self.tpm or 0))

    @property
    def idle(self) -> bool:
        return self.rpm is None and self.tpm is None and self.concurrency is None


_plans: dict[tuple[int, str], Plan] = {}
MAX_PLANS = 100_000  # more keys than that: planned again after a clear


def plan_for(limits: dict[str, Any], key_id: str) -> Plan:
    """The :class:`Plan` of these limits (a key's ``limits`` dict lives as long
    as its keys set; a reloaded set gets new plans)."""
    plan = _plans.get((id(limits), key_id))
    if plan is None or plan.limits is not limits:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        plan = _plans[(id(limits), key_id)] = Plan(limits, key_id)
    return plan


class Held:
    """What one request took, for :func:`comox_request_done` to settle."""

    __slots__ = ("plan", "tokens", "prompt", "slot", "ttl_s")

    def __init__(self, plan: Plan, ttl_s: float):
        self.plan = plan
        self.tokens = 0  # taken from the tpm bucket
        self.prompt = 0  # of which the prompt's estimate
        self.slot = False  # holds a concurrency slot
        self.ttl_s = ttl_s


@comox.hookimpl
async def comox_admit(request: GatewayRequest, principal: Principal) -> None:
    limits = principal.limits
    key_id = principal.key_id
    gateway = request.gateway
    if not limits or key_id is None or gateway is None:
        return
    plan = plan_for(limits, key_id)
    if plan.idle:
        return
    if plan.zero is not None:
        raise RateLimited(f"Key {key_id!r} is allowed no requests ({plan.zero} is 0).")
    settings: LimitSettings = gateway.plugin_settings("limits") or DEFAULTS
    shared = gateway.shared_state
    held = request.state["limits"] = Held(plan, settings.concurrency_ttl_s)
    refusal: RateLimited | None = None
    rpm, tpm = plan.rpm, plan.tpm
    if rpm is not None:
        requests = await shared.take(plan.rpm_key, 1, capacity=rpm, per_s=plan.rpm_per_s)
        _headers(request, plan.rpm_header, REQUESTS, requests)
        if not requests.allowed:
            refusal = RateLimited(
                f"Rate limit reached for key {key_id!r} on requests per min (RPM): Limit {rpm}. "
                f"Please try again in {duration(requests.retry_after_s)}.", retry_after=_seconds(requests.retry_after_s))
    if tpm is not None:
        if refusal is None:
            refusal = await _take_tokens(request, shared, held, plan, settings)
        if not held.tokens:  # nothing taken: the headers show the bucket as it is
            _headers(request, plan.tpm_header, TOKENS,
                     await shared.take(plan.tpm_key, 0, capacity=tpm, per_s=plan.tpm_per_s))
    if refusal is not None:
        raise refusal
    if plan.concurrency is not None:
        added, now = await shared.add(plan.conc_key, 1, cap=plan.concurrency, ttl_s=held.ttl_s)
        if not added:
            raise RateLimited(f"Concurrency limit reached for key {key_id!r}: {int(now)} requests in flight, "
                              f"max_concurrency {plan.concurrency}. Please try again when one has finished.",
                              retry_after=1)
        held.slot = True


async def _take_tokens(request: GatewayRequest, shared: SharedState, held: Held, plan: Plan,
                       settings: LimitSettings) -> RateLimited | None:
    """Take the request's estimate from the tpm bucket, recording it in
    ``held`` and the headers; the refusal if it does not fit (nothing taken)."""
    tpm = plan.tpm
    assert tpm is not None
    prompt, completion, bounded = estimate(request, settings)
    amount = prompt + completion
    if amount > tpm and (bounded or prompt > tpm):
        return RateLimited(  # OpenAI's answer: 429, and no retry-after (waiting cannot help)
            f"Request too large for key {held.plan.key_id!r} on tokens per min (TPM): Limit {tpm}, Requested {amount}. "
            "The input or output tokens must be reduced in order to run successfully.")
    amount = max(1, min(amount, tpm))  # a guessed completion never makes a request too large
    tokens = await shared.take(plan.tpm_key, amount, capacity=tpm, per_s=plan.tpm_per_s)
    if not tokens.allowed:
        return RateLimited(
            f"Rate limit reached for key {held.plan.key_id!r} on tokens per min (TPM): Limit {tpm}, "
            f"Remaining {int(tokens.remaining)}, Requested {amount}. Please try again in {duration(tokens.retry_after_s)}.",
            retry_after=_seconds(tokens.retry_after_s))
    held.tokens, held.prompt = amount, prompt
    _headers(request, plan.tpm_header, TOKENS, tokens)
    return None


@comox.hookimpl
async def comox_request_done(request: GatewayRequest, status: int) -> None:
    held: Held | None = request.state.pop("limits", None)
    if held is None or request.gateway is None:
        return
    shared = request.gateway.shared_state
    try:
        if held.slot:
            key, ttl = held.plan.conc_key, held.ttl_s
            _, now = await shared.add(key, -1, ttl_s=ttl)
            if now < 0:  # the count expired while this request ran: back to zero, not below
                await shared.add(key, -now, ttl_s=ttl)
    finally:
        tpm = held.plan.tpm
        if held.tokens and tpm is not None:
            usage = request.usage
            if usage is not None:  # an answer (from a backend or the cache): what it really cost
                used = (usage.prompt if usage.prompt is not None else held.prompt) + (usage.completion or 0)
            elif status == 200:  # a stream cut short: the backend may have done it all
                used = held.tokens
            else:  # refused, failed, or the client left before the answer started
                used = 0
            if used != held.tokens:
                await shared.take(held.plan.tpm_key, used - held.tokens, capacity=tpm,
                                  per_s=held.plan.tpm_per_s, force=True)


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
    pop, push, extend = stack.pop, stack.append, stack.extend
    # Exact types (what JSON parsing gives): bool is not counted as an id.
    while stack:
        value = pop()
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind is dict:
            for key, item in value.items():
                if type(item) is str:  # most of a chat: inline, not through the stack
                    if key not in BINARY_PARTS:
                        chars += len(item)
                elif key not in BINARY_PARTS:
                    push(item)
        elif kind is list:
            extend(value)
        elif kind is int:
            ids += 1
        elif isinstance(value, str):
            chars += len(value)
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


REQUESTS = (b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
TOKENS = (b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def _headers(request: GatewayRequest, limit: tuple[bytes, bytes], names: tuple[bytes, bytes], bucket: Bucket) -> None:
    request.response_headers += [
        limit, (names[0], b"%d" % bucket.remaining), (names[1], duration(bucket.reset_s).encode()),
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
