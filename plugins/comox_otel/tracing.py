"""The spans of one gateway: imported only when it traces (the OpenTelemetry
SDK, the OTLP/HTTP exporter, the aiohttp and httpx instrumentations and the
pyreqwest transport's own client spans).

Per API request, in the request's own task:

* ``comox_request_start``: the server span, a child of the client's
  ``traceparent`` (or of the span the host app made current, when Comox is
  mounted in an instrumented app), made current until ``comox_request_done``.
* ``comox_attempt_start`` / ``comox_attempt_done``: a client span per attempt,
  current around the backend call, so the HTTP client span the instrumentation
  makes is its child and the backend gets its ``traceparent``. A stream's
  attempt stays open until the stream ends — or until another node takes it
  over (``"resume"``), which ends it as ``broken``.
* ``comox_request_done``: the server span's name and attributes, then its end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

import comox
from comox import BackendResponse, Gateway, GatewayRequest

from .content import Tap, input_messages, output_messages, response_model

if TYPE_CHECKING:
    from . import TelemetrySettings

__all__ = ["Tracing", "OPERATIONS", "RequestsOnly"]

log = logging.getLogger("comox.otel")

OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "rerank": "rerank"}
"""``gen_ai.operation.name`` per endpoint (``rerank`` is not one of the conventions' own)."""
QUIET = frozenset({"ok", "cancelled", "declined"})
"""Attempt outcomes that are not an error of the attempt."""


class _Upstream(NamedTuple):
    provider: str  # the backend type: gen_ai.provider.name
    model: str | None  # the model name it is sent, when the config renames it
    address: str | None
    port: int | None


class _Group(NamedTuple):
    policy: str
    failover_provider: str | None  # the type of its cloud backends, when they are all one type


class _Record:
    """One request's spans (``request.state["otel"]``)."""

    __slots__ = ("span", "token", "started", "attempts", "attempt", "attempt_token", "answering", "first_chunk",
                 "model", "failover", "body", "taps")

    def __init__(self, span: Span, token: object):
        self.span = span
        self.token = token
        self.started = time.perf_counter()
        self.attempts = 0
        self.attempt: Span | None = None  # between comox_attempt_start and _done
        self.attempt_token: object = None
        self.answering: Span | None = None  # a stream's attempt, open until the stream ends
        self.first_chunk: float | None = None
        self.model: str | None = None  # gen_ai.response.model of the last answer
        self.failover = False  # comox_failover answered
        self.body: bytes | None = None  # captured JSON answer
        self.taps: list[Tap] = []  # captured streams


class _Headers(Getter[Sequence[tuple[bytes, bytes]]]):
    """W3C ``traceparent``/``tracestate`` (or whatever the configured
    propagator reads) from the raw ASGI header pairs."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for found, value in carrier if found == name]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_HEADERS = _Headers()


class RequestsOnly(sampling.Sampler):
    """Comox's own provider samples requests: a client span with no parent — a
    health check, a call to shared state, anything outside a request — is
    dropped; everything else is up to ``inner`` (the ``OTEL_TRACES_SAMPLER``
    one, parent-based by default)."""

    def __init__(self, inner: sampling.Sampler):
        self.inner = inner

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str, kind: SpanKind | None = None,
                      attributes: Attributes = None, links: Sequence[Link] | None = None,
                      trace_state: TraceState | None = None) -> sampling.SamplingResult:
        if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"RequestsOnly{{{self.inner.get_description()}}}"


def own_provider(otlp_endpoint: str | None) -> TracerProvider:
    """A tracer provider exporting in batches over OTLP/HTTP: to
    ``otlp_endpoint`` + ``/v1/traces``, else where ``OTEL_EXPORTER_OTLP_*``
    say. ``service.name`` is ``comox`` unless ``OTEL_SERVICE_NAME`` (or
    ``OTEL_RESOURCE_ATTRIBUTES``) names it."""
    resource = Resource.create({"service.version": comox.__version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "comox"}))
    from_env = getattr(sampling, "_get_from_env_or_default", None)  # what TracerProvider() itself reads
    inner = from_env() if from_env is not None else sampling.ParentBased(sampling.ALWAYS_ON)
    provider = TracerProvider(resource=resource, sampler=RequestsOnly(inner), shutdown_on_exit=False)
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "http/protobuf"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: Comox exports spans over OTLP/HTTP (http/protobuf) only", protocol)
    endpoint = f"{otlp_endpoint.rstrip('/')}/v1/traces" if otlp_endpoint else None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


# The HTTP client instrumentations are process-wide: turned on by the first
# gateway that traces (unless something else already did), off after the last.
_users = 0
_ours: list[Callable[[], object]] = []  # how to turn off each we turned on


def _instrument(provider: TracerProvider | None) -> None:
    global _users
    _users += 1
    if _users == 1:
        for instrumentor in (AioHttpClientInstrumentor(), HTTPXClientInstrumentor()):
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument(tracer_provider=provider)
                _ours.append(instrumentor.uninstrument)
        undo = comox.instrument_transports(provider)  # httptools and pyreqwest make their own client spans
        if undo is not None:
            _ours.append(undo)


def _uninstrument() -> None:
    global _users
    _users -= 1
    if _users == 0:
        while _ours:
            _ours.pop()()


class Tracing:
    """The tracer of one gateway, and what it knows of its backends."""

    def __init__(self, gateway: Gateway, settings: TelemetrySettings):
        self.capture = settings.capture_content
        self.provider = own_provider(settings.otlp_endpoint) if settings.source in ("otlp", "env") else None
        provider = self.provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer("comox", comox.__version__)
        self.upstreams: dict[str, _Upstream] = {}
        self.groups: dict[str, _Group] = {}
        for group in gateway.settings.models:
            for backend in group.backends:
                self.upstreams[backend.name] = _upstream(backend.type, getattr(backend, "url", None),
                                                         getattr(backend, "model", None))
            clouds = (group.failover or {}).get("backends") or ()
            types = {cloud.get("type", "openai") for cloud in clouds if isinstance(cloud, dict)}
            self.groups[group.name] = _Group(group.policy, types.pop() if len(types) == 1 else None)

    def start(self) -> None:
        _instrument(self.provider)

    async def stop(self) -> None:
        _uninstrument()
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)  # exports what is left (bounded by the exporter's timeout)

    # -- per request ----------------------------------------------------------

    def request_start(self, request: GatewayRequest) -> None:
        if trace.get_current_span().get_span_context().is_valid:
            parent, kind = None, SpanKind.INTERNAL  # mounted in an app whose own server span is current
        else:
            parent, kind = propagate.extract(request.headers, getter=_HEADERS), SpanKind.SERVER
        span = self.tracer.start_span(request.method, context=parent, kind=kind, attributes={
            "http.request.method": request.method, "url.path": request.path, "comox.request_id": request.id})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        request.state["otel"] = _Record(span, token)

    def attempt_start(self, request: GatewayRequest, backend: str | None, kind: str) -> None:
        record = request.state.get("otel")
        if not isinstance(record, _Record) or not record.span.is_recording():
            return  # (a request not sampled: its attempts would not be either)
        if record.answering is not None:  # the stream it answered broke off: this attempt takes it over
            _end_attempt(record.answering, "broken")
            record.answering = None
        record.attempts += 1
        upstream = self.upstreams.get(backend) if backend is not None else None
        group = self.groups.get(request.model_group)
        operation = OPERATIONS.get(request.endpoint, request.endpoint)
        # (a continuation, for "resume", names its model only in its body)
        model = upstream.model if upstream is not None and upstream.model else request.model or request.json.get("model")
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "comox.attempt": record.attempts,
                                      "comox.attempt.kind": kind, "comox.model_group": request.model_group}
        provider = upstream.provider if upstream is not None else group.failover_provider if group else None
        if provider:
            attributes["gen_ai.provider.name"] = provider
        if model:
            attributes["gen_ai.request.model"] = model
        _max_tokens(attributes, request)
        if backend is not None:
            attributes["comox.backend"] = backend
        if upstream is not None and upstream.address:
            attributes["server.address"] = upstream.address
            if upstream.port is not None:
                attributes["server.port"] = upstream.port
        # A model in the gateway's own process (no URL) is an internal call.
        span_kind = SpanKind.INTERNAL if upstream is not None and not upstream.address else SpanKind.CLIENT
        span = self.tracer.start_span(f"{operation} {model}" if model else operation, kind=span_kind,
                                      attributes=attributes)
        record.attempt = span
        record.attempt_token = otel_context.attach(trace.set_span_in_context(span))

    def attempt_done(self, request: GatewayRequest, backend: str | None, kind: str, response: BackendResponse | None,
                     error: str | None) -> None:
        record = request.state.get("otel")
        if not isinstance(record, _Record) or record.attempt is None:
            return
        span, record.attempt = record.attempt, None
        otel_context.detach(record.attempt_token)  # type: ignore[arg-type]  # the token attach gave
        record.attempt_token = None
        if response is None:
            _end_attempt(span, error or "failed")
            return
        status = response.status
        span.set_attribute("http.response.status_code", status)
        model = response_model(response.body, response.head)
        if model is not None:
            span.set_attribute("gen_ai.response.model", model)
        record.model = model
        record.failover = kind == "failover"
        if status == 200 and response.stream is not None:
            # The answer streams on: its attempt ends with the stream.
            if record.first_chunk is None:
                record.first_chunk = time.perf_counter()
            if self.capture:
                tap = Tap(response.head)
                response.stream = tap.tee(response.stream)
                record.taps.append(tap)
            record.answering = span
            return
        if self.capture and status == 200:
            record.body = response.body
        _end_attempt(span, "ok" if status < 400 else "busy" if status == 429 else
                     "client_error" if status < 500 else "server_error", status)

    def request_done(self, request: GatewayRequest, status: int, backend: str | None, error: Exception | None) -> None:
        record = request.state.pop("otel", None)
        if not isinstance(record, _Record):
            return
        if record.attempt is not None:  # (comox_attempt_done always follows: never left open)
            otel_context.detach(record.attempt_token)  # type: ignore[arg-type]  # the token attach gave
            _end_attempt(record.attempt, "failed")
        if record.answering is not None:
            _end_attempt(record.answering, "broken" if error is not None else "ok")
        span = record.span
        if not span.is_recording():
            span.end()
            otel_context.detach(record.token)  # type: ignore[arg-type]  # the token attach gave
            return
        attributes = self._request_attributes(request, record, status, backend)
        operation = OPERATIONS.get(request.endpoint)
        if operation is not None and request.model_group:
            span.update_name(f"{operation} {request.model}")
        elif request.endpoint:
            span.update_name(f"{request.method} /v1/{request.endpoint}")
        if self.capture and operation is not None:
            _content(attributes, request, record)
        if status >= 500 or (error is not None and status < 400):  # a 5xx, or a stream that broke off
            attributes["error.type"] = type(error).__name__ if error is not None else str(status)
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        span.end()
        otel_context.detach(record.token)  # type: ignore[arg-type]  # the token attach gave

    def _request_attributes(self, request: GatewayRequest, record: _Record, status: int,
                            backend: str | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {"http.response.status_code": status}
        if request.endpoint:
            attributes["comox.endpoint"] = request.endpoint
        key_id = request.principal.key_id
        if key_id is not None:
            attributes["comox.key_id"] = key_id
        cache = request.response_header(b"x-comox-cache")
        if cache is not None:
            attributes["comox.cache"] = cache.decode("latin-1")
        operation = OPERATIONS.get(request.endpoint)
        if operation is None or not request.model_group:
            return attributes
        group = self.groups.get(request.model_group)
        attributes.update({"gen_ai.operation.name": operation, "gen_ai.request.model": request.model,
                           "comox.model_group": request.model_group, "comox.attempts": record.attempts})
        _max_tokens(attributes, request)
        if group is not None:
            attributes["comox.policy"] = group.policy
        upstream = self.upstreams.get(backend) if backend is not None else None
        provider = None
        if upstream is not None:
            attributes["comox.backend"] = backend
            attributes["comox.route"] = "local"
            provider = upstream.provider
        elif record.failover:
            attributes["comox.route"] = "failover"
            provider = group.failover_provider if group is not None else None
        elif cache == b"hit":
            attributes["comox.route"] = "cache"
        if provider:
            attributes["gen_ai.provider.name"] = provider
        if record.model is not None and (upstream is not None or record.failover):
            attributes["gen_ai.response.model"] = record.model
        usage = request.usage
        if usage is not None:
            for name, value in (("gen_ai.usage.input_tokens", usage.prompt), ("gen_ai.usage.output_tokens", usage.completion),
                                ("gen_ai.usage.cache_read.input_tokens", usage.cached)):
                if value is not None:
                    attributes[name] = value
        if record.first_chunk is not None:
            attributes["comox.time_to_first_token_ms"] = round((record.first_chunk - record.started) * 1000, 3)
        return attributes


def _upstream(type_name: str, url: str | None, model: str | None) -> _Upstream:
    if not url:
        return _Upstream(type_name, model, None, None)
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    return _Upstream(type_name, model, parts.hostname, port)


def _max_tokens(attributes: dict[str, Any], request: GatewayRequest) -> None:
    # A request not translated (yet: passed through natively) is not translated
    # for its span: the client's own body names its bound one of these ways.
    body = request.inbound_json
    if body is None or request.body_made():
        body = request.json
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            attributes["gen_ai.request.max_tokens"] = value
            return


def _end_attempt(span: Span, outcome: str, status: int | None = None) -> None:
    span.set_attribute("comox.attempt.outcome", outcome)
    if outcome not in QUIET:
        span.set_attribute("error.type", str(status) if status is not None else outcome)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def _content(attributes: dict[str, Any], request: GatewayRequest, record: _Record) -> None:
    """``capture_content = true``: the prompt and the answer."""
    try:
        body = request.json
    except comox.InvalidRequest:  # passed through natively, and its translation refuses it
        body = {}
    prompt = input_messages(request.endpoint, body)
    if prompt is not None:
        attributes["gen_ai.input.messages"] = prompt
    answer = output_messages(record.body, [b"".join(tap.chunks) for tap in record.taps]) \
        if record.body is not None or record.taps else None
    if answer is not None:
        attributes["gen_ai.output.messages"] = answer
