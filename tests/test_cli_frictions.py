"""Frictions a new artist hit on the command line (issue 19): every command the code
suggests runs, size limits come first, quiet output, clear small errors."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.cli import doctor
from backend.cli.main import build_parser
from backend.engines import catalogue as catalogue_module
from backend.engines.catalogue import (CONTROLNETS, DEFAULT_BASES, DEMO_BASE, TINY_BASES,
                                       Catalogue, ModelConfig, Resolved)
from shared.errors import ControlCanvasError
from shared.messages import CONDITIONS

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# 6. Every suggested command runs
# -----------------------------------------------------------------------------

_SUGGESTED = re.compile(r"(?<!`)`(controlcanvas [^`]*)`(?!`)")  # not ``docs``


def suggested_commands(text: str) -> list:
    """The ``controlcanvas ...`` commands a message tells the user to run (in backticks);
    a bare mention of a sub-command outside backticks fails, so none slips through."""
    commands = _SUGGESTED.findall(text)
    bare = re.sub(_SUGGESTED, "", text)
    assert not re.search(r"controlcanvas (models|serve|setup|install-plugin|doctor|generate|"
                         r"preprocess|pose|demo|bench|train) ", bare), text
    return commands


def assert_runs(command: str, catalogue: Catalogue) -> None:
    """The parser accepts ``command``; for ``models download NAME`` the catalogue knows NAME."""
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        raise AssertionError(f"suggested command is rejected by the parser: {command}") from exit
    if args.command == "models" and args.action == "download":
        assert args.name, command
        try:
            catalogue.download_target(args.name)
        except ControlCanvasError as err:
            raise AssertionError(f"{command}: {err.message}") from None


def _bases(tmp_path, monkeypatch):
    """Every built-in base and each family's default hub base (as if downloaded)."""
    monkeypatch.setattr(catalogue_module.tiny, "ensure_tiny", lambda family, root=None: tmp_path)
    for name in catalogue_module.TINY_EDIT:  # the tiny edit bases (built from a tiny stack)
        monkeypatch.setitem(catalogue_module.TINY_EDIT, name, lambda root=None: tmp_path)
    catalogue = Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf")))
    bases = [catalogue.resolve_base(DEMO_BASE)]
    bases += [catalogue.resolve_base(name) for name in TINY_BASES]
    bases += [Resolved(repo, "base", family, "hub", str(tmp_path), repo_id=repo)
              for family, repo in DEFAULT_BASES.items()]
    return catalogue, bases


def test_every_model_missing_suggestion_is_a_command_that_runs(tmp_path, monkeypatch):
    catalogue, bases = _bases(tmp_path, monkeypatch)
    messages = []
    for base in bases:
        for condition in CONDITIONS:
            try:
                catalogue.resolve_controlnet(condition, base)
            except ControlCanvasError as err:
                messages.append(err.message)
    for name in ("", *DEFAULT_BASES.values(), "someone/model"):
        try:
            catalogue.resolve_base(name)
        except ControlCanvasError as err:
            messages.append(err.message)
    commands = [c for m in messages for c in suggested_commands(m)]
    # the demo's depth error suggested `controlcanvas models download sd15 depth` (rc 2)
    assert "controlcanvas models download depth" in commands
    assert len(commands) >= len(CONDITIONS)
    for command in commands:
        assert_runs(command, catalogue)


def test_every_doctor_hint_is_a_command_that_runs(tmp_path, monkeypatch):
    catalogue = Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf")))
    monkeypatch.setattr(doctor.ModelConfig, "from_toml",
                        classmethod(lambda cls, path=None: ModelConfig(cache_dir=str(tmp_path))))
    checks = list(doctor.check_models())
    checks.append(doctor.check_token(tmp_path / "token"))
    monkeypatch.setattr(doctor, "installed_plugins", lambda: [])
    checks.append(doctor.check_plugins())
    broken = SimpleNamespace(editor="gimp", path=tmp_path, next_steps="not executable")
    monkeypatch.setattr(doctor, "installed_plugins", lambda: [broken])
    checks.append(doctor.check_plugins())
    commands = [c for check in checks for c in suggested_commands(check.detail)]
    assert any(c.startswith("controlcanvas models download") for c in commands)
    assert any(c.startswith("controlcanvas install-plugin") for c in commands)
    for command in commands:
        assert_runs(command, catalogue)


