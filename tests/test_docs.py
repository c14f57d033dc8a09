"""What the plugin docs say is true.

Convention (docs/writing_plugins.md, plugin_hooks.md, routing.md): a fenced block that
follows the line ``<!-- example: NAME -->`` is a complete example. A ``python``
one is a whole plugin module: it is exec'd into a fresh module named as the
docs name the plugin (so its ``[plugins.<name>]`` table is the documented one),
registered on a real gateway (``comox_serve``, uvicorn, real HTTP against the
``comox_upstream`` stand-in), and its test asserts what the page says it does.
A ``toml`` block with the same NAME is the config the page shows for it, and
the test uses that config. A ``python`` block that is not complete is marked
``<!-- fragment -->``. Also here: every name of ``comox.__all__`` is documented,
and the tables of the docs match the code they describe.
"""

import ast
import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import math
import re
import sys
import tomllib
import types
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

import comox
from comox import hookspecs
from comox.plugins import make_plugin_manager
from comox.testing import Fault, ServerThread, free_port, wait_until

DOCS = Path(__file__).parent.parent / "docs"
PAGES = ("writing_plugins.md", "plugin_hooks.md", "routing.md")
BLOCK = re.compile(r"^<!-- (?:example: (?P<name>\w+)|(?P<fragment>fragment)) -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.M | re.S)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def page(name: str) -> str:
    return (DOCS / name).read_text()


def blocks() -> dict[tuple[str, str], str]:
    """(example name, language) → code, over both pages."""
    found: dict[tuple[str, str], str] = {}
    for name in PAGES:
        for match in BLOCK.finditer(page(name)):
            if match["name"]:
                key = (match["name"], match["lang"])
                assert key not in found, f"two {key[1]} examples named {key[0]}"
                found[key] = match["code"]
    return found


EXAMPLES = blocks()
PYTHON = sorted(name for name, lang in EXAMPLES if lang == "python")


@pytest.fixture
def example():
    """``example(name, module_name)``: exec the python example ``name`` into a
    fresh module called ``module_name`` (the plugin's name) and return it."""
    saved: dict[str, types.ModuleType | None] = {}

    def load(name: str, module_name: str) -> types.ModuleType:
        module = types.ModuleType(module_name)
        saved.setdefault(module_name, sys.modules.get(module_name))
        sys.modules[module_name] = module
        exec(compile(EXAMPLES[name, "python"], f"<docs example {name}>", "exec"), module.__dict__)
        return module

    yield load
    for module_name, previous in saved.items():
        if previous is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = previous


def config(name: str) -> dict:
    """The documented TOML of example ``name``, parsed."""
    return tomllib.loads(EXAMPLES[name, "toml"])


def keyless(**keys) -> comox.Settings:
    """Settings with ``auth = "none"``, for a gateway built without a server (as
    ``comox_serve`` does for a dict): with ``auth = "keys"`` the ``keys`` plugin
    refuses a config with model groups, no keys and no other plugin that
    authenticates."""
    return comox.Settings(**{"auth": "none", **keys})


def one_model(url: str, group: str = "m", **backend) -> dict:
    """A model group ``group`` with one backend at ``url`` (``backend``: its other keys)."""
    return {"name": group, "backends": [{"url": url, **backend}]}


# -- the convention itself ---------------------------------------------------


def test_every_python_block_is_an_example_or_a_fragment():
    for name in PAGES:
        text = page(name)
        for match in re.finditer(r"^```python$", text, re.M):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            assert re.fullmatch(r"<!-- (example: \w+|fragment) -->", before), f"{name}: unmarked python block after {before!r}"
    assert len(PYTHON) >= 10


def test_every_example_is_tested_here():
    source = Path(__file__).read_text()
    tested = set(re.findall(r'example\("(\w+)"', source))
    assert tested == set(PYTHON)
    assert {name for name, lang in EXAMPLES if lang == "toml"} <= tested


def _comox_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "comox"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "comox":
            found.append(node.module)
            if node.module == "comox":
                found += [f"comox.{alias.name}" for alias in node.names if alias.name not in comox.__all__]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "comox":
            if node.attr not in comox.__all__:
                found.append(f"comox.{node.attr}")
    return found


@pytest.mark.parametrize("name", PYTHON)
def test_examples_use_only_the_public_api(name):
    """Plugin code imports only ``comox`` (its ``__all__``); a test may use ``comox.testing``."""
    allowed = {"comox", "comox.testing"} if name == "testing" else {"comox"}
    used = _comox_imports(ast.parse(EXAMPLES[name, "python"]))
    assert "comox" in used and set(used) <= allowed, used


@pytest.mark.parametrize("name", comox.__all__)
def test_every_public_name_is_documented(name):
    """As code: `name`, `comox.name`, `name(...)`, or comox.name in a code block."""
    text = "\n".join(path.read_text() for path in sorted(DOCS.rglob("*.md")))
    name = re.escape(name)
    assert re.search(rf"`(comox\.)?{name}[`(]|comox\.{name}(?!\w)", text), f"{name} is in no page of docs/"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("hook", [name for name in dir(hookspecs) if name.startswith("comox_")])
def test_each_hook_section_gives_arguments_and_whether_it_may_be_async(hook):
    section = _section(page("plugin_hooks.md"), f"## {hook}")
    spec = getattr(make_plugin_manager().hook, hook).spec
    for arg in spec.argnames:
        assert f"\n- `{arg}` — " in section, f"{hook}: argument {arg} is not documented"
    may_be_async = "May be `async def`" in section
    assert may_be_async != ("Plain `def` only" in section), f"{hook}: say whether it may be async"
    per_request = hook in hookspecs.PER_REQUEST_HOOKS
    assert may_be_async == (per_request or hook in ("comox_startup", "comox_shutdown"))
    assert section.count("*per request*" if per_request else "*startup*") == 1


def test_the_error_tree_matches_the_classes():
    text = page("writing_plugins.md")
    tree = text[text.index("```\nComoxError") + 4 : text.index("```", text.index("```\nComoxError") + 4)]
    parents: list[tuple[int, type]] = []
    seen = set()
    for line in tree.splitlines():
        match = re.match(r"^([│├└─ ]*)(\w+)\s+(\d{3})\s*(\w+_error|service_unavailable)?(?:.*?code (\w+))?", line)
        if not match:
            continue
        depth, name, status = len(match[1]), match[2], int(match[3])
        cls = getattr(comox, name)
        assert cls.status == status, name
        if match[4]:
            assert cls.type == match[4], name
        if match[5]:
            assert cls.code == match[5], name
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if parents:
            assert cls.__bases__ == (parents[-1][1],), name
        parents.append((depth, cls))
        seen.add(name)
    errors = {name for name in comox.__all__ if isinstance(getattr(comox, name), type) and issubclass(getattr(comox, name), comox.ComoxError)}
    assert seen == errors


def _first_column(text: str, anchor: str) -> set[str]:
    """The names in the first column of the table that follows ``anchor``."""
    rest = text[text.index(anchor) :]
    table = rest[rest.index("\n|") : rest.index("\n\n", rest.index("\n|"))]
    names = set()
    for row in table.strip().splitlines()[2:]:
        for cell in re.findall(r"`([\w.]+)(?:\([^`]*\))?`", row.split("|")[1]):
            names.add(cell)
    return names


def _members(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


def test_the_view_tables_are_exactly_what_a_policy_may_read():
    text = page("writing_plugins.md")
    assert _first_column(text, "Of a model group (`comox.GroupView`)") == _members(comox.GroupView)
    assert _first_column(text, "Of a backend (`comox.BackendView`") == _members(comox.BackendView)


def test_the_request_table_names_real_attributes():
    request = comox.GatewayRequest(id="r", endpoint="chat/completions", path="/v1/chat/completions", headers=[])
    documented = _first_column(page("writing_plugins.md"), "Every per-request hook, routing policy and backend gets")
    assert documented and all(hasattr(request, name) for name in documented)
    # and every attribute the class documents for plugins is in the table
    docstring = comox.GatewayRequest.__doc__
    docstring_names = set(re.findall(r"\* ``(\w+)``", docstring)) | set(re.findall(r"``(\w+)`` —", docstring))
    assert {"id", "method", "path", "raw", "model", "stream", "slot"} <= docstring_names
    assert docstring_names <= documented


# -- writing_plugins.md ------------------------------------------------------


def test_block_user(example, comox_serve, comox_upstream):
    plugin = example("block_user", "blocklist")
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[plugin])
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "user": "mallory"})
    assert response.status_code == 403
    documented = re.search(r"gets `403` with\n`(\{.*?\})`", page("writing_plugins.md"))[1]
    assert response.json() == json.loads(documented)
    assert comox_upstream.requests == []
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "user": "alice"}).status_code == 200


