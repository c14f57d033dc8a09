"""Routing policies, unit by unit, with a fake clock and seeded randomness."""

from collections import Counter

import pytest

from comox import Usage
from comox_least_inflight import LeastInflight
from comox_p2c_ewma import P2CEwma
from comox_prefix_affinity import PrefixAffinity, block_hashes, render_prompt
from comox_round_robin import RoundRobin
from comox_session import Session
from comox_weighted import Weighted

from tests.policy_helpers import Clock, chat, make_group, names, pick


# -- weighted ----------------------------------------------------------------


def test_weighted_is_smooth_and_proportional():
    group = make_group(Weighted, 3, weights=[5, 1, 1])
    seq = names(pick(group) for _ in range(70))
    assert seq[:7] == ["b0", "b0", "b0", "b1", "b2", "b0", "b0"]
    for start in range(0, 70, 7):
        assert Counter(seq[start:start + 7]) == {"b0": 5, "b1": 1, "b2": 1}


def test_weighted_skips_ejected_and_returns_after_ejection():
    clock = Clock()
    group = make_group(Weighted, 3, weights=[2, 1, 1], clock=clock)
    group.backends[0].eject()
    assert set(names(pick(group) for _ in range(20))) == {"b1", "b2"}
    clock.advance(31)
    assert Counter(names(pick(group) for _ in range(40))) == {"b0": 20, "b1": 10, "b2": 10}


def test_weighted_slow_path_respects_exclusions():
    group = make_group(Weighted, 3, weights=[5, 1, 1])
    b0 = group.backends[0]
    assert {pick(group, exclude=[b0]).name for _ in range(10)} <= {"b1", "b2"}


# -- least_inflight ----------------------------------------------------------


def test_least_inflight_picks_fewest_in_flight():
    group = make_group(LeastInflight, 4)
    b = group.backends
    for state, count in zip(b, [3, 1, 2, 1]):
        for _ in range(count):
            state.acquire()
    seen = {pick(group).name for _ in range(50)}
    assert seen == {"b1", "b3"}  # both tied at 1, both chosen
    b[3].acquire()
    assert {pick(group).name for _ in range(20)} == {"b1"}
    for _ in range(3):
        b[0].release()
    assert {pick(group).name for _ in range(20)} == {"b0"}


def test_least_inflight_breaks_ties_at_random_not_first():
    group = make_group(LeastInflight, 4, seed=1)
    counts = Counter(pick(group).name for _ in range(400))  # all idle: all tied
    assert set(counts) == {"b0", "b1", "b2", "b3"}
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_least_inflight_spreads_concurrent_requests():
    group = make_group(LeastInflight, 5)
    held = []
    for _ in range(10):
        state = pick(group)
        state.acquire()
        held.append(state)
    assert sorted(s.inflight for s in group.backends) == [2, 2, 2, 2, 2]
    for state in held:
        state.release()
    assert all(s.inflight == 0 for s in group.backends)


def test_least_inflight_respects_max_concurrency_and_exclusion():
    group = make_group(LeastInflight, 2, max_concurrency=1)
    a = pick(group)
    a.acquire()
    b = pick(group)
    assert b is not a
    b.acquire()
    assert group.choose(chat("x")) is None
    assert group.saturated_only()
    a.release()
    assert pick(group) is a
    assert pick(group, exclude=[a]) is None


# -- p2c_ewma ----------------------------------------------------------------


def test_p2c_prefers_lower_latency_and_lower_load():
    group = make_group(P2CEwma, 2)
    fast, slow = group.backends
    fast.record_success(0.05)
    slow.record_success(0.5)
    assert Counter(pick(group).name for _ in range(20)) == {"b0": 20}
    for _ in range(12):  # 50 ms × 13 > 500 ms × 1
        fast.acquire()
    assert pick(group) is slow


def test_p2c_peak_ewma_takes_peaks_at_once_and_decays_with_time():
    clock = Clock()
    group = make_group(P2CEwma, 2, clock=clock)
    state = group.backends[0]
    state.record_success(0.1)
    state.record_success(1.0)
    assert state.ewma_ms == pytest.approx(1000.0)  # a peak is taken at once
    clock.advance(10)
    state.record_success(0.1)
    assert 100 < state.ewma_ms < 1000 * 0.37 + 100  # decayed by e^-1 over 10 s


def test_p2c_fast_failures_carry_a_decaying_penalty():
    clock = Clock()
    group = make_group(P2CEwma, 2, clock=clock)
    a, b = group.backends
    a.record_success(0.01)
    b.record_success(0.05)
    a.record_failure("HTTP 429", 429)  # busy: fast failure
    assert a.consecutive_failures == 0 and not a.ejected  # 429 is not a fault
    assert {pick(group).name for _ in range(20)} == {"b1"}
    clock.advance(120)  # the penalty decays away
    assert {pick(group).name for _ in range(20)} == {"b0"}


