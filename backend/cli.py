"""``controlcanvas`` command line: serve, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from shared.errors import ControlCanvasError

from .engine import create_engine
from .config import build_config, is_loopback_host, load_or_create_token

log = logging.getLogger("controlcanvas")


def _server_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    overrides = {
        "host": args.host, "port": args.port, "token_file": args.token_file,
        "engine": args.engine, "max_image_side": args.max_image_side,
        "max_pixels": args.max_pixels, "max_queue": args.max_queue,
        "step_seconds": args.step_seconds,
    }
    if args.host is not None and not is_loopback_host(args.host):
        overrides["allow_remote"] = True
    return overrides


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; any other "
                        "value makes the server reachable from the network)")
    parser.add_argument("--port", type=int, help="port (default 7351; 0 picks a free one)")
    parser.add_argument("--token-file", type=Path, help="where the access token lives "
                        "(default: token in the user config folder)")
    parser.add_argument("--engine", choices=["fake"], help="image engine")
    parser.add_argument("--max-image-side", type=int, help="largest image side accepted")
    parser.add_argument("--max-pixels", type=int, help="largest pixel count accepted")
    parser.add_argument("--max-queue", type=int, help="most jobs waiting at once")
    parser.add_argument("--step-seconds", type=float, help="fake engine: seconds per step")
    parser.add_argument("--config", type=Path, help="TOML config file ([server] table)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    config = build_config(_server_overrides(args), args.config)
    token, created = (config.token, False) if config.token else \
        load_or_create_token(config.token_file)
    engine = create_engine(config.engine, step_seconds=config.step_seconds)

    def ready(server) -> None:
        print(f"ControlCanvas server listening on {server.url} (engine: {engine.name})",
              flush=True)
        print(f"Token file: {config.token_file}", flush=True)
        if created:
            print(f"New access token (also in the token file): {token}", flush=True)
        if config.remote_allowed:
            print("Reachable from other machines: clients need the token above.", flush=True)

    try:
        asyncio.run(run_server(config, engine, token, ready=ready))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        print(f"controlcanvas: cannot listen on {config.host}:{config.port}: {err}. Is another "
              f"server running? Choose another --port.", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(Path(args.out), engine=args.engine)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    result = bench.run(args.name, args)
    print(json.dumps(result, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlcanvas",
                                     description="ControlNet for the editors you paint in.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the websocket server the plug-ins talk to")
    _add_server_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole editor path on the embedded default model")
    p.add_argument("--out", default="out/demo", help="folder for the canvas and result PNGs")
    p.add_argument("--engine", default="fake", choices=["fake"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="print one benchmark's figures as JSON")
    p.add_argument("name", choices=["transport", "soak"])
    p.add_argument("--repeats", type=int, default=15, help="transport: timed rounds")
    p.add_argument("--side", type=int, default=2048, help="transport: image side")
    p.add_argument("--cases", type=int, default=10_000, help="soak: fuzz cases")
    p.add_argument("--clients", type=int, default=100, help="soak: disconnecting clients")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except ControlCanvasError as err:
        print(f"controlcanvas: {err.message} [{err.code}]", file=sys.stderr)
        return 1
    except ValueError as err:  # bad configuration values
        print(f"controlcanvas: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
