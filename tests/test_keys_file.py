"""``keys_file``: keys from a separate TOML file (as a Kubernetes Secret mounts
it), reloaded when the file changes and on SIGHUP, a broken file keeping the
last good set; a ``comox serve`` process reloaded by ``kill -HUP``. As in
test_keys.py, no key reaches a log line (nor the process's stderr)."""

import asyncio
import logging
import os
import signal
import subprocess
import sys

import openai
import pytest

import comox
from comox.testing import free_port, stop_process, wait_for_http, wait_until
from tests.secrets_check import secret
from tests.test_keys import (  # noqa: F401  (no_key_in_logs: the same autouse check here)
    ALICE,
    BOB,
    assert_401,
    assert_no_key_in,
    chat,
    keyed,
    no_key_in_logs,
    post,
    sha,
)

CAROL = secret("cmx-carol-test-key-0123456789abcdef")


def keys_toml(**keys: str) -> str:
    return "".join(f'[[keys]]\nid = "{key_id}"\nkey_sha256 = "{sha(key)}"\n\n' for key_id, key in keys.items())


def works(server, key: str) -> bool:
    return post(server, {"authorization": f"Bearer {key}"}).status_code == 200


def logged(caplog, text: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comox.keys" and r.levelno == level and text in r.getMessage()]


class Secret:
    """A directory laid out as Kubernetes mounts a Secret: ``keys.toml`` →
    ``..data/keys.toml``, ``..data`` → ``..<version>``; an update swaps the
    ``..data`` symlink at once."""

    def __init__(self, root):
        self.root = root
        root.mkdir()
        self.version = 0
        (root / "keys.toml").symlink_to("..data/keys.toml")

    @property
    def path(self) -> str:
        return str(self.root / "keys.toml")

    def write(self, text: str) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        (version / "keys.toml").write_text(text)
        (self.root / "..data_tmp").symlink_to(version.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")


def rewrite_unseen(path: str, text: str) -> None:
    """Change the file's content keeping its inode, size and mtime: only a
    SIGHUP tells the gateway (the watch sees no change)."""
    before = os.stat(path)
    assert len(text.encode()) == before.st_size
    with open(path, "r+") as file:
        file.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_keys_reload_when_the_secret_changes(tmp_path, comox_serve, comox_upstream, caplog):
    secret = Secret(tmp_path / "secret")
    secret.write(keys_toml(alice=ALICE))
    hangup = signal.getsignal(signal.SIGHUP)
    server = comox_serve(keyed(comox_upstream.url, [], keys_file=secret.path))
    assert chat(server, ALICE) == "hello from upstream"
    assert_401(post(server, {"authorization": f"Bearer {BOB}"}))
    secret.write(keys_toml(bob=BOB))
    wait_until(lambda: works(server, BOB))
    assert_401(post(server, {"authorization": f"Bearer {ALICE}"}))
    assert logged(caplog, "reloaded") == [f"keys_file {secret.path} reloaded on a change of the file: 1 keys"]
    assert signal.getsignal(signal.SIGHUP) == hangup  # served from a thread: SIGHUP is left alone


def test_keys_file_and_config_keys_together(tmp_path, comox_serve, comox_upstream):
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(bob=BOB))
    server = comox_serve(keyed(comox_upstream.url, [{"id": "alice", "key_sha256": sha(ALICE), "models": ["x"]}],
                               keys_file=str(path)))
    assert works(server, BOB)
    assert post(server, {"authorization": f"Bearer {ALICE}"}).status_code == 404  # a [[keys]] entry, its models


def test_a_broken_keys_file_keeps_the_last_good_set(tmp_path, comox_serve, comox_upstream, caplog):
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(alice=ALICE))
    server = comox_serve(keyed(comox_upstream.url, [], keys_file=str(path)))
    assert works(server, ALICE)
    broken = [
        ("[[keys]\nid = ", "not valid TOML: "),
        # the clear key pasted where its hash belongs: the warning must not repeat it
        (f'[[keys]]\nid = "alice"\nkey_sha256 = "{ALICE}"\n', "keys[0].key_sha256: String should match pattern"),
        (keys_toml(alice=ALICE) + keys_toml(alice=BOB), "keys[1].id: the id 'alice' is used twice"),
        (f'[[keys]]\nid = "alice"\nkey_sha256 = "{sha(ALICE)}"\nrpm = "many"\n', "keys[0].rpm: Input should be a valid integer"),
        ('[[key]]\nid = "alice"\n', "key: Extra inputs are not permitted"),
    ]
    for count, (text, why) in enumerate(broken, 1):
        tmp = tmp_path / "new.toml"
        tmp.write_text(text)
        os.replace(tmp, path)
        wait_until(lambda: len(logged(caplog, "keeping the last good set", logging.WARNING)) == count)
        warning = logged(caplog, "keeping the last good set", logging.WARNING)[-1]
        assert warning.startswith(f"keys_file {path}: {why}") and "\n" not in warning
        assert warning.endswith("; keeping the last good set of 1 keys (reload on a change of the file)")
        assert works(server, ALICE) and not works(server, BOB)
    path.unlink()
    wait_until(lambda: len(logged(caplog, "keeping the last good set", logging.WARNING)) == len(broken) + 1)
    assert "cannot read it: No such file or directory" in logged(caplog, "keeping", logging.WARNING)[-1]
    assert works(server, ALICE)
    path.write_text(keys_toml(bob=BOB))
    wait_until(lambda: works(server, BOB))
    assert not works(server, ALICE)


