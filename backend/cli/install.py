"""``controlcanvas install-plugin krita|gimp``: put the plug-in where the editor looks.

Where editors look for user plug-ins (documented locations):

- Krita: the ``pykrita`` folder of its resource folder — Linux
  ``~/.local/share/krita/pykrita`` (Flatpak ``~/.var/app/org.kde.krita/data/krita/pykrita``),
  Windows ``%APPDATA%\\krita\\pykrita``, macOS ``~/Library/Application Support/krita/pykrita``.
  Krita loads a plug-in only after it is ticked in Settings ▸ Configure Krita ▸ Python
  Plugin Manager, and after a restart.
- GIMP 3: ``plug-ins`` of the per-version config folder — Linux ``~/.config/GIMP/3.0``
  (and ``3.2``; Flatpak ``~/.var/app/org.gimp.GIMP/config/GIMP/3.x``), Windows
  ``%APPDATA%\\GIMP\\3.x``, macOS ``~/Library/Application Support/GIMP/3.x``.  GIMP only
  loads ``plug-ins/<name>/<name>.py`` with the executable bit, at its next start.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

GIMP_VERSIONS = ("3.0", "3.2")
PLUGIN_NAME = "controlcanvas"


def _home() -> Path:
    return Path.home()


def _appdata() -> Path:
    return Path(os.environ.get("APPDATA") or _home() / "AppData" / "Roaming")


def krita_resource_dirs() -> List[Path]:
    """Candidate Krita resource folders, most usual first."""
    if sys.platform == "win32":
        return [_appdata() / "krita"]
    if sys.platform == "darwin":
        return [_home() / "Library" / "Application Support" / "krita"]
    data = Path(os.environ.get("XDG_DATA_HOME") or _home() / ".local" / "share")
    return [data / "krita", _home() / ".var" / "app" / "org.kde.krita" / "data" / "krita"]


def gimp_config_dirs() -> List[Path]:
    """Candidate GIMP 3.x config folders (one per version and install kind)."""
    if sys.platform == "win32":
        bases = [_appdata() / "GIMP"]
    elif sys.platform == "darwin":
        bases = [_home() / "Library" / "Application Support" / "GIMP"]
    else:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config")
        bases = [config / "GIMP", _home() / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP"]
    return [base / version for base in bases for version in GIMP_VERSIONS]


@dataclass(frozen=True)
class Installed:
    editor: str
    path: Path
    next_steps: str


def _unpack(source: Path, work: Path) -> Path:
    """A bundle folder as is, or a zip unpacked into ``work``."""
    if source.is_dir():
        return source
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                target = (work / member).resolve()
                if work.resolve() not in target.parents and target != work.resolve():
                    raise ValueError(f"{source}: refusing the unsafe path {member!r}")
            archive.extractall(work)
        return work
    raise ValueError(f"{source} is neither a plug-in folder nor a zip file")


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, replacing an older version atomically where possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(dst.name + ".installing")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
    staging.rename(dst)
    if old.exists():
        shutil.rmtree(old)


class EditorNotFound(ValueError):
    """None of the editor's config folders exists: it is not installed, or never started."""


def _found(editor: str, candidates: List[Path]) -> List[Path]:
    """The candidate folders that exist; EditorNotFound (naming them) when none does, so an
    editor that is not installed never gets folders made for it."""
    found = [d for d in candidates if d.exists()]
    if not found:
        raise EditorNotFound(
            f"{editor} does not seem to be installed, or has never been started: none of its "
            f"folders exists (looked for {', '.join(str(d) for d in candidates)}). Start "
            f"{editor} once and retry, or pass --profile-dir FOLDER.")
    return found


def install_krita(bundle: Path, profile_dir: Optional[Path] = None) -> List[Installed]:
    """Install the Krita bundle (the .desktop file + package folder, or their zip)."""
    targets = [profile_dir] if profile_dir else _found("Krita", krita_resource_dirs())
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpack(bundle, Path(tmp))
        desktop = root / f"{PLUGIN_NAME}.desktop"
        package = root / PLUGIN_NAME
        if not desktop.is_file() or not (package / "__init__.py").is_file():
            raise ValueError(f"{bundle} is not a ControlCanvas Krita bundle (needs "
                             f"{PLUGIN_NAME}.desktop and {PLUGIN_NAME}/__init__.py)")
        for resource in targets:
            pykrita = resource / "pykrita"
            _replace_tree(package, pykrita / PLUGIN_NAME)
            pykrita.mkdir(parents=True, exist_ok=True)
            shutil.copy2(desktop, pykrita / desktop.name)
            done.append(Installed("krita", pykrita / PLUGIN_NAME, (
                "In Krita: Settings ▸ Configure Krita ▸ Python Plugin Manager, tick "
                "'ControlCanvas', then restart Krita; the docker is under Settings ▸ Dockers "
                "▸ ControlCanvas.")))
    return done


def install_gimp(bundle: Path, profile_dir: Optional[Path] = None) -> List[Installed]:
    """Install the GIMP plug-in folder (or its zip) into every GIMP 3.x profile found."""
    targets = [profile_dir] if profile_dir else _found("GIMP 3", gimp_config_dirs())
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpack(bundle, Path(tmp))
        folder = root if (root / f"{PLUGIN_NAME}.py").is_file() else root / PLUGIN_NAME
        entry = folder / f"{PLUGIN_NAME}.py"
        if not entry.is_file():
            raise ValueError(f"{bundle} is not a ControlCanvas GIMP bundle (needs "
                             f"{PLUGIN_NAME}/{PLUGIN_NAME}.py)")
        for config in targets:
            target = config / "plug-ins" / PLUGIN_NAME
            _replace_tree(folder, target)
            installed_entry = target / f"{PLUGIN_NAME}.py"
            mode = installed_entry.stat().st_mode
            installed_entry.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            os.utime(installed_entry)  # GIMP re-queries a plug-in whose date changed

            done.append(Installed("gimp", target, (
                "Restart GIMP; the commands are under Filters ▸ ControlNet. If they do not "
                "appear, run `gimp --verbose` and look for 'controlcanvas'.")))
    return done


def installed_plugins() -> List[Installed]:
    """Where a ControlCanvas plug-in is currently installed (for ``doctor``)."""
    found = []
    for resource in krita_resource_dirs():
        if (resource / "pykrita" / f"{PLUGIN_NAME}.desktop").is_file():
            found.append(Installed("krita", resource / "pykrita" / PLUGIN_NAME, ""))
    for config in gimp_config_dirs():
        entry = config / "plug-ins" / PLUGIN_NAME / f"{PLUGIN_NAME}.py"
        if entry.is_file():
            ok = os.access(entry, os.X_OK)
            found.append(Installed("gimp", entry.parent, "" if ok else "not executable"))
    return found
