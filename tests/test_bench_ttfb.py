"""bench/ttfb.c, the instrument behind issue 5's TTFB figures: it must time the
first SSE event, not the whole response, and fail loudly on an answer that is
not a stream. Run against a real stand-in server on 127.0.0.1."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comox.testing import StandInUpstream

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "ttfb.c"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def ttfb(tmp_path_factory):
    binary = tmp_path_factory.mktemp("ttfb") / "ttfb"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def run(binary, url, body_file, concurrency=2, duration=0.6, max_requests=1000):
    host, port = url.removeprefix("http://").split(":")
    return subprocess.run([str(binary), host, port, "/v1/chat/completions", str(body_file), str(concurrency),
                           str(duration), str(max_requests)], capture_output=True, text=True, timeout=30)


def test_times_the_first_event_not_the_whole_stream(ttfb, tmp_path):
    # 6 events 50 ms apart: a whole response takes >= 250 ms, its first event comes at once.
    upstream = StandInUpstream(stream_chunks=6, chunk_delay=0.05).start()
    try:
        body = tmp_path / "stream.json"
        body.write_bytes(json.dumps({**CHAT, "stream": True}).encode())
        out = run(ttfb, upstream.url, body)
    finally:
        upstream.stop()
    assert out.returncode == 0, out.stderr  # any bad answer exits 1
    result = json.loads(out.stdout)
    # Each of the 2 connections reads every response to its end before the next,
    # so 0.6 s holds about 3 responses each, not hundreds.
    assert 2 <= result["n"] <= 10
    assert 0 < result["p50_ms"] < 100
    assert len(upstream.requests) == result["n"]


def test_an_answer_without_events_is_an_error(ttfb, tmp_path):
    upstream = StandInUpstream().start()
    try:
        body = tmp_path / "plain.json"
        body.write_bytes(json.dumps(CHAT).encode())  # not streamed: a JSON answer
        out = run(ttfb, upstream.url, body)
    finally:
        upstream.stop()
    assert out.returncode == 1
    assert "without an SSE event" in out.stderr
