import openai
import pytest

from comox.testing import StandInUpstream


@pytest.fixture
def client_for():
    """``client_for(server, prefix="")``: the official OpenAI SDK pointed at a gateway."""

    def make(server, prefix: str = "") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.url}{prefix}/v1", api_key="sk-client-secret", max_retries=0, timeout=30)

    return make


@pytest.fixture
def upstreams():
    """``upstreams(name, **options)``: start named stand-in upstreams; all stopped at teardown."""
    started = []

    def make(name, **kwargs):
        upstream = StandInUpstream(name, **kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()
