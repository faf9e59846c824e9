"""``controlcanvas preprocess`` and ``controlcanvas pose``: annotators and poses from a shell.

    controlcanvas preprocess NAME in.png -o out.png [--param k=v ...] [--size WxH]
    controlcanvas preprocess --list
    controlcanvas pose default -o pose.json [--size WxH] [--png skeleton.png]
    controlcanvas pose detect photo.png -o pose.json [--png skeleton.png] [--hands]
    controlcanvas pose render pose.json -o skeleton.png [--size WxH]
    controlcanvas pose parse skeleton.png -o pose.json
    controlcanvas pose mirror|scale|move IN -o OUT [--factor F] [--dx X --dy Y]

``backend.cli.main`` wires them with :func:`add_parsers`.  Image files are read with
OpenCV: 8- or 16-bit, grey, grey+alpha, RGB or RGBA PNG/JPEG/TIFF/WebP all
become the RGBA8 :class:`~shared.images.Image` the annotators take.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


from shared.errors import FieldError
from shared.images import Image
from shared import pose as shared_pose

from ..annotators import library
from ..imaging import load_image, load_input_image, save_image
from ..pose import detect as pose_detect


# -----------------------------------------------------------------------------
# Files
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# Arguments
# -----------------------------------------------------------------------------

def parse_size(text: str) -> Tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        size = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768; got {text!r}") from None
    if size[0] <= 0 or size[1] <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive; got {text!r}")
    return size


def parse_value(text: str) -> Any:
    """k=v values: true/false, integers, numbers, otherwise the text itself."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_params(items: Optional[List[str]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FieldError(f"--param needs the form name=value; got {item!r}.", field="params")
        out[key.strip()] = parse_value(value)
    return out


# -----------------------------------------------------------------------------
# Commands
# -----------------------------------------------------------------------------

def cmd_preprocess(args: argparse.Namespace) -> int:

    if args.list or not args.name:
        for info in library.list_annotators():
            flags = ("weights" if info.needs_weights else "built in") + \
                    ("" if info.available else ", not installed")
            print(f"{info.name:22s} {info.condition or '-':14s} ({flags}) {info.help}")
            for p in info.params:
                rng = f" {p.min:g}..{p.max:g}" if p.min is not None and p.max is not None else ""
                choices = f" {'|'.join(p.choices)}" if p.choices else ""
                print(f"    {p.name}={p.default!r} [{p.kind}{rng}{choices}] {p.help}")
        return 0 if args.list else 2
    if not args.input or not args.output:
        print("controlcanvas preprocess: give NAME in.png -o out.png", file=sys.stderr)
        return 2
    image = load_input_image(args.input, args.size)  # size limits checked from the header
    out = library.run(args.name, image, parse_params(args.param), args.size)
    target = Path(args.output)
    if target.is_dir() or str(args.output).endswith(("/", os.sep)):
        target = target / f"{Path(args.input).stem}-{args.name}.png"
    written = write_result(target, out)
    print(f"{args.name}: {args.input} ({image.width}x{image.height}) -> {written} "
          f"({out.width}x{out.height})")
    return 0


def write_result(path: Path, image: Image) -> Path:
    """Save a finished result at ``path``; if that fails for any reason, save it to a temporary
    file instead and say so on stderr (a result is never lost).  Returns where it went."""
    try:
        save_image(path, image)
        return path
    except Exception as err:  # noqa: BLE001 - whatever went wrong, keep the pixels
        reason = err.message if isinstance(err, FieldError) else f"{type(err).__name__}: {err}"
        handle, name = tempfile.mkstemp(prefix="controlcanvas-", suffix=".png")
        os.close(handle)
        save_image(name, image)
        print(f"controlcanvas: could not write {path} ({reason}); the result is in {name}",
              file=sys.stderr)
        return Path(name)