def test_custom_error(example, comox_serve, comox_upstream):
    errors = example("custom_error", "budget")

    class Spent:
        @comox.hookimpl
        def comox_admit(self):
            raise errors.BudgetExhausted("this key's monthly budget is spent", retry_after=3600)

    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[Spent()])
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert response.status_code == 402
    assert response.headers["retry-after"] == "3600"
    assert response.json() == {"error": {"message": "this key's monthly budget is spent", "type": "insufficient_quota",
                                         "param": None, "code": "budget_exhausted"}}


def test_api_keys(example, comox_serve, comox_upstream, monkeypatch):
    plugin = example("api_keys", "example_keys")
    documented = config("api_keys")
    assert documented["auth"] == "keys"
    assert documented["plugins"]["example_keys"]["clients"]["alice"]["sha256"] == hashlib.sha256(b"sk-alice-example").hexdigest()
    bob = hashlib.sha256(b"sk-bob-example").hexdigest()
    monkeypatch.setenv("COMOX_PLUGINS__EXAMPLE_KEYS__CLIENTS", '{"bob": {"sha256": "%s"}}' % bob)
    assert "`COMOX_PLUGINS__EXAMPLE_KEYS__CLIENTS=" in page("writing_plugins.md")
    settings = {**documented, "models": [one_model(comox_upstream.url, "chat"), one_model(comox_upstream.url, "chat-large", name="l"),
                                         one_model(comox_upstream.url, "other", name="o")]}
    server = comox_serve(settings, plugins=[plugin])
    url = f"{server.url}/v1/chat/completions"
    chat = {**CHAT, "model": "chat"}

    def auth(key):
        return {"authorization": f"Bearer {key}"} if key else {}

    def post(body, key=None, **kwargs):
        return httpx.post(url, json=body, headers=auth(key), **kwargs)

    def models(key=None):
        response = httpx.get(f"{server.url}/v1/models", headers=auth(key))
        return response.status_code, sorted(m["id"] for m in response.json().get("data", []))

    for key in (None, "sk-wrong", "sk-alice-example-and-more"):
        response = post(chat, key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    # Refused before the body is read: a body that would be 413 or 400 still gets 401.
    assert post(None, content=b"{not json").status_code == 401
    assert models() == (401, [])
    assert post(chat, "sk-alice-example").status_code == 200
    assert post({**chat, "model": "chat-large"}, "sk-alice-example").status_code == 200  # a glob pattern
    refused = post({**chat, "model": "other"}, "sk-alice-example")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert refused.json()["error"]["param"] == "model"
    assert models("sk-alice-example") == (200, ["chat", "chat-large"])
    assert httpx.get(f"{server.url}/v1/models/other", headers=auth("sk-alice-example")).status_code == 404
    assert post({**chat, "model": "other"}, "sk-bob-example").status_code == 200  # from the environment
    assert models("sk-bob-example") == (200, ["chat", "chat-large", "other"])
    assert len(comox_upstream.requests) == 3


def test_api_keys_settings_errors_are_one_line(example, comox_upstream):
    plugin = example("api_keys", "example_keys")
    text = page("writing_plugins.md")
    bad = {"example_keys": {"clients": {"alice": {"sha256": "abc"}}}}
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=[one_model(comox_upstream.url)], plugins=bad), plugins=[plugin])
    assert f"`comox: configuration error: {exc.value}`" in text
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=[one_model(comox_upstream.url)], plugins={"kyes": {}}), plugins=[plugin])
    assert str(exc.value).startswith("plugins.kyes: no loaded plugin named 'kyes' declares settings")
    assert "`plugins.kyes: no loaded plugin named 'kyes' declares settings`" in text


