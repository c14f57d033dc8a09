"""The core's side of failover (issue 13): when comox_failover is asked and
with which trigger, data that must stay local never reaching it, the route
header, and model aliases."""

import httpx

import comox
from comox.testing import Fault, free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Cloud:
    """A failover plugin that records every call and answers."""

    def __init__(self):
        self.calls = []

    @comox.hookimpl
    def comox_failover(self, request, trigger):
        self.calls.append((request.model_group, trigger, request.local_only))
        return comox.BackendResponse(200, body=b'{"answered_by": "cloud"}')


class LocalOnlyKey:
    @comox.hookimpl
    def comox_authenticate(self, request):
        if request.header(b"authorization") == b"Bearer local":
            return comox.Principal(key_id="local", local_only=True)
        return comox.Principal(key_id="anyone")


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


def serve(comox_serve, backends, cloud, **group):
    return comox_serve({"models": [{"name": "m", "backends": backends, **group}]}, plugins=[cloud, LocalOnlyKey()])


def test_capacity_when_no_backend_is_in_rotation(comox_serve):
    cloud = Cloud()
    server = serve(comox_serve, [{"url": dead_url(), "health_check": {"enabled": False}}], cloud)
    server.app.gateway.backends()[0].set_draining(True)
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and reply.json() == {"answered_by": "cloud"}
    assert reply.headers["x-comox-route"] == "failover"
    assert cloud.calls == [("m", "capacity", False)]


def test_error_when_every_attempt_failed(comox_serve):
    cloud = Cloud()
    server = serve(comox_serve, [{"url": dead_url(), "health_check": {"enabled": False}}], cloud)
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and cloud.calls == [("m", "error", False)]


def test_busy_answers_fail_over_instead_of_reaching_the_client(comox_serve, upstreams):
    cloud = Cloud()
    busy = upstreams("busy")
    busy.faults.extend([Fault(status=503)] * 2)
    server = serve(comox_serve, [{"url": busy.url}], cloud)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).json() == {"answered_by": "cloud"}


def test_a_local_answer_never_fails_over(comox_serve, upstreams):
    cloud = Cloud()
    local = upstreams("local")
    server = serve(comox_serve, [{"url": local.url}], cloud)
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and reply.headers["x-comox-route"] == "local" and not cloud.calls


def test_data_that_must_stay_local_never_reaches_failover(comox_serve):
    cloud = Cloud()
    dead = [{"url": dead_url(), "health_check": {"enabled": False}}]
    server = serve(comox_serve, dead, cloud)
    by_key = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer local"})
    by_header = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"x-comox-local-only": "true"})
    sovereign = serve(comox_serve, dead, cloud, sovereign=True)
    by_group = httpx.post(f"{sovereign.url}/v1/chat/completions", json=CHAT)
    for reply in (by_key, by_header, by_group):
        assert reply.status_code == 503 and reply.headers["retry-after"]
        error = reply.json()["error"]
        assert error["code"] == "local_capacity_exhausted" and "must stay local" in error["message"]
    assert cloud.calls == []
    # A request cannot lift its key's restriction.
    lifted = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT,
                        headers={"authorization": "Bearer local", "x-comox-local-only": "false"})
    assert lifted.status_code == 503 and cloud.calls == []


def test_aliases_reach_their_group_and_are_listed(comox_serve, upstreams):
    local = upstreams("local")
    server = comox_serve({"models": [{"name": "chat", "aliases": ["claude-sonnet-4-5"], "backends": [{"url": local.url}]}]})
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "claude-sonnet-4-5"})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "hello from local"
    listed = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert listed == ["chat", "claude-sonnet-4-5"]
    assert httpx.get(f"{server.url}/v1/models/claude-sonnet-4-5").status_code == 200


def test_an_alias_may_not_reuse_a_name():
    import pytest

    with pytest.raises(Exception, match="aliases\\[0\\]: model name 'a' is used twice"):
        comox.Settings(auth="none", models=[{"name": "a", "backends": [{"url": "http://x"}]},
                                            {"name": "b", "aliases": ["a"], "backends": [{"url": "http://y"}]}])


class Declines:
    @comox.hookimpl
    def comox_failover(self, request):
        return None


def test_a_busy_answer_stands_when_failover_declines(comox_serve, upstreams):
    busy = upstreams("busy")
    busy.faults.extend([Fault(status=429, headers={"retry-after": "7"})] * 2)
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": busy.url}]}]}, plugins=[Declines()])
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "7"
