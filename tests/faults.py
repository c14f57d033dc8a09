"""Helpers of the fault-injection suite (tests/test_faults*.py, issue 16): a
bounded load of client threads recording what each request got, stand-in
upstreams in processes of their own (to SIGKILL and start again on the same
port), and what an SSE body says."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

from comox.testing import free_port, stop_process, wait_for_http, wait_until

# -- what a client got ---------------------------------------------------------------


@dataclass
class Outcome:
    """One request of a load, as its client saw it. ``status`` is None when
    the client got no HTTP answer at all (``error`` says why)."""

    group: str
    stream: bool
    status: int | None
    started: float  # time.monotonic()
    elapsed: float
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-comox-backend")

    @property
    def events(self) -> list[dict]:
        return sse(self.body)[0]

    @property
    def done(self) -> int:
        """How many ``data: [DONE]`` the stream held."""
        return sse(self.body)[2]

    @property
    def error_events(self) -> list[dict]:
        return [event["error"] for event in self.events if "error" in event]

    @property
    def resumed(self) -> bool:
        return any(line.startswith(": comox-resumed ") for line in sse(self.body)[1])

    @property
    def complete(self) -> bool:
        """A 200 stream that ended with one ``[DONE]`` and no error event."""
        return self.status == 200 and self.done == 1 and not self.error_events

    @property
    def interrupted(self) -> bool:
        """A 200 stream that ended with an error event and no ``[DONE]``."""
        return self.status == 200 and self.done == 0 and len(self.error_events) == 1


def sse(body: bytes) -> tuple[list[dict], list[str], int]:
    """``(data objects, comment lines, [DONE] count)`` of an SSE body."""
    objects: list[dict] = []
    comments: list[str] = []
    done = 0
    for line in body.decode(errors="replace").replace("\r\n", "\n").split("\n"):
        if line.startswith("data: [DONE]"):
            done += 1
        elif line.startswith("data:"):
            try:
                objects.append(orjson.loads(line[5:]))
            except orjson.JSONDecodeError:
                pass  # an event the node cut short (forwarded as it came, before the error event)
        elif line.startswith(":"):
            comments.append(line)
    return objects, comments, done


def call(client: httpx.Client, url: str, body: dict, group: str, headers: dict[str, str] | None = None) -> Outcome:
    """POST ``body`` (streamed when it says ``stream``) and read the whole answer."""
    stream = bool(body.get("stream"))
    started = time.monotonic()
    try:
        with client.stream("POST", url, json=body, headers=headers) as response:
            data = response.read()
            return Outcome(group, stream, response.status_code, started, time.monotonic() - started, data,
                           dict(response.headers))
    except httpx.HTTPError as exc:  # no (whole) HTTP answer: a failure the client sees
        return Outcome(group, stream, None, started, time.monotonic() - started, error=repr(exc))


class Load:
    """``threads`` clients, each with its own connection pool, sending
    requests in a loop while a test does harm: ``request(client, i)`` sends
    the i-th and returns its :class:`Outcome`. Bounded: at most ``limit``
    requests in all, and :meth:`stop` ends it (also on ``with`` exit)."""

    def __init__(self, request: Callable[[httpx.Client, int], Outcome], *, threads: int = 4, limit: int = 2000,
                 timeout: float = 30.0):
        self.request = request
        self.limit = limit
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.counter = itertools.count()
        self.workers = [threading.Thread(target=self._run, daemon=True, name=f"load-{n}") for n in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self.stopping.is_set():
                i = next(self.counter)
                if i >= self.limit:
                    return
                self.outcomes.append(self.request(client, i))

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, count: int, timeout: float = 60.0, since: float = 0.0) -> None:
        """Until ``count`` more requests than those started before ``since`` are answered."""
        wait_until(lambda: sum(o.started >= since for o in self.outcomes) >= count, timeout=timeout, interval=0.02)

    def stop(self) -> list[Outcome]:
        self.stopping.set()
        for worker in self.workers:
            worker.join(self.timeout + 10)
        assert not any(worker.is_alive() for worker in self.workers), "a load thread did not finish"
        return self.outcomes


# -- a stand-in upstream in a process of its own ------------------------------------------

NODE = """
import sys
import uvicorn
from comox.testing import StandInUpstream
name, port, chunks, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
uvicorn.run(StandInUpstream(name, stream_chunks=chunks, chunk_delay=delay), host="127.0.0.1", port=port,
            log_level="warning", access_log=False, lifespan="off")
"""


class NodeProcess:
    """A :class:`comox.testing.StandInUpstream` served by uvicorn in a process
    of its own, on a port that stays its own: :meth:`kill` (SIGKILL) and
    :meth:`start` it again, as a node that dies and comes back."""

    def __init__(self, name: str, *, stream_chunks: int = 3, chunk_delay: float = 0.0, port: int | None = None):
        self.name = name
        self.port = port or free_port()
        self.argv = [sys.executable, "-c", NODE, name, str(self.port), str(stream_chunks), str(chunk_delay)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_http(f"{self.url}/v1/models", proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def open_fds() -> int:
    """File descriptors this process holds open now."""
    return len(os.listdir("/proc/self/fd"))
