"""One scrape for many worker processes: prometheus_client's multiprocess
mode, set up before the first metric is made.

A process spawned by a supervisor (``comox serve --workers N``, uvicorn's
``--workers``: :func:`multiprocessing.parent_process` is set) keeps its
values in memory-mapped files in a directory every worker of that supervisor
shares, ``<tmp>/comox-metrics-<supervisor pid>-<tag>`` (the tag tells two runs
of one pid apart), and whichever worker is scraped reads them all.
``PROMETHEUS_MULTIPROC_DIR``, when set, is used instead (gunicorn, or any
other process manager: empty it before starting the workers, as
prometheus_client's documentation says). A single process keeps its values in
memory, as usual.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

from prometheus_client import multiprocess, values

__all__ = ["setup", "sweep"]

log = logging.getLogger("comox.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "comox-metrics-"
_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def setup() -> Path | None:
    """The directory this process shares its values through, or None for a
    single process. Makes prometheus_client write there from now on."""
    path = os.environ.get(ENV) or os.environ.get(ENV.lower())
    if not path:
        parent = multiprocessing.parent_process()
        if parent is None or parent.pid is None:
            return None
        # Every worker of one supervisor inherits its authkey: a tag no
        # earlier run whose supervisor had the same pid shares.
        tag = hashlib.sha256(bytes(multiprocessing.current_process().authkey)).hexdigest()[:12]
        root = Path(tempfile.gettempdir())
        _remove_stale(root)
        path = str(root / f"{PREFIX}{parent.pid}-{tag}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.environ[ENV] = path
    if values.ValueClass is values.MutexValue:  # imported before the variable was set
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return Path(path)


def sweep(path: Path) -> None:
    """Forget the live gauges (in flight, states) of workers that are gone;
    their counters and histograms stay in the sums."""
    for file in path.glob("gauge_live*.db"):
        match = _LIVE_FILE.match(file.name)
        if match is not None and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), str(path))  # type: ignore[no-untyped-call]


def _remove_stale(root: Path) -> None:
    """Directories of supervisors that are gone (a stopped ``comox serve``)."""
    for directory in root.glob(PREFIX + "*"):
        pid = directory.name[len(PREFIX):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
