"""Stored responses across gateway replicas: two gateways, each with its own
shared-state client, sharing one real ``redis-server`` through the ``redis``
plugin ([state] redis_url). A conversation goes on whichever replica each turn
lands on, JSON and streamed turns alike."""

import openai
import pytest

import comox
from tests.test_responses import Answer, client, scripted  # noqa: F401 (scripted is a fixture)


def config(tmp_path, upstream_url: str, redis_url: str):
    path = tmp_path / "comox.toml"
    path.write_text(f"""
auth = "none"

[[models]]
name = "m"

  [[models.backends]]
  url = "{upstream_url}"

[state]  # a table the redis plugin owns: read from the file only
redis_url = "{redis_url}"

[plugins.responses]
ttl_s = 3600
""")
    return comox.load_settings(path)


def test_previous_response_id_across_two_replicas_sharing_redis(comox_serve, redis_server, scripted, tmp_path):  # noqa: F811
    upstream = scripted()
    settings = config(tmp_path, upstream.url, redis_server.url)
    a, b = client(comox_serve(settings)), client(comox_serve(settings))

    upstream.answers.append(Answer(content="Nice to meet you, Ada."))
    first = a.responses.create(model="m", input="My name is Ada.")
    upstream.answers.append(Answer(content="Your name is Ada."))
    with b.responses.create(model="m", previous_response_id=first.id, input="What is my name?", stream=True) as stream:
        second = [e for e in stream if e.type == "response.completed"][0].response
    assert second.output_text == "Your name is Ada."
    assert upstream.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    third = a.responses.create(model="m", previous_response_id=second.id, input="Thanks!")
    assert [m["content"] for m in upstream.requests[-1]["body"]["messages"]] == [
        "My name is Ada.", "Nice to meet you, Ada.", "What is my name?", "Your name is Ada.", "Thanks!"]

    assert b.responses.retrieve(first.id).output_text == "Nice to meet you, Ada."
    assert a.responses.retrieve(second.id).previous_response_id == first.id
    assert [i.id for i in b.responses.input_items.list(third.id, order="asc")] == [
        i.id for i in a.responses.input_items.list(third.id, order="asc")]
    redis = redis_server.client()
    key = f"comox:v:responses:-:{first.id}"
    assert 3_590_000 < redis.pttl(key) <= 3_600_000  # ttl_s
    b.responses.delete(first.id)
    assert redis.exists(key) == 0
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)
