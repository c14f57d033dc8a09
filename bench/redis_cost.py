#!/usr/bin/env python3
"""What sharing state in Redis adds to a request. See docs/deployment.md.

    python bench/redis_cost.py                  # 5000 operations, 2000 requests of each kind
    python bench/redis_cost.py -n 1000 --requests 500 --max-seconds 20

Starts ``redis-server`` (the Debian package) on a free port of 127.0.0.1,
nothing saved to disk. Then:

1. In process: times ``take`` (the token bucket every limited request takes
   from), ``add`` (the concurrency counter), ``get`` and ``set`` (the cache)
   one after another against ``comox.MemoryState`` and against the ``redis``
   plugin's ``RedisState``: per operation p50 and mean, in microseconds; and
   ``take`` from 64 concurrent tasks (operations a second).
2. End to end: the stand-in upstream, and two gateways in front of it
   (processes of their own under uvicorn, the ``limits`` and ``cache`` plugins
   on, and this module as a plugin that gives every caller an ``rpm``): one
   keeping its state in memory, one in this Redis. ``bench/cache_hit.py``'s
   measurement, taking turns between the two gateways: the same deterministic
   chat completion over one keep-alive connection, as a cache hit (the rpm
   bucket and one cache read) and with ``x-comox-cache: skip`` (the rpm bucket
   only; proxied to the stand-in). p50 and mean latency as the client saw them.

Bounded by ``-n`` operations, ``--requests`` requests of each kind and
``--max-seconds`` per part; every process it started is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from cache_hit import free_port, measure, stop, wait_ready  # noqa: E402

import comox  # noqa: E402

ROUNDS = 4  # turns taken between the two gateways


# --limits: what every caller is held to (never reached), passed on to the gateway processes.
LIMITS = {"rpm": {"rpm": 10**9},
          "all": {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**5}}[os.environ.get("COMOX_BENCH_LIMITS", "rpm")]


@comox.hookimpl
def comox_authenticate() -> comox.Principal:
    """Every caller has an rpm (never reached; with ``--limits all`` a tpm and
    a max_concurrency too, as a production key): each request takes from its bucket."""
    return comox.Principal(key_id="bench", limits=LIMITS)


def create_app() -> comox.ComoxApp:
    """The gateway processes: ``uvicorn redis_cost:create_app --factory``."""
    return comox.create_app(plugins=[sys.modules[__name__]])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", directory], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


# -- 1. in process ---------------------------------------------------------------


async def time_ops(state: comox.SharedState, count: int, max_seconds: float) -> dict[str, list[float]]:
    value = b"x" * 2048  # about a chat completion's JSON
    ops: dict[str, Callable[[int], Awaitable[object]]] = {
        "take": lambda i: state.take("bench:rpm", 1, capacity=1e12, per_s=1e10),
        "add": lambda i: state.add("bench:conc", 1 if i % 2 else -1, cap=1e9, ttl_s=600),
        "get": lambda i: state.get(f"bench:v{i % 100}"),
        "set": lambda i: state.set(f"bench:v{i % 100}", value, ttl_s=600),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    clock = time.perf_counter
    deadline = time.monotonic() + max_seconds
    for name, op in ops.items():
        for i in range(50):  # warm up: connections, scripts loaded
            await op(i)
        for i in range(count):
            start = clock()
            await op(i)
            times[name].append(clock() - start)
            if time.monotonic() > deadline:
                break
    return times


async def concurrent_takes(state: comox.SharedState, count: int, tasks: int = 64) -> float:
    """Takes a second with ``tasks`` concurrent callers."""
    per_task = max(1, count // tasks)

    async def worker() -> None:
        for _ in range(per_task):
            await state.take("bench:rpm", 1, capacity=1e12, per_s=1e10)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return per_task * tasks / (time.perf_counter() - start)


async def in_process(url: str, count: int, max_seconds: float) -> None:
    from comox_redis.state import RedisState

    results = {}
    for name, state in (("memory", comox.MemoryState()), ("redis", RedisState(url, timeout_s=1.0))):
        results[name] = (await time_ops(state, count, max_seconds), await concurrent_takes(state, count))
        assert state.readiness()["state"] in ("local", "shared"), state.readiness()
        await state.aclose()
    print(f"in process, one operation at a time (µs): {count} of each")
    print(f"{'':6} {'memory p50':>10} {'mean':>8} {'redis p50':>10} {'mean':>8}")
    for op in results["memory"][0]:
        m, r = results["memory"][0][op], results["redis"][0][op]
        print(f"{op:6} {statistics.median(m) * 1e6:10.1f} {statistics.fmean(m) * 1e6:8.1f}"
              f" {statistics.median(r) * 1e6:10.1f} {statistics.fmean(r) * 1e6:8.1f}")
    print(f"take, 64 concurrent tasks: memory {results['memory'][1]:,.0f}/s, redis {results['redis'][1]:,.0f}/s")


# -- 2. end to end -----------------------------------------------------------------


def config(upstream_port: int, redis_url: str | None) -> str:
    state = f'\n[state]\nredis_url = "{redis_url}"\n' if redis_url else ""
    return (f'auth = "none"\n\n[[models]]\nname = "bench"\n\n  [[models.backends]]\n  name = "stand-in"\n'
            f'  url = "http://127.0.0.1:{upstream_port}"\n{state}')


def end_to_end(url: str, tmp: str, count: int, max_seconds: float) -> None:
    upstream_port = free_port()
    ports = {"memory": free_port(), "redis": free_port()}
    procs: list[subprocess.Popen[bytes]] = []
    times: dict[str, list[float]] = {}
    try:
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "cache_hit.py"), "--serve-upstream",
                                       str(upstream_port)], cwd=ROOT, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(upstream_port, procs[-1])
        for store, port in ports.items():
            path = Path(tmp) / f"{store}.toml"
            path.write_text(config(upstream_port, url if store == "redis" else None))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "redis_cost:create_app", "--factory", "--app-dir", str(ROOT / "bench"),
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
                cwd=ROOT, env={**os.environ, "COMOX_CONFIG": str(path)}, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_ready(port, procs[-1])
        for _ in range(ROUNDS):
            for store, port in ports.items():
                for kind, values in measure(port, upstream_port, count // ROUNDS, max_seconds / ROUNDS / 2).items():
                    times.setdefault(kind if kind == "stand-in" else f"{store} {kind}", []).extend(values)
    finally:
        for proc in reversed(procs):
            stop(proc)
    print(f"\nend to end, one keep-alive connection, sequential (ms): up to {count} of each")
    print(f"{'':16} {'requests':>8} {'p50':>8} {'mean':>8}")
    for kind, values in sorted(times.items()):
        print(f"{kind:16} {len(values):8} {statistics.median(values) * 1e3:8.3f} {statistics.fmean(values) * 1e3:8.3f}")
    for kind in ("hit", "proxied"):
        m, r = times[f"memory {kind}"], times[f"redis {kind}"]
        print(f"redis adds to a {kind}: {(statistics.median(r) - statistics.median(m)) * 1e3:+.3f} ms p50, "
              f"{(statistics.fmean(r) - statistics.fmean(m)) * 1e3:+.3f} ms mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="operations of each kind in process (default 5000)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of each kind end to end (default 2000)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="bound on each part (default 60)")
    parser.add_argument("--limits", choices=["rpm", "all"], default="rpm",
                        help="the callers' limits end to end: an rpm (default), or rpm, tpm and max_concurrency")
    parser.add_argument("--end-to-end-only", action="store_true", help="skip the in-process part")
    args = parser.parse_args()
    os.environ["COMOX_BENCH_LIMITS"] = args.limits
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = start_redis(tmp)
        try:
            if not args.end_to_end_only:
                asyncio.run(in_process(url, args.n, args.max_seconds))
            end_to_end(url, tmp, args.requests, args.max_seconds)
        finally:
            stop(redis_proc)


if __name__ == "__main__":
    main()
