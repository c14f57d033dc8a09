"""The metrics Comox exposes, and how one finished request is recorded.

Labels have bounded values only: model groups, backends and endpoints named
by the config and the code, HTTP statuses, and a few fixed words — never a
key, a request id or anything a client wrote. Recording a request costs one
dict lookup for its label set and a few C calls (bench/metrics_cost.py): in
one process each per-request counter and histogram appends to a list, folded
into plain numbers in C (``bisect``, ``sum``) when scraped or every
``FOLD_EVERY`` requests — touched only by the event loop and exposed through
prometheus_client's collector API (:class:`Family`); with workers they are
prometheus_client's own, whose values live in the files every worker's
scrape reads.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from functools import partial, reduce
from operator import add, attrgetter
from time import perf_counter as _perf_counter
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import comox
from comox import Gateway, GatewayRequest, Usage

__all__ = ["Metrics", "STATES", "CACHE_STATUSES"]

STATES = ("healthy", "ejected", "unhealthy", "loading", "draining")
"""A backend's states, as ``/admin/backends`` shows them."""
CACHE_STATUSES = frozenset({b"hit", b"miss", b"skip"})
"""``x-comox-cache`` values taken as a label; any other is ``""``."""
_CACHE_LABEL = {status: status.decode() for status in CACHE_STATUSES}
NANO = 1_000_000_000
"""The failover plugin's budget counters are in nano-dollars (docs/failover.md)."""
FOLD_EVERY = 2048
"""Requests recorded between folds: bounds what one process holds unfolded."""

# Seconds. Whole requests take from milliseconds (embeddings, a cache hit) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 6.0, 12.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

REQUEST = ("model", "backend", "endpoint", "status", "route", "cache")
TIMED = ("model", "backend", "endpoint", "route")
TOKENS = ("model", "backend", "route")
PER_MODEL = ("model", "endpoint")
BACKEND = ("model", "backend")

_PROMPT, _COMPLETION, _CACHED = attrgetter("prompt"), attrgetter("completion"), attrgetter("cached")


def _take(pending: list[Any]) -> list[Any]:
    """What ``pending`` holds, removed: two C calls, so that an append between
    them (another thread's) stays pending rather than lost."""
    taken = pending[:]
    del pending[:len(taken)]
    return taken


class _Series(NamedTuple):
    """What one label set of a request records with: each a callable taking
    the amount or observed value (``tokens``: the answer's :class:`Usage`). A
    refused request's has only the first three, so no empty histogram is
    exposed."""

    requests: Callable[[float], None]
    retries: Callable[[float], None]
    rate_limited: Callable[[float], None]
    duration: Any = None
    ttft: Any = None
    itl: Any = None
    overhead: Any = None
    tokens: Any = None
    failovers: Any = None


class _Count:
    """A counter child of one process: ``inc`` is its pending list's append
    (a C call, no Python frame per request); :meth:`fold` sums them."""

    __slots__ = ("value", "pending", "inc")

    def __init__(self) -> None:
        self.value = 0.0
        self.pending: list[float] = []
        self.inc = self.pending.append

    def fold(self) -> None:
        if self.pending:
            self.value += sum(_take(self.pending))  # whole amounts: exact, as adding each was


class _Observed:
    """A histogram child of one process: ``observe`` appends; :meth:`fold`
    counts the pending values in C."""

    __slots__ = ("bounds", "le", "count", "sum", "pending", "observe")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.le = [0] * len(bounds)  # cumulative, as exposed: values <= each bound
        self.count = 0  # +Inf
        self.sum = 0.0
        self.pending: list[float] = []
        self.observe = self.pending.append

    def fold(self) -> None:
        if self.pending:
            values = _take(self.pending)
            self.sum = reduce(add, values, self.sum)  # in order: the same float as adding each
            self.count += len(values)
            # Per bound, how many of the sorted values are <= it: a bisection each, no loop over values.
            self.le = list(map(add, self.le, map(partial(bisect_right, sorted(values)), self.bounds)))


class _Tokens:
    """One process's token counters of one label set: ``add`` takes the
    answer's usage (or None); :meth:`fold` adds the counts it reported (not
    0 or None)."""

    __slots__ = ("counters", "pending", "add")

    def __init__(self, input_tokens: _Count, output_tokens: _Count, cached_tokens: _Count):
        self.counters = ((input_tokens, _PROMPT), (output_tokens, _COMPLETION), (cached_tokens, _CACHED))
        self.pending: list[Usage | None] = []
        self.add = self.pending.append

    def fold(self) -> None:
        if self.pending:
            usages = list(filter(None, _take(self.pending)))  # a Usage is a tuple of 5: true
            for counter, field in self.counters:
                counter.value += sum(filter(None, map(field, usages)))


