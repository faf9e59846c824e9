"""Whether a server address is this computer, and which token a client sends to it.

The local server's token file is this computer's secret: a client sends it only to a
server it reaches over loopback.  A server anywhere else gets the token the user
entered for it, or nothing: :func:`choose_token` then says where to enter one, and
never falls back to the local file.

"Loopback" is decided from the address as written, without asking a resolver, and
in doubt the answer is no (which only means the user has to enter the token):

- ``localhost`` and ``localhost.`` exactly (any case); ``foo.localhost`` is not;
- literal addresses in 127.0.0.0/8, ``::1`` and IPv4-mapped ``::ffff:127.x.y.z``,
  in their standard spelling only: ``127.1``, ``0x7f000001``, ``2130706433`` or
  ``0177.0.0.1`` are not (a resolver may read them as loopback, ``ipaddress`` does
  not, and so neither do we);
- URLs are parsed with :func:`urllib.parse.urlsplit` (what ``websockets`` uses): a
  ``ws``/``wss`` scheme, no user info (``ws://127.0.0.1@evil.example`` is
  evil.example), a host and an optional port and nothing else; no spaces, control or
  non-ASCII characters, no ``%`` (zone ids, escapes).

Used by both plug-ins and by the command line's ``--url`` (``backend.cli``); the
server's own checks of its bind address and of the ``Host`` header
(``backend.server.config.is_loopback_host``) use :func:`is_loopback_authority`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from .errors import TokenFileError, TokenNeeded
from .paths import load_token_file, token_file

LOCAL_NAMES = ("localhost", "localhost.")
SCHEMES = ("ws", "wss")
# The whole network location: [v6] or a name/v4 address, then an optional port.
_NETLOC = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.\-]+))"
                     r"(?::[0-9]{1,5})?")


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (a bare name or address: no brackets, no port) is this
    computer's loopback: see the module's rules."""
    if not host or not host.isascii() or "%" in host:
        return False
    name = host.lower()
    if name in LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (False before 3.13)
    return mapped is not None and mapped.is_loopback


def is_loopback_authority(text: str) -> bool:
    """True for ``host[:port]`` as written in a URL or an HTTP ``Host`` header
    ('localhost:7351', '[::1]:7351', '127.0.0.1') or a bare IPv6 address ('::1') when
    the host is loopback; anything more (user info, junk after the brackets) is not."""
    if not text or not text.isascii():
        return False
    if text.count(":") > 1 and "[" not in text:  # a bare IPv6 address (a bind address)
        return is_loopback_host(text)
    match = _NETLOC.fullmatch(text)
    return match is not None and is_loopback_host(match.group("v6") or match.group("name"))


def is_loopback_url(url: str) -> bool:
    """True when the websocket address ``url`` reaches this computer over loopback."""
    if not isinstance(url, str) or not url.isascii() or \
            any(ch.isspace() or not ch.isprintable() for ch in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return False
    if parts.scheme not in SCHEMES or not parts.hostname:
        return False
    if parts.netloc.count(":") > 1 and "[" not in parts.netloc:
        return False  # IPv6 in a URL needs brackets
    return is_loopback_authority(parts.netloc) and is_loopback_host(parts.hostname)


@dataclass(frozen=True)
class TokenChoice:
    """The token a client sends, and what to tell the user about it."""

    token: str  # "" = none
    source: str  # where it came from, for messages ("the token file ~/.config/…")
    note: str  # one sentence: where the token came from, or what the user must do
    needed: bool = False  # a server elsewhere and no token entered: do not connect
    # why the local token file was not used (missing, a link, ...): a plug-in connects
    # anyway and shows :attr:`note`; the command line stops with it
    problem: Optional[TokenFileError] = None

    def __repr__(self) -> str:  # keep the token out of logs
        return (f"TokenChoice(token=***, source={self.source!r}, needed={self.needed})")

    def token_or_raise(self) -> str:
        """The token to send; :class:`~shared.errors.TokenNeeded` (with :attr:`note`)
        when the server is elsewhere and no token was entered."""
        if self.needed:
            raise TokenNeeded(self.note)
        return self.token


def remote_needs_token(url: str, enter_it: str) -> str:
    """The sentence for a server elsewhere that has no token entered."""
    return (f"The server at {url} is not on this computer, so it does not get this "
            f"computer's token. {enter_it[:1].upper()}{enter_it[1:]} (`controlcanvas serve` "
            f"prints where its token file is, on that computer).")


def choose_token(url: str, entered: str = "", *, entered_source: str = "the token you entered",
                 enter_it: str = "enter its token in the plug-in's connection settings",
                 environ: Optional[Mapping[str, str]] = None) -> TokenChoice:
    """The token for the server at ``url``: the one the user entered; else, only when
    ``url`` is loopback, the local server's token file; else none (``needed``).

    ``entered_source`` names the entered token in messages; ``enter_it`` tells the user
    how to give a token ("enter its token in the docker's Server ▸ Token field", "pass
    its token with --token")."""
    entered = (entered or "").strip()
    if entered:
        return TokenChoice(entered, entered_source, f"Using {entered_source}.")
    if not is_loopback_url(url):
        return TokenChoice("", "no token", remote_needs_token(url, enter_it), needed=True)
    path = token_file(environ)
    try:  # shared.paths' rules: no symbolic link, no folder, not empty
        token = load_token_file(path)
    except TokenFileError as err:
        return _unusable_token_file(path, err, enter_it)
    return TokenChoice(token, f"the token file {path}", f"Token read from {path}.")


def _unusable_token_file(path: Path, err: TokenFileError, enter_it: str) -> TokenChoice:
    """No token: the file is missing, or :func:`~shared.paths.load_token_file` refused it
    (a symbolic link, a folder, empty, unreadable); the source names the real reason."""
    if not os.path.lexists(path):
        return TokenChoice("", f"no token (there is no token file at {path})",
                           f"No token file at {path}; start the server once with "
                           f"`controlcanvas serve`, or {enter_it}.", problem=err)
    reason = err.message.split(f"{path}", 1)[-1]  # the path may hold '.' or ';'
    reason = re.split(r"[.;] ", reason.rstrip("."), maxsplit=1)[0]
    return TokenChoice("", f"no token (the token file {path}{reason})",
                       f"{err.message} Or {enter_it}.", problem=err)
