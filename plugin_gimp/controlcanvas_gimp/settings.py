"""Where the server is and which token to use.

Order, for both the address and the token: the procedure's argument (scripts) >
what *Settings / connection test…* saved > the default (``ws://127.0.0.1:7351``
and the token file the server writes on this machine).  The token file goes only to
a server on this computer (a loopback address, ``shared.loopback``); a server on
another computer needs its token given or saved in Settings.

The token file is found by ``shared.paths``, exactly as the server finds it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from shared.client import DEFAULT_URL
from shared.loopback import choose_token
from shared.paths import config_dir, token_file  # noqa: F401 (re-exported)

from .problems import SETTINGS_MENU

SETTINGS_FILE = "controlcanvas.json"  # in GIMP's per-version user folder


@dataclass(frozen=True)
class Connection:
    url: str
    token: str
    token_source: str  # for messages: where the token came from

    def __repr__(self) -> str:  # keep the token out of logs
        return f"Connection(url={self.url!r}, token=***, token_source={self.token_source!r})"


def load_saved(path: Optional[Path]) -> dict:
    """What Settings saved: {'server-url': ..., 'token': ...}; {} when nothing is saved."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("server-url", "token") and isinstance(v, str)}


def save(path: Path, url: str, token: str) -> None:
    """Save the address and token (readable by this user only); blank values are dropped."""
    data = {k: v.strip() for k, v in (("server-url", url), ("token", token)) if v.strip()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def resolve(values: Mapping[str, str], saved: Mapping[str, str],
            environ: Optional[Mapping[str, str]] = None) -> Connection:
    """The address and token to use for one run; :class:`~shared.errors.TokenNeeded`
    when the server is on another computer and no token was given or saved for it.

    A saved token belongs to the saved address: a script naming another server does not
    get it.  The local token file goes to a loopback address only (``shared.loopback``),
    read by ``shared.paths``' rule: a file it refuses (a symbolic link, a folder, empty) is
    not used, and ``token_source`` says why, so the message names the real reason.
    """
    saved_url = saved.get("server-url", "").strip() or DEFAULT_URL
    url = (values.get("server-url") or "").strip() or saved_url
    entered, source = (values.get("token") or "").strip(), "the token given to the filter"
    if not entered and url == saved_url:
        entered, source = saved.get("token", "").strip(), "the token saved in Settings"
    choice = choose_token(url, entered, entered_source=source,
                          enter_it=f"enter its token in {SETTINGS_MENU}", environ=environ)
    return Connection(url, choice.token_or_raise(), choice.source)
