"""The hook chain: specs, order, and each per-request stage end to end."""

import asyncio
import re
from pathlib import Path

import httpx
import pytest

import comox
from comox import hookspecs
from comox.errors import ConfigError
from comox.plugins import PENDING, HookChain, make_plugin_manager
from tests.plugins.recorder import Failover, Recorder
from comox.testing import free_port, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
DOCS = Path(__file__).parent.parent / "docs" / "plugin_hooks.md"


def test_every_hook_is_documented():
    specs = [name for name in dir(hookspecs) if name.startswith("comox_")]
    documented = set(re.findall(r"^## (comox_\w+)", DOCS.read_text(), re.M))
    assert specs and set(specs) == documented


def test_hooks_are_prefixed_and_documented_in_code():
    for name in dir(hookspecs):
        obj = getattr(hookspecs, name)
        if callable(obj) and hasattr(obj, "comox_spec"):
            assert name.startswith("comox_") and obj.__doc__


def test_misspelled_hook_fails_loudly():
    class Typo:
        @comox.hookimpl
        def comox_authenticat(self, request):
            pass

    with pytest.raises(ConfigError, match="comox_authenticat"):
        make_plugin_manager([Typo()])


def test_wrapper_on_per_request_hook_is_refused():
    class Wrapper:
        @comox.hookimpl(wrapper=True)
        def comox_admit(self, request, principal):
            yield

    with pytest.raises(ConfigError, match="cannot be a wrapper"):
        HookChain(make_plugin_manager([Wrapper()]))


def test_order_follows_pluggy_tryfirst_trylast(monkeypatch):
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")  # the essential plugins only: none admits
    order = []

    def plugin(label, **marks):
        class P:
            @comox.hookimpl(**marks)
            def comox_admit(self):
                order.append(label)

        return P()

    pm = make_plugin_manager([plugin("last", trylast=True), plugin("first", tryfirst=True), plugin("a"), plugin("b")])
    pm.hook.comox_admit(request=None, principal=None)  # pluggy's own order
    pluggy_order, order[:] = order[:], []
    asyncio.run(HookChain.each(HookChain(pm).comox_admit, request=None, principal=None))
    assert order == pluggy_order == ["first", "b", "a", "last"]


def test_stage_without_plugins_is_empty(monkeypatch):
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")  # the essential plugins only
    chain = HookChain(make_plugin_manager())
    assert chain.comox_cache_lookup == () and chain.comox_failover == ()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def gateway(comox_serve, comox_upstream, recorder):
    return comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[recorder])


def test_stages_run_in_order(gateway, recorder):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer let-me-in"})
    assert response.status_code == 200
    assert recorder.calls == ["authenticate", ("admit", "k1"), "cache_lookup", "cache_store"]
    [(status, backend, error)] = recorder.done
    assert status == 200 and backend.startswith("http://127.0.0.1:") and error is None


def test_admit_rejects_with_openai_error(gateway, recorder, comox_upstream):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "user": "over-limit"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"] == {"message": "too many requests for this key", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    assert comox_upstream.requests == []
    assert recorder.done == [(429, None, "RateLimited")]


def test_admit_may_rewrite_body(gateway, comox_upstream):
    httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "user": "rewrite"})
    assert comox_upstream.requests[-1]["body"]["user"] == "rewritten"


def test_cache_hit_skips_backend(gateway, comox_upstream):
    first = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT)
    second = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT)
    assert first.content == second.content
    assert len(comox_upstream.requests) == 1


def test_failover_only_when_local_capacity_is_exhausted(comox_serve, comox_upstream):
    dead = {"models": [{"name": "m", "backends": [{"url": f"http://127.0.0.1:{free_port()}"}]}]}
    server = comox_serve(dead, plugins=[Failover()])
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).json()
    assert answer == {"answered_by": "failover", "because": "no_backend_available"}
    live = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[Failover()])
    assert httpx.post(f"{live.url}/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"] == "hello from upstream"


