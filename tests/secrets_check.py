"""The secrets check (issue 16, docs/reliability.md "Secrets"), a pytest plugin
loaded by tests/conftest.py for the whole suite.

It knows the secrets — client keys, their SHA-256, upstream API keys, the admin
key, prompt text — and watches what leaves a gateway besides its answers:

* log records (a handler on the root logger and on ``comox``, which
  ``comox serve`` stops propagating): message, fields, exception;
* the stderr of ``comox`` processes the tests start (pipes they read, files
  they log to);
* OpenTelemetry spans, as any exporter in the test process gets them (name,
  attributes, events, status);
* Prometheus ``/metrics`` text and every error body: in an ASGI wrapper
  around each app a test serves with ``comox.testing.ServerThread`` (what the
  gateway sent, read by the test or not, error events in streams too) and in
  httpx's ``Response.read`` (what a test read from any gateway, ``comox serve``
  processes included).

After each test (as a teardown error naming the secret's kind, the test and
where it appeared) and at the end of the session (everything captured, against
every secret registered by then), any secret found fails the run.

Secrets come from :func:`secret` (tests register their key and prompt
constants), from every gateway built in the process (``key_sha256`` of
``[[keys]]`` and keys files, the values of ``api_key_env`` variables,
``COMOX_ADMIN_KEY``) and from every request a served app receives (its
``authorization``/``x-api-key``/``api-key`` credential and that value's
SHA-256, and its prompt text: messages, prompt, input, system, instructions).
``COMOX_SECRETS_LOG_LEVEL=debug`` turns Comox's loggers down to that level for
a deeper run (every debug record and access-log line made, and scanned).
A test that must show a secret says so: ``@pytest.mark.secrets_allowed(where,
kinds, reason=...)``; a span is allowed prompt text in a test whose gateway set
``capture_content = true``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import comox.gateway
import comox.testing

CLIENT_KEY, KEY_HASH, UPSTREAM_KEY, ADMIN_KEY, PROMPT = "client key", "key hash", "upstream key", "admin key", "prompt"
KINDS = (CLIENT_KEY, KEY_HASH, UPSTREAM_KEY, ADMIN_KEY, PROMPT)
MIN_SEEN_KEY = 16     # a credential a request presented: shorter ones ("team-a", a fuzzer's "Settings") are names
MIN_ENV_KEY = 8       # an upstream or admin key from the environment: shorter ones ("adm") are words
MIN_PROMPT = 16       # prompt text a request sent: shorter ones ("hi", "Say hello") are everywhere
MAX_PROMPTS_PER_TEST = 500  # the fuzzers send thousands; the first ones are enough
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key")


@dataclass(frozen=True)
class Secret:
    kind: str
    value: str
    origin: str


@dataclass
class Capture:
    where: str
    text: str
    test: str
    allowed: tuple[tuple[str, frozenset[str]], ...] = ()  # (where prefix, kinds)

    def allows(self, kind: str) -> bool:
        return any(self.where.startswith(prefix) and kind in kinds for prefix, kinds in self.allowed)


class Registry:
    """Secrets by value: the session's (keys, canaries) and the current test's
    (prompt text its requests sent)."""

    def __init__(self) -> None:
        self.session: dict[str, Secret] = {}
        self.test: dict[str, Secret] = {}
        self.key_ids: set[str] = set()
        self._known: dict[bool, tuple[Secret, ...]] = {}
        self._lock = threading.Lock()

    def add(self, value: str, kind: str, origin: str, *, per_test: bool = False) -> None:
        if not value or value in self.key_ids:
            return
        with self._lock:
            if value in self.session or (per_test and value in self.test):
                return
            (self.test if per_test else self.session)[value] = Secret(kind, value, origin)
            self._known.clear()

    def add_key(self, value: str, kind: str, origin: str) -> None:
        """A key and its SHA-256 (hex, either case, as configs write it)."""
        self.add(value, kind, origin)
        digest = hashlib.sha256(value.encode()).hexdigest()
        self.add(digest, KEY_HASH, f"sha256 of the {kind} of {origin}")
        self.add(digest.upper(), KEY_HASH, f"sha256 of the {kind} of {origin}")

    def end_test(self) -> None:
        with self._lock:
            self.test = {}
            self._known.clear()

    def find(self, text: str, *, with_test: bool = True) -> list[Secret]:
        known = self._known.get(with_test)
        if known is None:
            with self._lock:
                known = self._known[with_test] = (*self.session.values(), *(self.test.values() if with_test else ()))
        return [secret_ for secret_ in known if secret_.value in text]  # (plain `in`: 5x a regex of them all)


REGISTRY = Registry()


def secret(value: str, kind: str = CLIENT_KEY) -> str:
    """Register ``value`` (a key, or with ``kind="prompt"`` a canary prompt) as a
    secret that no log, span, metric or error body may show, and return it. A key
    registers its SHA-256 too."""
    assert kind in KINDS, kind
    if kind in (CLIENT_KEY, UPSTREAM_KEY, ADMIN_KEY):
        REGISTRY.add_key(value, kind, "a test's constant")
    else:
        REGISTRY.add(value, kind, "a test's constant")
    return value


# -- what is captured -----------------------------------------------------------


class State:
    def __init__(self) -> None:
        self.test = "<outside any test>"
        self.captures: list[Capture] = []
        self.seen: set[tuple[str, str]] = set()
        self.content_captured = False  # a gateway of this test has capture_content = true
        self.files: list[tuple[str, str]] = []  # (what, path) of comox processes' logs
        self.lock = threading.Lock()
        # the session
        self.kept: dict[tuple[str, tuple[Any, ...]], Capture] = {}
        self.counts = dict.fromkeys(("tests", "log records", "spans", "error bodies", "metrics texts", "stderr texts"), 0)
        self.findings: list[str] = []
        self.scan_seconds = 0.0

    def capture(self, count: str, where: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            if (where, text) in self.seen:
                return
            self.seen.add((where, text))
            self.captures.append(Capture(where, text, self.test))
            self.counts[count] += 1


STATE = State()


def harvest_settings(settings: Any) -> None:
    """Keys, their hashes and upstream keys of a gateway about to be built."""
    try:
        data = settings.model_dump() if hasattr(settings, "model_dump") else settings
        if isinstance(data, dict):  # (``sections``, the plugins' tables, is excluded from a dump)
            data = {**data, "sections": getattr(settings, "sections", None)}
    except Exception:
        return
    admin = os.environ.get("COMOX_ADMIN_KEY")
    if admin and len(admin) >= MIN_ENV_KEY:
        REGISTRY.add_key(admin, ADMIN_KEY, "$COMOX_ADMIN_KEY")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "key_sha256" and isinstance(value, str) and len(value) == 64:
                    REGISTRY.add(value.lower(), KEY_HASH, "a [[keys]] entry")
                    REGISTRY.add(value.upper(), KEY_HASH, "a [[keys]] entry")
                elif name == "id" and isinstance(value, str) and "key_sha256" in node:
                    REGISTRY.key_ids.add(value)
                elif name == "api_key_env" and isinstance(value, str) and len(os.environ.get(value, "")) >= MIN_ENV_KEY:
                    REGISTRY.add_key(os.environ[value], UPSTREAM_KEY, f"${value}")
                elif name == "keys_file" and isinstance(value, str):
                    try:
                        text = Path(value).read_text()
                    except OSError:
                        pass
                    else:
                        for digest in re.findall(r"\b[0-9a-fA-F]{64}\b", text):
                            REGISTRY.add(digest.lower(), KEY_HASH, f"keys_file {value}")
                            REGISTRY.add(digest.upper(), KEY_HASH, f"keys_file {value}")
                elif name == "capture_content" and value is True:
                    STATE.content_captured = True
                walk(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(data)


def harvest_prompts(body: bytes) -> str | None:
    """Register the prompt text of a request body; return its ``model``."""
    if not body.startswith(b"{"):
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    model = model if isinstance(model, str) else None
    texts: list[str] = []

    def text_of(node: Any, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, list):
            for item in node[:50]:
                text_of(item, depth + 1)
        elif isinstance(node, dict):
            for name in ("content", "text", "input", "prompt", "instructions", "system", "messages", "query", "documents"):
                if name in node:
                    text_of(node[name], depth + 1)

    if isinstance(payload, dict):
        for name in ("messages", "prompt", "input", "system", "instructions", "query", "documents"):
            if name in payload:
                text_of(payload[name])
    for text in texts:
        text = text.strip()
        if text == model:
            continue  # a fuzzer's string sent as the model too, which a 404 names back
        if len(text) >= MIN_PROMPT and len(REGISTRY.test) < MAX_PROMPTS_PER_TEST and not text.isspace():
            REGISTRY.add(text, PROMPT, "a request's prompt", per_test=True)
    return model


FUZZED: set[str] = set()  # credential headers' strings a fuzzer made up: junk, not keys


def fuzzed(*values: str) -> None:
    """Say that these credential header values are a fuzzer's made-up strings,
    not keys: not registered when a request presents them (a fuzzer reuses its
    strings, and an error may name one sent elsewhere as a field's value)."""
    for value in values:
        FUZZED.add(value.strip())
        FUZZED.add(value.encode("utf-8", "replace").decode("latin-1").strip())  # as a server reads it


def harvest_credential(headers: list[tuple[bytes, bytes]], asked: str) -> None:
    """Register the credential a request presented, unless it is also what the
    request asked for (its path, model or body: a fuzzer's string everywhere,
    which an error names back as the body's, not as the key)."""
    for name, value in headers:
        if name in CREDENTIAL_HEADERS:
            text = value.decode("latin-1").strip()
            if text in FUZZED:
                continue
            if name == b"authorization":
                scheme, _, text = text.partition(" ")
                if scheme.lower() != "bearer":
                    continue
                text = text.strip()
            if len(text) >= MIN_SEEN_KEY and text not in asked:
                REGISTRY.add_key(text, CLIENT_KEY, f"a request's {name.decode()} header")


class Watch:
    """ASGI wrapper around an app a test serves: registers the credentials and
    prompts its requests carry; captures its error bodies, the error events of
    its streams and its /metrics text."""

    def __init__(self, app: Any):
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[bytes] = []
        size = 0
        model: str | None = None

        async def watched_receive() -> Any:
            nonlocal size, model
            message = await receive()
            chunk = message.get("body")
            if chunk and size < 1 << 20:
                body.append(chunk)
                size += len(chunk)
                if not message.get("more_body"):
                    model = harvest_prompts(b"".join(body))
            return message

        status = 0
        stream = False
        kept: list[bytes] = []
        path = scope.get("path", "")

        async def watched_send(message: Any) -> None:
            nonlocal status, stream
            if message["type"] == "http.response.start":
                status = message["status"]
                stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if status >= 400 or path.endswith("/metrics"):
                    kept.append(chunk)
                    if not message.get("more_body"):
                        text = b"".join(kept).decode("utf-8", "replace")
                        if status >= 400:
                            STATE.capture("error bodies", f"error body {status} {scope.get('method')} {path}", text)
                        else:
                            STATE.capture("metrics texts", f"metrics {path}", text)
                elif stream and (b'"error":{' in chunk or b"event: error" in chunk):
                    STATE.capture("error bodies", f"error event in a stream {path}", chunk.decode("utf-8", "replace"))
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            sent = b"".join(body).decode("utf-8", "replace")
            harvest_credential(scope.get("headers") or [], f"{path} {scope.get('query_string', b'')!r} {model or ''} {sent}")


def _watch_server_thread() -> None:
    original = comox.testing.ServerThread.__init__

    def __init__(self: Any, app: Any, **kwargs: Any) -> None:
        original(self, app, **kwargs)
        if not isinstance(app, comox.testing.StandInUpstream) and "Collector" not in type(app).__name__:
            self.server.config.app = Watch(app)

    comox.testing.ServerThread.__init__ = __init__  # type: ignore[method-assign]


def _watch_gateways() -> None:
    original = comox.gateway.Gateway.__init__

    def __init__(self: Any, settings: Any, **kwargs: Any) -> None:
        harvest_settings(settings)
        original(self, settings, **kwargs)

    comox.gateway.Gateway.__init__ = __init__  # type: ignore[method-assign]


def _client_side(response: httpx.Response) -> None:
    """What a test read from a gateway (in this process or a ``comox serve``)."""
    if threading.current_thread().name == "comox-test-server":
        return  # a gateway's own call to its upstream
    try:
        request = response.request
    except RuntimeError:
        return
    path = request.url.path
    if response.status_code >= 400:
        STATE.capture("error bodies", f"error body {response.status_code} {request.method} {path}", response.text)
    elif path.endswith("/metrics"):
        STATE.capture("metrics texts", f"metrics {path}", response.text)


def _watch_httpx() -> None:
    read, aread = httpx.Response.read, httpx.Response.aread

    def watched_read(self: httpx.Response) -> bytes:
        content = read(self)
        _client_side(self)
        return content

    async def watched_aread(self: httpx.Response) -> bytes:
        content = await aread(self)
        _client_side(self)
        return content

    httpx.Response.read = watched_read  # type: ignore[method-assign]
    httpx.Response.aread = watched_aread  # type: ignore[method-assign]


CLIENT_LIBRARIES = ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "anthropic", "urllib3", "hpack", "h2")


