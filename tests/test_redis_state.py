"""The ``redis`` plugin (plugins/comox_redis): ``RedisState`` against a real
``redis-server``, holding to the same :class:`comox.SharedState` contract as
:class:`comox.MemoryState`; atomic under concurrency; degraded (per-replica
shares, cache bypassed, one warning) or closed (503) while Redis is down, and
shared again by itself when it is back; the ``[state]`` table.

Replicas as separate processes: tests/test_redis_replicas.py."""

import asyncio
import logging
import math
import socket
import threading
import time
from pathlib import Path

import pytest

import comox
from comox import ConfigError, MemoryState, Settings, build_gateway
from comox.testing import free_port
from comox_redis import StateSettings
from comox_redis.state import RedisState, SharedStateUnavailable, share


def run(coro):
    """``asyncio.run``, except that tasks left over are dropped, not cancelled
    and awaited: one that swallows its cancellation fails the test instead of
    hanging it."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def until(condition, timeout=10.0):
    """Await a state, not a duration (the bound turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture(params=["memory", "redis"])
def make_state(request):
    """``make_state()`` inside a running loop: each implementation of the contract."""
    if request.param == "memory":
        return lambda **kw: MemoryState()
    server = request.getfixturevalue("redis_server")
    return lambda **kw: RedisState(server.url, **kw)


# -- the SharedState contract, for MemoryState and RedisState alike ---------------


def test_take_is_a_token_bucket(make_state):
    async def scenario():
        state = make_state()
        assert isinstance(state, comox.SharedState)
        per_s = 1 / 60  # one token a minute: nothing refills during the test
        got = [await state.take("k", 1, capacity=3, per_s=per_s) for _ in range(4)]
        assert [b.allowed for b in got] == [True, True, True, False]
        assert [b.remaining for b in got] == [2, 1, 0, 0]
        assert got[0].retry_after_s == 0
        assert got[3].retry_after_s == pytest.approx(60, abs=1)
        assert got[3].reset_s == pytest.approx(180, abs=1)
        assert (await state.take("other", 1, capacity=3, per_s=per_s)).remaining == 2  # keys are separate
        back = await state.take("k", -2, capacity=3, per_s=per_s)  # a negative amount gives back
        assert back.allowed and back.remaining == 2
        too_big = await state.take("k", 4, capacity=3, per_s=per_s)
        assert not too_big.allowed and too_big.retry_after_s == math.inf
        await state.aclose()

    run(scenario())


def test_force_takes_below_zero(make_state):
    async def scenario():
        state = make_state()
        forced = await state.take("k", 5, capacity=3, per_s=1 / 60, force=True)
        assert forced.allowed and forced.remaining == 0
        refused = await state.take("k", 1, capacity=3, per_s=1 / 60)
        assert not refused.allowed
        assert refused.retry_after_s == pytest.approx(3 * 60, abs=1)  # from -2 up to 1
        await state.aclose()

    run(scenario())


def test_take_refills_with_time(make_state):
    async def scenario():
        state = make_state()
        assert (await state.take("k", 2, capacity=2, per_s=100)).allowed
        first = await state.take("k", 2, capacity=2, per_s=100)
        assert not first.allowed and first.retry_after_s <= 0.02

        async def refilled():
            return (await state.take("k", 2, capacity=2, per_s=100)).allowed

        await until(refilled)
        await state.aclose()

    run(scenario())


def test_add_is_a_capped_counter(make_state):
    async def scenario():
        state = make_state()
        assert [await state.add("c", 1, cap=2) for _ in range(3)] == [(True, 1), (True, 2), (False, 2)]
        assert await state.add("c", -1, cap=2) == (True, 1)  # taking away is never refused
        assert await state.add("c", 0.5) == (True, 1.5)  # no cap; fractions kept
        assert await state.add("other", 7) == (True, 7)
        await state.add("ttl", 3, ttl_s=0.05)

        async def forgotten():  # (refused while 3 is kept: looking changes nothing)
            return await state.add("ttl", 1, cap=1) == (True, 1)

        await until(forgotten)
        await state.aclose()

    run(scenario())


def test_values_with_a_time_to_live(make_state):
    async def scenario():
        state = make_state()
        blob = bytes(range(256)) * 4096  # binary, 1 MiB
        await state.set("v", blob, ttl_s=60)
        assert await state.get("v") == blob
        assert await state.get("missing") is None
        await state.set("v", b"second", ttl_s=60)
        assert await state.get("v") == b"second"
        await state.delete("v")
        assert await state.get("v") is None
        await state.delete("v")  # deleting what is gone is fine
        await state.set("brief", b"x", ttl_s=0.05)

        async def expired():
            return await state.get("brief") is None

        await until(expired)
        await state.aclose()

    run(scenario())


def test_buckets_counters_and_values_do_not_share_keys(make_state):
    async def scenario():
        state = make_state()
        await state.take("same", 1, capacity=5, per_s=1)
        await state.add("same", 2)
        await state.set("same", b"value", ttl_s=60)
        assert (await state.take("same", 1, capacity=5, per_s=1)).remaining == 3
        assert await state.add("same", 0) == (True, 2)
        assert await state.get("same") == b"value"
        await state.aclose()

    run(scenario())


MINUTE = 1 / 60  # one token a minute: nothing refills during a test


def test_apply_a_batch_that_fits_as_a_whole(make_state):
    async def scenario():
        state = make_state()
        assert await state.apply([]) == []
        got = await state.apply([comox.Take("rpm", 1, 5, MINUTE), comox.Take("tpm", 100, 1000, MINUTE),
                                 comox.Add("inflight", 1, cap=2, ttl_s=60), comox.Add("spent", 0.5)])
        assert [type(r) for r in got] == [comox.Bucket, comox.Bucket, tuple, tuple]
        assert [r[:2] for r in got] == [(True, 4), (True, 900), (True, 1), (True, 0.5)]
        assert got[0].retry_after_s == 0 and got[0].reset_s == pytest.approx(60, abs=1)
        assert (await state.take("rpm", 0, capacity=5, per_s=MINUTE)).remaining == 4
        assert (await state.take("tpm", 0, capacity=1000, per_s=MINUTE)).remaining == 900
        assert await state.add("inflight", 0) == (True, 1)
        assert await state.add("spent", 0) == (True, 0.5)
        await state.aclose()

    run(scenario())


def test_apply_with_one_refused_op_applies_nothing(make_state):
    async def scenario():
        state = make_state()
        await state.take("tpm", 900, capacity=1000, per_s=MINUTE)  # 100 left
        await state.add("inflight", 2, cap=2)
        over_tokens = await state.apply([comox.Take("rpm", 1, 5, MINUTE), comox.Add("spent", 3),
                                         comox.Take("tpm", 200, 1000, MINUTE)])
        assert [r[0] for r in over_tokens] == [True, True, False]  # the judged-fit ones say so
        assert over_tokens[2].retry_after_s == pytest.approx(100 * 60, abs=60)
        over_cap = await state.apply([comox.Take("rpm", 1, 5, MINUTE), comox.Add("inflight", 1, cap=2)])
        assert over_cap[0].allowed and over_cap[1] == (False, 2)
        # nothing of either batch was applied
        assert (await state.take("rpm", 0, capacity=5, per_s=MINUTE)).remaining == 5
        assert (await state.take("tpm", 0, capacity=1000, per_s=MINUTE)).remaining == 100
        assert await state.add("spent", 0) == (True, 0)
        assert await state.add("inflight", 0) == (True, 2)
        await state.aclose()

    run(scenario())


def test_apply_never_refuses_forced_takes_and_negative_adds(make_state):
    async def scenario():
        state = make_state()
        await state.add("inflight", 3, cap=3)
        got = await state.apply([comox.Take("tpm", 50, 10, MINUTE, force=True), comox.Add("inflight", -1, cap=3),
                                 comox.Add("inflight", -1, cap=1)])
        assert [r[0] for r in got] == [True, True, True]
        assert got[2] == (True, 1)  # over its cap still, but going down
        assert not (await state.take("tpm", 1, capacity=10, per_s=MINUTE)).allowed  # 10 - 50: below zero
        assert await state.add("inflight", 0) == (True, 1)
        await state.aclose()

    run(scenario())


def test_apply_judges_the_same_key_on_what_the_op_before_left(make_state):
    async def scenario():
        state = make_state()
        twice = await state.apply([comox.Take("rpm", 3, 5, MINUTE), comox.Take("rpm", 3, 5, MINUTE)])
        assert [b.allowed for b in twice] == [True, False]
        assert twice[0].remaining == 2 and twice[1].remaining == 2
        assert twice[1].retry_after_s == pytest.approx(60, abs=1)  # from 2 up to 3
        assert (await state.take("rpm", 0, capacity=5, per_s=MINUTE)).remaining == 5  # nothing applied
        counted = await state.apply([comox.Add("c", 2, cap=3), comox.Add("c", 2, cap=3)])
        assert counted == [(True, 2), (False, 2)]
        assert await state.add("c", 0) == (True, 0)
        fits = await state.apply([comox.Take("rpm", 3, 5, MINUTE), comox.Take("rpm", 2, 5, MINUTE),
                                  comox.Add("c", 2, cap=3), comox.Add("c", 1, cap=3)])
        assert [r[:2] for r in fits] == [(True, 2), (True, 0), (True, 2), (True, 3)]
        assert not (await state.take("rpm", 1, capacity=5, per_s=MINUTE)).allowed
        assert await state.add("c", 0) == (True, 3)
        await state.aclose()

    run(scenario())


# -- RedisState only: atomic, keys and TTLs in Redis -----------------------------


def test_many_concurrent_takes_never_over_grant(redis_server):
    async def scenario():
        # (a generous timeout: 200 calls queue for 16 connections, and this is about atomicity)
        a, b = (RedisState(redis_server.url, max_connections=16, timeout_s=5) for _ in range(2))
        takes = [s.take("burst", 1, capacity=50, per_s=1 / 3600) for _ in range(100) for s in (a, b)]
        granted = sum(bucket.allowed for bucket in await asyncio.gather(*takes))
        adds = [s.add("slots", 1, cap=10) for _ in range(30) for s in (a, b)]
        added = sum(ok for ok, _ in await asyncio.gather(*adds))
        assert a.readiness()["state"] == b.readiness()["state"] == "shared"
        await a.aclose()
        await b.aclose()
        return granted, added

    assert run(scenario()) == (50, 10)
    assert float(redis_server.client().get("comox:c:slots")) == 10


def test_keys_prefix_and_expiry_in_redis(redis_server):
    async def scenario():
        state = RedisState(redis_server.url, prefix="team-a:")
        await state.take("rpm:alice", 1, capacity=60, per_s=1)
        await state.add("inflight:alice", 1, ttl_s=30)
        await state.add("budget:alice", 1)
        await state.set("cache:1", b"x", ttl_s=10)
        await state.take("full", 0, capacity=5, per_s=1)  # a full bucket is not stored
        await state.aclose()

    run(scenario())
    redis = redis_server.client()
    assert sorted(redis.keys("*")) == [b"team-a:c:budget:alice", b"team-a:c:inflight:alice", b"team-a:t:rpm:alice",
                                       b"team-a:v:cache:1"]
    assert 0 < redis.pttl("team-a:t:rpm:alice") <= 2000  # gone once it would be full again (1 s) + 1 s
    assert 29_000 < redis.pttl("team-a:c:inflight:alice") <= 30_000
    assert redis.pttl("team-a:c:budget:alice") == -1  # no ttl_s: kept
    assert 9_000 < redis.pttl("team-a:v:cache:1") <= 10_000


def test_apply_writes_the_keys_and_expiry_take_and_add_would(redis_server):
    async def scenario():
        state = RedisState(redis_server.url, prefix="team-b:")
        refused = await state.apply([comox.Take("rpm", 1, 60, 1), comox.Add("inflight", 1, cap=0)])
        assert [r[0] for r in refused] == [True, False]
        assert redis_server.client().keys("team-b:[tc]:*") == []  # a refused batch writes nothing
        await state.apply([comox.Take("rpm", 1, 60, 1), comox.Add("inflight", 1, ttl_s=30), comox.Add("budget", 1),
                           comox.Take("full", 0, 5, 1)])
        await state.aclose()

    run(scenario())
    redis = redis_server.client()
    assert sorted(redis.keys("*")) == [b"team-b:c:budget", b"team-b:c:inflight", b"team-b:t:rpm"]
    assert 0 < redis.pttl("team-b:t:rpm") <= 2000
    # The 30 s given, less the time since (a loaded CI machine took over a second).
    assert 20_000 < redis.pttl("team-b:c:inflight") <= 30_000
    assert redis.pttl("team-b:c:budget") == -1


def test_closing_stops_the_watcher_for_good(redis_server):
    async def scenario():
        state = RedisState(redis_server.url)
        await state.start()
        assert watchers() == 1
        await state.aclose()
        assert watchers() == 0
        await state.get("late")  # a call after closing (a request finishing late) starts none
        assert watchers() == 0

    def watchers():
        return sum(task.get_name() == "comox-redis-watch" and not task.done() for task in asyncio.all_tasks())

    run(scenario())


def test_replicas_count_each_other_and_leave(redis_server):
    async def scenario():
        a = RedisState(redis_server.url, heartbeat_s=0.05)
        b = RedisState(redis_server.url, heartbeat_s=0.05)
        await a.start()
        await b.start()

        async def both():
            return a.replicas == 2

        await until(both)
        assert a.readiness() == {"ready": True, "state": "shared", "replicas": 2}
        await b.aclose()

        async def one():
            return a.replicas == 1

        await until(one)
        await a.aclose()

    run(scenario())


# -- Redis down: degraded, closed, and back ---------------------------------------


def test_degraded_limits_count_per_replica_with_their_share(redis_server):
    clock = [1000.0]

    async def scenario():
        state = RedisState(redis_server.url, clock=lambda: clock[0], recheck_s=60)
        state.replicas = 3  # as the last heartbeat counted them
        redis_server.kill()
        got = [await state.take("rpm:k", 1, capacity=6, per_s=6 / 60) for _ in range(3)]
        assert [b.allowed for b in got] == [True, True, False]  # 6 a minute among 3: 2 here
        assert state.readiness()["state"] == "degraded"
        clock[0] += 29
        assert not (await state.take("rpm:k", 1, capacity=6, per_s=6 / 60)).allowed
        clock[0] += 1  # refilling at a third of the rate: one per 30 s
        assert (await state.take("rpm:k", 1, capacity=6, per_s=6 / 60)).allowed
        assert [await state.add("inflight", 1, cap=6) for _ in range(3)] == [(True, 1), (True, 2), (False, 2)]
        # a batch counts with the same shares, all or nothing
        batch = [comox.Take("tpm", 2, 6, 6 / 60), comox.Add("spent", 2, cap=6)]
        assert [r[:2] for r in await state.apply(batch)] == [(True, 0), (True, 2)]  # 2 of 6 each, here
        refused = await state.apply(batch + [comox.Add("inflight", 1, cap=6)])
        assert [r[0] for r in refused] == [False, False, False]
        assert refused[0].retry_after_s == pytest.approx(60, abs=1)  # a third of the rate: 2 per minute
        assert await state.add("spent", 0) == (True, 2)  # unchanged
        await state.set("v", b"x", ttl_s=60)  # bypassed
        assert await state.get("v") is None
        await state.aclose()

    run(scenario())


def test_a_share_is_never_smaller_than_one_request():
    assert share(6, 1, 3) == 2
    assert share(1, 1, 3) == 1  # 1 rpm among 3 replicas: each may serve one
    assert share(1000, 600, 3) == 600  # a request the whole limit allows still fits
    assert share(1000, 2000, 3) == 1000  # one it does not is refused as it would be by the whole
    assert share(6, -1, 3) == 2
    assert share(6, 1, 0) == 6


def test_outage_warns_once_bypasses_redis_and_recovers(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="comox.redis")

    async def scenario():
        state = RedisState(redis_server.url, recheck_s=0.05)
        await state.start()
        await state.set("v", b"kept", ttl_s=60)
        redis_server.kill()
        for _ in range(20):
            assert (await state.take("rpm", 1, capacity=100, per_s=1)).allowed
            assert await state.get("v") is None
        ready = state.readiness()
        assert ready["ready"] and ready["state"] == "degraded" and "redis unreachable" in ready["reason"]
        await asyncio.to_thread(redis_server.start)

        async def shared():
            return state.readiness()["state"] == "shared"

        await until(shared)
        await state.set("v", b"again", ttl_s=60)
        assert await state.get("v") == b"again"
        await state.aclose()

    run(scenario())
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "comox.redis"]
    assert [level for level, _ in records] == ["WARNING", "INFO"], records
    assert "shared state degraded (redis unreachable: " in records[0][1]
    assert "shared state recovered" in records[1][1]