def _write_pose(pose, args) -> None:
    """Write the pose where asked and say what was written (stdout: the JSON otherwise)."""
    what = f"{pose.width}x{pose.height}, {len(pose.people)} " \
        f"{'person' if len(pose.people) == 1 else 'people'}"
    if args.output:
        if str(args.output).lower().endswith(".json"):
            Path(args.output).write_text(pose.to_json(indent=1), encoding="utf-8")
            print(f"pose {args.action}: wrote {args.output} (pose JSON, {what})")
        else:
            save_image(args.output, shared_pose.render(pose))
            print(f"pose {args.action}: wrote {args.output} (skeleton image, {what})")
    png = getattr(args, "png", None)
    if png:
        save_image(png, shared_pose.render(pose))
        print(f"pose {args.action}: wrote {png} (skeleton image, {what})")
    if not args.output and not png:
        print(pose.to_json(indent=1))


def _load_pose(path, width: Optional[int] = None, height: Optional[int] = None):
    """A pose from a JSON file, or parsed from a skeleton picture."""
    if str(path).lower().endswith(".json"):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise FieldError(f"Cannot read the pose file {path} ({err}).", field="input") from None
        return shared_pose.Pose.from_json(text, width, height)
    return shared_pose.parse(load_image(path))


def cmd_pose(args: argparse.Namespace) -> int:

    action = args.action
    size = args.size
    if action == "default":
        w, h = size or (512, 512)
        pose = shared_pose.default_pose(w, h)
    elif action == "detect":
        pose = pose_detect.detect(load_input_image(args.input, size), hands=args.hands,
                               min_confidence=args.min_confidence, method=args.method)
        if not pose.people:
            print(f"controlcanvas pose detect: no person found in {args.input}", file=sys.stderr)
            return 1
    else:
        if not args.input:
            print(f"controlcanvas pose {action}: give an input file", file=sys.stderr)
            return 2
        pose = _load_pose(args.input, *(size or (None, None)))
        if action == "mirror":
            pose = pose.mirrored()
        elif action == "scale":
            pose = pose.scaled(args.factor)
        elif action == "move":
            pose = pose.translated(args.dx, args.dy)
    if size and action in ("render", "detect", "parse", "mirror", "scale", "move") \
            and (pose.width, pose.height) != tuple(size):
        pose = pose.resized(*size)
    _write_pose(pose, args)
    return 0


def add_parsers(subparsers) -> None:
    """Add ``preprocess`` and ``pose`` to ``controlcanvas``'s sub-command parsers."""
    p = subparsers.add_parser("preprocess", help="turn an image into a control image with an "
                              "annotator (canny, lineart_from_drawing, ...)")
    p.add_argument("name", nargs="?", help="annotator name (see --list)")
    p.add_argument("input", nargs="?", type=Path, help="input image (PNG, JPEG, ...)")
    p.add_argument("-o", "--output", type=Path, help="where to write the control image (PNG)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="annotator parameter (repeatable), e.g. --param low=50")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="output size (pixel perfect: the annotator runs at this size)")
    p.add_argument("--list", action="store_true", help="list annotators and their parameters")
    p.set_defaults(func=cmd_preprocess)

    p = subparsers.add_parser("pose", help="OpenPose skeletons: default, detect, render, parse, "
                              "mirror, scale, move")
    p.add_argument("action", choices=["default", "detect", "render", "parse", "mirror", "scale",
                                      "move"])
    p.add_argument("input", nargs="?", type=Path,
                   help="photo (detect), pose .json or skeleton .png (others)")
    p.add_argument("-o", "--output", type=Path,
                   help="pose .json, or a .png to write the rendered skeleton")
    p.add_argument("--png", type=Path, help="also write the rendered skeleton here")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="canvas size (default pose; resizes the result of the others)")
    p.add_argument("--hands", action="store_true", help="detect: hands too")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="detect: drop less certain joints")
    p.add_argument("--method", choices=["auto", "openpose", "mediapipe"], default="auto",
                   help="detect: which detector")
    p.add_argument("--factor", type=float, default=1.0, help="scale: factor")
    p.add_argument("--dx", type=float, default=0.0, help="move: pixels right")
    p.add_argument("--dy", type=float, default=0.0, help="move: pixels down")
    p.set_defaults(func=cmd_pose)


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (``python -m backend.cli.preprocess``), same as the wired commands."""
    from shared.errors import ControlCanvasError
    parser = argparse.ArgumentParser(prog="controlcanvas")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ControlCanvasError as err:
        print(f"controlcanvas: {err.message} [{err.code}]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_parsers", "cmd_pose", "cmd_preprocess", "load_image", "save_image",
           "parse_params", "parse_size"]
