#!/usr/bin/env python3
"""Python steps per request: the bytecodes one request runs, per file and per
function, with every default plugin and a key with limits, the app driven in
process (no sockets; ``bench/pipeline.py``'s transport answering from memory).
Deterministic, so it compares two trees on a busy machine where timings cannot
(docs/benchmarks.md, "Why steps, not microseconds").

    python bench/opcodes.py                      # chat, JSON
    python bench/opcodes.py --api messages --sse --rows 60
    python bench/opcodes.py --lines-of estimate  # per line of the functions of that name
    PYTHONPATH=/tmp/base:/tmp/base/plugins python bench/opcodes.py   # another checkout

Also prints the µs per request untraced (best of 5 × 2,000): a noisy figure, for
orientation only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf import APIS, BENCH_KEY  # noqa: E402
from pipeline import KEYS, MemoryTransport  # noqa: E402

from comox.app import create_app, tune_gc  # noqa: E402
from comox.settings import Settings  # noqa: E402

ROOT = str(Path(__file__).resolve().parent.parent) + "/"


async def count(api: str | None, stream: bool, n: int, lines_of: str | None) -> tuple[float, collections.Counter[Any]]:
    path, requests, answers = APIS[api]
    models = [{"name": name, "backends": [{"name": f"{name}-a", "url": "http://127.0.0.1:9",
                                          **({"native_apis": [api]} if api else {})}]}
              for name in ("bench", "bench-stream")]
    app = create_app(Settings(models=models, sections={"keys": KEYS}))
    for state in app.gateway.backends():
        state.backend.transport = MemoryTransport(answers)  # type: ignore[attr-defined]
    await app.gateway.startup()
    tune_gc()
    body = requests[stream]
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                         (b"authorization", f"Bearer {BENCH_KEY}".encode()), (b"anthropic-version", b"2023-06-01")]}
    never = asyncio.get_running_loop().create_future()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def one() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else await never

        await app(dict(scope), receive, send)
        assert sent[0]["status"] == 200, sent
        sent.clear()

    for _ in range(500):
        await one()
    best = min([await _timed(one) for _ in range(5)])
    counts: collections.Counter[Any] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            code = frame.f_code
            filename = code.co_filename.removeprefix(ROOT).split("/site-packages/")[-1]
            if lines_of is None:
                counts[(filename, code.co_name)] += 1
            elif code.co_name == lines_of:
                counts[(filename, f"{code.co_name}:{frame.f_lineno}")] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            await one()
    finally:
        sys.settrace(None)
    await app.gateway.aclose()
    return best, counts


async def _timed(one: Any) -> float:
    started = time.process_time()
    for _ in range(2000):
        await one()
    return (time.process_time() - started) / 2000 * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", choices=["chat", *sorted(a for a in APIS if a)], default="chat",
                        help="chat completions, or an inbound API passed through natively")
    parser.add_argument("--sse", action="store_true", help="a streamed request")
    parser.add_argument("-n", type=int, default=200, help="requests traced (after 500 of warm-up)")
    parser.add_argument("--rows", type=int, default=40, help="functions listed")
    parser.add_argument("--lines-of", help="count per line of the functions of this name")
    args = parser.parse_args()
    api = None if args.api == "chat" else args.api
    us, counts = asyncio.run(count(api, args.sse, args.n, args.lines_of))
    total = sum(counts.values()) / args.n
    print(f"{args.api} {'SSE' if args.sse else 'JSON'}: {us:.1f} µs per request untraced; "
          f"{total:.0f} opcodes per request" + (f" in {args.lines_of}" if args.lines_of else ""))
    by_file: collections.Counter[str] = collections.Counter()
    for (filename, _), value in counts.items():
        by_file[filename] += value
    if not args.lines_of:
        for filename, value in by_file.most_common(20):
            print(f"  {value / args.n:8.0f}  {filename}")
        print()
    for (filename, name), value in counts.most_common(args.rows):
        print(f"  {value / args.n:8.0f}  {filename}:{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
