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