def test_p2c_uses_measured_tokens_per_second():
    group = make_group(P2CEwma, 2, seed=3)
    fast, slow = group.backends
    fast.record_tokens(500, 0, 100, prefill_tps=2000, decode_tps=100)
    slow.record_tokens(500, 0, 100, prefill_tps=400, decode_tps=20)
    fast.record_success(1.0)
    slow.record_success(0.2)  # a short request: latency alone would mislead
    held = []
    for _ in range(60):
        state = pick(group, chat("x" * 400, max_tokens=100))
        state.acquire()
        held.append(state)
    counts = Counter(s.name for s in held)
    # cost ∝ service time × (in flight + 1): ~5× faster gets ~5× the work
    assert 4 <= counts["b0"] / counts["b1"] <= 6.5, counts


def test_p2c_on_one_backend_and_none():
    group = make_group(P2CEwma, 1)
    assert pick(group).name == "b0"
    group.backends[0].set_draining(True)
    assert group.choose(chat("x")) is None


# -- session -----------------------------------------------------------------


def test_session_sticks_by_header_and_by_user():
    group = make_group(Session, 4)
    first = pick(group, chat("a", session="s1"))
    assert all(pick(group, chat("b", session="s1")) is first for _ in range(20))
    by_user = pick(group, chat("a", user="alice"))
    assert all(pick(group, chat("c", user="alice")) is by_user for _ in range(20))
    spread = {pick(group, chat("a", session=f"k{i}")).name for i in range(40)}
    assert len(spread) == 4  # sessions are balanced over the group


def test_session_falls_back_when_pinned_is_unhealthy_and_repins():
    clock = Clock()
    group = make_group(Session, 3, clock=clock)
    first = pick(group, chat("a", session="s"))
    first.health_failed("down", unhealthy_threshold=1)
    second = pick(group, chat("a", session="s"))
    assert second is not first
    first.health_passed()
    assert pick(group, chat("a", session="s")) is second  # re-pinned


def test_session_keeps_pin_when_pinned_is_only_busy():
    group = make_group(Session, 2, max_concurrency=1)
    first = pick(group, chat("a", session="s"))
    first.acquire()
    other = pick(group, chat("a", session="s"))
    assert other is not first
    first.release()
    assert pick(group, chat("a", session="s")) is first


def test_session_bounded_and_validates_options():
    group = make_group(Session, 2, options={"max_sessions": 3, "header": "X-Conv"})
    for i in range(10):
        pick(group, chat("a", user=f"u{i}"))
    assert len(group.policy.pins) == 3
    with pytest.raises(ValueError, match="unknown option"):
        make_group(Session, 2, options={"nope": 1})


# -- prefix_affinity ---------------------------------------------------------

SYSTEM = "You are a helpful assistant. " * 40  # > 1000 chars


def conversation(turns: int, topic: str):
    contents = [SYSTEM]
    for t in range(turns):
        contents.append(f"{topic} question {t} " * 20)
        if t < turns - 1:
            contents.append(f"{topic} answer {t} " * 20)
    return chat(*contents)


def test_render_and_block_hashes_are_prefix_stable():
    short = render_prompt(conversation(1, "x").json)
    long = render_prompt(conversation(3, "x").json)
    assert long.startswith(short)
    h1, h3 = block_hashes(short, 64), block_hashes(long, 64)
    assert h3[:len(h1)] == h1 and len(h3) > len(h1)
    assert render_prompt({"prompt": "abc"}) == "abc"


def test_prefix_affinity_keeps_a_conversation_on_one_backend():
    group = make_group(PrefixAffinity, 4, options={"block_chars": 64})
    homes = {}
    for topic in ("alpha", "beta", "gamma", "delta", "eps", "zeta"):
        homes[topic] = pick(group, conversation(1, topic))
    for turns in (2, 3, 4):
        for topic, home in homes.items():
            assert pick(group, conversation(turns, topic)) is home


def test_prefix_affinity_leaves_an_overloaded_backend():
    group = make_group(PrefixAffinity, 3, options={"block_chars": 64, "balance_abs_threshold": 2, "balance_rel_threshold": 1.5})
    home = pick(group, conversation(1, "x"))
    home.acquire()
    home.acquire()
    assert pick(group, conversation(2, "x")) is home  # 2 more than the others: within the threshold
    home.acquire()
    assert pick(group, conversation(3, "x")) is not home  # 3 more: overloaded, least loaded instead


def test_prefix_affinity_skips_unavailable_match():
    group = make_group(PrefixAffinity, 3, options={"block_chars": 64})
    home = pick(group, conversation(1, "x"))
    home.set_draining(True)
    moved = pick(group, conversation(2, "x"))
    assert moved is not home
    home.set_draining(False)
    assert pick(group, conversation(3, "x")) is moved  # the prefix now lives there


def test_prefix_affinity_index_is_bounded_lru():
    group = make_group(PrefixAffinity, 2, options={"block_chars": 64, "max_blocks": 50})
    for topic in range(30):
        pick(group, conversation(2, f"t{topic}"))
    assert len(group.policy.index) == 50


