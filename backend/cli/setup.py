"""``controlcanvas setup annotators|pose``: the optional parts, installed for artists.

    controlcanvas setup annotators [--dry-run] [--yes]
    controlcanvas setup pose [--dir DIR] [--python PY] [--dry-run]

``annotators`` installs the ``annotators`` extra (controlnet-aux) into the backend's own
environment together with the torch/torchvision pair it works with (torch 2.14.1 +
torchvision 0.29.1; a newer CUDA torch pulled in by controlnet-aux, or torch 2.13 +
torchvision 0.28, breaks its import).  A torch 2.14.x that is already installed (CUDA or
not) is kept and only the matching torchvision is added; a CUDA torch of another
version is not replaced without ``--yes``.

``pose`` creates a separate venv for MediaPipe 0.10.21 (the last wheel that ships its
pose model; it pins numpy<2, so it cannot live beside the backend) under the per-user
data folder, and records its python in the pointer file that
:func:`backend.pose.detect.mediapipe_python` reads, so pose detection finds it without
environment variables.  ``--dry-run`` prints the exact commands and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from shared.paths import data_dir  # noqa: F401 (re-exported: the pose venv lives there)

from ..pose import detect as pose_detect

# the pair controlnet-aux 0.0.10 imports with (docs: the controlnet-aux/torchvision trap)
TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"
ANNOTATORS_SPEC = "controlnet-aux>=0.0.10,<0.0.11"  # = pyproject's `annotators` extra
MEDIAPIPE_SPECS = ("mediapipe==0.10.21", "numpy<2")


@dataclass(frozen=True)
class AnnotatorsPlan:
    commands: List[List[str]]
    note: str                      # what happens to torch, in one sentence
    refusal: Optional[str] = None  # set: do not run without --yes


def _release(version: str) -> tuple:
    """'2.14.1+cu128' -> (2, 14, 1)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def matching_torchvision(torch_version: str) -> Optional[str]:
    """The torchvision release built for this torch 2.14.x (0.29.x), else None."""
    major, minor, *rest = _release(torch_version) + (0,)
    if (major, minor) != _release(TORCH_VERSION)[:2]:
        return None
    return f"0.{minor + 15}.{rest[0]}"


def torch_refusal(installed: Optional[str], installed_cuda: Optional[str],
                  target: str = TORCH_VERSION) -> Optional[str]:
    """Why installing torch ``target`` must not go ahead unasked, or None.

    Only a GPU build (CUDA, or a ROCm/XPU local label) of another version is protected:
    pip would swap it for the build PyPI serves for ``target`` (on Windows a CPU build,
    elsewhere some CUDA version that may not suit the driver), and the artist loses the
    torch that uses the GPU.
    """
    label = installed.partition("+")[2] if installed else ""
    gpu = bool(installed_cuda) or label.startswith(("cu", "rocm", "xpu"))
    if not installed or not gpu or _release(installed) == _release(target):
        return None
    build = f"CUDA {installed_cuda}" if installed_cuda else label
    return (f"this environment has a GPU build of torch ({installed}, {build}); "
            f"controlnet-aux needs torch "
            f"{target} with torchvision {TORCHVISION_VERSION}, and installing that from PyPI "
            f"replaces your torch with another build that may not use your GPU. Either "
            f"install the GPU build of torch {target} + torchvision {TORCHVISION_VERSION} "
            f"from pytorch.org first (then this command keeps it), or run again with --yes "
            f"to let pip replace it.")


def plan_annotators(python: str, installed: Optional[str],
                    installed_cuda: Optional[str]) -> AnnotatorsPlan:
    """The pip command that adds controlnet-aux without breaking torch."""
    pip = [python, "-m", "pip", "install"]
    vision = matching_torchvision(installed) if installed else None
    if vision:
        torch_pin = f"torch=={'.'.join(map(str, _release(installed)))}"
        return AnnotatorsPlan([pip + [torch_pin, f"torchvision=={vision}", ANNOTATORS_SPEC]],
                              f"keeps torch {installed}, adds torchvision {vision}")
    note = (f"installs torch {TORCH_VERSION} + torchvision {TORCHVISION_VERSION}"
            + (f" in place of torch {installed}" if installed else ""))
    return AnnotatorsPlan(
        [pip + [f"torch=={TORCH_VERSION}", f"torchvision=={TORCHVISION_VERSION}",
                ANNOTATORS_SPEC]],
        note, torch_refusal(installed, installed_cuda))


