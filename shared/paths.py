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
from typing import Mapping, NamedTuple, Optional, Tuple

from .errors import TokenFileError


class _Folder(NamedTuple):
    """One kind of per-user folder: its override variable, and its base on each platform
    (Windows: a variable, else a path under the home folder; macOS: a path under the home
    folder; elsewhere: an XDG variable, else a path under the home folder)."""

    override: str
    windows: Tuple[str, Tuple[str, ...]]
    macos: Tuple[str, ...]
    xdg: Tuple[str, Tuple[str, ...]]
    inside: Tuple[str, ...] = ("controlcanvas",)         # below the base
    inside_windows: Tuple[str, ...] = ("controlcanvas",)
    flatpak_host: str = ""  # inside a Flatpak sandbox: the host's variable for this base


_CONFIG = _Folder("CONTROLCANVAS_CONFIG_DIR", ("APPDATA", ("AppData", "Roaming")),
                  ("Library", "Application Support"), ("XDG_CONFIG_HOME", (".config",)),
                  flatpak_host="HOST_XDG_CONFIG_HOME")
_CACHE = _Folder("CONTROLCANVAS_CACHE_DIR", ("LOCALAPPDATA", ("AppData", "Local")),
                 ("Library", "Caches"), ("XDG_CACHE_HOME", (".cache",)),
                 inside_windows=("controlcanvas", "cache"))
_DATA = _Folder("CONTROLCANVAS_DATA_DIR", ("LOCALAPPDATA", ("AppData", "Local")),
                ("Library", "Application Support"), ("XDG_DATA_HOME", (".local", "share")))


def _user_folder(folder: _Folder, environ: Optional[Mapping[str, str]],
                 platform: Optional[str]) -> Path:
    """The per-user folder of one kind (see the module docstring)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    override = env.get(folder.override)
    if override:
        return Path(override)
    if platform == "win32":
        # Path.home() on Windows reads USERPROFILE (not HOME); only used without the variable
        home = env.get("USERPROFILE") or env.get("HOME")
        variable, below_home = folder.windows
        base = Path(env.get(variable) or (Path(home) if home else Path.home()).joinpath(
            *below_home))
        return base.joinpath(*folder.inside_windows)
    home_path = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if platform == "darwin":
        return home_path.joinpath(*folder.macos, *folder.inside)
    variable, below_home = folder.xdg
    if folder.flatpak_host and env.get("FLATPAK_ID"):
        variable = folder.flatpak_host
    return Path(env.get(variable) or home_path.joinpath(*below_home)).joinpath(*folder.inside)


def config_dir(environ: Optional[Mapping[str, str]] = None,
               platform: Optional[str] = None) -> Path:
    """The per-user config folder (see the module docstring)."""
    return _user_folder(_CONFIG, environ, platform)


def cache_dir(environ: Optional[Mapping[str, str]] = None,
              platform: Optional[str] = None) -> Path:
    """The per-user cache folder (see the module's docstring)."""
    return _user_folder(_CACHE, environ, platform)


def token_file(environ: Optional[Mapping[str, str]] = None,
               platform: Optional[str] = None) -> Path:
    """The file holding the local server's access token."""
    return config_dir(environ, platform) / "token"


def data_dir(environ: Optional[Mapping[str, str]] = None,
             platform: Optional[str] = None) -> Path:
    """The per-user data folder (see the module docstring)."""
    return _user_folder(_DATA, environ, platform)


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