def test_prefix_affinity_corrects_itself_from_reported_cached_tokens():
    group = make_group(PrefixAffinity, 3, options={"block_chars": 64})
    policy = group.policy
    home = pick(group, conversation(1, "x"))
    other_convo = pick(group, conversation(1, "other"))
    # Turn 2 goes home; the backend reports a hit: the index was right.
    request = conversation(2, "x")
    assert pick(group, request) is home
    policy.observe(request, home, Usage(prompt=600, cached=400, completion=10))
    assert policy.hit_rate[id(home)] == 1.0
    # Turn 3 goes home, but the backend reports nothing cached (it restarted):
    request = conversation(3, "x")
    assert pick(group, request) is home
    policy.observe(request, home, Usage(prompt=900, cached=0, completion=10))
    assert policy.hit_rate[id(home)] < 1.0
    # Its other entries are stale now, but the prompt it just processed is not.
    assert pick(group, conversation(4, "x")) is home
    if other_convo is home:
        assert group.policy.choose.__self__ is policy  # nothing more to check
    # Repeated misses take away its affinity until hits come back.
    for turn in range(5, 9):
        request = conversation(turn, "x")
        state = pick(group, request)
        policy.observe(request, state, Usage(prompt=900, cached=0, completion=10))
    assert policy.hit_rate[id(home)] < policy.min_hit_rate


class SlotBackend:
    pins_slots = True

    def __init__(self, name):
        self.name = name


def test_prefix_affinity_pins_llamacpp_slots():
    group = make_group(PrefixAffinity, 2, options={"block_chars": 64}, backend=SlotBackend)
    for state in group.backends:
        state.total_slots = 4
    first = conversation(1, "x")
    home = pick(group, first)
    backend_name, slot = first.slot
    assert backend_name == home.name and 0 <= slot < 4
    later = conversation(2, "x")
    assert pick(group, later) is home
    assert later.slot == (home.name, slot)  # same node, same slot
    slots = set()
    for topic in range(8):
        request = conversation(1, f"n{topic}")
        state = pick(group, request)
        slots.add(request.slot)
    assert len(slots) == 4  # same node (shared system prompt), but each new conversation its own slot


def test_policies_reject_unknown_options():
    with pytest.raises(ValueError, match="unknown option"):
        make_group(PrefixAffinity, 2, options={"block": 1})


def test_round_robin_still_cycles():
    group = make_group(RoundRobin, 3)
    assert names(pick(group) for _ in range(6)) == ["b0", "b1", "b2", "b0", "b1", "b2"]


def test_prefix_affinity_knows_a_shared_head_lives_on_several_backends():
    group = make_group(PrefixAffinity, 3, options={"block_chars": 64, "balance_abs_threshold": 2})
    first = pick(group, conversation(1, "a"))
    for _ in range(3):
        first.acquire()  # busy: the next conversation sharing the system prompt goes elsewhere
    second = pick(group, conversation(1, "b"))
    assert second is not first
    system_block = block_hashes(render_prompt(conversation(1, "x").json), 64)[0]
    assert [e.state for e in group.policy.index[system_block]] == [second, first]
    # A third conversation with that head: the cheaper of the two holders.
    assert pick(group, conversation(1, "c")) is second
    # Each conversation still continues where it started.
    assert pick(group, conversation(2, "b")) is second
    for _ in range(3):
        first.release()
    assert pick(group, conversation(2, "a")) is first


def test_each_policy_and_backend_type_is_its_own_entry_point():
    from importlib.metadata import entry_points

    from comox.plugins import make_plugin_manager

    names = {ep.name: ep.value for ep in entry_points(group="comox")}
    for name in ("weighted", "least_inflight", "p2c_ewma", "session", "prefix_affinity", "admin", "llamacpp", "vllm"):
        assert names[name] == f"comox_{name}"
    registered = {}
    for mapping in make_plugin_manager().hook.comox_routing_policies():
        registered.update(mapping or {})
    assert {"round_robin", "weighted", "least_inflight", "p2c_ewma", "session", "prefix_affinity"} <= set(registered)


def test_least_inflight_buckets_stay_consistent_under_random_load():
    import random

    rng = random.Random(11)
    group = make_group(LeastInflight, 7, seed=4)
    held = []
    for step in range(3000):
        if held and rng.random() < 0.5:
            held.pop(rng.randrange(len(held))).release()
        else:
            state = pick(group)
            assert state.inflight == min(s.inflight for s in group.backends), step
            state.acquire()
            held.append(state)
        if step % 500 == 250:  # the fleet changes underneath: drained and back
            group.backends[step % 7].set_draining(True)
            pick(group)
            group.backends[step % 7].set_draining(False)


def test_prefix_affinity_stats_for_the_admin_api():
    group = make_group(PrefixAffinity, 2, options={"block_chars": 64})
    pick(group, conversation(2, "x"))
    stats = group.policy.stats()
    assert stats["blocks"] == len(block_hashes(render_prompt(conversation(2, "x").json), 64))
    assert stats["hit_rate"] == {"b0": 1.0, "b1": 1.0}
