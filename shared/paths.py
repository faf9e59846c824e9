"""Where the server keeps its per-user files, found the same way by the backend and by
both plug-ins (which cannot import the backend).

``$CONTROLCANVAS_CONFIG_DIR`` if set; else the per-user config folder —
``%APPDATA%`` on Windows, ``~/Library/Application Support`` on macOS,
``$XDG_CONFIG_HOME`` or ``~/.config`` elsewhere — plus ``controlcanvas``.

Inside a Flatpak sandbox (a Krita or GIMP from Flathub; ``$FLATPAK_ID`` is set) Flatpak
points ``$XDG_CONFIG_HOME`` at the app's own ``~/.var/app/<id>/config``, while the
server, outside the sandbox, writes the token to the host's folder: so there the host's
``$HOST_XDG_CONFIG_HOME`` (set by Flatpak when the host sets it) or ``~/.config`` is used.

The per-user data folder (:func:`data_dir`: models and training folders a client may
name, the pose venv) is ``$CONTROLCANVAS_DATA_DIR`` if set, else ``%LOCALAPPDATA%``,
``~/Library/Application Support`` or ``$XDG_DATA_HOME`` / ``~/.local/share``, plus
``controlcanvas``.

The token file is read without following a symbolic link (:func:`load_token_file`): a
link would let whoever placed it pick the token (say, a world-readable system file).

The per-user cache folder (``cache_dir``; the server's job store and the tiny models
live there) is ``$CONTROLCANVAS_CACHE_DIR`` if set; else ``%LOCALAPPDATA%/controlcanvas/cache``
on Windows, ``~/Library/Caches/controlcanvas`` on macOS, ``$XDG_CACHE_HOME`` or
``~/.cache`` plus ``controlcanvas`` elsewhere. Only the backend uses it (so no Flatpak rule).

The table in docs/platforms.md lists these folders; tests/test_platform_paths.py checks
that it and this code agree.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Mapping, Optional

from .errors import TokenFileError


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


def data_dir(environ: Optional[Mapping[str, str]] = None,
             platform: Optional[str] = None) -> Path:
    """The per-user data folder (see the module docstring)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    override = env.get("CONTROLCANVAS_DATA_DIR")
    if override:
        return Path(override)
    home = Path(env.get("USERPROFILE" if platform == "win32" else "HOME") or Path.home())
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "controlcanvas"


def load_token_file(path: Path) -> str:
    """The token in ``path``; TokenFileError (saying what to do) when the file is missing,
    empty, a folder, a symbolic link or unreadable. A link is never followed."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise TokenFileError(f"There is no token file at {path}. Start the server once with "
                             f"`controlcanvas serve` (it writes the file), or enter the "
                             f"server's token by hand.") from None
    except (OSError, ValueError) as err:
        raise TokenFileError(f"The token file {path} cannot be read "
                             f"({_reason(err)}).") from None
    if stat.S_ISLNK(info.st_mode):
        raise TokenFileError(f"The token file {path} is a symbolic link; ControlCanvas does "
                             f"not follow links for its token. Delete the link and start "
                             f"`controlcanvas serve` to make a new token file.")
    if stat.S_ISDIR(info.st_mode):
        raise TokenFileError(f"The token file {path} is a folder. Remove it, or choose a file "
                             f"path with --token-file (or token_file in config.toml).")
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"The token file {path} is not a regular file. Delete it and "
                             f"start `controlcanvas serve` to make a new one.")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            text = handle.read(4096).decode("utf-8").strip()
    except (OSError, ValueError) as err:  # ELOOP: became a link since lstat
        raise TokenFileError(f"The token file {path} cannot be read "
                             f"({_reason(err)}).") from None
    if not text:
        raise TokenFileError(f"The token file {path} is empty. Delete it and start "
                             f"`controlcanvas serve` to make a new one.")
    return text


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "it is a symbolic link"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    if isinstance(err, UnicodeError):
        return "it is not text"
    return type(err).__name__


def read_token(path: Path) -> str:
    """The token in ``path``, or '' when :func:`load_token_file` refuses it (missing,
    unreadable, empty, a folder or a symbolic link)."""
    try:
        return load_token_file(path)
    except TokenFileError:
        return ""
