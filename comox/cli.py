"""``comox serve`` and ``comox plugins``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError

__all__ = ["main", "serve_app"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import build_gateway

    if args.config:
        os.environ["COMOX_CONFIG"] = os.path.abspath(args.config)
    # Build once here so a bad config fails before uvicorn starts, with one line.
    gateway = build_gateway(None)
    print(f"Comox serving on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    from .default_config import serving_default, usage_example

    if serving_default(gateway.settings):
        print(usage_example(f"http://{args.host}:{args.port}"), file=sys.stderr, flush=True)
    uvicorn.run(
        "comox.cli:serve_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def serve_app():
    """The app ``comox serve`` runs in each worker: Comox owns the process, so
    it may tune its garbage collector (``[server] tune_gc``)."""
    from .app import ComoxApp, build_gateway

    gateway = build_gateway(None)
    return ComoxApp(gateway, tune_gc=gateway.settings.server.tune_gc)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comox", description="A self-hosted AI gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway under uvicorn")
    serve.add_argument("-c", "--config", help="TOML config file (default: $COMOX_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs throughput)")
    serve.set_defaults(func=_serve)

    plugins = commands.add_parser("plugins", help="list loaded plugins with their versions and hooks")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=_plugins)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"comox: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
