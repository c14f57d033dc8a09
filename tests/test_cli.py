"""The command line, run as a user would: real processes on loopback ports."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from comox.testing import free_port, stop_process, wait_for_http


def wait_healthy(proc, url):
    wait_for_http(f"{url}/healthz", proc=proc, detail=proc.stderr.read)


@pytest.fixture
def run_server():
    procs = []

    def start(args, env=None):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.fixture
def config(tmp_path, comox_upstream):
    path = tmp_path / "comox.toml"
    path.write_text(f'[[models]]\nname = "chat"\n[[models.backends]]\nurl = "{comox_upstream.url}"\n')
    return path


def chat(url):
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_comox_serve(run_server, config):
    port = free_port()
    proc = run_server([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    assert chat(url) == "hello from upstream"


@pytest.mark.parametrize("factory", ["comox.cli:serve_app", "comox.app:create_app"])
def test_uvicorn_factory_reads_comox_config(run_server, config, factory):
    port = free_port()
    proc = run_server(
        [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1", "--port", str(port)],
        env={"COMOX_CONFIG": str(config)},
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    assert chat(url) == "hello from upstream"


def test_bad_config_stops_startup_with_named_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[models]]\nname = "chat"\n[[models.backends]]\nurl = "http://127.0.0.1:9"\nmax_concurrency = -1\n')
    result = subprocess.run([sys.executable, "-m", "comox.cli", "serve", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "models[0].backends[0].max_concurrency: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_comox_plugins_lists_versions_and_hooks():
    result = subprocess.run([sys.executable, "-m", "comox.cli", "plugins", "--json"], capture_output=True, text=True, check=True, timeout=60)
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["openai"]["distribution"] == "comox"
    assert plugins["openai"]["hooks"] == ["comox_backend_types"]
    assert plugins["round_robin"]["hooks"] == ["comox_routing_policies"]
    text = subprocess.run([sys.executable, "-m", "comox.cli", "plugins"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "openai" in text and "comox_backend_types" in text


def run_lifespan_startup(app):
    """Drive an ASGI app through lifespan startup and shutdown in-process; return
    the message startup answered with and the GC state seen right after it."""
    import asyncio
    import gc

    async def drive():
        inbox = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        seen = {}

        async def send(message):
            if message["type"].startswith("lifespan.startup"):
                seen["startup"] = message["type"]
                seen["frozen"] = gc.get_freeze_count()
                seen["threshold"] = gc.get_threshold()[0]

        await app({"type": "lifespan"}, inbox.get, send)
        return seen

    return asyncio.run(drive())


@pytest.fixture
def restore_gc():
    import gc

    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.parametrize("tune", [True, False])
def test_serve_app_tunes_the_gc_of_the_process_it_owns(tmp_path, monkeypatch, restore_gc, comox_upstream, tune):
    import gc

    from comox.app import GC_GEN0_THRESHOLD
    from comox.cli import serve_app

    path = tmp_path / "comox.toml"
    path.write_text(f'[server]\ntune_gc = {str(tune).lower()}\n[[models]]\nname = "chat"\n'
                    f'[[models.backends]]\nurl = "{comox_upstream.url}"\n')
    monkeypatch.setenv("COMOX_CONFIG", str(path))
    before = gc.get_threshold()[0]
    seen = run_lifespan_startup(serve_app())
    assert seen["startup"] == "lifespan.startup.complete"
    if tune:
        assert seen["frozen"] > 1000 and seen["threshold"] == GC_GEN0_THRESHOLD
    else:
        assert seen["frozen"] == 0 and seen["threshold"] == before


def test_create_app_leaves_the_gc_of_its_host_alone(monkeypatch, restore_gc, comox_upstream):
    from comox import Settings, create_app

    app = create_app(Settings(models=[{"name": "chat", "backends": [{"url": comox_upstream.url}]}]))
    seen = run_lifespan_startup(app)
    assert seen["startup"] == "lifespan.startup.complete" and seen["frozen"] == 0