class KeyFromHeader:
    """Test double: the caller is whoever ``x-user`` names; no header, no caller."""

    @comox.hookimpl
    def comox_authenticate(self, request):
        user = request.header(b"x-user")
        return comox.Principal(key_id=user.decode()) if user else None


def test_ratelimit_owns_a_top_level_table(example, comox_serve, comox_upstream, tmp_path):
    plugin = example("ratelimit", "example_ratelimit")
    models = f'\n[[models]]\nname = "m"\n  [[models.backends]]\n  url = "{comox_upstream.url}"\n'
    path = tmp_path / "comox.toml"
    path.write_text(EXAMPLES["ratelimit", "toml"] + models)
    settings = comox.load_settings(path)
    assert settings.auth == "keys"  # the file's default: callers need a plugin to vouch for them
    server = comox_serve(settings, plugins=[plugin, KeyFromHeader()])
    url = f"{server.url}/v1/chat/completions"

    def post(user):
        return httpx.post(url, json=CHAT, headers={"x-user": user})

    first, second = post("alice"), post("alice")
    assert [first.status_code, second.status_code] == [200, 200]
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == ["1", "0"]
    third = post("alice")
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert 25 <= int(third.headers["retry-after"]) <= 31  # the bucket refills at two a minute
    assert third.headers["x-ratelimit-remaining-requests"] == "0"  # on the error too
    assert post("bob").status_code == 200  # per key
    assert len(comox_upstream.requests) == 3
    text = page("writing_plugins.md")
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(comox.load_settings(path))  # without the plugin
    assert f"`{exc.value}`" in text
    path.write_text(EXAMPLES["ratelimit", "toml"].replace("requests_per_minute", "requests_per_minut") + models)
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(comox.load_settings(path), plugins=[plugin])
    assert f"`{exc.value}`" in text


