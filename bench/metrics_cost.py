#!/usr/bin/env python3
"""Per-request cost of recording Comox's request metrics, prometheus_client
against OpenTelemetry metrics with its Prometheus exporter, and of the metrics
and access-log plugins as they run (docs/telemetry.md, docs/benchmarks.md).

    python bench/metrics_cost.py                 # best of 5 × 20,000 requests
    python bench/metrics_cost.py --number 50000 --repeat 7

One "request" records what the metrics plugin records for a streamed chat
completion: the requests counter, four histograms (latency, time to first
token, inter-token latency, overhead) and three token counters, under the
same label values (16 label sets, cycled). A benchmark, not a test: it needs
``opentelemetry-exporter-prometheus`` for the OpenTelemetry rows (skipped
without it).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins"))

LABELS = [
    {"model": f"chat-{g}", "backend": f"gpu-{g}-{b}", "endpoint": "chat/completions", "status": "200", "route": "local",
     "cache": "miss"}
    for g in range(4) for b in range(4)
]
TIMED = ("model", "backend", "endpoint", "route")
TOKENS = ("model", "backend", "route")


def _prometheus_client(cached: bool) -> Callable[[int], None]:
    """prometheus_client, children looked up with ``.labels()`` on every
    request, or once per label set (what the plugin does)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from comox_metrics.series import ITL_BUCKETS, LATENCY_BUCKETS, OVERHEAD_BUCKETS, TTFT_BUCKETS

    r = CollectorRegistry()
    requests = Counter("comox_requests", "", list(LABELS[0]), registry=r)
    duration = Histogram("comox_request_duration_seconds", "", TIMED, buckets=LATENCY_BUCKETS, registry=r)
    ttft = Histogram("comox_time_to_first_token_seconds", "", TIMED, buckets=TTFT_BUCKETS, registry=r)
    itl = Histogram("comox_inter_token_latency_seconds", "", TIMED, buckets=ITL_BUCKETS, registry=r)
    overhead = Histogram("comox_gateway_overhead_seconds", "", ("model", "endpoint", "route"), buckets=OVERHEAD_BUCKETS,
                         registry=r)
    tokens = [Counter(f"comox_{kind}_tokens", "", TOKENS, registry=r) for kind in ("input", "output", "cached")]

    def children(labels: dict[str, str]) -> tuple[Any, ...]:
        timed = [labels[name] for name in TIMED]
        return (requests.labels(**labels), duration.labels(*timed), ttft.labels(*timed), itl.labels(*timed),
                overhead.labels(labels["model"], labels["endpoint"], labels["route"]),
                *(counter.labels(*[labels[name] for name in TOKENS]) for counter in tokens))

    table = [children(labels) for labels in LABELS]

    def record(i: int) -> None:
        req, dur, first, inter, over, tin, tout, tcached = table[i & 15] if cached else children(LABELS[i & 15])
        req.inc()
        dur.observe(0.84)
        first.observe(0.12)
        inter.observe(0.021)
        over.observe(0.00031)
        tin.inc(812)
        tout.inc(64)
        tcached.inc(512)

    return record


def _opentelemetry(registry: Any = None) -> Callable[[int], None]:
    """OpenTelemetry's SDK with the Prometheus exporter's reader: attributes
    passed with every measurement (its Python API has no bound instruments).
    ``registry``: a prometheus_client registry to expose the reader in."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    from comox_metrics.series import ITL_BUCKETS, LATENCY_BUCKETS, OVERHEAD_BUCKETS, TTFT_BUCKETS

    views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(list(buckets)))
             for name, buckets in (("comox_request_duration_seconds", LATENCY_BUCKETS),
                                   ("comox_time_to_first_token_seconds", TTFT_BUCKETS),
                                   ("comox_inter_token_latency_seconds", ITL_BUCKETS),
                                   ("comox_gateway_overhead_seconds", OVERHEAD_BUCKETS))]
    reader = PrometheusMetricReader()
    if registry is not None:
        registry.register(reader._collector)  # what the exporter's own HTTP server serves
    provider = MeterProvider(metric_readers=[reader], views=views)
    meter = provider.get_meter("comox")
    requests = meter.create_counter("comox_requests")
    duration = meter.create_histogram("comox_request_duration_seconds", unit="s")
    ttft = meter.create_histogram("comox_time_to_first_token_seconds", unit="s")
    itl = meter.create_histogram("comox_inter_token_latency_seconds", unit="s")
    overhead = meter.create_histogram("comox_gateway_overhead_seconds", unit="s")
    tokens = [meter.create_counter(f"comox_{kind}_tokens") for kind in ("input", "output", "cached")]
    attrs = [(labels, {n: labels[n] for n in TIMED}, {n: labels[n] for n in ("model", "endpoint", "route")},
              {n: labels[n] for n in TOKENS}) for labels in LABELS]

    def record(i: int) -> None:
        full, timed, over, tok = attrs[i & 15]
        requests.add(1, full)
        duration.record(0.84, timed)
        ttft.record(0.12, timed)
        itl.record(0.021, timed)
        overhead.record(0.00031, over)
        tokens[0].add(812, tok)
        tokens[1].add(64, tok)
        tokens[2].add(512, tok)

    return record


def _fake_requests() -> list[Any]:
    """Finished streamed requests, as ``comox_request_done`` gets them."""
    import comox

    out = []
    for labels in LABELS:
        request = comox.GatewayRequest(id=os.urandom(16).hex(), endpoint="chat/completions", path="/v1/chat/completions",
                                       headers=[], json={"model": labels["model"], "stream": True, "messages": []})
        request.model_group = labels["model"]
        request.route = "local"
        request.response_headers.append((b"x-comox-cache", b"miss"))
        now = request.received_at
        request.sent_at, request.answered_at = now + 0.0002, now + 0.12
        request.first_byte_at, request.last_byte_at = now + 0.1203, now + 0.84
        request.usage = comox.Usage(prompt=812, completion=64, cached=512)
        out.append((request, labels["backend"]))
    return out


def _plugin() -> Callable[[int], None]:
    """The metrics plugin's ``Metrics.record``: label key, lookup, recording."""
    from prometheus_client import CollectorRegistry

    from comox_metrics.series import Metrics

    metrics = Metrics(CollectorRegistry())
    requests = _fake_requests()

    def record(i: int) -> None:
        request, backend = requests[i & 15]
        metrics.record(request, 200, backend)

    return record