class Listener:
    """A TCP port that accepts connections and never answers (``hang``) or
    closes them at once; counts the connections it got."""

    def __init__(self, hang):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.hang = hang
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            (self.held.append if self.hang else socket.socket.close)(conn)

    def close(self):
        try:  # (wakes the accept() and refuses what comes next; close() alone does neither)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.held:
            conn.close()


async def closes(state):
    """Close ``state``, failing (not hanging) if that never ends."""
    closing = asyncio.ensure_future(state.aclose())
    done, _ = await asyncio.wait({closing}, timeout=10)
    assert done, "aclose() hangs: a cancelled task went on"
    closing.result()


def test_no_request_waits_on_redis_while_it_is_down():
    listener = Listener(hang=False)

    async def scenario():
        state = RedisState(f"redis://127.0.0.1:{listener.port}/0", recheck_s=60)
        for _ in range(200):
            await state.take("rpm", 1, capacity=1000, per_s=1)
            await state.get("v")
        assert state.readiness()["state"] == "degraded"
        # Its first heartbeat is still connecting: closing cancels it (redis-py
        # may turn that cancel into a ConnectionError, which must not swallow it).
        await closes(state)

    for _ in range(20):  # (the cancel lands at a different point each time)
        before = listener.accepted
        run(scenario())
        assert listener.accepted - before <= 3  # the first call, the first heartbeat: not one per request
    listener.close()