def test_concurrency(example, comox_serve, comox_upstream):
    plugin = example("concurrency", "example_concurrency")
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[plugin, KeyFromHeader()])
    url = f"{server.url}/v1/chat/completions"

    def post(user):
        return httpx.post(url, json=CHAT, headers={"x-user": user}, timeout=10)

    comox_upstream.faults.extend([Fault(delay=1.5), Fault(delay=1.5)])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(post, "alice") for _ in range(2)]
        wait_until(lambda: len(comox_upstream.requests) == 2)
        third = post("alice")
        assert third.status_code == 429 and third.json()["error"]["message"] == "more than 2 requests in flight"
        assert post("bob").status_code == 200  # per key
        assert [future.result().status_code for future in slow] == [200, 200]
    # Each released by comox_request_done; the refused one had taken nothing.
    state = server.app.gateway.shared_state
    wait_until(lambda: state._counters["example_concurrency:alice"][0] == 0)  # read only: the server's thread writes it
    assert post("alice").status_code == 200


def test_canned_backend(example, comox_serve):
    plugin = example("canned_backend", "canned")
    backend = config("canned_backend")["models"]["backends"][0]
    server = comox_serve({"models": [{"name": "m", "backends": [backend]}]}, plugins=[plugin])
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "open?"}]
    answer = client.chat.completions.create(model="m", messages=messages)
    assert answer.choices[0].message.content == "We are closed today."
    stream = client.chat.completions.create(model="m", messages=messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream).strip() == "We are closed today."
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="m", input="x")
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=[{"name": "m", "backends": [{"type": "canned", "replly": "x"}]}]), plugins=[plugin])
    assert f"(`{exc.value}`)" in page("writing_plugins.md")


class Engine:
    """A TGI-like engine: ``/health`` (200, or 503 when not ``healthy``) and,
    with ``metrics``, a Prometheus ``/metrics`` with its queue."""

    def __init__(self, metrics: bool):
        self.metrics = metrics
        self.healthy = True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        status, body = 404, b"not found"
        if scope["path"] == "/health":
            status, body = (200, b"ok") if self.healthy else (503, b"down")
        elif scope["path"] == "/metrics" and self.metrics:
            status, body = 200, b"# TYPE tgi_queue_size gauge\ntgi_queue_size 3\ntgi_batch_current_size 2\n"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})


def test_tgi_backend(example, comox_serve, comox_upstream):
    plugin = example("tgi_backend", "tgi")
    backend = {**config("tgi_backend")["models"]["backends"][0], "url": comox_upstream.url}
    server = comox_serve({"models": [{"name": "m", "backends": [backend]}]}, plugins=[plugin])
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={**CHAT, "max_tokens": 5000}).status_code == 200
    assert httpx.post(url, json={**CHAT, "max_tokens": 100}).status_code == 200
    assert [request["body"]["max_tokens"] for request in comox_upstream.requests if request["path"].endswith("completions")] == [2048, 100]


def test_tgi_backend_health_reports(example):
    plugin = example("tgi_backend", "tgi")
    with_metrics, without = Engine(metrics=True), Engine(metrics=False)
    with ServerThread(with_metrics, lifespan="off") as a, ServerThread(without, lifespan="off") as b:
        settings = {"models": [one_model(a.url, type="tgi", name="with-metrics"),
                               one_model(b.url, "n", type="tgi", name="without")]}
        gateway = comox.build_gateway(keyless(**settings), plugins=[plugin])
        try:
            assert asyncio.run(gateway.probe()) == [("with-metrics", "ok", "ok"), ("without", "ok", "ok (no /metrics)")]
            fleet = {backend["name"]: backend for backend in gateway.snapshot()["data"]}
            assert fleet["with-metrics"]["reported_load"]["waiting"] == 3
            assert fleet["with-metrics"]["reported_load"]["running"] == 2
            without.healthy = False
            assert asyncio.run(gateway.probe())[1] == ("without", "fail", "GET /health: HTTP 503")
        finally:
            asyncio.run(gateway.aclose())


