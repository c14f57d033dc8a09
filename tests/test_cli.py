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


# These configs are about the command line, not keys (tests/test_keys.py): no
# authentication, or one key when nothing here calls the API.
NO_AUTH = 'auth = "none"\n'
A_KEY = f'[[keys]]\nid = "ops"\nkey_sha256 = "{"0" * 64}"\n'


@pytest.fixture
def config(tmp_path, comox_upstream):
    path = tmp_path / "comox.toml"
    path.write_text(f'{NO_AUTH}[[models]]\nname = "chat"\n[[models.backends]]\nurl = "{comox_upstream.url}"\n')
    return path


def comox(*args, env=None, timeout=60):
    """Run ``comox ARGS`` to its end, as a user would."""
    return subprocess.run([sys.executable, "-m", "comox.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


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
    result = comox("serve", "-c", str(path))
    assert result.returncode != 0
    assert "models[0].backends[0].max_concurrency: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_comox_plugins_lists_versions_and_hooks():
    result = comox("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["openai"]["distribution"] == "comox"
    assert plugins["openai"]["hooks"] == ["comox_backend_types"]
    assert plugins["round_robin"]["hooks"] == ["comox_routing_policies"]
    text = comox("plugins").stdout
    assert "openai" in text and "comox_backend_types" in text


def test_version():
    from comox import __version__

    result = comox("--version")
    assert (result.returncode, result.stdout) == (0, f"comox {__version__}\n")


@pytest.mark.parametrize("command, defaults", [
    ("serve", ["-c FILE, --config FILE", "default: $COMOX_CONFIG, else the embedded gemma-3-270m model",
               "--host HOST", "default: 127.0.0.1", "--port PORT", "default: 8000", "--workers N", "default: 1",
               "--log-level", "default: info", "--access-log", "default: off"]),
    ("check", ["-c FILE, --config FILE", "default: $COMOX_CONFIG, else the embedded gemma-3-270m model",
               "--json", "default: one line per backend"]),
    ("plugins", ["--json", "default: one line per plugin"]),
])
def test_help_shows_every_default(command, defaults):
    result = comox(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines to the terminal's width
    for expected in defaults:
        assert expected in text


def write_config(tmp_path, groups):
    """A config file of ``{group: [(backend name, url), ...]}``."""
    lines = [A_KEY]
    for group, backends in groups.items():
        lines.append(f'[[models]]\nname = "{group}"')
        lines += [f'[[models.backends]]\nname = "{name}"\nurl = "{url}"' for name, url in backends]
    path = tmp_path / "comox.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


def test_check_reports_every_backend_of_every_group(tmp_path, comox_upstream):
    path = write_config(tmp_path, {"chat": [("live", comox_upstream.url), ("dead", dead_url())],
                                   "embed": [("live-too", comox_upstream.url)]})
    result = comox("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 3) for line in result.stdout.splitlines()]
    assert [row[:3] for row in rows] == [["chat", "live", "ok"], ["chat", "dead", "fail"], ["embed", "live-too", "ok"]]
    assert "ConnectError" in rows[1][3]
    assert result.stderr == ""


def test_check_fails_when_a_group_has_no_backend_that_answers(tmp_path, comox_upstream):
    path = write_config(tmp_path, {"chat": [("live", comox_upstream.url)], "gone": [("dead", dead_url())]})
    result = comox("check", "-c", str(path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(g["name"], g["ok"], [(b["name"], b["verdict"]) for b in g["backends"]]) for g in report["groups"]] == [
        ("chat", True, [("live", "ok")]),
        ("gone", False, [("dead", "fail")]),
    ]
    assert result.stderr == "comox: no backend answered for gone\n"


def test_check_reads_comox_config(tmp_path, comox_upstream):
    path = write_config(tmp_path, {"from-env": [("live", comox_upstream.url)]})
    result = comox("check", "--json", env={"COMOX_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert [g["name"] for g in json.loads(result.stdout)["groups"]] == ["from-env"]


def test_check_on_a_bad_config_says_why_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f'{NO_AUTH}[[models]]\nname = "chat"\npolicy = "no-such-policy"\n[[models.backends]]\nurl = "http://127.0.0.1:9"\n')
    result = comox("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("comox: configuration error: models[0].policy: unknown routing policy 'no-such-policy'")
    assert result.stderr.count("\n") == 1


def test_serve_on_a_busy_port_says_so_before_serving(config):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = comox("serve", "-c", str(config), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr == f"comox: cannot listen on 127.0.0.1:{port}: Address already in use\n"


COUNTING_PLUGIN = """
import os, sys
import comox

@comox.hookimpl
def comox_routing_policies():
    # called once per gateway built
    print(f"counting plugin: gateway built, COMOX_CONFIG={os.environ.get('COMOX_CONFIG')}", file=sys.stderr, flush=True)
    return {}
"""


@pytest.fixture
def plugin_env(tmp_path):
    """``plugin_env(name, source)``: install a one-module plugin distribution
    (entry point ``name`` in the ``comox`` group) in a folder; returns the
    environment that puts that folder on the path of a process."""
    site = tmp_path / "site"

    def install(name, source):
        info = site / f"comox_{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: comox-{name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[comox]\n{name} = comox_{name}\n")
        (site / f"comox_{name}.py").write_text(source)
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    return install


BROKEN_PLUGIN = """
import comox

class Broken:
    settings_model = comox.BackendSettings

    def __init__(self, settings):
        self.name = settings.name

    async def startup(self):
        raise RuntimeError("no GPU here")

    async def handle(self, request):
        raise comox.BackendUnavailable("never started")

    async def aclose(self):
        pass

@comox.hookimpl
def comox_backend_types():
    return {"broken": Broken}
"""


def test_check_reports_a_gateway_that_fails_to_start(tmp_path, plugin_env):
    path = tmp_path / "comox.toml"
    path.write_text(f'{NO_AUTH}[[models]]\nname = "chat"\n[[models.backends]]\nname = "b"\ntype = "broken"\n')
    result = comox("check", "-c", str(path), env=plugin_env("broken", BROKEN_PLUGIN))
    assert result.returncode == 1
    assert result.stderr == "comox: the gateway failed to start: RuntimeError: no GPU here\n"


@pytest.mark.parametrize("workers, built", [(1, 1), (2, 3)])  # with workers: one check, then one gateway per worker
def test_serve_builds_the_gateway_once_per_process_and_leaves_the_environment_alone(
        run_server, config, plugin_env, workers, built):
    port = free_port()
    env = {**plugin_env("counting", COUNTING_PLUGIN), "COMOX_CONFIG": ""}
    proc = run_server([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                       "--workers", str(workers)], env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    assert chat(url) == "hello from upstream"
    stop_process(proc)
    log = proc.stderr.read()
    assert log.count("counting plugin: gateway built, COMOX_CONFIG=\n") == built, log
    assert log.count("counting plugin") == built
    assert log.index(f"Comox serving on http://127.0.0.1:{port}/v1") > log.index("counting plugin")


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
    path.write_text(f'{NO_AUTH}[server]\ntune_gc = {str(tune).lower()}\n[[models]]\nname = "chat"\n'
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

    app = create_app(Settings(auth="none", models=[{"name": "chat", "backends": [{"url": comox_upstream.url}]}]))
    seen = run_lifespan_startup(app)
    assert seen["startup"] == "lifespan.startup.complete" and seen["frozen"] == 0