def test_an_empty_keys_file_starts_and_refuses_everyone_until_keys_come(tmp_path, comox_serve, comox_upstream, caplog):
    path = tmp_path / "keys.toml"
    path.write_text("# keys come later\n")
    server = comox_serve(keyed(comox_upstream.url, [], keys_file=str(path)))
    assert logged(caplog, "no API keys", logging.WARNING) == [
        f"no API keys in keys_file {path} yet: every request gets 401 until keys are added"]
    assert_401(post(server, {"authorization": f"Bearer {ALICE}"}))
    path.write_text(keys_toml(alice=ALICE))
    wait_until(lambda: works(server, ALICE))


def test_a_keys_file_that_cannot_be_used_at_start_is_a_config_error(tmp_path, comox_upstream):
    path = tmp_path / "keys.toml"
    cases = [
        (None, f"keys_file {path}: cannot read it: No such file or directory"),
        ("[[keys]\n", f"keys_file {path}: not valid TOML: "),
        (keys_toml(again=ALICE), f"keys_file {path}: keys[0].key_sha256: the same key as the key 'alice'"),
    ]
    for text, error in cases:
        if text is not None:
            path.write_text(text)
        with pytest.raises(comox.ConfigError) as exc:
            comox.build_gateway(keyed(comox_upstream.url, [{"id": "alice", "key_sha256": sha(ALICE)}], keys_file=str(path)))
        assert str(exc.value).startswith(error) and "\n" not in str(exc.value)


def test_keys_file_is_relative_to_the_working_directory_and_read_from_the_environment(tmp_path, monkeypatch, comox_upstream):
    (tmp_path / "keys.toml").write_text(keys_toml(alice=ALICE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMOX_KEYS_FILE", "keys.toml")
    config = tmp_path / "comox.toml"
    config.write_text(f'[[models]]\nname = "chat"\n  [[models.backends]]\n  url = "{comox_upstream.url}"\n')
    settings = comox.load_settings(config)
    assert settings.keys_file == "keys.toml"
    comox.build_gateway(settings)  # has keys: starts


# -- SIGHUP -------------------------------------------------------------------------------


def test_sighup_reloads_in_the_main_thread_and_restores_the_handler(tmp_path, comox_upstream, caplog):
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(alice=ALICE))
    settings = keyed(comox_upstream.url, [], keys_file=str(path))

    async def run() -> None:
        gateway = comox.build_gateway(settings)
        await gateway.startup()
        try:
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            rewrite_unseen(str(path), keys_toml(carol=CAROL))
            os.kill(os.getpid(), signal.SIGHUP)
            while not logged(caplog, "reloaded on SIGHUP"):
                await asyncio.sleep(0.01)  # the reload runs on this loop
        finally:
            await gateway.aclose()

    for before in (signal.SIG_DFL, signal.SIG_IGN):  # ignored: as under `nohup comox serve`
        caplog.clear()
        outer = signal.signal(signal.SIGHUP, before)
        try:
            asyncio.run(run())
            assert logged(caplog, "reloaded on SIGHUP") == [f"keys_file {path} reloaded on SIGHUP: 1 keys"]
            assert signal.getsignal(signal.SIGHUP) == before  # restored when the gateway stopped
        finally:
            signal.signal(signal.SIGHUP, outer)
        path.write_text(keys_toml(alice=ALICE))

    def host_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGHUP, host_handler)
    try:
        asyncio.run(comox.build_gateway(settings).startup())
        assert signal.getsignal(signal.SIGHUP) is host_handler  # a host app's own handler is left alone
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_kill_hup_reloads_the_keys_of_comox_serve(tmp_path, comox_upstream):
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml(alice=ALICE))
    config = tmp_path / "comox.toml"
    config.write_text(f'keys_file = "{keys}"\n\n[[models]]\nname = "chat"\n  [[models.backends]]\n'
                      f'  url = "{comox_upstream.url}"\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comox.cli", "serve", "-c", str(config), "--port", str(port),
                             "--log-level", "debug"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc=proc)
        server = type("Served", (), {"url": url})
        assert chat(server, ALICE) == "hello from upstream"
        with pytest.raises(openai.AuthenticationError):
            chat(server, CAROL)
        rewrite_unseen(str(keys), keys_toml(carol=CAROL))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: works(server, CAROL))
        assert_401(post(server, {"authorization": f"Bearer {ALICE}"}))
        assert proc.poll() is None  # reloaded, not stopped
    finally:
        stop_process(proc)
    stderr = proc.stderr.read()
    assert f"keys_file {keys} reloaded on SIGHUP: 1 keys" in stderr
    assert "Traceback" not in stderr
    assert_no_key_in(stderr + proc.stdout.read())