def test_a_redis_that_never_answers_costs_at_most_the_timeout():
    listener = Listener(hang=True)

    async def scenario():
        state = RedisState(f"redis://127.0.0.1:{listener.port}/0", timeout_s=0.1, recheck_s=60)
        async with asyncio.timeout(5):  # a hang would fail here, not pass
            bucket = await state.take("rpm", 1, capacity=10, per_s=1)
        assert bucket.allowed
        assert "no answer within the timeout" in state.readiness()["reason"]
        await state.aclose()

    run(scenario())
    listener.close()


def test_a_cancelled_call_is_not_redis_down():
    """A client that goes away cancels its request's Redis call: the call is
    cancelled (redis-py must not turn that into a ConnectionError that counts
    as Redis down), and so is the heartbeat when the state closes."""
    listener = Listener(hang=True)

    async def scenario():
        # The heartbeat never gets an answer either: its timeout must not run
        # out before the check below, even on a loaded machine.
        state = RedisState(f"redis://127.0.0.1:{listener.port}/0", timeout_s=30, recheck_s=60)
        call = asyncio.create_task(state.get("v"))

        async def connected():  # the call's connection and the first heartbeat's
            return listener.accepted >= 2

        await until(connected)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert state.readiness() == {"ready": True, "state": "shared", "replicas": 1}
        listener.close()  # so that leaving the replica count is refused, not waited on for 30 s
        await closes(state)

    run(scenario())