def test_failover_respects_local_only(comox_serve):
    class LocalOnly:
        @comox.hookimpl
        def comox_authenticate(self, request):
            return comox.Principal(key_id="private", local_only=True)

    dead = {"models": [{"name": "m", "backends": [{"url": f"http://127.0.0.1:{free_port()}"}]}]}
    server = comox_serve(dead, plugins=[Failover(), LocalOnly()])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 503


def test_request_done_sees_every_api_request_even_those_refused_before_parsing(gateway, recorder, comox_upstream):
    # Parsed, then refused: the hook sees it, with the status the client got.
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    # Refused before the body was parsed, and GET /v1/models: seen too.
    assert httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.get(f"{gateway.url}/v1/chat/completions").status_code == 405
    assert httpx.post(f"{gateway.url}/v1/nowhere", json=CHAT).status_code == 404
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert recorder.done == [(404, None, "ModelNotFound"), (400, None, "InvalidRequest"), (405, None, "MethodNotAllowed"),
                             (404, None, "NotFound"), (200, None, None), (200, comox_upstream.url, None)]
    assert recorder.seen == [("chat/completions", "nope"), ("chat/completions", ""), ("chat/completions", ""),
                             ("", ""), ("models", ""), ("chat/completions", "m")]


class PartialArgs:
    """Implementations that declare a subset of a hook's arguments, in another order."""

    def __init__(self):
        self.got = []

    @comox.hookimpl
    def comox_admit(self, principal):
        self.got.append(("admit", principal.key_id))

    @comox.hookimpl
    def comox_request_done(self, error, status):
        self.got.append(("done", status, error))


def test_hooks_are_called_with_keywords_and_any_subset_of_arguments(comox_serve, comox_upstream):
    plugin = PartialArgs()
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[plugin])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert plugin.got == [("admit", None), ("done", 200, None)]


class BrokenStore:
    def __init__(self):
        self.done = []

    @comox.hookimpl
    def comox_cache_store(self, request, response):
        raise RuntimeError("the cache is down")

    @comox.hookimpl
    def comox_request_done(self, status, error):
        self.done.append((status, error))


def test_cache_store_failing_after_the_answer_went_out_changes_nothing(comox_serve, comox_upstream):
    plugin = BrokenStore()
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]}, plugins=[plugin])
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    # One response start, the whole body: before, a second http.response.start
    # broke the connection and the hook was told 429/500.
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello from upstream"
    wait_until(lambda: plugin.done)  # runs after the last byte went out
    assert plugin.done == [(200, None)]


class Quiet:
    """A plugin that says (comox_active) whether it has work on this gateway."""

    def __init__(self, active):
        self.active = active
        self.seen = []

    @comox.hookimpl
    def comox_active(self, gateway):
        if isinstance(self.active, Exception):
            raise self.active
        return self.active

    @comox.hookimpl
    def comox_startup(self, gateway):
        self.seen.append("startup")

    @comox.hookimpl
    def comox_admit(self, request):
        self.seen.append("admit")

    @comox.hookimpl
    def comox_request_done(self, status):
        self.seen.append(("done", status))


@pytest.mark.parametrize("active", [False, None, True])
def test_a_plugin_that_says_it_is_inactive_is_left_out_of_every_request(comox_serve, comox_upstream, active):
    plugin, control = Quiet(active), Quiet(None)
    server = comox_serve({"models": [{"name": "m", "backends": [{"url": comox_upstream.url}]}]},
                         plugins=[plugin, control])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    wait_until(lambda: ("done", 200) in control.seen)  # the request is over for every plugin
    if active is False:
        assert plugin.seen == ["startup"]  # its startup hook ran; no per-request one did
    else:
        assert plugin.seen == ["startup", "admit", ("done", 200)]


