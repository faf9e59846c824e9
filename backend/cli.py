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


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor
    from .config import DEFAULT_HOST, DEFAULT_PORT, default_token_file
    return doctor.main(args.token_file or default_token_file(), args.host or DEFAULT_HOST,
                       args.port or DEFAULT_PORT)


def _build_bundle(editor: str, out: Path) -> Path:
    """Build the plug-in bundle from this source checkout (packaging/build.py)."""
    import importlib.util
    script = Path(__file__).resolve().parent.parent / "packaging" / "build.py"
    if not script.is_file():
        raise SystemExit("controlcanvas: this installation has no packaging/build.py; download "
                         "the plug-in zip from the release page and pass it with --from ZIP.")
    spec = importlib.util.spec_from_file_location("controlcanvas_packaging_build", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, f"build_{editor}")(out)


def cmd_install_plugin(args: argparse.Namespace) -> int:
    import tempfile

    from . import install
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.source or _build_bundle(args.editor, Path(tmp))
        installer = install.install_krita if args.editor == "krita" else install.install_gimp
        for done in installer(Path(bundle), args.profile_dir):
            print(f"Installed the {done.editor} plug-in in {done.path}")
            print(f"Next: {done.next_steps}")
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

    from .preprocess_cli import add_parsers as add_preprocess_parsers
    add_preprocess_parsers(sub)

    p = sub.add_parser("doctor", help="check the installation, one line per item")
    p.add_argument("--token-file", type=Path)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install-plugin", help="install the Krita or GIMP plug-in")
    p.add_argument("editor", choices=["krita", "gimp"])
    p.add_argument("--profile-dir", type=Path, help="the editor's resource/config folder "
                   "(Krita: the folder holding pykrita/; GIMP: e.g. ~/.config/GIMP/3.0); "
                   "default: every one found")
    p.add_argument("--from", dest="source", type=Path,
                   help="a built bundle (folder or zip) instead of building from source")
    p.set_defaults(func=cmd_install_plugin)

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