def test_closed_refuses_while_down_and_serves_when_back(redis_server):
    async def scenario():
        state = RedisState(redis_server.url, on_failure="closed", recheck_s=0.05)
        await state.start()
        assert (await state.take("rpm", 1, capacity=5, per_s=1)).allowed
        redis_server.kill()
        for operation in (state.take("rpm", 1, capacity=5, per_s=1), state.add("c", 1), state.get("v"),
                          state.set("v", b"x", ttl_s=1), state.apply([comox.Take("rpm", 1, 5, 1)])):
            with pytest.raises(SharedStateUnavailable) as refused:
                await operation
            assert refused.value.status == 503 and refused.value.retry_after is not None
        assert state.readiness() == {"ready": False, "state": "unavailable", "reason": state.down_reason}
        await asyncio.to_thread(redis_server.start)

        async def back():
            return state.readiness()["ready"]

        await until(back)
        assert (await state.take("rpm", 1, capacity=5, per_s=1)).allowed
        await state.aclose()

    run(scenario())


# -- the [state] table --------------------------------------------------------------


def gateway_with(state_table):
    return build_gateway(Settings(auth="none", sections={"state": state_table}))


def test_no_redis_url_keeps_the_memory_state():
    assert isinstance(gateway_with({}).shared_state, MemoryState)


