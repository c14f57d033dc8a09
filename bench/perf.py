#!/usr/bin/env python3
"""Gateway overhead benchmark: Comox against nginx direct and a minimal aiohttp
proxy (the limit), in one interleaved run. See docs/benchmarks.md.

    python bench/perf.py                       # the full run (about 10 minutes)
    python bench/perf.py --duration 3 --rounds 1   # a quick look
    python bench/perf.py --soak 200000         # RSS growth over N requests
    python bench/perf.py --workers-compare     # comox serve --workers 1 vs 2
    python bench/perf.py --peers portkey,litellm   # add Portkey's and LiteLLM's gateways
    python bench/perf.py --extra comox-messages-native,comox-responses-native   # native pass-through

Needs nginx (Debian ``nginx-light``) and ``wrk`` on PATH (and, for the
peers, Node with npm); ``pip install -e '.[bench]'`` for the Python side. Every process it
starts is stopped on exit; every load run is bounded in time (and count).
"""

from __future__ import annotations

import argparse
import hashlib
import asyncio
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from minimal_proxy import JSON_BODY, SSE_BODY  # noqa: E402  (the bodies nginx serves)
from comox.testing import free_port

PROXY_CORE = 0
LOAD_CORE = 1  # nginx, wrk, the TTFB client and this script

REQUEST_JSON = (
    b'{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0.7}'
)
REQUEST_SSE = (
    b'{"model":"bench-stream","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0.7,"stream":true}'
)


# -- native pass-through (--extra comox-messages-native,comox-responses-native) ---
#
# A Messages request to /v1/messages and a Responses request to /v1/responses,
# passed through by Comox to a backend with native_apis = [...]: nginx answers
# those paths with the API's own JSON and SSE event sequence, and every target
# of that API (nginx direct, the minimal proxy, Comox) is sent them on that path.
# Native pass-through stores nothing in Comox (a native backend keeps its own
# responses; the response cache skips native answers), so the Responses request
# leaves ``store`` at its default, as the OpenAI SDK does.


def _compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _events(events: list[dict], sequence: bool = False) -> bytes:
    """An SSE body: ``event: <type>`` and ``data: <json>`` per event."""
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: "
                    + _compact({**e, "sequence_number": n} if sequence else e) + b"\n\n"
                    for n, e in enumerate(events))


SYSTEM = "You are a helpful assistant."
ANSWER = "Hello! How can I help you today?"
PIECES = [f"tok{i} " for i in range(8)]  # as SSE_BODY's 8 chat chunks

MESSAGES_REQUEST = {"model": "bench", "system": SYSTEM, "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 16, "temperature": 0.7}
_MESSAGE = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench",
            "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 9}}
MESSAGES_SSE = _events([
    {"type": "message_start", "message": {**_MESSAGE, "content": [], "stop_reason": None,
                                          "usage": {**_MESSAGE["usage"], "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in PIECES),
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 8}},
    {"type": "message_stop"},
])

RESPONSES_REQUEST = {"model": "bench", "instructions": SYSTEM, "input": "Say hello.", "max_output_tokens": 16,
                     "temperature": 0.7}
_ITEM = {"type": "message", "id": "msg_bench", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}
_RESPONSE = {"id": "resp_bench", "object": "response", "created_at": 1, "status": "completed", "error": None,
             "incomplete_details": None, "instructions": SYSTEM, "max_output_tokens": 16, "model": "bench",
             "output": [_ITEM], "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None},
             "store": True, "temperature": 0.7, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
             "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {},
             "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                       "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 18}}
_PENDING = {**_RESPONSE, "status": "in_progress", "output": [], "usage": None}
_PART = {"type": "output_text", "text": "", "annotations": []}
_STREAMED = "".join(PIECES)
_STREAMED_ITEM = {**_ITEM, "content": [{**_PART, "text": _STREAMED}]}
RESPONSES_SSE = _events([
    {"type": "response.created", "response": _PENDING},
    {"type": "response.in_progress", "response": _PENDING},
    {"type": "response.output_item.added", "output_index": 0, "item": {**_ITEM, "status": "in_progress", "content": []}},
    {"type": "response.content_part.added", "item_id": "msg_bench", "output_index": 0, "content_index": 0, "part": _PART},
    *({"type": "response.output_text.delta", "item_id": "msg_bench", "output_index": 0, "content_index": 0, "delta": p}
      for p in PIECES),
    {"type": "response.output_text.done", "item_id": "msg_bench", "output_index": 0, "content_index": 0, "text": _STREAMED},
    {"type": "response.content_part.done", "item_id": "msg_bench", "output_index": 0, "content_index": 0,
     "part": {**_PART, "text": _STREAMED}},
    {"type": "response.output_item.done", "output_index": 0, "item": _STREAMED_ITEM},
    {"type": "response.completed", "response": {**_RESPONSE, "output": [_STREAMED_ITEM]}},
], sequence=True)

# api → (path, (JSON request, streamed request), (JSON answer, SSE answer)); None is the chat completion.
APIS = {
    None: ("/v1/chat/completions", (REQUEST_JSON, REQUEST_SSE), (JSON_BODY, SSE_BODY)),
    "messages": ("/v1/messages", (_compact(MESSAGES_REQUEST), _compact({**MESSAGES_REQUEST, "model": "bench-stream", "stream": True})),
                 (_compact(_MESSAGE), MESSAGES_SSE)),
    "responses": ("/v1/responses", (_compact(RESPONSES_REQUEST), _compact({**RESPONSES_REQUEST, "model": "bench-stream", "stream": True})),
                  (_compact(_RESPONSE), RESPONSES_SSE)),
}
NATIVE = {"comox-messages-native": "messages", "comox-responses-native": "responses"}  # --extra name → api

_started: list[subprocess.Popen] = []


def _stop_all() -> None:
    """Stop every process this script started (idempotent; also runs at exit)."""
    while _started:
        proc = _started.pop()
        if proc.poll() is not None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


atexit.register(_stop_all)


def _on_signal(signum, frame):  # pragma: no cover - interactive
    _stop_all()
    raise SystemExit(128 + signum)


def taskset(cores: str | None, argv: list[str]) -> list[str]:
    if cores is None or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", cores, *argv]


def start(argv: list[str], *, env: dict | None = None, log: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=cwd)
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop one process this script started (its whole process group)."""
    if proc in _started:
        _started.remove(proc)
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_http(port: int, body: bytes, timeout: float = 30.0, path: str = "/v1/chat/completions",
              headers: dict[str, str] | None = None) -> None:
    """Wait until a POST to the port answers 200."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {BENCH_KEY}", **(headers or {})}  # as bench/post.lua
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(request)
                data = s.recv(65536)
                if data.startswith(b"HTTP/1.1 200"):
                    return
                last = data[:300]
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not answer 200 in {timeout}s: {last!r}")


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            if p.name() in ("taskset",):
                continue
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


