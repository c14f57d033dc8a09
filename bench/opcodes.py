#!/usr/bin/env python3
"""Python steps per request: the bytecodes one request runs, per file and per
function, with every default plugin and a key with limits, the app driven in
process (no sockets; ``bench/pipeline.py``'s transport answering from memory).
Deterministic, so it compares two trees on a busy machine where timings cannot
(docs/benchmarks.md, "Why steps, not microseconds").

    python bench/opcodes.py                      # chat, JSON
    python bench/opcodes.py --api messages --sse --rows 60
    python bench/opcodes.py --lines-of estimate  # per line of the functions of that name
    python bench/opcodes.py --through-protocol   # the request as bytes through comox serve's protocol too
    python bench/opcodes.py --through-protocol --instructions   # machine instructions (valgrind) instead
    PYTHONPATH=/tmp/base:/tmp/base/plugins python bench/opcodes.py   # another checkout

Also prints the µs per request untraced (best of 5 × 2,000): a noisy figure, for
orientation only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
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


class _Socket:
    """What the protocol writes to (``--through-protocol``): the bytes are kept, nothing is sent."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _through_protocol(app: Any, path: str, body: bytes) -> Any:
    """``one()`` for ``--through-protocol``: wrk's request bytes fed to comox
    serve's protocol on one kept-alive connection, the app behind it."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from comox.server_protocol import SERVER_OPTIONS, ComoxServeProtocol

    raw = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer %s\r\nanthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n%s"
           % (path.encode(), BENCH_KEY.encode(), len(body), body))
    config = Config(app, lifespan="off", access_log=False, **SERVER_OPTIONS)
    config.load()
    state = ServerState()
    protocol = ComoxServeProtocol(config, state, {}, asyncio.get_running_loop())
    socket = _Socket()
    protocol.connection_made(socket)  # type: ignore[arg-type]

    async def one() -> None:
        answered = state.total_requests
        protocol.data_received(raw)
        while state.total_requests == answered:
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # what the app does after its answer
        assert socket.written[0].startswith(b"HTTP/1.1 200 OK"), socket.written[:1]
        socket.written.clear()

    return one


# Not the request's own steps: the event loop's (how many turns a request takes
# in process is not how many it takes on sockets) and this script's.
_NOT_THE_REQUESTS = ("asyncio/", "selectors.py", "bench/opcodes.py")


async def _requests(api: str | None, stream: bool, through_protocol: bool) -> tuple[Any, Any]:
    """The app, started, and ``one()``, which sends it one request."""
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

    if through_protocol:
        one = _through_protocol(app, path, body)
    return app, one


async def drive(api: str | None, stream: bool, n: int, through_protocol: bool) -> None:
    """``n`` requests after the warm-up, untimed (what ``--instructions`` counts)."""
    app, one = await _requests(api, stream, through_protocol)
    for _ in range(500 + n):
        await one()
    await app.gateway.aclose()


def instructions(argv: list[str]) -> float:
    """Machine instructions per request, counted by valgrind (cachegrind,
    no cache simulation): the difference between two ``--drive`` runs, so
    startup and warm-up cancel out; with a fixed hash seed, so that sets and
    dicts are laid out alike run after run. It counts the C work that steps
    do not (a map or a dict lookup is one step)."""
    counts = []
    for n in (200, 1200):
        out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                              sys.executable, __file__, *argv, "--drive", str(n)], capture_output=True, text=True,
                             check=True, timeout=1800, env={**os.environ, "PYTHONHASHSEED": "0"})
        refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        assert refs is not None, out.stderr[-2000:]
        counts.append(int(refs.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / 1000


async def count(api: str | None, stream: bool, n: int, lines_of: str | None,
                through_protocol: bool = False) -> tuple[float, collections.Counter[Any]]:
    app, one = await _requests(api, stream, through_protocol)
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
            if through_protocol and any(part in filename for part in _NOT_THE_REQUESTS):
                return tracer
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
    parser.add_argument("--through-protocol", action="store_true",
                        help="send the request as bytes through comox serve's HTTP protocol (its steps counted "
                             "too; the event loop's and this script's not)")
    parser.add_argument("--instructions", action="store_true",
                        help="machine instructions per request instead, counted by valgrind (apt-get install valgrind; "
                             "a few minutes)")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)  # (--instructions' own runs)
    args = parser.parse_args()
    api = None if args.api == "chat" else args.api
    if args.drive is not None:
        asyncio.run(drive(api, args.sse, args.drive, args.through_protocol))
        return 0
    if args.instructions:
        argv = [f"--api={args.api}", *(["--sse"] if args.sse else []),
                *(["--through-protocol"] if args.through_protocol else [])]
        print(f"{args.api} {'SSE' if args.sse else 'JSON'}: {instructions(argv):,.0f} instructions per request")
        return 0
    us, counts = asyncio.run(count(api, args.sse, args.n, args.lines_of, args.through_protocol))
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