def test_tagged_transport(example, comox_serve, comox_upstream):
    plugin = example("tagged_transport", "tagged")
    server = comox_serve({"models": [one_model(comox_upstream.url, type="tagged")]}, plugins=[plugin])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert comox_upstream.requests[-1]["headers"]["x-gateway"] == "comox"


def test_sticky_policy(example, comox_serve, upstreams):
    plugin = example("sticky_policy", "sticky")
    a, b = upstreams("a"), upstreams("b")
    group = {**config("sticky_policy")["models"][0],
             "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}
    server = comox_serve({"models": [group]}, plugins=[plugin])
    body = {**CHAT, "model": "chat"}
    for _ in range(3):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"x-backend": "b"}).status_code == 200
    assert (len(a.requests), len(b.requests)) == (0, 3)
    gateway = server.app.gateway
    wait_until(lambda: gateway.snapshot()["groups"]["chat"]["policy_stats"] == {"prompt_tokens": {"b": 15}})
    for _ in range(4):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200
    assert len(a.requests) + len(b.requests) == 7


def test_sticky_policy_refuses_unknown_options(example, comox_upstream):
    plugin = example("sticky_policy", "sticky")
    group = {**one_model(comox_upstream.url), "policy": "sticky", "policy_options": {"header": "x-pin", "bogus": 1}}
    with pytest.raises(comox.ConfigError, match=r"^models\[0\]\.policy_options: unknown option\(s\) for sticky: bogus$"):
        comox.build_gateway(keyless(models=[group]), plugins=[plugin])


def test_testing_example(example, comox_serve, comox_upstream):
    module = example("testing", "test_my_plugin")
    module.test_refuse(comox_serve, comox_upstream)
    assert len(comox_upstream.requests) == 2


# -- plugin_hooks.md ---------------------------------------------------------


def test_extra_route(example, comox_serve, comox_upstream):
    plugin = example("extra_route", "available")
    server = comox_serve({"models": [one_model(comox_upstream.url), one_model(comox_upstream.url, "n", name="n1")]},
                         plugins=[plugin])
    assert httpx.get(f"{server.url}/-/available").json() == {"m": 1, "n": 1}
    server.app.gateway.set_draining("n1", True)
    assert httpx.get(f"{server.url}/-/available").json() == {"m": 1, "n": 0}


class Stores:
    """Test double: the ids of the requests comox_cache_store is called for,
    after every other implementation."""

    def __init__(self):
        self.ids: list[str] = []

    @comox.hookimpl(trylast=True)
    def comox_cache_store(self, request):
        self.ids.append(request.id)


@pytest.fixture
def without_the_real_cache(monkeypatch):
    """The shipped ``cache`` plugin would answer (and store) these requests first."""
    monkeypatch.setenv("COMOX_BLOCK_PLUGINS", "cache")


def test_example_cache(example, comox_serve, comox_upstream, without_the_real_cache):
    plugin = example("example_cache", "example_cache")
    stores = Stores()
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[plugin, stores])
    url = f"{server.url}/v1/chat/completions"

    def post(rid, **body):
        return httpx.post(url, json={**CHAT, **body}, headers={"x-request-id": rid})

    first = post("first", temperature=0)
    wait_until(lambda: stores.ids == ["first"])  # stored after the client had its answer
    second = post("hit", temperature=0)
    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert "x-cache" not in first.headers and second.headers["x-cache"] == "hit"
    assert len(comox_upstream.requests) == 1
    post("warm-1", temperature=0.7)
    post("warm-2", temperature=0.7)
    post("stream-1", temperature=0, stream=True)
    post("stream-2", temperature=0, stream=True)
    assert len(comox_upstream.requests) == 5
    wait_until(lambda: "warm-2" in stores.ids)
    assert stores.ids == ["first", "warm-1", "warm-2"]  # never the hit, never a stream
    keys = list(server.app.gateway.shared_state._values)
    assert len(keys) == 1 and keys[0].startswith("example_cache:")  # the shared state holds it


class Broken:
    """Test double: fails first in the hooks whose failures are only logged."""

    @comox.hookimpl(tryfirst=True)
    def comox_cache_store(self):
        raise RuntimeError("store broke")

    @comox.hookimpl(tryfirst=True)
    def comox_request_done(self):
        raise RuntimeError("telemetry broke")