def test_a_failing_comox_active_is_a_configuration_error_naming_the_plugin():
    with pytest.raises(ConfigError, match="comox_active failed.*no config"):
        comox.build_gateway(comox.Settings(auth="none", models=[{"name": "m", "backends": [{"url": "http://127.0.0.1:9"}]}]),
                            plugins=[Quiet(RuntimeError("no config"))])


def test_failover_and_dashboard_leave_the_requests_of_a_config_that_does_not_use_them(monkeypatch):
    def chains(**group):
        gateway = comox.build_gateway(comox.Settings(auth="none", models=[
            {"name": "m", "backends": [{"url": "http://127.0.0.1:9"}], **group}]))
        return {impl.plugin for impl in gateway.hooks.comox_request_done} | {
            impl.plugin for impl in gateway.hooks.comox_failover}

    monkeypatch.delenv("COMOX_ADMIN_KEY", raising=False)
    idle = chains()
    assert "failover" not in idle and "dashboard" not in idle
    monkeypatch.setenv("COMOX_ADMIN_KEY", "an-admin-key-for-this-test-only")
    cloud = {"failover": {"backends": [{"name": "cloud", "type": "openai", "url": "http://127.0.0.1:9", "model": "x",
                                        "price_input_per_mtok": 1.0, "price_output_per_mtok": 1.0}]}}
    busy = chains(**cloud)
    assert {"failover", "dashboard"} <= busy


def test_the_compiled_calls_keep_each_first_and_each_logged_semantics(monkeypatch, caplog):
    """HookChain's per-hook functions (what the core calls) against the
    static each/first/each_logged they replace on the request path."""
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")  # the essential plugins only: these hooks are ours alone
    calls = []

    class Sync:
        @comox.hookimpl(tryfirst=True)
        def comox_cache_lookup(self, request):
            calls.append(("sync", request))
            return None

        @comox.hookimpl(tryfirst=True)
        def comox_request_done(self, request, status):
            calls.append(("done-sync", status))
            raise RuntimeError("observer broke")

        @comox.hookimpl
        def comox_admit(self, principal):  # a subset of the arguments; returns an awaitable
            async def later():
                calls.append(("admit-awaited", principal))
            return later()

    class Async:
        @comox.hookimpl
        async def comox_cache_lookup(self, request):
            calls.append(("async", request))
            return "hit"

        @comox.hookimpl(trylast=True)
        async def comox_request_done(self, request, status, backend, error):
            calls.append(("done-async", backend))

        @comox.hookimpl(tryfirst=True)
        async def comox_admit(self, request, principal):
            calls.append(("admit-first", request))
            raise comox.RateLimited("over")

    class Never:
        @comox.hookimpl(trylast=True)
        def comox_cache_lookup(self, request):  # after a non-None answer: not called
            calls.append(("never", request))

    chain = HookChain(make_plugin_manager([Sync(), Async(), Never()]))
    assert asyncio.run(chain.cache_lookup(request="r")) == "hit"
    assert calls == [("sync", "r"), ("async", "r")]
    calls.clear()
    with pytest.raises(comox.RateLimited):  # each: the first exception stops the rest
        asyncio.run(chain.admit(request="r", principal="p"))
    assert calls == [("admit-first", "r")]
    calls.clear()
    quiet = HookChain(make_plugin_manager([Sync()]))  # a sync implementation's awaitable is awaited
    asyncio.run(quiet.admit(request="r", principal="p"))
    assert calls == [("admit-awaited", "p")]
    calls.clear()
    with caplog.at_level("ERROR", logger="comox"):  # each_logged: logged, and the others still run
        assert asyncio.run(chain.request_done(request="r", status=200, backend="b", error=None)) is None
    assert calls == [("done-sync", 200), ("done-async", "b")]
    assert any("failed in a hook" in record.getMessage() for record in caplog.records)
    # The static forms give the same answers.
    calls.clear()
    assert asyncio.run(HookChain.first(chain.comox_cache_lookup, request="r")) == "hit"
    assert calls == [("sync", "r"), ("async", "r")]


