import pytest

from comox import ConfigError, Gateway, load_settings
from comox.settings import Settings

GOOD = """
[server]
expose_backend_header = true
max_body_bytes = 1000

[[models]]
name = "chat"
policy = "round_robin"

  [[models.backends]]
  name = "node-a"
  type = "openai"
  url = "http://127.0.0.1:9/v1"
  model = "llama-3.1-8b"
  weight = 2
  max_concurrency = 8
"""


def write(tmp_path, text):
    path = tmp_path / "comox.toml"
    path.write_text(text)
    return path


def test_toml_file(tmp_path):
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.server.expose_backend_header is True
    assert settings.server.max_body_bytes == 1000
    backend = settings.models[0].backends[0]
    assert (backend.name, backend.weight, backend.max_concurrency, backend.model) == ("node-a", 2, 8, "llama-3.1-8b")


def test_environment_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COMOX_SERVER__MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("COMOX_CONFIG", str(write(tmp_path, GOOD)))
    settings = load_settings()
    assert settings.server.max_body_bytes == 2048
    assert settings.server.expose_backend_header is True  # the rest of [server] still comes from the file


def test_models_from_environment_json(monkeypatch):
    monkeypatch.setenv("COMOX_MODELS", '[{"name": "m", "backends": [{"url": "http://127.0.0.1:9"}]}]')
    settings = load_settings()
    assert settings.models[0].backends[0].name == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes: Input should be greater than 0"),
        ("[server]\nmax_bodybytes = 5\n", "server.max_bodybytes: Extra inputs are not permitted"),
        ("[[models]]\nname = 'x'\nbackends = []\n", "models[0].backends: List should have at least 1 item"),
        ("[[models]]\nname = 'x'\n[[models.backends]]\nurl='http://a'\n[[models]]\nname = 'x'\n[[models.backends]]\nurl='http://b'\n", "models[1].name: model name 'x' is used twice"),
        ("[[models]]\nname = 'x'\n[[models.backends]]\nurl='http://a'\n[[models.backends]]\nurl='http://a'\n", "models[0].backends[1].name: backend name 'http://a' is used twice"),
        ("not = [valid", "is not valid TOML"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/comox.toml")


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"type": "openai"}, "models[0].backends[0].url: Field required"),
        ({"url": "ftp://x"}, "models[0].backends[0].url: Value error, must be an http:// or https:// URL"),
        ({"url": "http://x", "tiemout_s": 3}, "models[0].backends[0].tiemout_s: Extra inputs are not permitted"),
        ({"url": "http://x", "type": "nope"}, "models[0].backends[0].type: unknown backend type 'nope'"),
        ({"url": "http://x", "api_key_env": "COMOX_TEST_UNSET_VAR"}, "models[0].backends[0]: api_key_env: the environment variable 'COMOX_TEST_UNSET_VAR' is not set"),
    ],
)
def test_backend_config_errors(backend, message):
    with pytest.raises(ConfigError) as info:
        Gateway(Settings(auth="none", models=[{"name": "m", "backends": [backend]}]))
    assert message in str(info.value)


def test_unknown_policy():
    with pytest.raises(ConfigError, match=r"models\[0\].policy: unknown routing policy 'fastest'"):
        Gateway(Settings(auth="none", models=[{"name": "m", "policy": "fastest", "backends": [{"url": "http://x"}]}]))