def _shared_tokens(input_tokens: Any, output_tokens: Any, cached_tokens: Any) -> Callable[[Usage | None], None]:
    def add(usage: Usage | None) -> None:
        if usage is None:
            return
        if usage.prompt:
            input_tokens.inc(usage.prompt)
        if usage.completion:
            output_tokens.inc(usage.completion)
        if usage.cached:
            cached_tokens.inc(usage.cached)
    return add


class Family:
    """A counter (``buckets`` None) or histogram of one process, kept in
    plain numbers by the event loop: ``labels(*values)`` gives the child to
    ``inc(amount)`` or ``observe(value)``, as prometheus_client's do, without
    a lock; what it holds is exact once :meth:`fold` ran."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 buckets: Sequence[float] | None = None):
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.buckets = tuple(buckets) if buckets is not None else None
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: object) -> Any:
        key = tuple(str(value) for value in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Observed(self.buckets) if self.buckets is not None else _Count()
        return child

    def fold(self) -> None:
        for child in self.children.values():
            child.fold()

    def metric(self) -> Metric:
        children = list(self.children.items())
        if self.buckets is None:
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, child in children:
                counter.add_metric(key, child.value)
            return counter
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [*(repr(float(bound)) for bound in self.buckets), "+Inf"]
        for key, child in children:
            cumulative = [(bound, float(count)) for bound, count in zip(bounds, [*child.le, child.count])]
            histogram.add_metric(list(key), cumulative, child.sum)
        return histogram


class _Families(Collector):
    def __init__(self, families: list[Family], fold: Callable[[], None]):
        self.families = families
        self.fold = fold

    def collect(self) -> list[Metric]:
        self.fold()
        return [family.metric() for family in self.families]


class Metrics:
    """Every metric of one gateway: in ``registry`` (one process), or with
    ``shared`` in the files of the multiprocess directory (workers: gauges
    say how the workers' values combine)."""

    def __init__(self, registry: CollectorRegistry, *, shared: bool = False):
        r = registry
        plain: list[Family] = []
        self._tokens_plain: list[_Tokens] = []
        self._tick = itertools.cycle(range(FOLD_EVERY))

        # Per request: plain numbers in one process, prometheus_client's own with workers.
        def counter(name: str, documentation: str, labels: Sequence[str]) -> Any:
            if shared:
                return Counter(name, documentation, labels, registry=r)
            plain.append(Family(name, documentation, labels))
            return plain[-1]

        def histogram(name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Any:
            if shared:
                return Histogram(name, documentation, labels, buckets=buckets, registry=r)
            plain.append(Family(name, documentation, labels, buckets=buckets))
            return plain[-1]

        self.requests = counter("comox_requests", "API requests answered or refused, by model group, backend, "
                                "endpoint, HTTP status, route (local, failover, cache; empty: refused) and cache "
                                "status.", REQUEST)
        self.duration = histogram("comox_request_duration_seconds", "Time from the request's arrival until the "
                                  "gateway was done with it: its last byte sent, or its client gone.", TIMED,
                                  LATENCY_BUCKETS)
        self.ttft = histogram("comox_time_to_first_token_seconds", "Streams: time from the request's arrival to "
                              "its first chunk sent to the client.", TIMED, TTFT_BUCKETS)
        self.itl = histogram("comox_inter_token_latency_seconds", "Streams: time from the first chunk to the last, "
                             "over the tokens after the first.", TIMED, ITL_BUCKETS)
        self.overhead = histogram("comox_gateway_overhead_seconds", "The time Comox added up to the response's "
                                  "start (x-comox-overhead-ms): time in the gateway less the answering backend's "
                                  "own time to its answer or first chunk.", ("model", "endpoint", "route"),
                                  OVERHEAD_BUCKETS)
        self.input_tokens = counter("comox_input_tokens", "Prompt tokens of answered requests (cached ones "
                                    "included), as the answers reported them.", TOKENS)
        self.output_tokens = counter("comox_output_tokens", "Generated tokens of answered requests.", TOKENS)
        self.cached_tokens = counter("comox_cached_tokens", "Prompt tokens served from a backend's prompt cache.",
                                     TOKENS)
        self.retries = counter("comox_retries", "Moves of a request to another backend before its first byte.",
                               PER_MODEL)
        self.failovers = counter("comox_failovers", "Requests answered by cloud failover.", PER_MODEL)
        self.rate_limited = counter("comox_rate_limited", "Requests refused with 429 by the gateway itself (rate "
                                    "limits, concurrency limits), not passed through from a backend.", PER_MODEL)
        self._plain = plain
        if plain:
            registry.register(_Families(plain, self.fold))
        # The fleet, as this process sees it: set from gateway.snapshot() when
        # scraped (and every few seconds in each worker).
        self.inflight = Gauge("comox_backend_inflight", "Requests in flight at the backend (all workers).", BACKEND,
                              registry=r, multiprocess_mode="livesum")
        self.state = Gauge("comox_backend_state", "1 for the backend's state (with workers: a state any worker "
                           "sees).", (*BACKEND, "state"), registry=r, multiprocess_mode="livemax")
        self.decode_tps = Gauge("comox_backend_decode_tokens_per_second", "Measured generation speed of the "
                                "backend (with workers: the highest worker's estimate).", BACKEND, registry=r,
                                multiprocess_mode="livemax")
        self.prefill_tps = Gauge("comox_backend_prefill_tokens_per_second", "Measured prompt processing speed of "
                                 "the backend (with workers: the highest worker's estimate).", BACKEND, registry=r,
                                 multiprocess_mode="livemax")
        self.ejections = Counter("comox_backend_ejections", "Times the backend was ejected after consecutive "
                                 "failures.", BACKEND, registry=r)
        self.available = Gauge("comox_model_backends_available", "Backends of the model group in rotation (with "
                               "workers: the fewest any worker sees).", ("model",), registry=r,
                               multiprocess_mode="livemin")
        self._series: dict[tuple[str, str | None, str, int, str, bytes | None], _Series] = {}
        self._tokens: dict[tuple[str, str, str], Callable[[Usage | None], None]] = {}
        self._ejections_seen: dict[tuple[str, str], int] = {}

    # -- per request --------------------------------------------------------

    def record(self, request: GatewayRequest, status: int, backend: str | None) -> None:
        """One finished API request (from ``comox_request_done``): a call per
        counter or histogram it adds to, each C in one process."""
        route = request.route
        # The x-comox-cache header as it came: the label is made of it once.
        key = (request.model_group, backend, request.api_endpoint or request.endpoint, status, route,
               request.response_header(b"x-comox-cache"))
        try:
            series = self._series[key]
        except KeyError:
            series = self._new_series(key)
        series.requests(1)
        if not next(self._tick):  # every FOLD_EVERY-th request (a C iterator: no counter to update)
            self.fold()
        if request.retries:
            series.retries(request.retries)
        if not route:  # refused before any answer
            if status == 429:
                series.rate_limited(1)
            return
        if route == "failover":
            series.failovers(1)
        start = request.received_at
        first = request.first_byte_at
        series.duration(_perf_counter() - start)
        series.tokens(request.usage)
        if first:
            waited = request.answered_at - request.sent_at
            series.overhead(first - start - waited if waited > 0 else first - start)
            if request.stream and status == 200:
                series.ttft(first - start)
                last = request.last_byte_at
                usage = request.usage
                if usage is not None and last > first:
                    tokens = usage.completion
                    if tokens and tokens > 1:
                        series.itl((last - first) / (tokens - 1))

    def fold(self) -> None:
        """Fold what one process's children hold pending into their numbers
        (nothing pends with workers)."""
        for tokens in self._tokens_plain:
            tokens.fold()
        for family in self._plain:
            family.fold()

    def _new_series(self, key: tuple[str, str | None, str, int, str, bytes | None]) -> _Series:
        model, backend, endpoint, status, route, header = key
        backend = backend or ""
        cache = _CACHE_LABEL.get(header, "") if header is not None else ""
        counted = (self.requests.labels(model, backend, endpoint, status, route, cache).inc,
                   self.retries.labels(model, endpoint).inc, self.rate_limited.labels(model, endpoint).inc)
        if not route:
            series = _Series(*counted)
        else:
            timed = (model, backend, endpoint, route)
            series = _Series(
                *counted, self.duration.labels(*timed).observe, self.ttft.labels(*timed).observe,
                self.itl.labels(*timed).observe, self.overhead.labels(model, endpoint, route).observe,
                self._tokens_of((model, backend, route)), self.failovers.labels(model, endpoint).inc,
            )
        if header is None or cache:  # kept for a known header value only: the keys stay bounded
            self._series[key] = series
        return series

    def _tokens_of(self, labels: tuple[str, str, str]) -> Callable[[Usage | None], None]:
        add = self._tokens.get(labels)
        if add is None:
            counters = (self.input_tokens.labels(*labels), self.output_tokens.labels(*labels),
                        self.cached_tokens.labels(*labels))
            if isinstance(counters[0], _Count):
                self._tokens_plain.append(_Tokens(*counters))
                add = self._tokens_plain[-1].add
            else:
                add = _shared_tokens(*counters)
            self._tokens[labels] = add
        return add

    # -- the fleet ----------------------------------------------------------

    def refresh_fleet(self, gateway: Gateway) -> None:
        """Set the fleet's gauges from ``gateway.snapshot()``, now."""
        snapshot = gateway.snapshot()
        for backend in snapshot["data"]:
            labels = (backend["model"], backend["name"])
            self.inflight.labels(*labels).set(backend["inflight"])
            for state in STATES:
                self.state.labels(*labels, state).set(1 if backend["state"] == state else 0)
            if backend["decode_tokens_per_s"] is not None:
                self.decode_tps.labels(*labels).set(backend["decode_tokens_per_s"])
            if backend["prefill_tokens_per_s"] is not None:
                self.prefill_tps.labels(*labels).set(backend["prefill_tokens_per_s"])
            ejections = backend["ejections"]
            seen = self._ejections_seen.get(labels)
            if seen is None:
                self.ejections.labels(*labels)  # the series exists from the start, at 0
                seen = 0
            if ejections > seen:
                self.ejections.labels(*labels).inc(ejections - seen)
            self._ejections_seen[labels] = ejections
        for name, group in snapshot["groups"].items():
            self.available.labels(name).set(group["available"])


class ScrapeTime(Collector):
    """What is read when scraped, never kept per worker: Comox's version, and
    cloud spend and reservations from the failover plugin's budget counters
    in the shared state (what ``GET /admin/spend`` reports of the day's and
    the month's budgets)."""

    def __init__(self) -> None:
        self.spend: list[tuple[str, float, float, float | None]] = []  # budget, spent, reserved, limit (USD)

    async def read_spend(self, gateway: Gateway) -> None:
        budgets = gateway.plugin_settings("failover")
        if budgets is None or not hasattr(budgets, "cloud_usd_per_day"):
            self.spend = []  # the failover plugin is not loaded
            return
        now = time.gmtime()
        state = gateway.shared_state
        rows = []
        for budget, counter, ttl_s, limit in (
            ("day", f"budget:day:{time.strftime('%Y-%m-%d', now)}", 3 * 86400.0, budgets.cloud_usd_per_day),
            ("month", f"budget:month:{time.strftime('%Y-%m', now)}", 62 * 86400.0, budgets.cloud_usd_per_month),
        ):
            # Adding 0 reads a counter (with the time to live the ledger gives it).
            _, committed = await state.add(counter, 0, ttl_s=ttl_s)
            _, spent = await state.add(counter + ":spent", 0, ttl_s=ttl_s)
            rows.append((budget, spent / NANO, max(0.0, committed - spent) / NANO,
                         float(limit) if limit is not None else None))
        self.spend = rows

    def collect(self) -> list[Metric]:
        info = GaugeMetricFamily("comox_info", "Comox's version.", labels=["version"])
        info.add_metric([comox.__version__], 1)
        out: list[Metric] = [info]
        if self.spend:
            spent = GaugeMetricFamily("comox_cloud_spent_usd", "Cloud failover spend settled in the budget's "
                                      "current period (UTC day, month), every replica sharing the state.",
                                      labels=["budget"])
            reserved = GaugeMetricFamily("comox_cloud_reserved_usd", "Worst-case cost held by cloud requests in "
                                         "flight, against the budget.", labels=["budget"])
            limit = GaugeMetricFamily("comox_cloud_budget_usd", "The budget's limit ([budgets]); absent when "
                                      "unset.", labels=["budget"])
            for budget, spent_usd, reserved_usd, limit_usd in self.spend:
                spent.add_metric([budget], spent_usd)
                reserved.add_metric([budget], reserved_usd)
                if limit_usd is not None:
                    limit.add_metric([budget], limit_usd)
            out += [spent, reserved, limit]
        return out
