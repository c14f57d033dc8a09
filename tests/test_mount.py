"""Comox inside a real FastAPI app: mounted, and as middleware."""

import hashlib

import fastapi
import httpx
import openai
import pytest

import comox
from comox.testing import ServerThread
from tests.secrets_check import secret

CHAT = [{"role": "user", "content": "hi"}]
# the key client_for's SDK sends (tests/conftest.py): keys work mounted and as middleware too
KEY_SHA256 = hashlib.sha256(secret("sk-client-secret").encode()).hexdigest()


@pytest.fixture
def settings(comox_upstream):
    return comox.Settings(models=[{"name": "m", "backends": [{"url": comox_upstream.url}]}],
                          sections={"keys": [{"id": "client", "key_sha256": KEY_SHA256}]})


def host_app() -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    @app.get("/hello")
    def hello():
        return {"host": "says hello"}

    return app


def test_mounted_in_fastapi(settings, client_for):
    app = host_app()
    app.mount("/llm", comox.create_app(settings))
    with ServerThread(app) as server:
        client = client_for(server, prefix="/llm")
        assert client.chat.completions.create(model="m", messages=CHAT).choices[0].message.content == "hello from upstream"
        assert [c.choices[0].delta.content for c in client.chat.completions.create(model="m", messages=CHAT, stream=True)] == ["tok0 ", "tok1 ", "tok2 "]
        assert [m.id for m in client.models.list()] == ["m"]
        assert httpx.get(f"{server.url}/hello").json() == {"host": "says hello"}
        assert httpx.get(f"{server.url}/llm/healthz").status_code == 200
        assert httpx.get(f"{server.url}/llm/v1/models").status_code == 401  # no key


def test_middleware_in_fastapi(settings, client_for):
    app = host_app()
    app.add_middleware(comox.ComoxMiddleware, settings=settings)
    with ServerThread(app) as server:
        client = client_for(server)
        assert client.completions.create(model="m", prompt="x").choices[0].text == "hello from upstream"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=CHAT)
        # every other path belongs to the host app, untouched
        assert httpx.get(f"{server.url}/hello").json() == {"host": "says hello"}
        assert httpx.get(f"{server.url}/missing").json() == {"detail": "Not Found"}
        assert httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer sk-other"}).status_code == 401


def test_no_settings_reads_comox_config(tmp_path, monkeypatch, comox_upstream, client_for):
    config = tmp_path / "comox.toml"
    config.write_text(f'[[models]]\nname = "from-file"\n[[models.backends]]\nurl = "{comox_upstream.url}"\n'
                      f'[[keys]]\nid = "client"\nkey_sha256 = "{KEY_SHA256}"\n')
    monkeypatch.setenv("COMOX_CONFIG", str(config))
    app = host_app()
    app.mount("/a", comox.create_app())
    app.add_middleware(comox.ComoxMiddleware)
    with ServerThread(app) as server:
        assert [m.id for m in client_for(server, prefix="/a").models.list()] == ["from-file"]
        assert [m.id for m in client_for(server).models.list()] == ["from-file"]


def test_a_host_that_gives_headers_as_lists(settings, client_for):
    """ASGI lets a server send headers as any iterable of pairs: a host whose
    pairs are lists (and the list a tuple) is served as one with tuples, the
    compiled header readers included (comox.parse, comox_keys.credential)."""
    inner = comox.create_app(settings)

    async def lists(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "headers": tuple([name, value] for name, value in scope["headers"])}
        await inner(scope, receive, send)

    with ServerThread(lists) as server:
        client = client_for(server)
        assert client.chat.completions.create(model="m", messages=CHAT).choices[0].message.content == "hello from upstream"
        assert httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer sk-other"}).status_code == 401
