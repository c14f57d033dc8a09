"""What the fleet page shows of the last minutes, kept in this process.

* :class:`Samples`: every second, each backend's state, requests in flight,
  EWMA latency, time to first token (the mean of the streams that started in
  that second) and measured decode tokens/s, from ``gateway.snapshot()`` and
  ``comox_request_done``; the last ``HISTORY_S`` seconds.
* :class:`EventRing`: a logging handler on ``comox.events`` keeping the last
  fleet events — their name, level, time, message, backend and model; never
  the other fields.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import deque
from typing import Any

from comox import Gateway

__all__ = ["EventRing", "Samples", "HISTORY_S", "INTERVAL_S"]

log = logging.getLogger("comox.dashboard")

HISTORY_S = 300
INTERVAL_S = 1.0
EVENTS = 200
"""Fleet events kept."""
CLIP = 300
"""Longest text (a message, an error) passed on."""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def clip(text: object) -> str:
    """``text`` at most ``CLIP`` long, without the user and password a URL in it may hold."""
    text = _USERINFO.sub("…@", str(text))
    return text if len(text) <= CLIP else text[: CLIP - 1] + "…"


class EventRing(logging.Handler):
    """The last ``EVENTS`` fleet events (records of ``comox.events`` with a
    ``comox_event``), numbered from 1."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "comox_event", None)
        if not isinstance(fields, dict):
            return
        self.seq += 1  # under the handler's lock (Handler.handle)
        event = {"seq": self.seq, "t": round(record.created, 3), "level": record.levelname.lower(),
                 "event": clip(fields.get("event", "")), "message": clip(record.getMessage())}
        for name in ("backend", "model"):
            if fields.get(name) is not None:
                event[name] = clip(fields[name])
        self.events.append(event)

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [event for event in list(self.events) if event["seq"] > seq]


class Samples:
    """Per-backend samples, one every ``INTERVAL_S`` while :meth:`run` runs.

    ``instance`` tells this process's numbering from another's (a browser's
    stream may reconnect to another worker)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.instance = secrets.token_hex(4)
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_S / INTERVAL_S))
        self.seq = 0
        self.backends: set[str] = set()
        self.ttft: dict[str, list[float]] = {}
        self._tick: asyncio.Event | None = None

    def observe_ttft(self, backend: str, ms: float) -> None:
        if backend in self.backends:
            self.ttft.setdefault(backend, []).append(ms)

    def take(self) -> None:
        now = time.time()
        row: dict[str, list[Any]] = {}
        for backend in self.gateway.snapshot()["data"]:
            name = backend["name"]
            ttfts = self.ttft.pop(name, None)
            ttft = round(sum(ttfts) / len(ttfts), 1) if ttfts else None
            row[name] = [backend["state"], backend["inflight"], backend["ewma_latency_ms"], ttft, backend["decode_tokens_per_s"]]
        self.backends = set(row)
        self.seq += 1
        self.samples.append({"seq": self.seq, "t": round(now, 3), "b": row})
        if self._tick is not None:
            self._tick.set()
        self._tick = asyncio.Event()

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [sample for sample in list(self.samples) if sample["seq"] > seq]

    async def next(self, timeout: float) -> None:
        """Wait for the next sample (or ``timeout`` seconds, when none is taken)."""
        if self._tick is None:
            self._tick = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._tick.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        while True:
            try:
                self.take()
            except Exception:  # a sample missed is no reason to stop sampling
                log.exception("the fleet page could not sample the fleet")
            await asyncio.sleep(INTERVAL_S)
