"""The limits plugin's work on each request: a key's :class:`Plan`, its
admission (:func:`admit`) and settlement (:func:`request_done`), the prompt's
estimate and the ``x-ratelimit-*`` headers. Plain computation on plain
classes, compiled with mypyc when Comox is installed (``setup.py``; one more
frame per hook, in ``__init__.py``, is all it costs to keep the hooks in
Python, where pluggy can mark them). See ``__init__.py`` for what the limits are.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any, cast

from comox import Add, Bucket, GatewayRequest, MemoryState, Principal, RateLimited, SharedState, Take

from .local import KeyCounters, counters_for
from .settings import DEFAULTS, LimitSettings

__all__ = ["Plan", "plan_for", "admit", "request_done", "estimate", "duration"]

# Body fields whose text is the prompt, on every endpoint Comox serves or will.
PROMPT_FIELDS = ("messages", "prompt", "input", "tools", "functions", "system", "instructions", "query", "documents")
_PROMPT_KEYS = frozenset(PROMPT_FIELDS)
# Body fields that bound the completion, in order of precedence.
MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Parts whose strings are not text (base64 images, audio, files): not counted.
# "source" holds an Anthropic image's or PDF's data; "file_data" a Responses file's.
BINARY_PARTS = frozenset({"image_url", "input_audio", "file", "image", "source", "file_data"})
NO_COMPLETION = frozenset({"embeddings", "rerank"})


class Plan:
    """One key's limits, worked out once per ``principal.limits`` (its
    buckets' names, refill rates and header values), not on every request."""

    __slots__ = ("limits", "key_id", "rpm", "tpm", "concurrency", "zero", "idle", "rpm_key", "tpm_key", "conc_key",
                 "rpm_per_s", "tpm_per_s", "rpm_header", "tpm_header", "rpm_take", "slot_ops", "counters")

    def __init__(self, limits: dict[str, Any], key_id: str):
        self.limits = limits  # kept, so that its id() is not reused while planned
        self.key_id = key_id
        self.rpm, self.tpm, self.concurrency = _limit(limits, "rpm"), _limit(limits, "tpm"), _limit(limits, "max_concurrency")
        self.zero = next((name for name, value in (("rpm", self.rpm), ("tpm", self.tpm),
                                                   ("max_concurrency", self.concurrency)) if value == 0), None)
        self.idle = self.rpm is None and self.tpm is None and self.concurrency is None
        self.rpm_key, self.tpm_key, self.conc_key = f"limits:rpm:{key_id}", f"limits:tpm:{key_id}", f"limits:conc:{key_id}"
        self.rpm_per_s = (self.rpm or 0) / 60
        self.tpm_per_s = (self.tpm or 0) / 60
        self.rpm_header = (b"x-ratelimit-limit-requests", b"%d" % (self.rpm or 0))
        self.tpm_header = (b"x-ratelimit-limit-tokens", b"%d" % (self.tpm or 0))
        self.rpm_take = Take(self.rpm_key, 1, self.rpm or 0, self.rpm_per_s)
        self.slot_ops: tuple[float, Add, Add] | None = None  # (ttl, take a slot, give it back)
        self.counters: tuple[MemoryState, KeyCounters] | None = None  # (in that state, local.py)

    def slot(self, ttl_s: float) -> tuple[Add, Add]:
        """The ops that take and give back a concurrency slot."""
        ops = self.slot_ops
        if ops is None or ops[0] != ttl_s:
            ops = self.slot_ops = (ttl_s, Add(self.conc_key, 1, self.concurrency, ttl_s), Add(self.conc_key, -1, None, ttl_s))
        return ops[1], ops[2]


_new_take = tuple.__new__  # the NamedTuple's own __new__ is a Python call, on every request

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


# What ``comox_admit`` leaves in ``request.state["limits"]`` for
# ``comox_request_done`` (a tuple: no class to build per request): the plan,
# the tokens taken from the tpm bucket and the prompt's share of them, and
# the op that gives back the concurrency slot taken (None: none taken).
Held = tuple[Plan, int, int, "Add | None"]