# -- the upstream ----------------------------------------------------------------


def nginx_string(body: bytes) -> str:
    text = body.decode()
    assert "'" not in text and "\\" not in text
    return text.replace("\n", "\\n")


def nginx_return(body: bytes) -> str:
    """``return 200 '<body>';``; a body longer than one nginx config token
    (4 KB: the Responses API's events) is set in parts, split between events,
    and returned as their concatenation."""
    if len(nginx_string(body)) < 4000:
        return f"return 200 '{nginx_string(body)}';"
    assert b"$" not in body
    parts, part = [], b""
    for event in body.split(b"\n\n")[:-1]:
        if part and len(nginx_string(part + event)) > 3500:
            parts.append(part)
            part = b""
        part += event + b"\n\n"
    parts.append(part)
    assert b"".join(parts) == body
    sets = " ".join(f"set $bench_part{i} '{nginx_string(part)}';" for i, part in enumerate(parts))
    return sets + " return 200 '" + "".join("${bench_part%d}" % i for i in range(len(parts))) + "';"


class Nginx:
    """nginx serving the fixed JSON body on one port and the SSE body on another,
    for any method (``return 200``, so POST works); ``/v1/messages`` and
    ``/v1/responses`` answer with those APIs' own JSON and events (see APIS)."""

    def __init__(self, workdir: Path, cores: str | None):
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.port_json = free_port()
        self.port_sse = free_port()
        native = {stream: "".join(
            f"\n        location = {path} {{ default_type {'text/event-stream' if stream else 'application/json'}; "
            f"{nginx_return(answers[stream])} }}"
            for api, (path, _, answers) in APIS.items() if api is not None) for stream in (False, True)}
        conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{self.port_json} backlog=4096;
        location / {{ default_type application/json; return 200 '{nginx_string(JSON_BODY)}'; }}{native[False]}
    }}
    server {{
        listen 127.0.0.1:{self.port_sse} backlog=4096;
        location / {{ default_type text/event-stream; return 200 '{nginx_string(SSE_BODY)}'; }}{native[True]}
    }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = start(taskset(cores, [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]),
                          log=self.dir / "stdout.log")
        wait_http(self.port_json, REQUEST_JSON)
        wait_http(self.port_sse, REQUEST_SSE)


# -- targets ---------------------------------------------------------------------


class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    streams = True  # serves the SSE request (see Portkey)
    api: str | None = None  # the inbound API it is sent (APIS): None for chat completions

    @property
    def path(self) -> str:
        return APIS[self.api][0]

    def headers(self, stream: bool) -> dict[str, str]:
        """Request headers this target needs besides bench/post.lua's."""
        return {}

    def rss(self) -> int:
        return tree_rss(self.proc.pid) if self.proc else 0

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class Direct(Target):
    """wrk straight to nginx: the floor every proxy adds to. Both sit on the load core."""

    def __init__(self, nginx: Nginx, api: str | None = None):
        self.api = api
        self.name = "nginx direct" + (f", {self.path}" if api else "")
        self.nginx = nginx
        self.port = nginx.port_json
        self.port_sse = nginx.port_sse

    def url(self, stream: bool) -> str:
        return f"http://127.0.0.1:{self.port_sse if stream else self.port}{self.path}"


class Proxy(Target):
    def url(self, stream: bool) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def wait_ready(self) -> None:
        """Until it answers chat completions; for a native API's target, until
        it passes that API's answers through unchanged (:func:`check_answers`)."""
        if self.api is None:
            wait_http(self.port, REQUEST_JSON)
            wait_http(self.port, REQUEST_SSE)
        else:
            check_answers(self)


class MinimalProxy(Proxy):
    LABELS = {
        "aiohttp": "minimal ASGI proxy, one aiohttp session",
        "httpx": "minimal ASGI proxy, httpx stock",
        "httpx-aiohttp": "minimal ASGI proxy, httpx over aiohttp transport",
        "memory": "uvicorn answering from memory",
        "comox-transport": "minimal ASGI proxy, Comox's AiohttpTransport",
        "limit-httptools": "minimal ASGI proxy, Comox's HttptoolsTransport",
        "aiohttp-gc": "minimal ASGI proxy, aiohttp, GC tuned as comox serve",
        "limit-pyreqwest": "minimal ASGI proxy, one pyreqwest client",
        "limit-comox": "minimal ASGI proxy, Comox's protocol and HttptoolsTransport",
    }

    def __init__(self, client: str, nginx: Nginx, workdir: Path, cores: str | None, workers: int = 1,
                 api: str | None = None):
        self.api = api  # forwarded to the same path on nginx (minimal_proxy.py keeps the path)
        self.name = self.LABELS[client] + (f" ({workers} workers)" if workers > 1 else "") + (f", {self.path}" if api else "")
        self.port = free_port()
        env = {
            "MINPROXY_CLIENT": {"aiohttp-gc": "aiohttp", "limit-pyreqwest": "pyreqwest", "limit-httptools": "comox-httptools",
                               "limit-comox": "comox-httptools"}.get(client, client),
            "MINPROXY_TUNE_GC": "1" if client == "aiohttp-gc" else "",
            "MINPROXY_UPSTREAM": f"http://127.0.0.1:{nginx.port_json}",
            "MINPROXY_UPSTREAM_SSE": f"http://127.0.0.1:{nginx.port_sse}",
        }
        argv = [sys.executable, "-m", "uvicorn", "minimal_proxy:app", "--app-dir", str(HERE),
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                "--no-access-log", "--loop", "uvloop", "--workers", str(workers), "--http",
                # limit-comox: the floor of Comox's own serving and upstream parts, no stage between
                "comox.server_protocol:ComoxServeProtocol" if client == "limit-comox" else "httptools"]
        self.proc = start(taskset(cores, argv), env=env, log=workdir / f"minproxy-{client}-{self.port}.log")
        self.wait_ready()


def available_policies() -> set[str]:
    from comox.plugins import make_plugin_manager

    names: set[str] = set()
    for mapping in make_plugin_manager().hook.comox_routing_policies():
        names.update(mapping or {})
    return names


BENCH_KEY = "sk-bench"  # what bench/post.lua and the TTFB clients send


def comox_config(nginx: Nginx, policy: str, path: Path, backends: int = 1, native: str | None = None) -> Path:
    """Comox as a production gateway runs it: a key with limits (high enough
    never to refuse: they are counted, not hit), the in-memory response cache
    (the benchmark's requests sample, so they are looked up and skipped),
    and the default plugins. ``native``: every backend speaks that inbound API
    itself (``native_apis``), so its requests are passed through."""
    digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    lines = ["[server]", "retries = 1", "",
             "[[keys]]", 'id = "bench"', f'key_sha256 = "{digest}"',
             "rpm = 1000000000", "tpm = 1000000000000", "max_concurrency = 100000", ""]
    for model, port in (("bench", nginx.port_json), ("bench-stream", nginx.port_sse)):
        lines += ["[[models]]", f'name = "{model}"', f'policy = "{policy}"', ""]
        for i in range(backends):
            lines += ["[[models.backends]]", f'name = "{model}-nginx-{i}"', 'type = "openai"',
                      f'url = "http://127.0.0.1:{port}"', *([f'native_apis = ["{native}"]'] if native else []), ""]
    path.write_text("\n".join(lines))
    return path


class Comox(Proxy):
    VARIANTS = {"comox-httpx": "httpx", "comox-httpx-aiohttp": "httpx-aiohttp", "comox-pyreqwest": "pyreqwest",
                "comox-aiohttp": "aiohttp", "comox-httptools": "httptools"}

    def __init__(self, nginx: Nginx, workdir: Path, cores: str | None, policy: str, workers: int = 1,
                 label: str | None = None, client: str | None = None, native: str | None = None,
                 source: Path | None = None):
        self.name = label or f"Comox ({policy}{', %d workers' % workers if workers > 1 else ''})"
        self.api = native
        if native:
            self.name += f", {self.path} native"
        if source is not None:  # --baseline: the same gateway from another checkout (its own plugins too)
            self.name += f" [baseline {source.name}]"
        self.port = free_port()
        config = comox_config(nginx, policy, workdir / f"comox-{self.port}.toml", native=native)
        env = None
        if client in ("pyreqwest", "httptools", "aiohttp"):  # comox serve, every backend with that transport
            self.name = f"Comox ({policy}) over {client}"
            config.write_text(config.read_text().replace('type = "openai"', f'type = "openai"\ntransport = "{client}"'))
            client = None
        if client is None:
            argv = [sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "warning", "--workers", str(workers)]
        else:  # the same gateway with another transport in the openai backend (bench/comox_variants.py)
            self.name = f"Comox ({policy}) over {client}"
            env = {"COMOX_CONFIG": str(config), "BENCH_CLIENT": client}
            argv = [sys.executable, "-m", "uvicorn", "comox_variants:create_app", "--factory", "--app-dir", str(HERE),
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        cwd = ROOT
        if source is not None:  # run from there (python -m puts the working directory first on sys.path)
            env = {**(env or {}), "PYTHONPATH": f"{source}:{source / 'plugins'}"}
            cwd = source
        self.proc = start(taskset(cores, argv), env=env, log=workdir / f"comox-{self.port}.log", cwd=cwd)
        self.wait_ready()


def check_answers(target: Proxy) -> None:
    """Wait until ``target`` answers its API's JSON and streamed requests on its
    path, then check once that each answer is 200 with nginx's body, byte for
    byte (the stream's events de-chunked): passed through, not translated."""
    import http.client

    path, requests, answers = APIS[target.api]
    for stream in (False, True):
        wait_http(target.port, requests[stream], path=path)
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
        try:
            conn.request("POST", path, requests[stream], {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {BENCH_KEY}"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or body != answers[stream]:
            raise RuntimeError(f"{target.name}: {path}{' streamed' if stream else ''} answered {response.status} "
                               f"{body[:300]!r}, not nginx's {answers[stream][:80]!r}…")


# -- peers: gateways a user would pick instead ------------------------------------
#
# Installed on first use into a cache directory (never into this environment),
# each pointed at the same nginx upstream as an OpenAI-compatible provider.

CACHE = Path(os.environ.get("COMOX_BENCH_CACHE") or Path.home() / ".cache" / "comox-bench")
PORTKEY_VERSION = "1.15.2"  # npm @portkey-ai/gateway
LITELLM_SPEC = "litellm[proxy]"


def install_portkey() -> Path:
    """Portkey's gateway from npm into ``CACHE/portkey``; its Node entry point."""
    home = CACHE / "portkey"
    entry = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not entry.exists():
        for tool in ("node", "npm"):
            if not shutil.which(tool):
                raise SystemExit(f"--peers portkey: {tool} is not installed (Portkey's gateway runs on Node)")
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "package.json").exists():
            (home / "package.json").write_text('{"private": true}\n')
        print(f"installing @portkey-ai/gateway@{PORTKEY_VERSION} into {home} ...", flush=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"@portkey-ai/gateway@{PORTKEY_VERSION}"],
                       cwd=home, check=True, timeout=1200, stdout=subprocess.DEVNULL)
    return entry


def install_litellm() -> Path:
    """LiteLLM's proxy into its own venv, ``CACHE/litellm``; its ``litellm`` command."""
    venv = CACHE / "litellm"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {LITELLM_SPEC} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True, timeout=1800)
    return exe


def peer_versions(peers: list[str]) -> dict:
    found = {}
    if "portkey" in peers:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        found["portkey"] = f"@portkey-ai/gateway {PORTKEY_VERSION} on Node {node}"
    if "litellm" in peers:
        python = CACHE / "litellm" / "bin" / "python"
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m, platform; "
                              "print(m.version('litellm'), 'on Python', platform.python_version())"],
                             capture_output=True, text=True)
        found["litellm"] = f"litellm {out.stdout.strip()}"
    return found


