"""Where the server keeps its per-user files, found the same way by the backend and by
both plug-ins (which cannot import the backend).

``$CONTROLCANVAS_CONFIG_DIR`` if set; else the per-user config folder —
``%APPDATA%`` on Windows, ``~/Library/Application Support`` on macOS,
``$XDG_CONFIG_HOME`` or ``~/.config`` elsewhere — plus ``controlcanvas``.
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
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if platform == "win32":
        base = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return base / "controlcanvas"


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