def admit(request: GatewayRequest, principal: Principal) -> Awaitable[None] | None:
    # A plain function: only a state shared with other replicas has I/O to await
    # (a coroutine is returned for it), and a coroutine per request costs.
    limits = principal.limits
    key_id = principal.key_id
    gateway = request.gateway
    if not limits or key_id is None or gateway is None:
        return None
    plan = plan_for(limits, key_id)
    if plan.idle:
        return None
    if plan.zero is not None:
        raise RateLimited(f"Key {key_id!r} is allowed no requests ({plan.zero} is 0).")
    settings: LimitSettings = gateway.plugin_settings("limits") or DEFAULTS
    shared = gateway.shared_state
    tpm = plan.tpm
    amount = prompt = 0
    too_large = False
    if tpm is not None:
        prompt, completion, bounded = estimate(request, settings)
        amount = prompt + completion
        too_large = amount > tpm and (bounded or prompt > tpm)
        if not too_large:  # a guessed completion never makes a request too large
            # (Conditionals, not max(1, min(...)): each builtin call parses its arguments
            # for key= and default=, 4x the time of the comparison.)
            amount = tpm if amount > tpm else amount if amount > 1 else 1
    if type(shared) is not MemoryState:
        return _admit_shared(request, plan, settings, shared, amount, prompt, too_large)
    # This process's own state: the key's counters on one object (local.py).
    counters = counters_for(plan, shared)
    now = shared.clock()
    ttl = settings.concurrency_ttl_s
    if too_large or not counters.admit(plan, now, amount, ttl):
        rpm_left, tpm_left = counters.tokens(plan, now)
        inflight = counters.in_flight(now) if plan.concurrency is not None else 0.0
        raise _local_refusal(request, plan, counters, now, amount, too_large, rpm_left, tpm_left, inflight)
    release = None
    if plan.concurrency is not None:
        release = plan.slot(ttl)[1]
    _headers(request, plan, counters.rpm, counters.tpm)  # what admit left in the buckets
    request.state["limits"] = (plan, amount, prompt, release)
    return None


async def _admit_shared(request: GatewayRequest, plan: Plan, settings: LimitSettings, shared: SharedState,
                        amount: int, prompt: int, too_large: bool) -> None:
    """``comox_admit`` on a state shared with other replicas: every limit in
    one atomic step (one round trip to Redis), all or nothing."""
    ops: list[Take | Add] = [plan.rpm_take] if plan.rpm is not None else []
    if plan.tpm is not None:
        ops.append(_new_take(Take, (plan.tpm_key, amount, plan.tpm, plan.tpm_per_s, False)))
    release = None
    if plan.concurrency is not None:
        take_slot, release = plan.slot(settings.concurrency_ttl_s)
        ops.append(take_slot)
    if not too_large:
        results = await shared.apply(ops)
        for result in results:
            if not result[0]:
                break
        else:  # admitted
            _bucket_headers(request, plan, results)
            request.state["limits"] = (plan, amount, prompt, release)
            return
    # Nothing was taken, but a request refused for tokens or concurrency still
    # counts against the rpm, as OpenAI counts unsuccessful requests (a zero take
    # forced: it reads a bucket below zero without refusing the batch).
    _bucket_headers(request, plan, await shared.apply(
        [op if op is plan.rpm_take else op._replace(amount=0, force=True) for op in ops if isinstance(op, Take)]))
    raise _refusal(plan, None if too_large else results, amount)


def _local_refusal(request: GatewayRequest, plan: Plan, counters: KeyCounters, now: float, amount: int,
                   too_large: bool, rpm_left: float, tpm_left: float, inflight: float) -> RateLimited:
    """:func:`_refusal` on a key's counters in this process: the batch as the
    state would have judged it, and the rpm taken all the same."""
    judged: list[Bucket | tuple[bool, float]] = []
    if plan.rpm is not None:
        judged.append(_judged(1, rpm_left, plan.rpm, plan.rpm_per_s))
        if rpm_left >= 1:
            rpm_left = counters.take_rpm(rpm_left, now)
    if plan.tpm is not None:
        judged.append(_judged(amount, tpm_left, plan.tpm, plan.tpm_per_s))
    if plan.concurrency is not None:
        judged.append((inflight < plan.concurrency, inflight))
    _headers(request, plan, rpm_left, tpm_left)
    return _refusal(plan, None if too_large else judged, amount)


def _judged(amount: float, tokens: float, capacity: float, per_s: float) -> Bucket:
    """A take of ``amount`` from a bucket holding ``tokens``, as
    :meth:`comox.MemoryState.apply` answers it in a refused batch."""
    if amount <= tokens:
        return Bucket(True, math.floor(tokens - amount), (capacity - tokens + amount) / per_s, 0.0)
    return Bucket(False, math.floor(tokens) if tokens > 0 else 0.0, (capacity - tokens) / per_s,
                  math.inf if amount > capacity else (amount - tokens) / per_s)