class Portkey(Proxy):
    """Portkey's open-source gateway (Node, Hono) in one process; the upstream
    is chosen per request with its x-portkey-provider / custom-host headers."""

    def __init__(self, nginx: Nginx, workdir: Path, cores: str | None):
        self.name = f"Portkey gateway {PORTKEY_VERSION} (Node)"
        self.nginx = nginx
        self.port = free_port()
        entry = install_portkey()
        env = {"NODE_ENV": "production"}  # no UI, no log stream to the browser
        self.proc = start(taskset(cores, ["node", str(entry), f"--port={self.port}", "--headless"]), env=env,
                          log=workdir / f"portkey-{self.port}.log")
        wait_http(self.port, REQUEST_JSON, headers=self.headers(False))

    # 1.15.2 on Node 20 answers every streamed chat completion 500 "Something
    # went wrong" (its log: "tryTargetsRecursively error: immutable TypeError:
    # immutable", from ResponseService.updateHeaders appending to a fetch()
    # response's immutable headers): no SSE or TTFB row for it.
    streams = False

    def headers(self, stream: bool) -> dict[str, str]:
        port = self.nginx.port_sse if stream else self.nginx.port_json
        return {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{port}/v1"}


class LiteLLM(Proxy):
    """LiteLLM's proxy (one uvicorn worker, its default), a model per nginx port."""

    def __init__(self, nginx: Nginx, workdir: Path, cores: str | None):
        self.name = "LiteLLM proxy (1 worker)"
        self.port = free_port()
        exe = install_litellm()
        config = workdir / f"litellm-{self.port}.yaml"
        lines = ["model_list:"]
        for model, port in (("bench", nginx.port_json), ("bench-stream", nginx.port_sse)):
            lines += [f"  - model_name: {model}", "    litellm_params:", f"      model: openai/{model}",
                      f"      api_base: http://127.0.0.1:{port}/v1", "      api_key: sk-upstream"]
        # Its master key is the bench's key, so every request is authenticated as
        # Comox's are (LiteLLM calls a 8-character key weak and wants a permit for it).
        lines += ["litellm_settings:", "  telemetry: false", "  drop_params: true",
                  "general_settings:", f"  master_key: {BENCH_KEY}", "  dangerously_permit_weak_or_unset_master_key: true"]
        config.write_text("\n".join(lines) + "\n")
        # The local model cost map: no download at start.
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
        argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                "--num_workers", "1"]
        self.proc = start(taskset(cores, argv), env=env, log=workdir / f"litellm-{self.port}.log")
        wait_http(self.port, REQUEST_JSON, timeout=180)
        wait_http(self.port, REQUEST_SSE, timeout=60)


