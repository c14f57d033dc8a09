"""Test helpers, installed as a pytest plugin (entry point ``pytest11``) so that
plugin authors get them too.

* :class:`ServerThread` runs any ASGI app under a real uvicorn on 127.0.0.1
  with an ephemeral port, in a background thread.
* :class:`StandInUpstream` is an OpenAI-compatible server (JSON, SSE, error
  bodies) with per-request fault injection: status, delay, close mid-stream.

Fixtures: ``comox_upstream`` (a running stand-in), ``comox_serve`` (start a
gateway from settings; stopped at teardown) and ``comox_gateway`` (a gateway
with the model group ``test-model`` in front of ``comox_upstream``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pytest

if TYPE_CHECKING:
    import subprocess

    from .asgi_io import Receive, Send

__all__ = ["Fault", "ServerThread", "StandInUpstream", "free_port", "stop_process", "wait_for_http", "wait_until"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.005) -> None:
    """Wait for a state, not a duration: the bound only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(interval)


def wait_for_http(url: str, *, proc: subprocess.Popen[Any] | None = None, timeout: float = 30.0,
                  detail: Callable[[], object] | None = None) -> None:
    """Poll GET ``url`` until it answers 200. Fail at once when ``proc`` (the
    ``subprocess.Popen`` serving it) exits, adding ``detail()`` (its log, say)
    to the message; fail after ``timeout`` seconds otherwise."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            extra = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"the server exited with {proc.returncode} before {url} answered{extra}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout:g} s")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Terminate a ``subprocess.Popen``; kill it if it does not exit in time."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerThread:
    """A uvicorn server on 127.0.0.1:<ephemeral port>, in a daemon thread."""

    def __init__(self, app: Callable[..., Any], *, lifespan: str = "auto", **config: Any):
        import uvicorn

        self.app = app
        options = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": lifespan, **config}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="comox-test-server")
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Fault:
    """What the stand-in does to the next request it gets."""

    status: int | None = None
    """Answer with this status and an OpenAI-format error body."""
    delay: float = 0.0
    """Seconds to wait before answering."""
    close_after_chunks: int | None = None
    """For a stream: drop the connection after this many chunks."""
    stall_after_chunks: int | None = None
    """For a stream: after this many chunks (0: right after the headers),
    send nothing more, holding the connection open until the client leaves."""
    headers: dict[str, str] | None = None


class StandInUpstream:
    """An OpenAI-compatible server speaking the real wire format.

    ``faults`` is a queue: each API request (POST) takes the next
    :class:`Fault`, if any; ``probe_faults`` likewise for GET requests (health
    checks, model lists), so a gateway's background checks never take a fault
    meant for a request. ``requests`` records the POSTs that arrived (path,
    headers, parsed body, raw bytes), ``probes`` the paths of the GETs.
    ``disconnects`` counts streams whose client went away before the end.
    ``hang = True``: accept every request and never answer it (a node that
    stopped answering), until the client leaves or the server stops.
    """

    def __init__(self, name: str = "upstream", *, stream_chunks: int = 3, chunk_delay: float = 0.0):
        self.name = name
        self.stream_chunks = stream_chunks
        self.chunk_delay = chunk_delay
        self.faults: deque[Fault] = deque()
        self.probe_faults: deque[Fault] = deque()
        self.requests: list[dict[str, Any]] = []
        self.probes: list[str] = []
        self.hang = False
        self.disconnects = 0
        self.server: ServerThread | None = None

    # -- running --------------------------------------------------------------

    def start(self) -> StandInUpstream:
        self.server = ServerThread(self, lifespan="off").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def url(self) -> str:
        assert self.server is not None, "the stand-in is not started"
        return self.server.url

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        payload = orjson.loads(body) if body else {}
        if scope["method"] == "GET":
            self.probes.append(path)
            fault = self.probe_faults.popleft() if self.probe_faults else Fault()
        else:
            self.requests.append({"path": path, "headers": {k.decode(): v.decode() for k, v in scope["headers"]}, "body": payload, "raw": body})
            fault = self.faults.popleft() if self.faults else Fault()
        if self.hang:
            await self._hang(receive)
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        extra = [(k.encode(), v.encode()) for k, v in (fault.headers or {}).items()]
        if fault.status is not None:
            error = {"error": {"message": f"{self.name} injected {fault.status}", "type": "server_error", "param": None, "code": None}}
            await self._json(send, fault.status, error, extra)
        elif path == "/health":
            await self._json(send, 200, {"status": "ok"}, extra)
        elif path == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [{"id": "stand-in", "object": "model", "created": 0, "owned_by": self.name}]}, extra)
        elif path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            if payload.get("stream"):
                await self._stream(receive, send, payload, chat, fault, extra)
            else:
                await self._json(send, 200, self._completion(payload, chat), extra)
        elif path == "/v1/rerank":  # llama.cpp server's shape
            await self._json(send, 200, self._rerank(payload), extra)
        elif path == "/v1/embeddings":
            inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(len(str(text)))]} for i, text in enumerate(inputs)]
            await self._json(send, 200, {"object": "list", "data": data, "model": payload.get("model"), "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}, extra)
        else:
            await self._json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}}, extra)

    @staticmethod
    async def _hang(receive: Receive) -> None:
        """Answer nothing until the client leaves (or the server shuts down)."""
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    def _rerank(payload: dict[str, Any]) -> dict[str, Any]:
        """Scores by how many of the query's words a document holds, as
        llama.cpp's server answers ``/v1/rerank``."""
        words = set(str(payload.get("query", "")).lower().split())
        texts = [d if isinstance(d, str) else d.get("text", "") for d in payload.get("documents", [])]
        results = [{"index": i, "relevance_score": float(len(words & set(t.lower().split())))} for i, t in enumerate(texts)]
        results.sort(key=lambda r: -r["relevance_score"])
        if payload.get("top_n"):
            results = results[: payload["top_n"]]
        tokens = sum(len(t.split()) for t in texts)
        return {"model": payload.get("model"), "object": "list", "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results}

    def _completion(self, payload: dict[str, Any], chat: bool) -> dict[str, Any]:
        text = f"hello from {self.name}"
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return {"id": "chatcmpl-standin", "object": "chat.completion", "created": 1, "model": payload.get("model"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {"id": "cmpl-standin", "object": "text_completion", "created": 1, "model": payload.get("model"), "choices": [choice], "usage": usage}

    @staticmethod
    async def _json(send: Send, status: int, obj: dict[str, Any], extra: list[tuple[bytes, bytes]]) -> None:
        body = orjson.dumps(obj)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive: Receive, send: Send, payload: dict[str, Any], chat: bool, fault: Fault,
                      extra: list[tuple[bytes, bytes]]) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), *extra]})
        try:
            for i in range(self.stream_chunks):
                if fault.close_after_chunks is not None and i >= fault.close_after_chunks:
                    raise ConnectionAbortedError("stand-in drops the connection mid-stream")
                if fault.stall_after_chunks is not None and i >= fault.stall_after_chunks:
                    await gone.wait()
                    self.disconnects += 1
                    return
                piece = f"tok{i} "
                if chat:
                    chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1, "model": payload.get("model"), "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                else:
                    chunk = {"id": "cmpl-standin", "object": "text_completion", "created": 1, "model": payload.get("model"), "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True})
                if self.chunk_delay:
                    try:  # (asyncio.timeout: 3.11's wait_for can drop a cancel)
                        async with asyncio.timeout(self.chunk_delay):
                            await gone.wait()
                    except TimeoutError:
                        pass
                if gone.is_set():
                    self.disconnects += 1
                    return
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def comox_upstream() -> Iterator[StandInUpstream]:
    """A running :class:`StandInUpstream`."""
    upstream = StandInUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def comox_serve() -> Iterator[Callable[..., ServerThread]]:
    """``comox_serve(settings, plugins=[...]) -> ServerThread``: run a Comox app
    (``create_app(settings)``) under uvicorn as ``comox serve`` runs it
    (:data:`comox.server_protocol.SERVER_OPTIONS`); every one is stopped at teardown."""
    from .app import create_app
    from .server_protocol import SERVER_OPTIONS

    servers: list[ServerThread] = []

    def serve(settings: Any, *, plugins: Iterable[object] = ()) -> ServerThread:
        from .settings import Settings

        if isinstance(settings, dict):
            # Tests of other stages need no keys: say so, unless the test does.
            settings = Settings(**{"auth": "none", **settings})
        server = ServerThread(create_app(settings, plugins=plugins), **SERVER_OPTIONS).start()
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def comox_gateway(comox_serve: Callable[..., ServerThread], comox_upstream: StandInUpstream) -> ServerThread:
    """A running gateway serving the model ``test-model`` from ``comox_upstream``."""
    return comox_serve({"models": [{"name": "test-model", "backends": [{"name": "upstream", "url": comox_upstream.url}]}]})
