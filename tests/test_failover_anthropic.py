"""Cloud failover to the ``anthropic`` backend type (plugins/comox_failover
with plugins/comox_anthropic): the Anthropic stand-in speaking the real wire
format as the cloud, the official openai SDK as the client. Anthropic counts
cache reads and writes beside ``input_tokens``: each is priced once, at its
own price."""

import openai
import pytest
from anthropic.types import Usage

from comox.testing import Fault
from tests.anthropic_standin import AnthropicStandIn, Reply
from tests.secrets_check import secret
from tests.test_failover import HI, Keys, chat, client, clouds, cloud_backend, dead_backend, gateway_settings
from tests.test_failover_budgets import spend

__all__ = ["clouds"]  # the fixture, imported for these tests

KEY = secret("sk-ant-failover", "upstream key")
# The example prices for claude-sonnet-4-5 (examples only), and a cache write price.
PRICES = {"price_input_per_mtok": 3.0, "price_output_per_mtok": 15.0, "price_cached_input_per_mtok": 0.3,
          "price_cache_write_per_mtok": 3.75}
USAGE = Usage(input_tokens=600, cache_read_input_tokens=400, cache_creation_input_tokens=300, output_tokens=50)
COST = (600 * 3.0 + 400 * 0.3 + 300 * 3.75 + 50 * 15.0) / 1e6


@pytest.fixture
def claude(monkeypatch, clouds):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    standin = AnthropicStandIn(api_key=KEY).start()
    yield standin
    standin.stop()


def claude_backend(claude):
    return {"name": "claude", "type": "anthropic", "url": claude.url, "model": "claude-sonnet-4-5",
            "api_key_env": "ANTHROPIC_API_KEY", **PRICES}


def test_failover_to_anthropic_prices_reads_and_writes_once(comox_serve, claude):
    server = comox_serve(gateway_settings([dead_backend()], [claude_backend(claude)], trigger="error",
                                          failover={"max_tokens_cap": 256}), plugins=[Keys()])
    claude.replies.extend([Reply(usage=USAGE), Reply(usage=USAGE)])
    reply = chat(server)
    assert reply.headers["x-comox-route"] == "failover" and reply.headers["x-comox-backend"] == "claude"
    answer = reply.parse()
    assert answer.choices[0].message.content == "hello from claude" and answer.usage.prompt_tokens == 1300
    chunks = list(client(server).chat.completions.create(model="chat", messages=HI, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "hello from claude"
    assert chunks[-1].choices  # the usage chunk the gateway asked for is not the client's
    sent = claude.requests
    assert [request["body"]["max_tokens"] for request in sent] == [256, 256]
    assert sent[0]["headers"]["x-api-key"] == KEY and "team-a" not in str(sent[0]["headers"])
    day = spend(server)["day", None]
    assert day["spent_usd"] == pytest.approx(2 * COST, abs=1e-12) and day["reserved_usd"] == 0


def test_an_overloaded_anthropic_moves_to_the_next_cloud(comox_serve, claude, clouds):
    cloud = clouds()
    server = comox_serve(gateway_settings([dead_backend()], [claude_backend(claude), cloud_backend(cloud)],
                                          trigger="error", budgets={"cloud_usd_per_day": 1}), plugins=[Keys()])
    claude.replies.extend([Reply(status=529), Reply(error_after_events=0)])
    assert chat(server).headers["x-comox-backend"] == "cloud"
    streamed = client(server).chat.completions.create(model="chat", messages=HI, stream=True)
    assert [chunk.choices[0].delta.content for chunk in streamed] == ["tok0 ", "tok1 ", "tok2 "]
    assert len(claude.requests) == 2 and len(cloud.requests) == 2
    day = spend(server)["day", None]
    # Only the OpenAI-format cloud's answers are spent (1800 $/M each); claude's reservations came back.
    assert day["spent_usd"] == pytest.approx(2 * 0.0018, abs=1e-12) and day["reserved_usd"] == 0
    cloud.faults.append(Fault(status=503))
    claude.replies.append(Reply(status=529))
    with pytest.raises(openai.InternalServerError):
        chat(server)
    assert spend(server)["day", None]["reserved_usd"] == 0
