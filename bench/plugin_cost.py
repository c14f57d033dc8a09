#!/usr/bin/env python3
"""What each default plugin costs end to end: Comox with plugins added one
stage at a time, against the minimal proxies, in interleaved rounds.

    python bench/plugin_cost.py                 # 3 rounds of 4 s (about 6 minutes)
    python bench/plugin_cost.py --rounds 1 --duration 3

``bench/pipeline.py`` measures the same stages in process; end to end they cost
more (everything runs slower among uvicorn's and aiohttp's code than in a
tight loop), and this is what a user sees. Each row is ``comox serve`` (pinned
to core 0; nginx and wrk on core 1, as ``bench/perf.py``) with only the named
plugins loaded (``COMOX_LOAD_PLUGINS``), JSON chat completions at c=16. CPU per
request counts every thread of the process, split into the event loop's thread
and the others (pyreqwest's Rust runtime), with their context switches per
request. Needs what ``bench/perf.py`` needs (nginx, wrk, ``comox[bench]``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from statistics import fmean

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from perf import (  # noqa: E402
    BENCH_KEY, LOAD_CORE, PROXY_CORE, REQUEST_JSON, MinimalProxy, Nginx, Proxy, _stop_all, free_port, start, taskset,
    wait_http, wrk,
)

CORE = "openai,p2c_ewma"
# (label, plugins loaded — None: every installed plugin, keyed, transport)
STAGES: list[tuple[str, str | None, bool, str]] = [
    ("core alone (auth = \"none\")", CORE, False, "httptools"),
    ("+ keys", f"{CORE},keys", True, "httptools"),
    ("+ limits (rpm, tpm, max_concurrency)", f"{CORE},keys,limits", True, "httptools"),
    ("+ cache (sampled: skipped)", f"{CORE},keys,limits,cache", True, "httptools"),
    ("+ metrics", f"{CORE},keys,limits,cache,metrics", True, "httptools"),
    ("every default plugin", None, True, "httptools"),
    ("every default plugin, transport = \"aiohttp\"", None, True, "aiohttp"),
    ("every default plugin, transport = \"pyreqwest\"", None, True, "pyreqwest"),
]


def config(path: Path, port: int, keyed: bool, transport: str) -> Path:
    digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    lines = ['[server]', 'retries = 1', '']
    if keyed:
        lines += ['[[keys]]', 'id = "bench"', f'key_sha256 = "{digest}"', 'rpm = 1000000000',
                  'tpm = 1000000000000', 'max_concurrency = 100000', '']
    else:
        lines.insert(0, 'auth = "none"')
    lines += ['[[models]]', 'name = "bench"', 'policy = "p2c_ewma"', '', '[[models.backends]]', 'name = "nginx"',
              'type = "openai"', f'url = "http://127.0.0.1:{port}"']
    lines.append(f'transport = "{transport}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class Stage(Proxy):
    def __init__(self, label: str, plugins: str | None, keyed: bool, transport: str, nginx: Nginx, workdir: Path):
        self.name = label
        self.port = free_port()
        path = config(workdir / f"stage-{self.port}.toml", nginx.port_json, keyed, transport)
        env = {"COMOX_LOAD_PLUGINS": plugins} if plugins else {}
        argv = [sys.executable, "-m", "comox.cli", "serve", "-c", str(path), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]
        self.proc = start(taskset(str(PROXY_CORE), argv), env=env, log=workdir / f"stage-{self.port}.log")
        wait_http(self.port, REQUEST_JSON)


def threads(pid: int) -> dict[str, tuple[float, int]]:
    """Per thread of ``pid``: (CPU seconds, context switches)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        switches = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
        out[tid] = ((int(fields[11]) + int(fields[12])) / tick, switches)
    return out


def measure(target: Proxy, body: Path, duration: float) -> tuple[float, float, float, float, float]:
    """rps, CPU µs/request (all threads), of which the main thread's, and
    context switches per request of the main thread and of the others."""
    pid = target.proc.pid
    before = threads(pid)
    result = wrk(target.url(False), body, 16, duration, cores=str(LOAD_CORE))
    after = threads(pid)
    n = result["rps"] * duration
    main_cpu = other_cpu = main_sw = other_sw = 0.0
    for tid, (cpu, switches) in after.items():
        cpu0, switches0 = before.get(tid, (0.0, 0))
        if tid == str(pid):
            main_cpu, main_sw = cpu - cpu0, switches - switches0
        else:
            other_cpu += cpu - cpu0
            other_sw += switches - switches0
    return result["rps"], (main_cpu + other_cpu) / n * 1e6, main_cpu / n * 1e6, main_sw / n, other_sw / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load run")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="comox-plugin-cost-"))
    body = workdir / "request.json"
    body.write_bytes(REQUEST_JSON)
    results: dict[str, list[tuple[float, float, float, float, float]]] = {}
    try:
        nginx = Nginx(workdir, str(LOAD_CORE))
        targets: list[Proxy] = [MinimalProxy("aiohttp", nginx, workdir, str(PROXY_CORE)),
                                MinimalProxy("limit-httptools", nginx, workdir, str(PROXY_CORE)),
                                MinimalProxy("limit-pyreqwest", nginx, workdir, str(PROXY_CORE))]
        targets += [Stage(*stage, nginx, workdir) for stage in STAGES]
        for target in targets:  # warm-up
            wrk(target.url(False), body, 16, 1, cores=str(LOAD_CORE))
        for round_ in range(args.rounds):
            for target in targets:
                row = measure(target, body, args.duration)
                results.setdefault(target.name, []).append(row)
                print(f"round {round_ + 1}: {target.name:<50} {row[0]:>8,.0f} rps  {row[1]:5.0f} µs/request", flush=True)
    finally:
        _stop_all()
    limit = fmean(r[0] for r in results[MinimalProxy.LABELS["aiohttp"]])
    print("\n| c=16, JSON | rps | of the aiohttp proxy | CPU µs/request | of which the loop's thread "
          "| context switches per request (loop / other threads) |\n|---|---:|---:|---:|---:|---:|")
    previous = None
    for name, rows in results.items():
        rps, cpu, main_cpu, main_sw, other_sw = (fmean(r[i] for r in rows) for i in range(5))
        step = f" ({cpu - previous:+.0f})" if previous is not None and name.startswith("+") else ""
        print(f"| {name} | {rps:,.0f} | {rps / limit:.0%} | {cpu:.0f}{step} | {main_cpu:.0f} | {main_sw:.2f} / {other_sw:.2f} |")
        if name in [s[0] for s in STAGES]:
            previous = cpu
    print(f"\nMeans of {args.rounds} interleaved rounds of {args.duration:g} s; targets pinned to core {PROXY_CORE}, "
          f"nginx and wrk to core {LOAD_CORE}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