def _access_log(on: bool) -> Callable[[int], None]:
    """The access-log plugin's hook, off (one level check) or on (a JSON line
    written to a buffer through comox.events.JsonFormatter)."""
    import comox_accesslog

    from comox.events import JsonFormatter

    logger = logging.getLogger("comox.access")
    logger.handlers[:] = []
    logger.propagate = False
    if on:
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if on else logging.WARNING)
    requests = _fake_requests()

    def record(i: int) -> None:
        request, backend = requests[i & 15]
        comox_accesslog.comox_request_done(request, 200, backend, None)
        if on and i & 1023 == 0:
            handler.stream = io.StringIO()  # keep the buffer small

    return record


def _multiprocess() -> Callable[[int], None]:
    """prometheus_client's multiprocess mode (``--workers N``): every value in
    a memory-mapped file."""
    from prometheus_client import CollectorRegistry, values

    from comox_metrics.series import Metrics

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="comox-metrics-bench-")
    saved = values.ValueClass
    values.ValueClass = values.MultiProcessValue()
    requests = _fake_requests()
    try:
        metrics = Metrics(CollectorRegistry(), shared=True)
        for request, backend in requests:  # children are made on first use, in the files
            metrics.record(request, 200, backend)
    finally:
        values.ValueClass = saved

    def record(i: int) -> None:
        request, backend = requests[i & 15]
        metrics.record(request, 200, backend)

    return record


def _scrape(kind: str) -> Callable[[], object]:
    """One scrape of the 16 label sets every instrument above holds."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    if kind == "prometheus_client":
        from comox_metrics.series import Metrics

        metrics = Metrics(registry)
        for request, backend in _fake_requests():
            metrics.record(request, 200, backend)
    else:
        record = _opentelemetry(registry)
        for i in range(len(LABELS)):
            record(i)
    return lambda: generate_latest(registry)


def best_us(func: Callable[[int], None], number: int, repeat: int) -> float:
    counter = iter(range(1 << 62))
    timer = timeit.Timer(lambda: func(next(counter)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows: list[tuple[str, float | None]] = [
        ("prometheus_client, .labels() per request", best_us(_prometheus_client(False), args.number, args.repeat)),
        ("prometheus_client, children kept per label set", best_us(_prometheus_client(True), args.number, args.repeat)),
    ]
    try:
        otel: Callable[[int], None] | None = _opentelemetry()
    except ImportError as exc:
        print(f"OpenTelemetry rows skipped: {exc}", file=sys.stderr)
        otel = None
    rows.append(("OpenTelemetry SDK + Prometheus exporter", best_us(otel, args.number, args.repeat) if otel else None))
    rows += [
        ("metrics plugin, one process: Metrics.record (plain numbers, prometheus_client's collector API)",
         best_us(_plugin(), args.number, args.repeat)),
        ("metrics plugin, workers: Metrics.record (prometheus_client's multiprocess mode)", best_us(_multiprocess(), args.number, args.repeat)),
        ("access-log plugin, off", best_us(_access_log(False), args.number, args.repeat)),
        ("access-log plugin, on (JSON line)", best_us(_access_log(True), args.number, args.repeat)),
    ]
    print(f"Python {platform.python_version()}, {platform.machine()}, best of {args.repeat} x {args.number:,}")
    print("| what, per request | µs |")
    print("|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |" if us is not None else f"| {name} | — |")
    for kind in ("prometheus_client", "opentelemetry"):
        try:
            scrape = _scrape(kind)
        except ImportError:
            continue
        print(f"| one scrape of 16 label sets, {kind} | {min(timeit.repeat(scrape, number=50, repeat=3)) / 50 * 1e6:.0f} |")


if __name__ == "__main__":
    main()