class LogWatch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.__dict__.get("_secrets_checked"):
            return  # seen on ``comox`` already, now on the root logger
        record.__dict__["_secrets_checked"] = True
        if record.name.split(".")[0] in CLIENT_LIBRARIES and record.threadName != "comox-test-server":
            return  # a test's own client logging what it sends (a gateway's own calls upstream are kept)
        try:
            parts = [record.getMessage()]
        except Exception:
            parts = [str(record.msg), repr(record.args)]
        event = record.__dict__.get("comox_event")
        if event:
            parts.append(repr(event))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(logging.Formatter().formatException(record.exc_info))
        kind = "access log" if record.name == "comox.access" else "log"
        STATE.capture("log records", f"{kind} {record.name} {record.levelname}", "\n".join(parts))


LOG_WATCH = LogWatch(level=logging.NOTSET)


def _span_text(span: Any) -> str:
    parts = [str(span.name)]
    parts += [f"{key}={value}" for key, value in (span.attributes or {}).items()]
    for event in span.events or ():
        parts.append(str(event.name))
        parts += [f"{key}={value}" for key, value in (event.attributes or {}).items()]
    status = getattr(span, "status", None)
    if status is not None and status.description:
        parts.append(status.description)
    return "\n".join(parts)


def _watch_spans() -> None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return
    for exporter in (InMemorySpanExporter, OTLPSpanExporter):
        original = exporter.export

        def export(self: Any, spans: Any, _original: Any = original) -> Any:
            for span in spans:
                STATE.capture("spans", f"span {span.name!r}", _span_text(span))
            return _original(self, spans)

        exporter.export = export  # type: ignore[method-assign]


