"""Fleet events in the log: one line per backend state change, retry and
startup verdict, with the same fields as plain text (default) or as JSON
(``comox serve --log-format json``).

Every event is a record of the ``comox.events`` logger whose ``comox_event``
attribute holds its name and fields; :class:`JsonFormatter` renders them as
one JSON object per line, :class:`TextFormatter` as ``key=value`` pairs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["emit", "JsonFormatter", "TextFormatter", "configure_logging", "LOGGER"]

LOGGER = "comox.events"
log = logging.getLogger(LOGGER)


def emit(event: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` (``backend_ejected``, ``request_retried``, …) with a
    human message and its fields. Never pass a key or prompt content."""
    if log.isEnabledFor(level):
        log.log(level, message, extra={"comox_event": {"event": event, **fields}})


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value …``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        event = getattr(record, "comox_event", None)
        if event:
            line += " " + " ".join(f"{key}={_text(value)}" for key, value in event.items())
        return line


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "comox_event", None)
        if event:
            out.update(event)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(log_format: str = "text", level: str = "info", access_log: bool = False) -> None:
    """Send Comox's logs (``comox`` and below) to stderr in ``log_format``
    (``text`` or ``json``), for a process Comox owns (``comox serve``); the
    access log (logger ``comox.access``, one line per API request) only with
    ``access_log``, whatever ``level`` says."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("comox")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    logging.getLogger("comox.access").setLevel(logging.INFO if access_log else logging.WARNING)