PEERS = {"portkey": Portkey, "litellm": LiteLLM}


# -- load ------------------------------------------------------------------------


def wrk(url: str, body_file: Path, connections: int, duration: float, *, cores: str | None,
        script: str = "post.lua", extra: list[str] = (), timeout: float | None = None,
        headers: dict[str, str] | None = None) -> dict:
    flags = [arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")]
    argv = taskset(cores, ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
                           *flags, "-s", str(HERE / script), url, "--", str(body_file), *extra])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result = json.loads(line[len("WRKJSON "):])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            result["errors"] = sum(result[k] for k in result if k.startswith("err_"))
            return result
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


async def _ttfb(url: str, body: bytes, concurrency: int, duration: float, max_requests: int) -> list[float]:
    """Streaming time to first byte: from sending the request to the first body
    chunk (the first SSE event), with ``concurrency`` keep-alive connections."""
    import aiohttp

    samples: list[float] = []
    deadline = time.perf_counter() + duration
    headers = {"content-type": "application/json", "authorization": f"Bearer {BENCH_KEY}"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def worker() -> None:
            while time.perf_counter() < deadline and len(samples) < max_requests:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    chunk = await response.content.readany()
                    t1 = time.perf_counter()
                    if response.status != 200 or not chunk.startswith((b"data: ", b"event: ")):
                        raise RuntimeError(f"bad stream from {url}: {response.status} {chunk[:200]!r}")
                    await response.read()
                samples.append((t1 - t0) * 1000.0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def ttfb_python(url: str, concurrency: int, duration: float, max_requests: int = 100_000,
                body: bytes = REQUEST_SSE) -> dict:
    samples = asyncio.run(_ttfb(url, body, concurrency, duration, max_requests))
    samples.sort()
    return {
        "n": len(samples),
        "p50_ms": samples[len(samples) // 2],
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
    }


def build_ttfb_client(workdir: Path) -> Path | None:
    """Compile ``bench/ttfb.c`` (the C TTFB client) into ``workdir``; None
    without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = workdir / "ttfb"
    subprocess.run([cc, "-O2", "-o", str(binary), str(HERE / "ttfb.c")], check=True)
    return binary


def ttfb_c(binary: Path, url: str, body: Path, concurrency: int, duration: float,
           max_requests: int = 200_000, cores: str | None = None) -> dict:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    argv = taskset(cores, [str(binary), parts.hostname, str(parts.port), parts.path, str(body),
                           str(concurrency), str(duration), str(max_requests)])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"ttfb client failed on {url}: {out.stderr.strip()}")
    return json.loads(out.stdout)


# -- contention ------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


class Contention:
    """CPU time used on this machine by processes that are not part of the benchmark."""

    def __init__(self, targets: list[Target], nginx: Nginx):
        self.targets, self.nginx = targets, nginx
        self.start_busy = busy_cpu_seconds()
        self.start_ours = self._ours()
        self.start_wall = time.monotonic()

    def _ours(self) -> float:
        me = os.times()
        total = me.user + me.system + me.children_user + me.children_system
        total += tree_cpu(self.nginx.proc.pid)
        for t in self.targets:
            total += t.cpu()
        return total

    def other_cores(self) -> float:
        """Average number of cores used by others during the run."""
        wall = time.monotonic() - self.start_wall
        others = (busy_cpu_seconds() - self.start_busy) - (self._ours() - self.start_ours)
        return max(0.0, others / wall)


# -- report ----------------------------------------------------------------------


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_int(v) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_ms(v, digits=2) -> str:
    return "—" if v is None else f"{v:.{digits}f} ms"


def versions() -> dict:
    def ver(dist):
        try:
            from importlib.metadata import version

            return version(dist)
        except Exception:
            return "absent"

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1:2]
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "kernel": platform.release(), "python": platform.python_version(), "comox": f"{ver('comox')} ({rev})",
        "uvicorn": ver("uvicorn"), "uvloop": ver("uvloop"), "httptools": ver("httptools"), "aiohttp": ver("aiohttp"),
        "httpx": ver("httpx"), "httpx-aiohttp": ver("httpx-aiohttp"), "pyreqwest": ver("pyreqwest"), "orjson": ver("orjson"),
        "nginx": nginx, "wrk": (wrk_v[0] if wrk_v else "?"),
    }


def print_versions(v: dict) -> None:
    print(f"\nMachine: {v['cpu']}, {v['cores']} cores, {v['memory_gb']} GiB, Linux {v['kernel']}")
    print("Versions: " + ", ".join(f"{k} {v[k]}" for k in (
        "python", "comox", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "httpx-aiohttp", "pyreqwest", "orjson", "nginx", "wrk")))


# -- the main run ----------------------------------------------------------------


def main_run(args, workdir: Path, nginx: Nginx, policy: str) -> None:
    apis = [NATIVE[c] for c in args.extra if c in NATIVE]  # native pass-through targets, each with its own path
    files = {None: {False: workdir / "request.json", True: workdir / "request-stream.json"}}
    files.update({api: {False: workdir / f"request-{api}.json", True: workdir / f"request-{api}-stream.json"} for api in apis})
    for api, paths in files.items():
        for stream, path in paths.items():
            path.write_bytes(APIS[api][1][stream])
    load = str(LOAD_CORE) if args.pin else None
    pcore = str(PROXY_CORE) if args.pin else None

    targets: list[Target] = [Direct(nginx)]
    for client in args.extra:
        if client in NATIVE:
            continue
        if client in Comox.VARIANTS:
            targets.append(Comox(nginx, workdir, pcore, policy, client=Comox.VARIANTS[client]))
        else:
            targets.append(MinimalProxy(client, nginx, workdir, pcore))
    for peer in args.peers:
        targets.append(PEERS[peer](nginx, workdir, pcore))
    targets.append(MinimalProxy("aiohttp", nginx, workdir, pcore))
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None:
        targets.append(Comox(nginx, workdir, pcore, policy, source=baseline))
    targets.append(Comox(nginx, workdir, pcore, policy))
    limit = next(t for t in targets if isinstance(t, MinimalProxy) and t.name == MinimalProxy.LABELS["aiohttp"])
    comox = targets[-1]
    # Each native target beside its own floor (nginx on that path) and its own
    # limit: the same aiohttp proxy, forwarding the same bytes to the same path.
    pairs = [(comox, limit)]
    for api in apis:
        targets.append(Direct(nginx, api))
        api_limit = MinimalProxy("aiohttp", nginx, workdir, pcore, api=api)
        targets.append(api_limit)
        if baseline is not None:
            targets.append(Comox(nginx, workdir, pcore, policy, native=api, source=baseline))
        targets.append(Comox(nginx, workdir, pcore, policy, native=api))
        pairs.append((targets[-1], api_limit))
    if len({t.name for t in targets}) != len(targets):
        raise SystemExit("duplicate targets")

    # The C client by default: the Python one costs as much CPU per stream as
    # the proxies it times, and its own queueing moved "TTFB added" between runs.
    ttfb_binary = build_ttfb_client(workdir) if args.ttfb_client != "python" else None
    if ttfb_binary is None:
        if args.ttfb_client != "python":
            print("no C compiler: timing TTFB with the Python (aiohttp) client", flush=True)
        ttfb_clients = ["python"]
    else:
        ttfb_clients = ["c", "python"] if args.ttfb_client == "both" else ["c"]
    print(f"warming up {len(targets)} targets ...", flush=True)
    for t in targets:
        wrk(t.url(False), files[t.api][False], 16, 2, cores=load, headers=t.headers(False))
        if t.streams:
            wrk(t.url(True), files[t.api][True], 16, 1, cores=load, headers=t.headers(True))

    tests = [(f"rps c={c}", False, c) for c in args.concurrency] + [(f"SSE streams/s c={args.sse_concurrency}", True, args.sse_concurrency)]
    results: dict[str, dict[str, list]] = {t.name: {} for t in targets}

    def add(target, key, value):
        results[target.name].setdefault(key, []).append(value)

    contention = Contention(targets, nginx)
    for r in range(args.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for label, stream, c in tests:
            for t in order:
                if stream and not t.streams:
                    continue
                cpu0 = t.cpu()
                res = wrk(t.url(stream), files[t.api][stream], c, args.duration, cores=load, headers=t.headers(stream))
                if t.proc is not None and res["requests"]:
                    add(t, label + " cpu", (t.cpu() - cpu0) / res["requests"] * 1e6)
                add(t, label, res["rps"])
                add(t, label + " p50", res["p50_us"] / 1000)
                add(t, label + " p99", res["p99_us"] / 1000)
                add(t, label + " errors", res["errors"])
                print(f"  {t.name:<48} {label:<22} {res['rps']:>9,.0f}/s  p50 {res['p50_us'] / 1000:6.2f} ms  "
                      f"p99 {res['p99_us'] / 1000:6.2f} ms  errors {res['errors']}", flush=True)
        for t in order:
            if t.headers(True) or not t.streams:  # the TTFB clients send no extra headers: no TTFB row
                continue
            for client in ttfb_clients:
                if client == "c":
                    res = ttfb_c(ttfb_binary, t.url(True), files[t.api][True], args.sse_concurrency, min(args.duration, 4.0), cores=load)
                else:
                    res = ttfb_python(t.url(True), args.sse_concurrency, min(args.duration, 4.0), body=APIS[t.api][1][True])
                suffix = "" if client == ttfb_clients[0] else f" ({client} client)"
                add(t, "ttfb p50" + suffix, res["p50_ms"])
                add(t, "ttfb p99" + suffix, res["p99_ms"])
                print(f"  {t.name:<48} {'TTFB c=%d' % args.sse_concurrency + suffix:<22} p50 {res['p50_ms']:6.2f} ms  "
                      f"p99 {res['p99_ms']:6.2f} ms  n={res['n']}", flush=True)
        for t in targets:
            add(t, "rss", t.rss() / 2**20 if t.proc else None)
    others = contention.other_cores()

    # per-round "added" latencies (over nginx direct on the same path), then medians
    directs = {t.api: t for t in targets if isinstance(t, Direct)}
    c1 = f"rps c={args.concurrency[0]} p50"
    for t in targets:
        direct = directs[t.api]
        add_list = [a - b for a, b in zip(results[t.name].get(c1, []), results[direct.name].get(c1, []))]
        results[t.name]["added p50"] = add_list
        for suffix in ("", " (python client)"):
            if "ttfb p50" + suffix in results[t.name]:
                results[t.name]["ttfb added" + suffix] = [
                    a - b for a, b in zip(results[t.name]["ttfb p50" + suffix], results[direct.name]["ttfb p50" + suffix])]

    # Throughput goals and CPU per request are for the loaded runs; c=1 is the latency run.
    loaded = [c for c in args.concurrency if c != 1]
    # Comox / limit within each round: drift and other load hit both alike.
    pairings = {}
    for gw, lim in pairs:
        paired = pairings[gw.name] = {}
        for key in [f"rps c={c}" for c in loaded] + [f"SSE streams/s c={args.sse_concurrency}"]:
            ratios = [a / b for a, b in zip(results[gw.name][key], results[lim.name][key]) if b]
            paired[key] = (med(ratios), min(ratios), max(ratios))
    paired = pairings[comox.name]
    # Means by default: this VM's speed is bimodal (the same target swings ~1.7×
    # between rounds), and a median jumps between the modes where a mean over
    # interleaved rounds weighs them alike for every target.
    agg = mean if args.aggregate == "mean" else med
    m = {name: {k: agg(v) for k, v in d.items()} for name, d in results.items()}
    conc = args.concurrency
    sse = f"SSE streams/s c={args.sse_concurrency}"
    header = ["target"] + [f"rps c={c}" for c in conc] + [f"p50 / p99 c={c}" for c in conc] + [
        f"p50 added c={conc[0]}", f"SSE streams/s c={args.sse_concurrency}", f"TTFB p50 c={args.sse_concurrency}",
        "TTFB added", "RSS"] + [f"CPU/req c={c}" for c in loaded] + ["CPU/req SSE"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for t in targets:
        d = m[t.name]
        row = [t.name] + [fmt_int(d.get(f"rps c={c}")) for c in conc]
        row += [f"{d.get(f'rps c={c} p50'):.2f} / {d.get(f'rps c={c} p99'):.2f} ms" for c in conc]
        is_direct = isinstance(t, Direct)
        row += ["—" if is_direct else fmt_ms(d.get("added p50")), fmt_int(d.get(sse)), fmt_ms(d.get("ttfb p50")),
                "—" if is_direct else fmt_ms(d.get("ttfb added")),
                "—" if is_direct else f"{d['rss']:.0f} MB"]
        row += ["—" if d.get(f"{key} cpu") is None else f"{d[f'{key} cpu']:.0f} µs"
                for key in [f"rps c={c}" for c in loaded] + [sse]]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)

    goals = []

    def goal(text, ok):
        goals.append(f"- [{'x' if ok else ' '}] {text}")

    def pair_goals(gw: Target, lim: Target, who: str, whose: str) -> None:
        """The goals of one gateway target against its limit (``whose``: how the limit is named)."""
        L, C, paired = m[lim.name], m[gw.name], pairings[gw.name]
        direct = directs[gw.api]

        def share(key: str, text: str) -> None:
            ratio = C[key] / L[key]
            mid, low, high = paired[key]
            cpu = ""
            if C.get(f"{key} cpu") and L.get(f"{key} cpu"):
                cpu = (f"; CPU per request {C[f'{key} cpu']:.0f} µs against the proxy's {L[f'{key} cpu']:.0f} µs "
                       f"(the proxy's / {who}'s = {L[f'{key} cpu'] / C[f'{key} cpu']:.0%})")
            goal(f"{text}: {who} {C[key]:,.0f} = {ratio:.0%} of {whose} {L[key]:,.0f} (goal ≥ 75%); "
                 f"per-round ratios: median {mid:.0%}, range {low:.0%}–{high:.0%}{cpu}", ratio >= 0.75)

        for c in loaded:  # issue 5 bounds throughput at c=16 and 64, latency at c=1
            share(f"rps c={c}", f"rps c={c}")
        share(sse, sse)
        if conc[0] == 1:
            goal(f"p50 added at c=1: {C['added p50']:.2f} ms (goal < 0.6 ms)", C["added p50"] < 0.6)
        tr = C["ttfb added"] / L["ttfb added"] if L["ttfb added"] > 0 else float("inf")
        ttfb_ratios = [a / b for a, b in zip(results[gw.name]["ttfb added"], results[lim.name]["ttfb added"]) if b > 0] or [tr]
        goal(f"streaming TTFB added at c={args.sse_concurrency} ({ttfb_clients[0]} client): {C['ttfb added']:.2f} ms = {tr:.2f}× "
             f"{whose} {L['ttfb added']:.2f} ms (goal ≤ 1.5×); per-round ratios: median {med(ttfb_ratios):.2f}×, "
             f"range {min(ttfb_ratios):.2f}–{max(ttfb_ratios):.2f}×", tr <= 1.5)
        if "ttfb added (python client)" in C:
            C_py, L_py = C["ttfb added (python client)"], L["ttfb added (python client)"]
            goals.append(f"  - with the Python client: {C_py:.2f} ms against {L_py:.2f} ms = {C_py / L_py:.2f}×"
                         f" (TTFB p50 direct {m[direct.name]['ttfb p50 (python client)']:.2f} ms, C client"
                         f" {m[direct.name]['ttfb p50']:.2f} ms)")

    pair_goals(comox, limit, "Comox", "the aiohttp proxy's")
    for gw, lim in pairs[1:]:
        goals.append(f"\n{gw.path} passed through to a native backend (against the aiohttp proxy forwarding the same "
                     f"bytes to the same path; added latencies over nginx direct on {gw.path}):")
        pair_goals(gw, lim, "Comox", "the aiohttp proxy's")
    errors = {t.name: sum(sum(v) for k, v in results[t.name].items() if k.endswith("errors")) for t in targets}

    print("\n" + table)
    print(f"\n{args.aggregate.capitalize()}s of {args.rounds} interleaved rounds of {args.duration:g} s; proxies pinned to core {PROXY_CORE}, "
          f"nginx + wrk + TTFB client to core {LOAD_CORE}" if args.pin else "")
    print(f"Other processes used {others:.2f} cores on average during the run (contention).")
    if any(errors.values()):
        print("Errors (non-200 or socket): " + ", ".join(f"{k}: {v}" for k, v in errors.items() if v))
    print("\nGoals (issue 5):\n" + "\n".join(goals))
    if args.json:
        out = {args.aggregate + "s": m, "raw": results, "paired": paired, "other_cores": others}
        if len(pairs) > 1:
            out["paired_native"] = {gw.name: pairings[gw.name] for gw, _ in pairs[1:]}
        Path(args.json).write_text(json.dumps(out, indent=1))
    for t in targets:
        t.stop()


def soak(args, workdir: Path, nginx: Nginx, policy: str) -> None:
    """RSS of Comox over N requests after warm-up, alternating JSON and SSE chunks.

    wrk runs for a fixed time (its threads stop early at their request count,
    but the run lasts its duration), so each chunk's duration is sized from the
    rate measured so far; the counts reported are wrk's own."""
    bodies = {False: workdir / "request.json", True: workdir / "request-stream.json"}
    bodies[False].write_bytes(REQUEST_JSON)
    bodies[True].write_bytes(REQUEST_SSE)
    load = str(LOAD_CORE) if args.pin else None
    comox = Comox(nginx, workdir, str(PROXY_CORE) if args.pin else None, policy)

    def chunk(stream: bool, count: int, rate: float) -> dict:
        duration = min(120.0, max(2.0, count / max(rate, 1.0) * 1.15 + 0.5))
        return wrk(comox.url(stream), bodies[stream], 16, duration, cores=load, script="soak.lua", extra=[str(count)])

    try:
        rate = 1000.0
        warm = 0
        for stream in (False, True):
            res = chunk(stream, 10_000, rate)
            rate = max(rate, res["rps"] * 0.9) if res["requests"] >= 10_000 else res["rps"]
            warm += res["requests"]
        base = comox.rss() / 2**20
        print(f"RSS after {warm:,} requests of warm-up: {base:.1f} MB", flush=True)
        per = max(1, args.soak // 8)
        done, i = 0, 0
        t0 = time.monotonic()
        samples = [(0, base)]
        while done < args.soak and i < 40:
            stream = bool(i % 2)
            res = chunk(stream, min(per, args.soak - done), rate)
            if res["duration_us"] and res["requests"]:
                rate = res["requests"] / (res["duration_us"] / 1e6)
            done += res["requests"]
            i += 1
            rss = comox.rss() / 2**20
            samples.append((done, rss))
            print(f"  {done:>9,} requests ({'SSE' if stream else 'JSON'} chunk of {res['requests']:,}, errors {res['errors']}): "
                  f"RSS {rss:.1f} MB ({rss - base:+.1f})", flush=True)
        growth = samples[-1][1] - base
        print(f"\nSoak: {done:,} requests in {time.monotonic() - t0:.0f} s after {warm:,} of warm-up; RSS {base:.1f} → "
              f"{samples[-1][1]:.1f} MB: growth {growth:+.1f} MB (goal < 10 MB) — {'met' if growth < 10 else 'MISSED'}")
    finally:
        comox.stop()


def connection_split(proc: subprocess.Popen, port: int) -> list[int]:
    """How many established connections to ``port`` each process of ``proc``'s
    tree holds (the kernel's view: whichever process accepted them), most first.
    Read from outside, so the servers carry no counting code."""
    counts = []
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            n = sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if n:
            counts.append(n)
    return sorted(counts, reverse=True)


def wrk_split(target: Proxy, body: Path, connections: int, duration: float) -> tuple[dict, list[int]]:
    """wrk, and the connection split sampled half-way through its run."""
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(wrk(target.url(False), body, connections, duration, cores=None)))
    thread.start()
    time.sleep(min(duration / 2, duration - 0.5))
    split = connection_split(target.proc, target.port) if target.proc else []
    thread.join()
    return out, split


def workers_compare(args, workdir: Path, nginx: Nginx, policy: str) -> None:
    """Comox and the minimal proxy with 1 and 2 worker processes, in interleaved
    rounds. Nothing is pinned (this script neither: pinned, it would confine the
    workers it starts to its own core): nginx and wrk share the cores with the
    workers, so 2 cores give 2 workers less than 2 cores' worth."""
    body = workdir / "request.json"
    body.write_bytes(REQUEST_JSON)
    agg = mean if args.aggregate == "mean" else med
    rows = []
    others: list[float] = []
    for make in (lambda w: MinimalProxy("aiohttp", nginx, workdir, None, workers=w),
                 lambda w: Comox(nginx, workdir, None, policy, workers=w)):
        targets = {}
        try:
            for w in (1, 2):
                targets[w] = make(w)
                wrk(targets[w].url(False), body, 64, 2, cores=None)
            rates = {1: [], 2: []}
            costs = {1: [], 2: []}
            splits: list[str] = []
            contention = Contention(list(targets.values()), nginx)
            for r in range(args.rounds):
                for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                    t = targets[w]
                    cpu0 = t.cpu()
                    res, split = wrk_split(t, body, 64, args.duration)
                    rates[w].append(res["rps"])
                    costs[w].append((t.cpu() - cpu0) / max(res["requests"], 1) * 1e6)
                    if w == 2:
                        splits.append("/".join(map(str, split)) or "?")
                    print(f"  {t.name:<48} rps c=64 {res['rps']:>9,.0f}  CPU {costs[w][-1]:.0f} µs/request  "
                          f"connections per process {'/'.join(map(str, split))}", flush=True)
            ratios = [two / one for one, two in zip(rates[1], rates[2])]
            others.append(contention.other_cores())
            rows.append((targets[1].name.split(" (")[0], agg(rates[1]), agg(rates[2]), agg(costs[1]), agg(costs[2]),
                         med(ratios), min(ratios), max(ratios), ", ".join(splits)))
        finally:
            for t in targets.values():
                t.stop()
    print("\n| target | rps c=64, 1 worker | rps c=64, 2 workers | 2 / 1 | per round: median (range) "
          "| CPU µs/request, 1 worker | 2 workers | wrk's 64 connections per worker, each round |"
          "\n|---|---:|---:|---:|---:|---:|---:|---|")
    for name, one, two, c1, c2, mid, low, high, split in rows:
        print(f"| {name} | {one:,.0f} | {two:,.0f} | {two / one:.2f}× | {mid:.2f}× ({low:.2f}–{high:.2f}×) | {c1:.0f} | {c2:.0f} "
              f"| {split} |")
    print(f"\nUnpinned; nginx and wrk share the {os.cpu_count()} cores. {args.aggregate.capitalize()}s of {args.rounds} "
          f"interleaved rounds of {args.duration:g} s. CPU µs/request is the workers' CPU time (all processes) over"
          "\nrequests served: when it stays the same with more workers, nothing in the server serialises them."
          f"\nOther processes used {mean(others):.2f} cores on average during the run (contention).")


def profile(args, workdir: Path, nginx: Nginx, policy: str) -> None:
    """Sample Comox with py-spy while wrk drives it; print where the time goes."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    load = str(LOAD_CORE) if args.pin else None
    stream = args.profile == "sse"
    body = workdir / "request.json"
    body.write_bytes(APIS[args.profile_api][1][stream])  # a chat completion, or the native API's request
    cores = str(PROXY_CORE) if args.pin else None
    if args.profile_target.startswith("comox"):
        comox = Comox(nginx, workdir, cores, policy, client=Comox.VARIANTS.get(args.profile_target), native=args.profile_api)
    else:
        comox = MinimalProxy(args.profile_target.replace("minimal", "aiohttp"), nginx, workdir, cores)
    raw = Path(args.profile_out or workdir / "profile.txt")
    try:
        wrk(comox.url(stream), body, 16, 2, cores=load)
        spy_proc = start([spy, "record", "-p", str(comox.proc.pid), "-d", str(int(args.duration)), "-r", "250",
                          "-f", "raw", "-o", str(raw), "--nonblocking"], log=workdir / "py-spy.log")
        time.sleep(1.0)
        res = wrk(comox.url(stream), body, 16, args.duration, cores=load)
        spy_proc.wait(args.duration + 60)
        print(f"under profile: {res['rps']:,.0f}/s at c=16 ({'SSE' if stream else 'JSON'})")
    finally:
        comox.stop()
    self_time: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")" for f in stack.split(";")]
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    print(f"\n{total} samples. Top self time:")
    for f, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {n / total:6.1%}  {f}")
    print("Top inclusive time:")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {n / total:6.1%}  {f}")
    by_file: dict[str, int] = {}
    for f, n in self_time.items():
        key = f.rsplit(" (", 1)[-1].rstrip(")")
        by_file[key] = by_file.get(key, 0) + n
    print("Self time by file:")
    for f, n in sorted(by_file.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {n / total:6.1%}  {f}")
    print(f"raw stacks: {raw}")


def routing_bench(policy: str, n: int = 1000, calls: int = 20000) -> float:
    """Microseconds per ``group.choose()`` with ``n`` backends in the group."""
    from comox.gateway import Gateway
    from comox.request import GatewayRequest
    from comox.settings import Settings

    backends = [{"name": f"b{i}", "url": f"http://127.0.0.1:{10000 + i}"} for i in range(n)]
    gateway = Gateway(Settings(auth="none", models=[{"name": "bench", "policy": policy, "backends": backends}]))
    group = gateway.groups["bench"]
    request = GatewayRequest(id="x", endpoint="chat/completions", path="/v1/chat/completions", headers=[],
                             raw=REQUEST_JSON, json=json.loads(REQUEST_JSON))
    for i, state in enumerate(group.backends):
        state.ewma_ms = 1.0 + (i % 7)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            group.choose(request, ())
        best = min(best, (time.perf_counter() - t0) / (calls // 5) * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load run (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--aggregate", choices=["mean", "median"], default="mean",
                        help="how rounds are summarised (default mean: robust to a machine whose speed is bimodal)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts (default 1,16,64)")
    parser.add_argument("--sse-concurrency", type=int, default=16)
    parser.add_argument("--ttfb-client", choices=["c", "python", "both"], default="c",
                        help="what times streaming TTFB: bench/ttfb.c (default; needs cc), the Python aiohttp client, or both")
    parser.add_argument("--extra", default="", help="extra targets, any of: memory,httpx,httpx-aiohttp,comox-transport,aiohttp-gc,limit-pyreqwest,limit-httptools,limit-comox "
                        "(minimal proxy variants), comox-httpx,comox-httpx-aiohttp,comox-pyreqwest,comox-aiohttp,comox-httptools "
                        "(Comox over another transport), "
                        "comox-messages-native,comox-responses-native (Comox passing /v1/messages or /v1/responses "
                        "through to native_apis backends, each with its own nginx-direct and aiohttp-proxy rows on that path)")
    parser.add_argument("--policy", default="auto", help="Comox routing policy (default: p2c_ewma if installed, else round_robin)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    parser.add_argument("--peers", default="", help="peer gateways to add, any of: portkey,litellm (installed on first "
                        "use into ~/.cache/comox-bench, or $COMOX_BENCH_CACHE)")
    parser.add_argument("--soak", type=int, metavar="N", help="memory soak: RSS growth over N requests after warm-up")
    parser.add_argument("--workers-compare", action="store_true", help="comox serve --workers 1 vs 2")
    parser.add_argument("--routing", action="store_true", help="only the routing micro-benchmark (1,000 backends)")
    parser.add_argument("--profile", choices=["json", "sse"], help="py-spy profile of Comox under c=16 load")
    parser.add_argument("--profile-target", choices=["comox", "minimal", *Comox.VARIANTS, "limit-pyreqwest"],
                        default="comox")
    parser.add_argument("--profile-api", choices=sorted(a for a in APIS if a), help="--profile Comox passing this "
                        "API's requests through to a native backend (default: chat completions)")
    parser.add_argument("--profile-out", help="where --profile writes py-spy's raw (collapsed) stacks")
    parser.add_argument("--top", type=int, default=30, help="rows of the --profile summary")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--baseline", help="also run Comox from this checkout (e.g. a `git worktree add` of an "
                        "earlier commit), beside each Comox row, in the same interleaved rounds: an A/B "
                        "comparison that the machine's drift between two runs cannot blur")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.profile_api and not args.profile_target.startswith("comox"):
        parser.error("--profile-api: only for a Comox --profile-target")
    args.extra = [c for c in args.extra.split(",") if c]
    args.peers = [p for p in args.peers.split(",") if p]
    for p in args.peers:
        if p not in PEERS:
            parser.error(f"--peers: unknown {p!r} (have: {', '.join(PEERS)})")
    for c in args.extra:
        if (c not in MinimalProxy.LABELS and c not in Comox.VARIANTS and c not in NATIVE) or c == "aiohttp":
            parser.error(f"--extra: unknown {c!r}")
    if os.cpu_count() < 2 or args.workers_compare:
        args.pin = False  # workers must be free to use every core

    policies = available_policies()
    policy = args.policy if args.policy != "auto" else ("p2c_ewma" if "p2c_ewma" in policies else "round_robin")
    if policy not in policies:
        parser.error(f"routing policy {policy!r} is not installed (have: {', '.join(sorted(policies))})")
    print_versions(versions())
    for peer in args.peers:  # installed now, before any timing
        {"portkey": install_portkey, "litellm": install_litellm}[peer]()
    if args.peers:
        print("Peers: " + "; ".join(peer_versions(args.peers).values()))
    us = routing_bench(policy)
    print(f"Routing: one {policy} decision among 1,000 backends: {us:.1f} µs (goal < 20 µs) — {'met' if us < 20 else 'MISSED'}")
    if args.routing:
        return 0
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            parser.error(f"{tool} is not installed: apt-get install -y nginx-light wrk")

    signal.signal(signal.SIGTERM, _on_signal)
    if args.pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    with tempfile.TemporaryDirectory(prefix="comox-bench-") as tmp:
        workdir = Path(tmp)
        try:
            nginx = Nginx(workdir, str(LOAD_CORE) if args.pin else None)
            if args.profile:
                profile(args, workdir, nginx, policy)
            elif args.soak:
                soak(args, workdir, nginx, policy)
            elif args.workers_compare:
                workers_compare(args, workdir, nginx, policy)
            else:
                main_run(args, workdir, nginx, policy)
        finally:
            _stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
