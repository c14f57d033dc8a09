"""comox_limits/local.py: a key's counters on one object, for the in-process
state. Any run of admissions, settlements and waits must be judged as the same
plugin judges it with the counters as ops on the state's string keys (the
path every shared state takes): the same refusals, messages, retry-after and
x-ratelimit-* headers."""

import asyncio
import math

from hypothesis import given, settings
from hypothesis import strategies as st

import comox
from comox import GatewayRequest, Principal, RateLimited, Usage
from comox_limits import DEFAULTS, comox_admit, comox_request_done
from comox_limits.admission import plan_for
from comox_limits.local import KeyCounters, counters_for
from tests.test_limits import BatchedState


class Gateway:
    """What the plugin reads of a gateway: its shared state and settings."""

    def __init__(self, state):
        self.shared_state = state

    def plugin_settings(self, name):
        return DEFAULTS


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


def run(steps, state_class, limits):
    """Each step's outcome: ``(status or message, retry-after, headers)``."""
    clock = Clock()
    gateway = Gateway(state_class(clock=clock))
    principal = Principal(key_id="k", limits=limits)
    admitted = []
    outcomes = []

    async def go():
        for kind, a, b in steps:
            if kind == "wait":
                clock.now += a
                continue
            if kind == "done":
                if admitted:
                    request = admitted.pop(a % len(admitted))
                    request.usage = Usage(prompt=b, completion=b // 2) if b % 3 else None
                    await awaited(comox_request_done(request, 200 if b % 5 else 500))
                    outcomes.append(("done", request.state.get("limits")))
                continue
            body = {"model": "m", "messages": [{"role": "user", "content": "x" * a}]}
            if b:
                body["max_tokens"] = b
            request = GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[],
                                     json=body, gateway=gateway)  # type: ignore[arg-type]
            try:
                await awaited(comox_admit(request, principal))
            except RateLimited as refused:
                outcomes.append((refused.message, refused.retry_after, request.response_headers))
            else:
                admitted.append(request)
                outcomes.append((200, None, request.response_headers))

    asyncio.run(go())
    return outcomes


async def awaited(result):
    """A hook implementation's result, awaited if it is an awaitable (as the gateway does)."""
    if result is not None:
        await result


step = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 400), st.sampled_from([0, 1, 10, 50, 500])),
    st.tuples(st.just("done"), st.integers(0, 10), st.integers(0, 120)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.01, 0.7, 3.0, 25.0, 700.0]), st.just(0)),
)
limit = st.one_of(st.none(), st.integers(1, 6))


@settings(max_examples=1500, deadline=None, database=None)
@given(st.lists(step, max_size=40), limit, st.one_of(st.none(), st.integers(1, 400)), limit)
def test_one_object_per_key_judges_as_the_batches_do(steps, rpm, tpm, concurrency):
    limits = {"rpm": rpm, "tpm": tpm, "max_concurrency": concurrency}
    assert run(steps, comox.MemoryState, limits) == run(steps, BatchedState, limits)


def test_the_counters_are_the_states_own_and_outlive_a_reloaded_key():
    one, other = comox.MemoryState(), comox.MemoryState()
    before = plan_for({"rpm": 5}, "k")
    reloaded = plan_for({"rpm": 3}, "k")  # the key's limits changed: a new plan
    counters = counters_for(before, one)
    assert counters_for(reloaded, one) is counters
    assert counters_for(reloaded, other) is not counters
    assert reloaded.counters == (other, counters_for(reloaded, other))


def test_a_slot_given_back_after_its_count_expired_stays_at_zero():
    plan = plan_for({"max_concurrency": 2}, "k")
    counters = KeyCounters()
    counters.inflight, counters.until = 1.0, 10.0
    counters.settle(plan, 600.0, 0, 20.0)  # the count had expired at 10 s
    assert counters.in_flight(21.0) == 0.0 and counters.until == 620.0
    assert math.isinf(KeyCounters().rpm)  # full until first taken
