"""How the access token travels, and how it stays out of logs.

A client sends the token twice: in the handshake (``Authorization: Bearer TOKEN``), so
the server can give it a client slot before reading a single frame, and in ``hello``
(the protocol's own check, which older clients rely on alone).

Standard library only, Python >= 3.10: this module is bundled into the editors.
"""

from __future__ import annotations

import hmac
import logging
from typing import Dict, Optional

HEADER = "Authorization"
_SCHEME = "bearer"


def same_token(given: str, token: str) -> bool:
    """Constant-time comparison of a token a peer sent with the real one; any text (a lone
    surrogate, a byte smuggled into a header) compares unequal and never raises."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               token.encode("utf-8", "surrogatepass"))


def handshake_headers(token: str) -> Dict[str, str]:
    """The header that carries ``token`` in the handshake (none for a token that cannot
    travel in an HTTP header: the client then relies on ``hello`` alone)."""
    if token and token.isascii() and token.isprintable():
        return {HEADER: f"Bearer {token}"}
    return {}


def token_from_header(value: str) -> Optional[str]:
    """The token in an ``Authorization`` header's value, or None when it is not a bearer
    token."""
    scheme, _, given = value.strip().partition(" ")
    return given.strip() if scheme.lower() == _SCHEME else None


class QuietTokenLogger(logging.LoggerAdapter):
    """A logger for the websockets library that never writes the token: at debug level it
    logs every handshake header, so the ``Authorization`` value becomes ``***``."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level, msg, *args, **kwargs) -> None:
        if len(args) == 2 and isinstance(args[0], str) and args[0].lower() == HEADER.lower():
            args = (args[0], "***")
        super().log(level, msg, *args, **kwargs)