class Tee:
    """A ``comox`` process's stderr pipe: what the test reads, kept too."""

    def __init__(self, stream: Any, what: str):
        self._stream = stream
        self._what = what

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _keep(self, data: Any) -> Any:
        if data:
            STATE.capture("stderr texts", self._what, data if isinstance(data, str) else data.decode("utf-8", "replace"))
        return data

    def read(self, *args: Any) -> Any:
        return self._keep(self._stream.read(*args))

    def readline(self, *args: Any) -> Any:
        return self._keep(self._stream.readline(*args))

    def readlines(self, *args: Any) -> Any:
        lines = self._stream.readlines(*args)
        for line in lines:
            self._keep(line)
        return lines

    def __iter__(self) -> Any:
        for line in self._stream:
            yield self._keep(line)


def _comox_argv(args: Any) -> str | None:
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    joined = " ".join(argv)
    if "comox" not in joined or "pytest" in joined:
        return None
    at = next((i for i, a in enumerate(argv) if a == "comox" or a.endswith("/comox")), None)
    shown = argv[at:at + 3] if at is not None else argv[:4]
    return " ".join(Path(a).name if "/" in a else a for a in shown)


def _watch_subprocesses() -> None:
    init, communicate = subprocess.Popen.__init__, subprocess.Popen.communicate

    def __init__(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        init(self, args, *rest, **kwargs)
        what = _comox_argv(args)
        self._secrets_what = what
        if what is None:
            return
        target = kwargs.get("stderr")
        if target == subprocess.STDOUT:
            target = kwargs.get("stdout")
        if self.stderr is not None:
            self.stderr = Tee(self.stderr, f"stderr of {what}")
        elif hasattr(target, "name") and isinstance(target.name, str):
            STATE.files.append((f"log file of {what}", target.name))

    def watched_communicate(self: Any, *args: Any, **kwargs: Any) -> Any:
        stream = self.stderr
        if isinstance(stream, Tee):
            self.stderr = stream._stream  # communicate() reads the pipe itself
        out, err = communicate(self, *args, **kwargs)
        what = getattr(self, "_secrets_what", None)
        if what and err:
            STATE.capture("stderr texts", f"stderr of {what}", err if isinstance(err, str) else err.decode("utf-8", "replace"))
        return out, err

    subprocess.Popen.__init__ = __init__  # type: ignore[method-assign]
    subprocess.Popen.communicate = watched_communicate  # type: ignore[method-assign]


# -- checking ----------------------------------------------------------------------


def _show(value: str) -> str:
    return repr(value[:6] + "…") if len(value) > 10 else repr(value)


def _excerpt(text: str, value: str) -> str:
    at = text.find(value)
    before = text[max(0, at - 60):at].replace("\n", " ")
    after = text[at + len(value):at + len(value) + 60].replace("\n", " ")
    return f"…{before}[{_show(value)}]{after}…"


def scan(captures: list[Capture], *, with_test: bool = True) -> list[str]:
    """One line per secret found in ``captures``: kind, test, where, excerpt."""
    started = time.perf_counter()
    lines = []
    for capture in captures:
        for found in REGISTRY.find(capture.text, with_test=with_test):
            if capture.allows(found.kind):
                continue
            lines.append(f"{found.kind} {_show(found.value)} (from {found.origin}) in {capture.where} "
                         f"during {capture.test}: {_excerpt(capture.text, found.value)}")
    STATE.scan_seconds += time.perf_counter() - started
    return lines


def _allowed(item: pytest.Item) -> tuple[tuple[str, frozenset[str]], ...]:
    allowed = []
    for mark in item.iter_markers("secrets_allowed"):
        where, kinds = mark.args
        assert mark.kwargs.get("reason"), "secrets_allowed needs a reason"
        allowed.append((where, frozenset([kinds] if isinstance(kinds, str) else kinds)))
    if STATE.content_captured:  # capture_content = true: prompts in spans are what it is for
        allowed.append(("span ", frozenset([PROMPT])))
    return tuple(allowed)


def finish_test(item: pytest.Item | None) -> list[str]:
    for what, path in STATE.files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        STATE.capture("stderr texts", what, text)
    with STATE.lock:
        captures, STATE.captures, STATE.seen, STATE.files = STATE.captures, [], set(), []
    allowed = _allowed(item) if item is not None else ()
    for capture in captures:
        capture.allowed = allowed
    found = scan(captures)
    for capture in captures:
        STATE.kept.setdefault((capture.text, capture.allowed), capture)
    REGISTRY.end_test()
    STATE.content_captured = False
    STATE.findings += found
    return found


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "secrets_allowed(where, kinds, reason): this test may show these kinds of "
                            "secret in captures whose place starts with `where` (docs/reliability.md, Secrets)")
    _watch_server_thread()
    _watch_gateways()
    _watch_httpx()
    _watch_spans()
    _watch_subprocesses()
    for name in ("", "comox"):
        logging.getLogger(name).addHandler(LOG_WATCH)
    level = os.environ.get("COMOX_SECRETS_LOG_LEVEL")
    if level:  # a deeper run: Comox's debug and info records (the access log among them) made and scanned too
        logging.getLogger("comox").setLevel(level.upper())