def installed_torch() -> tuple:
    """(version, CUDA version) of this environment's torch, read without importing it
    when possible; (None, None) when torch is not installed."""
    from importlib import metadata
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None, None
    cuda = None  # a local label (+cu128, +rocm6.2, +cpu) says the build by itself
    if "+" not in version:
        try:  # PyPI's Linux wheels carry no local label; ask torch itself
            import torch
            cuda = torch.version.cuda
        except Exception:
            cuda = None
    return version, cuda


def venv_python(folder: Path, platform: Optional[str] = None) -> Path:
    platform = sys.platform if platform is None else platform
    return folder / ("Scripts/python.exe" if platform == "win32" else "bin/python")


def plan_pose(folder: Path, python: str) -> List[List[str]]:
    inner = str(venv_python(folder))
    return [[python, "-m", "venv", str(folder)],
            [inner, "-m", "pip", "install", "--upgrade", "pip"],
            [inner, "-m", "pip", "install", *MEDIAPIPE_SPECS],
            [inner, "-c", "import mediapipe as mp; print(mp.__name__, mp.__version__)"]]


def _show(command: Sequence[str]) -> str:
    return subprocess.list2cmdline(command) if os.name == "nt" else shlex.join(command)


def _run_all(commands: List[List[str]]) -> int:
    """Run each command with its output (pip's progress) on the terminal."""
    for command in commands:
        print(f"$ {_show(command)}", flush=True)
        started = time.monotonic()
        rc = subprocess.run(command, check=False).returncode
        if rc != 0:
            print(f"controlcanvas setup: that command failed (exit {rc}); nothing more was "
                  f"changed. Fix what pip says above and run this setup again.", file=sys.stderr)
            return rc
        print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


def cmd_annotators(args: argparse.Namespace) -> int:
    version, cuda = installed_torch()
    plan = plan_annotators(sys.executable, version, cuda)
    print(f"controlcanvas setup annotators: into {sys.prefix}; {plan.note}.")
    if args.dry_run:
        for command in plan.commands:
            print(_show(command))
        if plan.refusal:
            print(f"(without --yes this would stop: {plan.refusal})")
        return 0
    if plan.refusal and not args.yes:
        print(f"controlcanvas setup annotators: not changing anything: {plan.refusal}",
              file=sys.stderr)
        return 2
    rc = _run_all(plan.commands)
    if rc == 0:
        print("Done: the controlnet-aux annotators are available (their weights download on "
              "first use); `controlcanvas doctor` shows them.")
    return rc


def cmd_pose(args: argparse.Namespace) -> int:
    folder = (args.dir or data_dir() / "mediapipe-venv").expanduser().absolute()
    python = args.python or sys.executable
    commands = plan_pose(folder, python)
    pointer = pose_detect.pointer_file()
    inner = venv_python(folder)
    print(f"controlcanvas setup pose: MediaPipe in its own venv {folder}")
    if not args.python and sys.version_info >= (3, 13):
        print("  note: MediaPipe 0.10.21 has wheels for Python 3.9-3.12 only; if pip finds "
              "none, pass --python with a Python 3.12 (or older) interpreter.")
    if args.dry_run:
        for command in commands:
            print(_show(command))
        print(f"then write {pointer} -> {inner}")
        return 0
    if venv_python(folder).is_file():
        commands = commands[1:]  # the venv is there: update it
    rc = _run_all(commands)
    if rc != 0:
        return rc
    write_pointer(pointer, inner)
    print(f"Done: pose detection uses {inner} (recorded in {pointer}).")
    return 0


def write_pointer(pointer: Path, python: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f"{python}\n", encoding="utf-8")


def add_parser(subparsers) -> None:
    """``controlcanvas setup annotators|pose``."""
    p = subparsers.add_parser("setup", help="install the optional parts: the controlnet-aux "
                              "annotators, or MediaPipe for pose detection")
    what = p.add_subparsers(dest="what", required=True)
    a = what.add_parser("annotators", help="controlnet-aux (+ the torch/torchvision pair it "
                        "needs) into this environment")
    a.add_argument("--dry-run", action="store_true", help="print the pip command, change nothing")
    a.add_argument("--yes", action="store_true", help="replace a CUDA torch of another version")
    a.set_defaults(func=cmd_annotators)
    q = what.add_parser("pose", help="a separate venv with MediaPipe 0.10.21 for pose detection")
    q.add_argument("--dir", type=Path, help="the venv folder (default: the per-user data "
                   "folder's controlcanvas/mediapipe-venv)")
    q.add_argument("--python", help="the interpreter that creates the venv (MediaPipe 0.10.21 "
                   "has wheels for Python 3.9-3.12; default: this one)")
    q.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    q.set_defaults(func=cmd_pose)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


__all__ = ["add_parser", "run", "plan_annotators", "plan_pose", "torch_refusal",
           "matching_torchvision", "data_dir", "write_pointer"]
