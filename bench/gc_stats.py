#!/usr/bin/env python3
"""What Python's garbage collector costs ``comox serve`` under load, with
``[server] tune_gc`` off and on: ``python bench/gc_stats.py [--duration 10] [--pairs 2]``.

Each run starts nginx (as ``bench/perf.py`` does) and ``comox serve`` wrapped so
that ``gc.callbacks`` time every collection, drives it with wrk at c=16 (JSON,
then SSE), stops it, and prints the collections per generation, the time they
took and the longest pause, next to throughput and p99.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import perf  # noqa: E402

# Runs `comox serve` with every collection timed; writes the totals at exit.
WRAPPER = '''
import atexit, gc, os, signal, sys, time
stats = [[0, 0.0, 0.0] for _ in range(3)]
started = [0.0]
def timer(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        took = time.perf_counter() - started[0]
        s = stats[info["generation"]]
        s[0] += 1; s[1] += took; s[2] = max(s[2], took)
gc.callbacks.append(timer)
def report():
    with open(os.environ["GC_STATS"], "w") as f:
        for g, (n, total, longest) in enumerate(stats):
            f.write(f"gen{g} {n} {total} {longest}\\n")
atexit.register(report)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
from comox.cli import main
sys.exit(main(sys.argv[1:]))
'''


def run(nginx: perf.Nginx, workdir: Path, tune: bool, duration: float) -> dict:
    port = perf.free_port()
    config = perf.comox_config(nginx, "p2c_ewma", workdir / f"comox-{port}.toml")
    config.write_text(f"[server]\ntune_gc = {str(tune).lower()}\n" + config.read_text().replace("[server]\n", "", 1))
    wrapper = workdir / "gc_wrapper.py"
    wrapper.write_text(WRAPPER)
    stats = workdir / f"gc-{port}.txt"
    proc = perf.start(perf.taskset(str(perf.PROXY_CORE), [sys.executable, str(wrapper), "serve", "-c", str(config),
                                                          "--port", str(port), "--log-level", "warning"]),
                      env={"GC_STATS": str(stats)})
    try:
        perf.wait_http(port, perf.REQUEST_JSON)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        results = {}
        for kind, body in (("json", perf.REQUEST_JSON), ("sse", perf.REQUEST_SSE)):
            path = workdir / f"{kind}.json"
            path.write_bytes(body)
            results[kind] = perf.wrk(url, path, 16, duration, cores=str(perf.LOAD_CORE))
    finally:
        perf.stop(proc)
    gens = [line.split() for line in stats.read_text().splitlines()]
    results["gc"] = [(int(n), float(total), float(longest)) for _, n, total, longest in gens]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per kind (default 10)")
    parser.add_argument("--pairs", type=int, default=2, help="off/on pairs, interleaved (default 2)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="comox-gc-"))
    nginx = perf.Nginx(workdir, str(perf.LOAD_CORE))
    print("| tune_gc | JSON rps / p99 | SSE rps / p99 | requests | gen0 | gen1 | gen2 | GC time | GC share of the run | longest pause |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for _ in range(args.pairs):
            for tune in (False, True):
                r = run(nginx, workdir, tune, args.duration)
                gc_time = sum(total for _, total, _ in r["gc"])
                wall = 2 * args.duration
                requests = r["json"]["requests"] + r["sse"]["requests"]
                counts = " | ".join(f"{n:,}" for n, _, _ in r["gc"])
                print(f"| {'on' if tune else 'off'} | {r['json']['rps']:,.0f} / {r['json']['p99_us'] / 1000:.1f} ms | "
                      f"{r['sse']['rps']:,.0f} / {r['sse']['p99_us'] / 1000:.1f} ms | {requests:,} | {counts} | "
                      f"{gc_time * 1000:.0f} ms | {gc_time / wall:.1%} | {max(l for _, _, l in r['gc']) * 1000:.1f} ms |",
                      flush=True)
    finally:
        perf._stop_all()
    print("\nGC time includes the collection made at startup when tune_gc is on (the longest pause then).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
