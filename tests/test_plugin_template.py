"""A third-party plugin, installed with pip, is picked up with no code change."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

TEMPLATE = Path(__file__).parent.parent / "contrib" / "plugin-template"


@pytest.fixture(scope="module")
def installed_template():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", str(TEMPLATE)], check=True)
    yield
    subprocess.run([*pip, "uninstall", "-y", "comox-plugin-template"], check=True)


def test_listed_by_comox_plugins(installed_template):
    out = subprocess.run([sys.executable, "-m", "comox.cli", "plugins", "--json"], check=True, capture_output=True, text=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)}
    assert plugins["plugin_template"]["distribution"] == "comox-plugin-template"
    assert plugins["plugin_template"]["version"] == "0.1.0"
    assert plugins["plugin_template"]["hooks"] == ["comox_admit", "comox_routes"]


def test_gateway_uses_it(installed_template, comox_gateway):
    assert httpx.get(f"{comox_gateway.url}/-/plugin-template").json() == {"hello": "from comox-plugin-template"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "x"}], "user": "blocked-by-template"}
    response = httpx.post(f"{comox_gateway.url}/v1/chat/completions", json=body)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    body["user"] = "someone-else"
    assert httpx.post(f"{comox_gateway.url}/v1/chat/completions", json=body).status_code == 200


def test_blocked_by_environment(installed_template, monkeypatch):
    from comox.plugins import make_plugin_manager

    monkeypatch.setenv("COMOX_BLOCK_PLUGINS", "plugin_template")
    assert "plugin_template" not in dict(make_plugin_manager().list_name_plugin())
    monkeypatch.delenv("COMOX_BLOCK_PLUGINS")
    monkeypatch.setenv("COMOX_LOAD_PLUGINS", "plugin_template,openai")
    assert set(dict(make_plugin_manager().list_name_plugin())) == {"plugin_template", "openai", "round_robin"}  # and the essential ones
