"""Where the server keeps its per-user files, found the same way by the backend and by
both plug-ins (which cannot import the backend).

``$CONTROLCANVAS_CONFIG_DIR`` if set; else the per-user config folder —
``%APPDATA%`` on Windows, ``~/Library/Application Support`` on macOS,
``$XDG_CONFIG_HOME`` or ``~/.config`` elsewhere — plus ``controlcanvas``.

Inside a Flatpak sandbox (a Krita or GIMP from Flathub; ``$FLATPAK_ID`` is set) Flatpak
points ``$XDG_CONFIG_HOME`` at the app's own ``~/.var/app/<id>/config``, while the
server, outside the sandbox, writes the token to the host's folder: so there the host's
``$HOST_XDG_CONFIG_HOME`` (set by Flatpak when the host sets it) or ``~/.config`` is used.

The per-user cache folder (``cache_dir``; the server's job store and the tiny models
live there) is ``$CONTROLCANVAS_CACHE_DIR`` if set; else ``%LOCALAPPDATA%/controlcanvas/cache``
on Windows, ``~/Library/Caches/controlcanvas`` on macOS, ``$XDG_CACHE_HOME`` or
``~/.cache`` plus ``controlcanvas`` elsewhere. Only the backend uses it (so no Flatpak rule).

The table in docs/platforms.md lists these folders; tests/test_platform_paths.py checks
that it and this code agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional


def config_dir(environ: Optional[Mapping[str, str]] = None,
               platform: Optional[str] = None) -> Path:
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    override = env.get("CONTROLCANVAS_CONFIG_DIR")
    if override:
        return Path(override)
    if platform == "win32":
        # Path.home() on Windows reads USERPROFILE (not HOME); only used without APPDATA
        home = env.get("USERPROFILE") or env.get("HOME")
        base = Path(env.get("APPDATA") or
                    (Path(home) if home else Path.home()) / "AppData" / "Roaming")
    else:
        home_path = Path(env["HOME"]) if env.get("HOME") else Path.home()
        if platform == "darwin":
            base = home_path / "Library" / "Application Support"
        elif env.get("FLATPAK_ID"):
            base = Path(env.get("HOST_XDG_CONFIG_HOME") or home_path / ".config")
        else:
            base = Path(env.get("XDG_CONFIG_HOME") or home_path / ".config")
    return base / "controlcanvas"


def cache_dir(environ: Optional[Mapping[str, str]] = None,
              platform: Optional[str] = None) -> Path:
    """The per-user cache folder (see the module's docstring)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    override = env.get("CONTROLCANVAS_CACHE_DIR")
    if override:
        return Path(override)
    if platform == "win32":
        home = env.get("USERPROFILE") or env.get("HOME")
        base = Path(env.get("LOCALAPPDATA") or
                    (Path(home) if home else Path.home()) / "AppData" / "Local")
        return base / "controlcanvas" / "cache"
    home_path = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if platform == "darwin":
        return home_path / "Library" / "Caches" / "controlcanvas"
    return Path(env.get("XDG_CACHE_HOME") or home_path / ".cache") / "controlcanvas"


def token_file(environ: Optional[Mapping[str, str]] = None,
               platform: Optional[str] = None) -> Path:
    """The file holding the local server's access token."""
    return config_dir(environ, platform) / "token"


def read_token(path: Path) -> str:
    """The token in ``path``, or '' when the file is missing, unreadable or empty."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
