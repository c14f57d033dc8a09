"""``comox serve``, ``comox check``, ``comox plugins`` and ``comox keys new``.

Exit status: 0 on success, 1 when ``comox check`` finds a model group with no
backend that answers (or ``comox serve --workers N``'s workers keep dying), 2 on a bad configuration or a port that cannot be
listened on (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ConfigError
from .events import configure_logging

if TYPE_CHECKING:
    from .app import ComoxApp
    from .gateway import Gateway

__all__ = ["main", "serve_app"]


class CommandError(Exception):
    """A failure the command reports in one line and exits 2 for."""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ComoxApp, build_gateway
    from .default_config import serving_default
    from .server_protocol import SERVER_OPTIONS

    configure_logging(args.log_format, args.log_level, args.access_log)
    # The config is read and the gateway built once, here: a bad config fails
    # with one line, and a busy port too, before anything says it is serving.
    gateway = build_gateway(args.config)
    if serving_default(gateway.settings) and gateway.settings.auth == "none" and not _loopback(args.host):
        raise CommandError(f"the embedded default model has no API keys, so it serves this machine only and will "
                           f"not listen on {args.host}: pass a config with [[keys]] (-c comox.toml) to serve others")
    if args.workers > 1:
        return _serve_workers(args, gateway)
    sock = _listen_socket(args.host, args.port)
    host, port = args.host, sock.getsockname()[1]
    # --access-log is Comox's access log (logger comox.access), not uvicorn's.
    server = uvicorn.Server(uvicorn.Config(ComoxApp(gateway, tune_gc=gateway.settings.server.tune_gc), host=host,
                                           port=port, log_level=args.log_level, access_log=False, **SERVER_OPTIONS))
    _announce(gateway, host, port)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0


def _serve_workers(args: argparse.Namespace, gateway: Gateway) -> int:
    """N spawned worker processes (comox/workers.py), each building its own
    gateway from a pickled factory that takes the config path along: nothing
    is written into the environment. Each listens on its own SO_REUSEPORT
    socket where the kernel balances them (Linux), else on a shared one."""
    from .server_protocol import SERVER_OPTIONS
    from .workers import PortBusy, Supervisor, reserve_port, reuseport_supported

    reuseport = reuseport_supported()
    try:
        sock = reserve_port(args.host, args.port, reuseport=reuseport)
    except PortBusy as exc:
        raise CommandError(str(exc)) from None
    factory = functools.partial(serve_app, os.path.abspath(args.config) if args.config else None, args.log_format,
                                args.log_level, args.access_log)
    supervisor = Supervisor(factory, args.host, sock, args.workers, reuseport=reuseport,
                            options=dict(log_level=args.log_level, access_log=False, **SERVER_OPTIONS))
    _announce(gateway, args.host, supervisor.port)
    return supervisor.run()


def _listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)  # handed to the worker processes
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _announce(gateway: Gateway, host: str, port: int) -> None:
    from .default_config import serving_default, usage_example

    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"Comox serving on {base}/v1", file=sys.stderr, flush=True)
    if serving_default(gateway.settings):
        if gateway.settings.auth == "none":
            print("No API keys: the embedded default answers any caller on this machine, so it listens on loopback "
                  "only (to serve others, pass a config with [[keys]]: comox keys new)", file=sys.stderr, flush=True)
        print(usage_example(base), file=sys.stderr, flush=True)


def serve_app(config: str | None = None, log_format: str | None = None, log_level: str = "info",
              access_log: bool = False) -> ComoxApp:
    """The app ``comox serve`` runs in each worker (and a factory for
    ``uvicorn comox.cli:serve_app --factory``): the gateway from the file
    ``config``, else ``$COMOX_CONFIG``, else the embedded default. Comox owns
    the process, so it may tune its garbage collector (``[server] tune_gc``)."""
    from .app import ComoxApp, build_gateway

    if log_format is not None:
        configure_logging(log_format, log_level, access_log)
    gateway = build_gateway(config)
    return ComoxApp(gateway, tune_gc=gateway.settings.server.tune_gc)


def _check(args: argparse.Namespace) -> int:
    from .app import build_gateway

    gateway = build_gateway(args.config)
    # The report below says what each backend answered; the fleet events the
    # same checks log would only say it twice.
    logging.getLogger("comox.events").disabled = True
    try:
        results = asyncio.run(_probe(gateway))
    except ConfigError:
        raise
    except Exception as exc:
        print(f"comox: the gateway failed to start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    verdicts = {name: (verdict, detail) for name, verdict, detail in results}
    groups: list[dict[str, Any]] = []
    for group in gateway.groups.values():
        backends = [
            {"name": state.name, "verdict": verdicts[state.name][0], "detail": verdicts[state.name][1]}
            for state in group.backends
        ]
        groups.append({"name": group.name, "ok": any(b["verdict"] == "ok" for b in backends), "backends": backends})
    ok = bool(groups) and all(group["ok"] for group in groups)
    if args.json:
        print(json.dumps({"ok": ok, "groups": groups}, indent=2))
    else:
        rows = [(g["name"], b["name"], b["verdict"], b["detail"]) for g in groups for b in g["backends"]]
        width_group = max((len(row[0]) for row in rows), default=0)
        width_backend = max((len(row[1]) for row in rows), default=0)
        for group_name, backend, verdict, detail in rows:
            extra = f"  {detail}" if detail and detail != verdict else ""
            print(f"{group_name:<{width_group}}  {backend:<{width_backend}}  {verdict:<7}{extra}".rstrip())
    failed = [g["name"] for g in groups if not g["ok"]]
    if failed:
        print(f"comox: no backend answered for {', '.join(failed)}", file=sys.stderr)
    return 0 if ok else 1


async def _probe(gateway: Gateway) -> list[tuple[str, str, str]]:
    """One health check of every backend of a started gateway, then close it."""
    try:
        await gateway.startup()
        return await gateway.probe()
    finally:
        await gateway.aclose()


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import make_plugin_manager, plugin_info

    info = plugin_info(make_plugin_manager())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for plugin in info:
            version = f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"] else "(not from a distribution)"
            print(f"{plugin['name']:<24} {version:<32} {', '.join(plugin['hooks'])}")
    return 0


KEY_PREFIX = "cmx-"
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


def _keys_new(args: argparse.Namespace) -> int:
    """Show a fresh key, once, on stderr, and print on stdout the ``[[keys]]``
    lines that hold its hash (``comox keys new >> comox.toml`` appends them)."""
    import hashlib
    import secrets

    key_id = args.id if args.id is not None else f"key-{secrets.token_hex(3)}"
    if not KEY_ID.fullmatch(key_id):
        raise CommandError(f"--id {key_id!r}: use 1 to 128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    print(f"API key {key_id} (shown only this once; Comox keeps only its SHA-256):\n\n  {key}\n\n"
          "Its [[keys]] entry, for the config or the keys_file, is on stdout.", file=sys.stderr, flush=True)
    print(f'\n[[keys]]\nid = "{key_id}"\nkey_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
          '# models = ["*"]  # globs of the model groups it may use; rpm, tpm, max_concurrency, local_only: docs/keys.md')
    return 0


CONFIG_HELP = "TOML config file (default: $COMOX_CONFIG, else the embedded gemma-3-270m model)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comox", description="A self-hosted AI gateway.")
    parser.add_argument("--version", action="version", version=f"comox {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway under uvicorn", description="Run the gateway under uvicorn.")
    serve.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes, each with its own fleet state (default: %(default)s)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="log level of Comox and uvicorn (default: %(default)s)")
    serve.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="Comox's log lines (fleet events, startup banner): plain text or one JSON object "
                            "per line (default: %(default)s)")
    serve.add_argument("--access-log", action="store_true",
                       help="Comox's access log: one line per API request (request id, key id, model, backend, "
                            "status, latency, tokens, …; text or JSON per --log-format), never a key or content "
                            "(default: off, as it costs throughput)")
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check", help="check the config and which backends answer, without serving",
        description="Validate the config, load its plugins, build the gateway and run one health check per "
                    "backend. Exit 0 when every model group has a backend that answered ok, 1 otherwise, "
                    "2 on a bad config.",
    )
    check.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    check.add_argument("--json", action="store_true", help="print JSON (default: one line per backend)")
    check.set_defaults(func=_check)

    plugins = commands.add_parser("plugins", help="list loaded plugins with their versions and hooks")
    plugins.add_argument("--json", action="store_true", help="print JSON (default: one line per plugin)")
    plugins.set_defaults(func=_plugins)

    keys = commands.add_parser("keys", help="make API keys", description="Make API keys (docs/keys.md).")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser(
        "new", help="show a fresh API key once, and print the [[keys]] lines to paste",
        description="Show a fresh API key, once, on stderr (it is stored nowhere), and print on stdout the "
                    "[[keys]] lines that hold its SHA-256, for the config or the keys_file: "
                    "comox keys new --id my-app >> comox.toml",
    )
    new.add_argument("--id", metavar="NAME", help="the key's id, used in logs and limits (default: key-<random>)")
    new.set_defaults(func=_keys_new)

    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"comox: configuration error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"comox: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