def _refusal(plan: Plan, judged: list[Bucket | tuple[bool, float]] | None, amount: int) -> RateLimited:
    """Why the request is refused (``judged``: the refused batch's results;
    None: too large for the tpm)."""
    rpm, tpm, key_id = plan.rpm, plan.tpm, plan.key_id
    if judged is None:
        return RateLimited(  # OpenAI's answer: 429, and no retry-after (waiting cannot help)
            f"Request too large for key {key_id!r} on tokens per min (TPM): Limit {tpm}, Requested {amount}. "
            "The input or output tokens must be reduced in order to run successfully.")
    results = iter(judged)
    if rpm is not None:
        bucket = cast(Bucket, next(results))
        if not bucket.allowed:
            return RateLimited(
                f"Rate limit reached for key {key_id!r} on requests per min (RPM): Limit {rpm}. "
                f"Please try again in {duration(bucket.retry_after_s)}.", retry_after=_seconds(bucket.retry_after_s))
    if tpm is not None:
        tokens = cast(Bucket, next(results))
        if not tokens.allowed:
            return RateLimited(
                f"Rate limit reached for key {key_id!r} on tokens per min (TPM): Limit {tpm}, "
                f"Remaining {int(tokens.remaining)}, Requested {amount}. Please try again in {duration(tokens.retry_after_s)}.",
                retry_after=_seconds(tokens.retry_after_s))
    slot = next(results)
    return RateLimited(f"Concurrency limit reached for key {key_id!r}: {int(slot[1])} requests in flight, "
                       f"max_concurrency {plan.concurrency}. Please try again when one has finished.", retry_after=1)


def request_done(request: GatewayRequest, status: int) -> Awaitable[None] | None:
    held: Held | None = request.state.pop("limits", None)
    if held is None or request.gateway is None:
        return None
    plan, tokens, prompt, release = held
    more = 0  # tokens to take beyond the estimate (fewer when negative)
    tpm = plan.tpm
    if tokens and tpm is not None:
        usage = request.usage
        if usage is not None:  # an answer (from a backend or the cache): what it really cost
            more = (usage.prompt if usage.prompt is not None else prompt) + (usage.completion or 0) - tokens
        elif status != 200:  # refused, failed, or the client left before the answer started
            more = -tokens
        # (else a stream cut short: the backend may have done it all)
    shared = request.gateway.shared_state
    if type(shared) is MemoryState:
        counters_for(plan, shared).settle(plan, None if release is None else release.ttl_s, more, shared.clock())
        return None
    ops: list[Take | Add] = [release] if release is not None else []
    if more:
        ops.append(_new_take(Take, (plan.tpm_key, more, tpm, plan.tpm_per_s, True)))
    if not ops:
        return None
    return _settle_shared(plan, shared, ops, release)


async def _settle_shared(plan: Plan, shared: SharedState, ops: list[Take | Add], release: Add | None) -> None:
    """``comox_request_done`` on a state shared with other replicas: a release
    and a settlement in one step, never refused."""
    results = await shared.apply(ops)
    if release is not None:
        now = results[0][1]
        if now < 0:  # the count expired while this request ran: back to zero, not below
            await shared.add(plan.conc_key, -now, ttl_s=release.ttl_s)


def estimate(request: GatewayRequest, settings: LimitSettings = DEFAULTS) -> tuple[int, int, bool]:
    """``(prompt tokens, completion tokens, bounded)`` a request is expected to
    cost before it is sent: its prompt text (``messages``, ``prompt``,
    ``input``, ``tools``, … — every string in them, less images and audio)
    over ``chars_per_token``, plus one token per token id given as a number;
    its completion bound (``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens``, times ``n``), or ``default_completion_tokens`` when
    it names none (``bounded`` False), or 0 for embeddings."""
    # A request in another API's terms is judged from its own body (its prompt and
    # bound fields share these names): one passed through natively is never translated.
    body = request.inbound_json
    if body is None:
        body = request.json
    chars = ids = 0
    stack: list[Any] = []
    for name in _PROMPT_KEYS.intersection(body):
        value = body[name]
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind is list and (plain := _plain_text(value)) is not None:
            chars += plain
        else:
            stack.append(value)
    if stack:
        more_chars, ids = _walk(stack)
        chars += more_chars
    prompt = math.ceil(chars / settings.chars_per_token) + ids
    if request.endpoint in NO_COMPLETION:
        return prompt, 0, True
    n = body.get("n")
    choices = n if type(n) is int and n > 0 else 1  # (type: a bool is no count)
    for name in MAX_FIELDS:
        bound = body.get(name)
        if type(bound) is int and bound >= 0:
            return prompt, bound * choices, True
    return prompt, settings.default_completion_tokens * choices, False