def test_a_compiled_call_with_nothing_to_await_makes_no_coroutine(monkeypatch, caplog):
    """Plain implementations that return no awaitable are called at once: the
    call returns None (or a ``first`` hook's answer), not a coroutine; one that
    returns an awaitable hands the rest of the chain to a coroutine."""
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")
    calls = []

    class Plain:
        @comox.hookimpl
        def comox_cache_lookup(self, request):
            calls.append(("lookup", request))
            return "plain hit"

        @comox.hookimpl
        def comox_admit(self, request):
            calls.append(("admit", request))

        @comox.hookimpl
        def comox_request_done(self, status):
            calls.append(("done", status))
            raise RuntimeError("observer broke")

    class Later:
        @comox.hookimpl(tryfirst=True)
        def comox_admit(self, principal):
            async def later():
                calls.append(("later", principal))
            return later() if principal == "wait" else None

    chain = HookChain(make_plugin_manager([Plain(), Later()]))
    assert chain.cache_lookup(request="r") == "plain hit"
    assert chain.admit(request="r", principal="p") is None
    with caplog.at_level("ERROR", logger="comox"):
        assert chain.request_done(request="r", status=200, backend=None, error=None) is None
    assert any("failed in a hook" in record.getMessage() for record in caplog.records)
    assert calls == [("lookup", "r"), ("admit", "r"), ("done", 200)]
    calls.clear()
    pending = chain.admit(request="r", principal="wait")  # Later's awaitable: the rest waits for it
    assert type(pending) is PENDING and calls == []
    asyncio.run(pending)
    assert calls == [("later", "wait"), ("admit", "r")]


def test_an_answer_is_awaited_whenever_it_is_awaitable_and_a_plain_class_is_checked_once(monkeypatch):
    """The compiled call remembers the classes it found not awaitable (the ABC
    check once per class, not per request), never an awaitable one."""
    from comox import plugins

    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")
    monkeypatch.setattr(plugins, "_PLAIN", set())
    checked = []
    real = plugins.inspect.isawaitable
    monkeypatch.setattr(plugins.inspect, "isawaitable", lambda value: checked.append(type(value)) or real(value))

    class Answer:
        pass

    class Ticket:  # awaitable, not a coroutine
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return "awaited"

    results = iter([Answer(), Ticket(), Answer(), Ticket()])

    class Plain:
        @comox.hookimpl
        def comox_cache_lookup(self, request):
            return next(results)

    chain = HookChain(make_plugin_manager([Plain()]))
    answers = [chain.cache_lookup(request="r") for _ in range(4)]
    assert [type(answer) for answer in answers] == [Answer, PENDING, Answer, PENDING]
    assert [asyncio.run(answers[i]) for i in (1, 3)] == ["awaited", "awaited"]
    assert checked == [Answer, Ticket, Ticket]  # Answer once: remembered as plain; Ticket each time
    assert plugins._PLAIN == {Answer}


def test_an_implementation_is_given_the_arguments_it_declares_in_its_own_order(monkeypatch):
    """Matched by name, passed in the implementation's order (a positional-only
    parameter too, as pluggy passes them)."""
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "")
    seen = []

    class Reordered:
        @comox.hookimpl
        def comox_request_done(self, error, status, request, /):
            seen.append(("done", error, status, request))

        @comox.hookimpl
        def comox_admit(self, principal, request):
            seen.append(("admit", principal, request))

    chain = HookChain(make_plugin_manager([Reordered()]))
    assert chain.request_done(request="r", status=200, backend="b", error="e") is None
    assert chain.admit(request="r", principal="p") is None
    asyncio.run(HookChain.each(chain.comox_admit, request="r2", principal="p2"))  # the static form too
    assert seen == [("done", "e", 200, "r"), ("admit", "p", "r"), ("admit", "p2", "r2")]