def test_a_redis_url_gives_a_redis_state(redis_server):
    gateway = gateway_with({"redis_url": redis_server.url, "prefix": "x:", "timeout_ms": 50, "on_failure": "closed"})
    state = gateway.shared_state
    assert isinstance(state, RedisState)
    assert (state.prefix, state.timeout_s, state.on_failure) == ("x:", 0.05, "closed")

    async def started():
        await gateway.startup()
        assert gateway.readiness()["state"] == "shared" and gateway.readiness()["ready"]
        await gateway.aclose()

    run(started())


def test_the_url_from_the_environment(monkeypatch):
    port = free_port()
    monkeypatch.setenv("TEST_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    assert isinstance(gateway_with({"redis_url_env": "TEST_REDIS_URL"}).shared_state, RedisState)
    monkeypatch.delenv("TEST_REDIS_URL")
    with pytest.raises(ConfigError, match="state.redis_url_env: the environment variable 'TEST_REDIS_URL' is not set"):
        gateway_with({"redis_url_env": "TEST_REDIS_URL"})


@pytest.mark.parametrize("table, message", [
    ({"redis_url": "http://redis:6379"}, "state.redis_url: Value error, must start with redis://, rediss://, unix://"),
    ({"on_failure": "maybe"}, "state.on_failure: Input should be 'open' or 'closed'"),
    ({"timeout_ms": 0}, "state.timeout_ms: Input should be greater than or equal to 1"),
    ({"redis_urll": "redis://x"}, "state.redis_urll: Extra inputs are not permitted"),
    ({"redis_url": "redis://a", "redis_url_env": "B"}, "set redis_url or redis_url_env, not both"),
])
def test_bad_state_tables_are_one_line_errors(table, message):
    with pytest.raises(ConfigError) as error:
        gateway_with(table)
    assert message in str(error.value)


def test_the_settings_model_owns_the_state_table():
    assert StateSettings.section == "state"
    assert StateSettings().on_failure == "open" and StateSettings().timeout_ms == 200


# -- what the docs say ----------------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs"


def test_configuration_md_lists_every_state_key_with_its_default():
    text = (DOCS / "configuration.md").read_text()
    table = text[text.index("### `[state]`"):]
    table = table[:table.index("\n\n", table.index("| key |"))]
    rows = {}
    for line in table.splitlines()[2:]:
        if line.startswith("| `"):
            key, default = (cell.strip() for cell in line.split("|")[1:3])
            rows[key.strip("`")] = default.strip("`")
    defaults = StateSettings()
    assert sorted(rows) == sorted(StateSettings.model_fields)
    for key, default in rows.items():
        value = getattr(defaults, key)
        assert default == ("none" if value is None else f'"{value}"' if isinstance(value, str) else f"{value:g}"), key


def test_the_documented_log_lines_are_what_is_logged(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="comox.redis")
    text = (DOCS / "deployment.md").read_text()
    warning, info = (line for line in text.splitlines() if line.startswith(("WARNING comox.redis:", "INFO comox.redis:")))

    async def scenario():
        state = RedisState(redis_server.url, recheck_s=0.05)
        state.replicas = 3
        redis_server.kill()
        await state.get("v")
        redis_server.start()

        async def back():
            return state.readiness()["state"] == "shared"

        await until(back)
        await state.aclose()

    run(scenario())
    logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if r.name == "comox.redis"]
    port = redis_server.port
    logged[0] = logged[0].replace(f"127.0.0.1:{port}", "10.0.0.9:6379").replace(f"('127.0.0.1', {port})", "('10.0.0.9', 6379)")
    assert logged == [warning, info.replace("3 replica(s)", "1 replica(s)")]


def test_aclose_returns_even_when_the_watcher_swallowed_a_cancel(redis_server):
    """A watcher that lost one cancel (redis-py can swallow one around a call)
    is cancelled again: aclose() once hung a CI run for ever on it."""

    async def scenario():
        state = RedisState(redis_server.url)
        await state.start()
        state._task.cancel()
        await asyncio.wait({state._task})

        async def stubborn():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # swallowed once
            await asyncio.sleep(3600)

        state._task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(state.aclose(), 5)
        assert state._task is None

    run(scenario())