def _plain_text(messages: list[Any]) -> int | None:
    """The characters of a chat's messages of plain text (each an object of
    strings: role, content, name), or None for any other shape (walked)."""
    # A plain loop: timed, 3x faster for one message than the same in C (map,
    # chain, issuperset, isdisjoint), and still faster for twenty.
    chars = 0
    for message in messages:
        if type(message) is not dict:
            return None
        for key, text in message.items():
            if type(text) is not str or key in BINARY_PARTS:
                return None
            chars += len(text)
    return chars


def _walk(stack: list[Any]) -> tuple[int, int]:
    """The characters of text and the token ids (ints) in what ``stack``
    holds, less :data:`BINARY_PARTS`: the prompt's parts that are not plain
    messages of text."""
    chars = ids = 0
    pop, push, extend = stack.pop, stack.append, stack.extend
    # Exact types (what JSON parsing gives): bool is not counted as an id.
    while stack:
        value = pop()
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind is dict:
            # (No shortcut in C for a dict of strings: timed, map, all and sum
            # cost more than this loop, for parts, tools and tool calls alike.)
            for key, item in value.items():
                if type(item) is str:
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
    return chars, ids


def duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes ``x-ratelimit-reset-*`` (Go's durations):
    ``120ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h0m0s``; rounded up to the
    millisecond."""
    ms = _ms(seconds)
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


def _ms(seconds: float) -> int:
    """``seconds`` in milliseconds, rounded up; float noise within a
    nanosecond of a whole millisecond (0.12 * 1000 = 120.00000000000001) is
    not a millisecond more. (Not round(x, 6): 7x the time, twice per answer.)"""
    return math.ceil(seconds * 1000 - 1e-6)


REQUESTS = (b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
TOKENS = (b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")
_RESETS: dict[int, bytes] = {}  # milliseconds → duration(): the same few values, answer after answer


def _reset(seconds: float) -> bytes:
    """:func:`duration` as a header value."""
    ms = _ms(seconds)
    value = _RESETS.get(ms)
    if value is None:
        value = duration(ms / 1000).encode()
        if len(_RESETS) < 10_000:
            _RESETS[ms] = value
    return value


def _headers(request: GatewayRequest, plan: Plan, rpm_left: float, tpm_left: float) -> None:
    """The ``x-ratelimit-*`` headers from the tokens left in the key's buckets
    (in this process: local.py)."""
    _put_headers(request, plan, rpm_left, (plan.rpm - rpm_left) / plan.rpm_per_s if plan.rpm is not None else 0.0,
                 tpm_left, (plan.tpm - tpm_left) / plan.tpm_per_s if plan.tpm is not None else 0.0)


def _bucket_headers(request: GatewayRequest, plan: Plan, results: list[Bucket | tuple[bool, float]]) -> None:
    """The ``x-ratelimit-*`` headers from a batch's results: the rpm bucket's
    first, then the tpm bucket's (as ``comox_admit`` orders its ops)."""
    rpm = tpm = _NO_BUCKET
    if plan.rpm is not None:
        rpm = cast(Bucket, results[0])
    if plan.tpm is not None:
        tpm = cast(Bucket, results[0 if plan.rpm is None else 1])
    _put_headers(request, plan, rpm[1], rpm[2], tpm[1], tpm[2])


_NO_BUCKET = Bucket(True, 0.0, 0.0, 0.0)  # of a limit the key does not have: no header read from it


def _put_headers(request: GatewayRequest, plan: Plan, rpm_left: float, rpm_reset_s: float,
                 tpm_left: float, tpm_reset_s: float) -> None:
    """The headers of the limits the key has: what is left in each bucket
    (whole units, never below 0) and the time until it is full."""
    if plan.rpm is not None:
        headers = [plan.rpm_header, (REQUESTS[0], _whole(rpm_left)),
                   (REQUESTS[1], _reset(rpm_reset_s))]
        if plan.tpm is not None:
            headers += (plan.tpm_header, (TOKENS[0], _whole(tpm_left)),
                        (TOKENS[1], _reset(tpm_reset_s)))
    elif plan.tpm is not None:
        headers = [plan.tpm_header, (TOKENS[0], _whole(tpm_left)),
                   (TOKENS[1], _reset(tpm_reset_s))]
    else:
        return
    request.response_headers += headers


def _whole(left: float) -> bytes:
    """What is left in a bucket as a header value: whole units, never below 0.
    (int() first: ``%d`` of a float raises and clears a TypeError inside.)"""
    return b"%d" % int(left) if left > 0 else b"0"


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
