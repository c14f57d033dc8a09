"""``RedisState``: a :class:`comox.SharedState` kept in Redis (or Valkey).

Every operation is one atomic server-side step: token buckets and capped
counters are one Lua script, for ``apply`` (several of both, all or nothing,
in one round trip) and for ``take`` and ``add`` (one op each); buckets refill
by Redis' own ``TIME``, so replicas whose clocks disagree still share one
bucket; values are plain
``SET … PX`` / ``GET`` / ``DEL``. Each call is bounded by ``timeout_s`` as a
whole (waiting for a pooled connection, connecting, the command): Redis never
holds a request for longer.

When Redis cannot be used (refused, timed out, an error), the state
*degrades*: with ``on_failure = "open"`` buckets and counters are kept in this
process, each replica taking its share of every limit (capacity and refill
divided by the replicas last seen alive), and values are bypassed (``get``
finds nothing, ``set`` and ``delete`` do nothing); with ``"closed"`` every
operation raises :class:`SharedStateUnavailable` (503). No request calls Redis
while it is down: a background task checks it every ``recheck_s`` and
resumes shared counting when it answers. The same task is the heartbeat that
counts live replicas: each refreshes its member of a sorted set every
``heartbeat_s`` and counts the members seen within three heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

import comox

__all__ = ["RedisState", "SharedStateUnavailable"]

log = logging.getLogger("comox.redis")

T = TypeVar("T")

# What "Redis could not be used" looks like: redis-py's own errors (connection
# refused or reset, pool exhausted, script errors, READONLY, OOM…), socket
# errors that escape it, and the overall deadline.
UNAVAILABLE = (RedisError, OSError, TimeoutError)

_FMT = "local function fmt(x) return string.format('%.17g', x) end\n"

# Every take and add, one op or several (``take`` and ``add`` are one-op
# batches). KEYS[i] the i-th op's key (prefixed: "t:" bucket, "c:" counter);
# ARGV five per op: "t", amount, capacity, per_s, force ("1"/"0") or "a",
# amount, cap ("" for none), ttl in ms ("" for none), "". A bucket refills by
# Redis' TIME; one that is full again is deleted (absent = full), so idle keys
# cost nothing. Each op is judged on an overlay of what the ones before it left
# (same clock, so the same key twice sees the first op's result); written only
# if none was refused. Returns per op a comox.Bucket's fields (allowed,
# remaining, reset_s, retry_after_s) or a counter's (added, value).
APPLY = _FMT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local buckets, counters, order = {}, {}, {}
local results, refused = {}, false
for i = 1, #KEYS do
  local key, kind, amount = KEYS[i], ARGV[5 * i - 4], tonumber(ARGV[5 * i - 3])
  if kind == 't' then
    local capacity, per_s = tonumber(ARGV[5 * i - 2]), tonumber(ARGV[5 * i - 1])
    local b = buckets[key]
    local tokens = capacity
    if b == nil then
      local held = redis.call('HMGET', key, 'tokens', 'at')
      if held[1] then
        tokens = math.min(capacity, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * per_s)
      end
      order[#order + 1] = key
    elseif not b.full then
      tokens = math.min(capacity, b.tokens)
    end
    local allowed = 0
    if ARGV[5 * i] == '1' or amount <= tokens then
      allowed = 1
      tokens = tokens - amount
    else
      refused = true
    end
    buckets[key] = {tokens = tokens, full = tokens >= capacity, capacity = capacity, per_s = per_s}
    local reset, retry = math.huge, 0
    if per_s > 0 then reset = math.max(0, (capacity - tokens) / per_s) end
    if allowed == 0 then
      if amount > capacity or per_s <= 0 then retry = math.huge else retry = (amount - tokens) / per_s end
    end
    results[i] = {allowed, fmt(math.max(0, math.floor(tokens))), fmt(reset), fmt(retry)}
  else
    local c = counters[key]
    local value
    if c == nil then value = tonumber(redis.call('GET', key) or '0') else value = c.value end
    local new = value + amount
    local cap = ARGV[5 * i - 2]
    if cap ~= '' and amount > 0 and new > tonumber(cap) then
      refused = true
      results[i] = {0, fmt(value)}
    else
      if c == nil then order[#order + 1] = key end
      counters[key] = {value = new, ttl = ARGV[5 * i - 1]}
      results[i] = {1, fmt(new)}
    end
  end
end
if not refused then
  for _, key in ipairs(order) do
    local b, c = buckets[key], counters[key]  -- ("t:" and "c:" keys never meet)
    if b ~= nil then
      if b.full then
        redis.call('DEL', key)
      else
        redis.call('HSET', key, 'tokens', fmt(b.tokens), 'at', fmt(now))
        if b.per_s > 0 then
          redis.call('PEXPIRE', key, math.ceil((b.capacity - b.tokens) / b.per_s * 1000) + 1000)
        else
          redis.call('PERSIST', key)
        end
      end
    elseif c ~= nil then
      if c.ttl ~= '' then
        redis.call('SET', key, fmt(c.value), 'PX', c.ttl)
      else
        redis.call('SET', key, fmt(c.value))
      end
    end
  end
end
return results
"""