def test_a_failing_store_or_observer_is_logged_and_the_others_still_run(example, comox_serve, comox_upstream, caplog,
                                                                        without_the_real_cache):
    cache = example("example_cache", "example_cache")
    log = example("request_log", "request_log")
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[cache, log, Broken()])
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={**CHAT, "temperature": 0}).status_code == 200
    wait_until(lambda: log.statuses == Counter({("chat/completions", 200): 1}))
    wait_until(lambda: len(server.app.gateway.shared_state._values) == 1)
    assert httpx.post(url, json={**CHAT, "temperature": 0}).headers.get("x-cache") == "hit"
    text = page("plugin_hooks.md")
    assert "the other implementations of that hook still run" in text
    failures = {str(record.exc_info[1]) for record in caplog.records if record.exc_info and record.levelname == "ERROR"}
    assert failures == {"store broke", "telemetry broke"}


def test_small_state(example, comox_serve, comox_upstream):
    plugin = example("small_state", "small_state")
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[plugin])
    state = server.app.gateway.shared_state
    assert isinstance(state, comox.MemoryState) and isinstance(state, comox.SharedState)
    assert state.max_value_bytes == 64 * 1024 * 1024
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "state": "local", "started": True}
    # Without the plugin, the default: a MemoryState with the documented bound.
    default = comox.build_gateway(keyless(models=[one_model(comox_upstream.url)])).shared_state
    assert type(default) is comox.MemoryState and default.max_value_bytes == 256 * 1024 * 1024
    assert "`comox.MemoryState(*, clock=time.monotonic, max_value_bytes=256 * 1024 * 1024)`" in page("writing_plugins.md")


def test_shared_state_as_documented():
    state = comox.MemoryState(clock=lambda: now)
    now = 0.0
    take = functools.partial(state.take, "k", capacity=2, per_s=1 / 30)
    assert asyncio.run(take(1)) == comox.Bucket(True, 1, 30.0, 0.0)
    assert asyncio.run(take(1)).allowed
    refused = asyncio.run(take(1))
    assert not refused.allowed and refused.remaining == 0 and refused.retry_after_s == 30.0
    assert asyncio.run(take(3)).retry_after_s == math.inf  # more than the bucket holds
    assert asyncio.run(take(1, force=True)).allowed and asyncio.run(take(1, force=True)).remaining == 0
    add = functools.partial(state.add, "c", cap=2, ttl_s=60)
    assert [asyncio.run(add(1)) for _ in range(3)] == [(True, 1), (True, 2), (False, 2)]
    assert asyncio.run(add(-1)) == (True, 1)
    now = 61.0
    assert asyncio.run(add(0)) == (True, 0)  # forgotten ttl_s after its last change
    asyncio.run(state.set("v", b"x", ttl_s=10))
    assert asyncio.run(state.get("v")) == b"x" and asyncio.run(state.get("never")) is None
    now = 71.0
    assert asyncio.run(state.get("v")) is None


class LocalOnly:
    @comox.hookimpl
    def comox_authenticate(self, request):
        if request.header(b"x-local-only"):
            return comox.Principal(key_id="private", local_only=True)
        return None


