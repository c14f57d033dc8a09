"""A real ``redis-server`` (the Debian package) for tests: on an ephemeral
port, nothing saved to disk, killed and restarted on the same port at will."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from comox.testing import free_port, stop_process, wait_until


def redis_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, port: int | None = None):
        binary = redis_binary()
        assert binary is not None, "redis-server is not installed"
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="comox-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # a plain synchronous client, to look at what is stored
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=15, interval=0.02)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        import redis

        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """Gone at once, as a crashed or unreachable Redis is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def skip_reason() -> str | None:
    """Why tests that need redis-server cannot run here, or None. CI installs
    it (.ci/run), so there a missing binary is a failure, not a skip."""
    if redis_binary() is not None:
        return None
    reason = "redis-server is not installed (apt-get install redis-server; .ci/run installs it)"
    if os.environ.get("CI"):
        raise AssertionError(reason)
    return reason