# KEYS[1] the replicas' sorted set; ARGV this replica, window in seconds.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return redis.call('ZCARD', KEYS[1])
"""


class SharedStateUnavailable(comox.ComoxError):
    """503: the shared state is unreachable and ``[state] on_failure = "closed"``."""

    status = 503
    type = "service_unavailable"
    code = "shared_state_unavailable"


def share(total: float, amount: float, replicas: int) -> float:
    """This replica's part of ``total`` among ``replicas``, but never too small
    for one ``amount`` that fits the whole (a limit of 1 a minute among three
    replicas still lets each serve one: within one request per replica)."""
    part = total / max(1, replicas)
    return max(part, min(amount, total)) if amount > 0 else part


class RedisState:
    """A :class:`comox.SharedState` in Redis; see the module docstring.

    :param url: ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS)
        or ``unix:///path/to/socket``.
    :param prefix: put before every key, so several gateways (or other users)
        can share one Redis.
    :param timeout_s: the most one operation may take, all included.
    :param on_failure: ``"open"`` (degrade and keep serving) or ``"closed"``.
    :param clock: a monotonic ``() -> seconds`` for the fallback buckets (tests
        pass a fake one); the shared buckets use Redis' own clock.
    """

    def __init__(self, url: str, *, prefix: str = "comox:", timeout_s: float = 0.2,
                 on_failure: Literal["open", "closed"] = "open", max_connections: int = 64,
                 heartbeat_s: float = 5.0, recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, replica_id: str | None = None) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.heartbeat_s = heartbeat_s
        self.recheck_s = recheck_s
        self.clock = clock
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0),  # a retry would only double the wait
        )
        self.redis = Redis.from_pool(pool)
        self._apply = self.redis.register_script(APPLY)
        self._heartbeat = self.redis.register_script(HEARTBEAT)
        self.replicas = 1
        """Live replicas counted at the last heartbeat (1 until one answered)."""
        self.down_reason: str | None = None
        """Why Redis is not used right now; ``None`` while it is."""
        self.fallback = comox.MemoryState(clock=clock)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._wake: asyncio.Event | None = None

    # -- the SharedState operations -------------------------------------------

    async def take(self, key: str, amount: float, *, capacity: float, per_s: float, force: bool = False) -> comox.Bucket:
        result = (await self.apply([comox.Take(key, amount, capacity, per_s, force)]))[0]
        assert isinstance(result, comox.Bucket)
        return result

    async def add(self, key: str, amount: float, *, cap: float | None = None, ttl_s: float | None = None) -> tuple[bool, float]:
        result = (await self.apply([comox.Add(key, amount, cap, ttl_s)]))[0]
        assert not isinstance(result, comox.Bucket)
        return result

    async def apply(self, ops: Sequence[comox.Take | comox.Add]) -> list[comox.Bucket | tuple[bool, float]]:
        if not ops:
            return []

        async def shared() -> list[comox.Bucket | tuple[bool, float]]:
            keys: list[str] = []
            args: list[str | float] = []
            for op in ops:
                if isinstance(op, comox.Take):
                    keys.append(self.prefix + "t:" + op.key)
                    args += ["t", op.amount, op.capacity, op.per_s, "1" if op.force else "0"]
                else:
                    keys.append(self.prefix + "c:" + op.key)
                    ttl = str(max(1, math.ceil(op.ttl_s * 1000))) if op.ttl_s else ""
                    args += ["a", op.amount, "" if op.cap is None else op.cap, ttl, ""]
            answers = await self._apply(keys=keys, args=args)
            results: list[comox.Bucket | tuple[bool, float]] = []
            for op, answer in zip(ops, answers, strict=True):
                if isinstance(op, comox.Take):
                    allowed, remaining, reset, retry = answer
                    results.append(comox.Bucket(bool(allowed), float(remaining), float(reset), float(retry)))
                else:
                    added, value = answer
                    results.append((bool(added), float(value)))
            return results

        async def local() -> list[comox.Bucket | tuple[bool, float]]:
            n = self.replicas
            parts: list[comox.Take | comox.Add] = [
                op._replace(capacity=share(op.capacity, op.amount, n), per_s=op.per_s / n)
                if isinstance(op, comox.Take) else
                op if op.cap is None else op._replace(cap=share(op.cap, op.amount, n))
                for op in ops]
            return await self.fallback.apply(parts)

        return await self._call(shared, local)

    async def get(self, key: str) -> bytes | None:
        async def shared() -> bytes | None:
            value = await self.redis.get(self.prefix + "v:" + key)
            assert value is None or isinstance(value, bytes)  # responses are not decoded
            return value

        return await self._call(shared, _nothing)

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        async def shared() -> None:
            await self.redis.set(self.prefix + "v:" + key, value, px=max(1, math.ceil(ttl_s * 1000)))

        await self._call(shared, _nothing)

    async def delete(self, key: str) -> None:
        async def shared() -> None:
            await self.redis.delete(self.prefix + "v:" + key)

        await self._call(shared, _nothing)

    def readiness(self) -> dict[str, Any]:
        if self.down_reason is None:
            return {"ready": True, "state": "shared", "replicas": self.replicas}
        if self.on_failure == "closed":
            return {"ready": False, "state": "unavailable", "reason": self.down_reason}
        return {"ready": True, "state": "degraded", "reason": self.down_reason, "replicas": self.replicas}

    # -- up, down and back ----------------------------------------------------

    async def _call(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        if self._task is None and not self._closed:  # (a call after aclose() starts no watcher to leak)
            self._start()
        if self.down_reason is None:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await shared()
            except UNAVAILABLE as exc:
                _reraise_cancel(exc)
                self._went_down(exc)
        if self.on_failure == "closed":
            raise SharedStateUnavailable(
                "the shared state (Redis) is unreachable and [state] on_failure is \"closed\": try again shortly",
                retry_after=self.recheck_s)
        return await local()

    def _went_down(self, exc: BaseException) -> None:
        if self.down_reason is not None:
            return
        self.down_reason = f"redis unreachable: {_describe(exc)}"
        self.fallback = comox.MemoryState(clock=self.clock)  # every outage starts with full local shares
        what = ("requests are refused ([state] on_failure = \"closed\")" if self.on_failure == "closed" else
                f"limits count per replica (this one takes 1/{self.replicas} of each) and the cache is bypassed")
        log.warning("shared state degraded (%s): %s until redis answers again", self.down_reason, what)
        if self._wake is not None:
            self._wake.set()  # the watcher checks again within recheck_s, not heartbeat_s

    def _came_back(self) -> None:
        if self.down_reason is None:
            return
        self.down_reason = None
        log.info("shared state recovered: redis answers again, counting across %d replica(s)", self.replicas)

    async def beat(self) -> bool:
        """One heartbeat: refresh this replica, count the live ones. False
        (and degraded) when Redis could not be used."""
        try:
            async with asyncio.timeout(self.timeout_s):
                count = await self._heartbeat(keys=[self.prefix + "replicas"],
                                              args=[self.replica_id, 3 * self.heartbeat_s])
        except UNAVAILABLE as exc:
            _reraise_cancel(exc)
            self._went_down(exc)
            return False
        self.replicas = max(1, int(count))
        if self.down_reason is not None:
            # Connections pooled before the outage are dead: drop them now, or the first
            # calls after recovery fail on them and start another outage (full local shares).
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        self._came_back()
        return True

    async def start(self) -> None:
        """First heartbeat (so readiness and the replica count are right from
        the start), then the watcher in the background. Idempotent."""
        if self._task is None and not self._closed:
            self._start(beat_first=False)
            await self.beat()

    def _start(self, *, beat_first: bool = True) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._watch(self._wake, beat_first), name="comox-redis-watch")

    async def _watch(self, wake: asyncio.Event, beat_first: bool) -> None:
        if beat_first:
            await self.beat()
        while True:
            wake.clear()
            ok = self.down_reason is None
            try:
                async with asyncio.timeout(self.heartbeat_s if ok else self.recheck_s):
                    await wake.wait()
            except TimeoutError:
                pass
            await self.beat()

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            # Cancelled again if it swallowed a cancel (redis-py can, around a call
            # it was in): a watcher left running would keep aclose() waiting for ever.
            for _ in range(10):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=1.0)  # (a cancel of aclose() itself still goes through)
                if done:
                    break
            else:
                log.warning("the redis watcher did not stop; left to the event loop's end")
            self._task = None
        if self.down_reason is None:
            try:  # leave the count at once, not three heartbeats later
                async with asyncio.timeout(self.timeout_s):
                    await self.redis.zrem(self.prefix + "replicas", self.replica_id)
            except UNAVAILABLE as exc:
                _reraise_cancel(exc)
        await self.redis.aclose()  # and its pool


async def _nothing() -> None:
    return None


def _reraise_cancel(exc: BaseException) -> None:
    """Raise ``CancelledError`` if this task is being cancelled from outside:
    redis-py can turn the cancellation of a call into a ``ConnectionError``,
    and a client that went away must neither count as Redis down nor lose
    its cancellation. (Our own ``asyncio.timeout`` has uncancelled the task by
    now: a timeout is a Redis that did not answer.)"""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