def test_spill(example, comox_serve, comox_upstream, monkeypatch):
    plugin = example("spill", "spill")
    table = config("spill")["plugins"]
    assert table["spill"]["api_key_env"] == "OPENAI_API_KEY"
    table["spill"]["url"] = comox_upstream.url
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cloud")
    dead = one_model(f"http://127.0.0.1:{free_port()}")
    server = comox_serve({"models": [dead], "plugins": table}, plugins=[plugin, LocalOnly()])
    url = f"{server.url}/v1/chat/completions"
    answer = httpx.post(url, json=CHAT)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hello from upstream"
    [sent] = comox_upstream.requests
    assert sent["body"]["model"] == "gpt-4o-mini" and sent["headers"]["authorization"] == "Bearer sk-cloud"
    refused = httpx.post(url, json=CHAT, headers={"x-local-only": "1"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "local_capacity_exhausted"  # by the core
    assert len(comox_upstream.requests) == 1


def test_spill_without_a_url_lets_the_503_stand(example, comox_serve):
    plugin = example("spill", "spill")
    server = comox_serve({"models": [one_model(f"http://127.0.0.1:{free_port()}")]}, plugins=[plugin])
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_backend_available"


def test_request_log_sees_every_api_request(example, comox_serve, comox_upstream, caplog):
    plugin = example("request_log", "request_log")
    caplog.set_level("INFO", logger="comox.request_log")
    server = comox_serve({"models": [one_model(comox_upstream.url)]}, plugins=[plugin])
    assert httpx.post(f"{server.url}/v1/nowhere", json=CHAT).status_code == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    assert httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # not an API path: not seen
    expected = Counter({("unknown", 404): 1, ("models", 200): 1, ("chat/completions", 400): 1, ("chat/completions", 200): 1})
    wait_until(lambda: plugin.statuses == expected)
    assert any(record.getMessage().startswith("POST /v1/nowhere -> 404 NotFound") for record in caplog.records)


# -- names, listing and loading ------------------------------------------------


def test_comox_plugins_json_gives_the_names_config_uses(capsys):
    from comox.cli import main

    assert main(["plugins", "--json"]) == 0
    plugins = {plugin["name"]: plugin for plugin in json.loads(capsys.readouterr().out)}
    text = page("writing_plugins.md")
    for key in plugins["admin"]:
        assert f"`{key}`" in text
    assert plugins["llama_cpp_python"]["backend_types"] == ["llama-cpp-python"]
    assert plugins["round_robin"]["routing_policies"] == ["round_robin"] and plugins["round_robin"]["essential"]
    assert plugins["openai"]["essential"] and not plugins["admin"]["essential"]


def test_essential_plugins_cannot_be_left_out(monkeypatch):
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "admin")
    assert set(dict(make_plugin_manager().list_name_plugin())) == {"admin", "openai", "round_robin"}
    monkeypatch.delenv("COMOX_LOAD_PLUGINS")
    monkeypatch.setenv("COMOX_BLOCK_PLUGINS", "openai")
    with pytest.raises(comox.ConfigError, match="essential"):
        make_plugin_manager()


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed distribution whose entry point ``broken`` cannot be imported."""
    info = tmp_path / "comox_broken_doc_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: comox-broken-doc-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[comox]\nbroken = comox_broken_doc_plugin_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_broken_plugin_is_reported_by_name(broken_plugin, monkeypatch, capsys):
    from comox.cli import main

    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=[one_model("http://127.0.0.1:9")]))
    assert str(exc.value).startswith("plugin 'broken' failed to load: import of comox_broken_doc_plugin_missing raised ModuleNotFoundError(")
    assert str(exc.value).endswith("(fix or uninstall it, or set COMOX_BLOCK_PLUGINS=broken)")
    assert main(["plugins", "--json"]) == 0
    listed = {plugin["name"]: plugin for plugin in json.loads(capsys.readouterr().out)}
    assert listed["broken"]["error"].startswith("import of comox_broken_doc_plugin_missing raised")
    assert listed["openai"]["error"] is None and "admin" in listed
    monkeypatch.setenv("COMOX_BLOCK_PLUGINS", "broken")
    comox.build_gateway(keyless(models=[one_model("http://127.0.0.1:9")]))


# -- routing.md ----------------------------------------------------------------


def test_in_order_policy(example, comox_serve, upstreams):
    plugin = example("in_order", "in_order")
    a, b = upstreams("a"), upstreams("b")
    group = {"name": "m", "policy": "in_order", "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}
    server = comox_serve({"models": [group]}, plugins=[plugin])
    url = f"{server.url}/v1/chat/completions"
    assert [httpx.post(url, json=CHAT).status_code for _ in range(3)] == [200] * 3
    assert (len(a.requests), len(b.requests)) == (3, 0)
    a.faults.append(Fault(status=503))  # retried around: the next candidate
    assert httpx.post(url, json=CHAT).json()["choices"][0]["message"]["content"] == "hello from b"
    assert (len(a.requests), len(b.requests)) == (4, 1)
    server.app.gateway.set_draining("a", True)  # out of rotation
    assert httpx.post(url, json=CHAT).status_code == 200
    assert (len(a.requests), len(b.requests)) == (4, 2)


def _emitted_events() -> set[str]:
    """Every event name the code logs with ``emit("name", …)`` (or ``emit("a" if x else "b", …)``)."""
    names = set()
    for path in (Path(comox.__file__).parent).rglob("*.py"):
        for match in re.finditer(r'emit\(\s*"(\w+)"(?:\s+if\s+[\w.]+\s+else\s+"(\w+)")?', path.read_text()):
            names.update(name for name in match.groups() if name)
    return names


def test_the_fleet_events_table_lists_every_event_the_code_logs():
    documented = _first_column(page("routing.md"), "No line holds a key or prompt content.")
    assert documented == _emitted_events()
    assert {"backend_unhealthy", "backend_ejected", "request_retried", "model_group", "no_reachable_backend"} <= documented


def test_the_documented_log_lines_are_what_the_formatters_write():
    from comox.events import JsonFormatter, TextFormatter

    text = page("deployment.md")
    block = text[text.index("### Logs") :]
    block = block[block.index("```\n") + 4 : block.index("\n```", block.index("```\n") + 4)]
    text_line, json_line = block.splitlines()
    fields = json.loads(json_line)
    record = logging.LogRecord("comox.events", getattr(logging, fields["level"].upper()), __file__, 1, fields["message"], (), None)
    record.comox_event = {key: value for key, value in fields.items() if key not in ("time", "level", "logger", "message")}
    assert json.loads(JsonFormatter().format(record)) | {"time": fields["time"]} == fields
    written = TextFormatter().format(record)
    assert written.split(" ", 2)[2] == text_line.split(" ", 2)[2]  # all but the local time


def test_log_format_is_a_serve_flag(capsys):
    from comox.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--log-format {text,json}" in capsys.readouterr().out


class CheckedByDefault:
    """A backend type with a health check and no ``health_check_default``."""

    settings_model = comox.BackendSettings

    def __init__(self, settings):
        pass

    async def handle(self, request):
        raise comox.BackendUnavailable("never used")

    async def health_check(self, http):
        return comox.HealthReport(comox.OK)

    async def aclose(self):
        pass


class CheckedOnRequest(CheckedByDefault):
    health_check_default = False


class Types:
    @comox.hookimpl
    def comox_backend_types(self):
        return {"checked": CheckedByDefault, "on_request": CheckedOnRequest}


def test_health_checks_are_on_unless_a_type_or_the_config_says_otherwise(example):
    from comox.health import enabled

    canned = example("canned_backend", "canned")
    url = "http://127.0.0.1:9"
    backends = [{"name": "openai", "url": url}, {"name": "llamacpp", "type": "llamacpp", "url": url},
                {"name": "vllm", "type": "vllm", "url": url}, {"name": "checked", "type": "checked"},
                {"name": "on-request", "type": "on_request"},
                {"name": "asked", "type": "on_request", "health_check": {"enabled": True}},
                {"name": "off", "url": url, "health_check": {"enabled": False}},
                {"name": "in-process", "type": "canned"}]
    gateway = comox.build_gateway(keyless(models=[{"name": "m", "backends": backends}]), plugins=[Types(), canned])
    checked = {state.name for state in gateway.backends() if enabled(state)}
    assert checked == {"openai", "llamacpp", "vllm", "checked", "asked"}


def test_the_routing_example_config_is_valid():
    text = page("routing.md")
    documented = tomllib.loads(text[text.index("```toml\n") + 8 : text.index("```", text.index("```toml\n") + 8)])
    gateway = comox.build_gateway(keyless(**documented))
    backend = gateway.backend("box-cuda")
    assert backend.settings.first_byte_timeout_s == 300 and gateway.groups["llama-3-8b"].decay_s == 10


# -- configuration.md ----------------------------------------------------------


def _default(text: str, key: str) -> str:
    """The default column of ``key``'s row in a table of ``text``."""
    return re.search(rf"^\| `{key}` \| ([^|]+) \|", text, re.M)[1].strip()


def test_the_documented_defaults_are_the_codes():
    from comox.settings import BackendSettings, ModelGroupSettings

    text = page("configuration.md")
    assert _default(text, "first_byte_timeout_s") == f"`{BackendSettings().first_byte_timeout_s:g}`"
    assert _default(text, "estimate_decay_s") == f"`{ModelGroupSettings.model_fields['estimate_decay_s'].default:g}`"
    assert re.search(r'^\| `"keys"` \(default\) \|', text, re.M) and comox.Settings.model_fields["auth"].default == "keys"
    assert comox.Settings(models=[one_model("http://127.0.0.1:9")]).auth == "keys"


def test_configuration_of_plugins_is_as_documented(monkeypatch):
    text = page("configuration.md")
    models = [one_model("http://127.0.0.1:9")]
    with monkeypatch.context() as env:  # the backend types the page's example lists
        env.setenv("COMOX_LOAD_PLUGINS", "llamacpp,vllm,llama_cpp_python")
        with pytest.raises(comox.ConfigError) as exc:
            comox.build_gateway(keyless(models=[one_model("http://127.0.0.1:9", type="tgi")]))
    assert f"`{exc.value}`" in text
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=models, plugins={"admin": {"key_env": 3}}))
    assert f"`comox: configuration error: {exc.value}`" in text
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyless(models=models, plugins={"admn": {}}))
    assert f"`{exc.value}`" in text
    assert comox.build_gateway(keyless(models=models)).plugin_settings("admin").key_env == "COMOX_ADMIN_KEY"
    monkeypatch.setenv("COMOX_PLUGINS__ADMIN__KEY_ENV", "OPS_KEY")
    assert "`COMOX_PLUGINS__ADMIN__KEY_ENV=OPS_KEY`" in text
    assert comox.build_gateway(keyless(models=models)).plugin_settings("admin").key_env == "OPS_KEY"