@pytest.fixture(autouse=True)
def secrets_check(request: pytest.FixtureRequest) -> Any:
    """After each test (its other fixtures torn down: gateways stopped), every
    capture against every secret."""
    finish_test(None)  # whatever came between tests (module fixtures, late threads)
    comox_logger = logging.getLogger("comox")
    if LOG_WATCH not in comox_logger.handlers:  # configure_logging() replaced them
        comox_logger.addHandler(LOG_WATCH)
    STATE.test = request.node.nodeid
    STATE.counts["tests"] += 1
    yield
    found = finish_test(request.node)
    STATE.test = "<between tests>"
    if found:
        pytest.fail("secrets leaked (docs/reliability.md, Secrets):\n" + "\n".join(found), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    finish_test(None)
    late = [line for line in scan(list(STATE.kept.values()), with_test=False) if line not in STATE.findings]
    STATE.findings += late
    session.config.stash[_LATE] = late
    if late and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LATE = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    late = config.stash.get(_LATE, [])
    if late:
        terminalreporter.section("secrets leaked (found at the end of the session)", red=True)
        for line in late:
            terminalreporter.write_line(line)
    counts = ", ".join(f"{value} {name}" for name, value in STATE.counts.items())
    terminalreporter.write_line(f"secrets check: {counts} scanned for {len(REGISTRY.session)} secrets "
                                f"(+ each test's prompts) in {STATE.scan_seconds:.1f} s; {len(STATE.findings)} found")