def test_every_literal_command_in_the_source_parses():
    """Commands written out in full in the backend's and plug-ins' messages."""
    catalogue = Catalogue(ModelConfig())
    found = []
    for folder in ("backend", "shared", "plugins"):
        for path in (REPO / folder).rglob("*.py"):
            for command in _SUGGESTED.findall(path.read_text(encoding="utf-8")):
                if "{" not in command and "NAME" not in command:
                    found.append(command)
    assert found
    for command in found:
        assert_runs(command, catalogue)


# -----------------------------------------------------------------------------
# 7. Size limits first, --size honoured
# -----------------------------------------------------------------------------

def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1-bit PNG of width x height written row by row: a few KB on disk, no big
    buffer in memory (what a 20000² scan looks like to the CLI before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def run_cli(argv, capsys):
    """``controlcanvas ARGV`` in this process; the logging levels it sets are put back."""
    import logging
    import os

    from backend.cli.main import _CHATTY_LIBRARIES, main

    levels = {name: logging.getLogger(name).level for name in _CHATTY_LIBRARIES}
    env = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    try:
        rc = main([str(a) for a in argv])
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_huge_input_is_refused_from_its_header_with_what_to_do(tmp_path, capsys):
    import time

    big = huge_png(tmp_path / "scan.png")
    assert big.stat().st_size < 200_000
    started = time.monotonic()
    rc, _, err = run_cli(["preprocess", "canny", big, "-o", tmp_path / "out.png"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "the image is 20000×20000, over the 8192 px side limit: pass --size WxH" in err
    rc, _, err = run_cli(["generate", "--engine", "fake", "--control", f"lineart={big}",
                          "-o", tmp_path / "g.png"], capsys)
    assert rc == 1 and "20000×20000, over the 8192 px side limit" in err
    assert "Output size" not in err
    assert time.monotonic() - started < 5  # no pixel was decoded


def test_size_resizes_an_oversized_input(tmp_path, capsys):
    from PIL import Image as PILImage

    wide = tmp_path / "wide.png"
    image = PILImage.new("RGB", (9000, 200), "white")
    image.paste((0, 0, 0), (0, 80, 9000, 120))  # a black band: something to find
    image.save(wide)
    rc, out, err = run_cli(["preprocess", "canny", wide, "-o", tmp_path / "edges.png",
                            "--size", "900x20"], capsys)
    assert rc == 0, err
    assert PILImage.open(tmp_path / "edges.png").size == (900, 20)
    rc, out, err = run_cli(["generate", "--engine", "fake", "--steps", "1", "--size", "90x20",
                            "--control", f"lineart={wide}", "-o", tmp_path / "g.png"], capsys)
    assert rc == 0, err
    assert PILImage.open(tmp_path / "g.png").size == (90, 20)
    rc, _, err = run_cli(["generate", "--engine", "fake", "--size", "9000x9000",
                          "-o", tmp_path / "g.png"], capsys)
    assert rc == 1 and "over the 8192 px side limit" in err


# -----------------------------------------------------------------------------
# 8. Quiet by default; one line for a long prompt
# -----------------------------------------------------------------------------

def test_a_100k_prompt_gives_one_short_line_not_the_libraries_dump(tmp_path):
    import os
    import subprocess
    import sys

    prompt = ("a red ball " * 9100)[:100_000]
    out = subprocess.run([sys.executable, "-m", "backend", "generate", "--engine", "demo",
                          "--steps", "2", "--size", "64x64", "--prompt", prompt,
                          "-o", str(tmp_path / "g.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stderr) < 2000, out.stderr[:3000]
    assert re.search(r"prompt is \d+ tokens; CLIP reads the first 77", out.stderr)
    assert "Warning" not in out.stderr and "truncated" not in out.stderr


# -----------------------------------------------------------------------------
# 12. Small ones
# -----------------------------------------------------------------------------

def test_a_folder_given_as_an_image_is_called_a_folder(tmp_path, capsys):
    rc, _, err = run_cli(["preprocess", "canny", tmp_path, "-o", tmp_path / "out.png"], capsys)
    assert rc == 1 and "is a folder, not an image file" in err and "no such file" not in err
    rc, _, err = run_cli(["generate", "--engine", "fake", "--init", tmp_path,
                          "-o", tmp_path / "g.png"], capsys)
    assert rc == 1 and "is a folder, not an image file" in err


def test_doctor_calls_the_missing_base_optional_with_the_demo_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.ModelConfig, "from_toml",
                        classmethod(lambda cls, path=None: ModelConfig(cache_dir=str(tmp_path))))
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (base,) = [c for c in doctor.check_models() if c.name == "base model"]
    assert base.status == doctor.FAIL and "blocks generating with the diffusers engine" in \
        base.detail and "--engine demo" in base.detail
    (tmp_path / "cfg" / "config.toml").write_text('[server]\nengine = "demo"\n')
    (base,) = [c for c in doctor.check_models() if c.name == "base model"]
    assert base.status == doctor.WARN and base.detail.startswith("optional with the "
                                                                 "configured demo engine")


def test_pose_commands_say_what_they_wrote(tmp_path, capsys):
    rc, out, _ = run_cli(["pose", "default", "-o", tmp_path / "p.json", "--png",
                          tmp_path / "p.png"], capsys)
    assert rc == 0
    assert f"pose default: wrote {tmp_path / 'p.json'} (pose JSON, 512x512, 1 person)" in out
    assert f"wrote {tmp_path / 'p.png'} (skeleton image" in out
    rc, out, _ = run_cli(["pose", "mirror", tmp_path / "p.json", "-o", tmp_path / "m.json"],
                         capsys)
    assert rc == 0 and f"pose mirror: wrote {tmp_path / 'm.json'}" in out


@pytest.mark.parametrize("editor", ["krita", "gimp"])
def test_install_plugin_refuses_an_editor_that_is_not_installed(editor, tmp_path, monkeypatch,
                                                                capsys):
    from backend.cli import install

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "APPDATA"):
        monkeypatch.delenv(var, raising=False)
    bundle = tmp_path / "bundle"
    rc, _, err = run_cli(["install-plugin", editor, "--from", bundle], capsys)
    assert rc == 2 and "does not seem to be installed" in err and "--profile-dir" in err
    looked = install.krita_resource_dirs() if editor == "krita" else install.gimp_config_dirs()
    assert str(looked[0]) in err
    assert list(home.iterdir()) == []  # no folder made for it


def test_models_download_of_an_unknown_name_lists_the_known_ones(tmp_path, capsys):
    rc, _, err = run_cli(["models", "download", "sd16"], capsys)
    assert rc == 1 and "'sd16' is not a known model name" in err and "local path" not in err
    from backend.engines.families import SUPPORTED
    known = err.split("Known: ", 1)[1].split(", ")
    assert set(SUPPORTED) <= set(known) and "canny" in known and "sdxl:depth" in err
    assert "flux:depth" in err and "hub id" in err


def test_the_krita_zip_is_named_with_the_version():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cc_build", REPO / "packaging" / "build.py")
    build = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    version = build.project_version()
    assert build.KRITA_ZIP.format(version=version) == f"controlcanvas-krita-{version}.zip"
    readme = (REPO / "packaging" / "README.md").read_text(encoding="utf-8")
    assert "controlcanvas-krita-<version>.zip" in readme
    assert "controlcanvas-gimp-<version>.zip" in readme


def test_verbose_keeps_the_libraries_messages(monkeypatch):
    import logging

    from backend.cli import main as cli

    for name in cli._CHATTY_LIBRARIES:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    cli.quiet_libraries(verbose=True)
    assert logging.getLogger("transformers").level == logging.NOTSET
    assert "TRANSFORMERS_VERBOSITY" not in __import__("os").environ
    cli.quiet_libraries(verbose=False)
    for name in ("transformers", "diffusers", "websockets", "huggingface_hub"):
        assert logging.getLogger(name).level == logging.ERROR
    assert __import__("os").environ["DIFFUSERS_VERBOSITY"] == "error"
    assert cli.build_parser().parse_args(["-v", "doctor"]).verbose
