"""``comox serve --workers 2`` (comox/workers.py): each worker accepts on its
own SO_REUSEPORT socket, so a few keep-alive connections spread over both; a
killed worker is started again; SIGTERM stops every child; a busy port is one
line and exit 2. Which worker holds a connection is read from the kernel
(psutil: the worker process that owns the accepted socket), so the server
needs no test-only code."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import psutil
import pytest

from comox.testing import free_port, stop_process, wait_for_http, wait_until
from comox.workers import reuseport_supported

pytestmark = pytest.mark.skipif(not reuseport_supported(), reason="needs SO_REUSEPORT (Linux)")

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def serve(tmp_path, comox_upstream):
    config = tmp_path / "comox.toml"
    config.write_text(f'auth = "none"\n[[models]]\nname = "chat"\n[[models.backends]]\nurl = "{comox_upstream.url}"\n')
    procs: list[subprocess.Popen] = []

    def start(workers: int = 2) -> tuple[subprocess.Popen, str, int]:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                                 "--workers", str(workers), "--log-level", "warning"], stderr=log, text=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc=proc, detail=lambda: (log.seek(0), log.read())[1])
        wait_until(lambda: len(listening(proc, port)) == workers, timeout=30)
        return proc, url, port

    yield start
    for proc in procs:
        stop_process(proc)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The supervisor's live worker processes (not multiprocessing's resource
    tracker; not a killed one the supervisor has yet to reap, a zombie)."""
    found = []
    for child in psutil.Process(proc.pid).children():
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:  # gone, or a zombie (ZombieProcess is one)
            pass
    return found


def listening(proc: subprocess.Popen, port: int) -> set[int]:
    """Pids of the workers with a listening socket of their own on ``port``."""
    pids = set()
    for worker in workers(proc):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in worker.net_connections("tcp")):
                pids.add(worker.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def accepted(proc: subprocess.Popen, port: int) -> Counter[int]:
    """Established connections to ``port``, by the worker pid that accepted them."""
    counts: Counter[int] = Counter()
    for worker in workers(proc):
        for c in worker.net_connections("tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port:
                counts[worker.pid] += 1
    return counts


def test_few_keep_alive_connections_spread_over_both_workers(serve):
    proc, url, port = serve(2)
    assert len(listening(proc, port)) == 2  # a socket each, not one shared
    clients = [httpx.Client(base_url=url) for _ in range(16)]
    try:
        for client in clients:  # one keep-alive connection each, all held open
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        wait_until(lambda: sum(accepted(proc, port).values()) == 16)
        counts = accepted(proc, port)
        assert len(counts) == 2, counts  # 2 ** -15 that the hash puts all 16 on one
        for client in clients:  # and each connection keeps serving
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    finally:
        for client in clients:
            client.close()


def test_a_killed_worker_is_started_again(serve):
    proc, url, port = serve(2)
    before = {w.pid for w in workers(proc)}
    victim = min(before)
    psutil.Process(victim).kill()
    wait_until(lambda: len(listening(proc, port)) == 2 and victim not in listening(proc, port), timeout=30)
    after = {w.pid for w in workers(proc)}
    assert victim not in after and len(after) == 2
    for _ in range(20):  # new connections, whichever worker the kernel picks
        with httpx.Client(base_url=url) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert proc.poll() is None


def test_sigterm_stops_every_child(serve):
    proc, url, port = serve(2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len([c for c in children if "spawn_main" in " ".join(c.cmdline())]) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []  # no orphans: workers and multiprocessing's helpers alike
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_workers_stop_when_the_supervisor_is_killed(serve):
    proc, url, port = serve(2)
    children = workers(proc)
    proc.kill()  # no chance to stop them itself
    proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert alive == []


def test_a_busy_port_is_one_line_and_exit_2(tmp_path, comox_upstream):
    config = tmp_path / "comox.toml"
    config.write_text(f'auth = "none"\n[[models]]\nname = "chat"\n[[models.backends]]\nurl = "{comox_upstream.url}"\n')
    for reuseport in (False, True):  # another program; another SO_REUSEPORT server of this user
        with socket.socket() as taken:
            if reuseport:
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port",
                                     str(port), "--workers", "2"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"comox: cannot listen on 127.0.0.1:{port}: Address already in use\n"
        assert time.monotonic() - started < 30
