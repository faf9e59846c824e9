"""The plug-in's own errors, and every error as one message that says what to do.

GIMP shows the text of a failed procedure in a message box (and a script gets it
as the PDB error), so :func:`describe` must turn anything — a typed server error,
a refused connection, a bug — into sentences, never a traceback.
"""

from __future__ import annotations

from typing import Optional

from shared.errors import ControlCanvasError, Unsupported
from shared.loopback import is_loopback_url

SETTINGS_MENU = "Filters ▸ ControlNet ▸ Settings / connection test…"
START_SERVER = ("Start it with `controlcanvas serve` (in a terminal on the computer with the "
                "GPU), then run the filter again")


class UsageError(ControlCanvasError):
    """Something in GIMP is not as the filter needs it (no layer, bad argument...)."""

    code = "usage"
    default_message = "Select one layer of an RGB or grayscale image, then run the filter."


class PoseUnavailable(Unsupported):
    """The server cannot detect poses (no pose annotator, or it sends no keypoints)."""

    default_message = (
        "the server cannot detect poses yet (it offers no 'openpose' pose annotator). Use "
        "Filters ▸ ControlNet ▸ Figure from pose…: it starts from a default skeleton path "
        "whose joints you move with the Paths tool.")


def describe(err: BaseException, *, url: str = "", token_source: str = "",
             action: str = "") -> str:
    """One user-facing message for ``err``: what happened, then what to do."""
    where = f" at {url}" if url else ""
    doing = f" {action}" if action else ""
    if isinstance(err, ControlCanvasError):
        code = err.code
        text = err.message.strip()
        if code == "unreachable":
            return (f"ControlCanvas: no server answers{where}. {START_SERVER}. To use another "
                    f"address, open {SETTINGS_MENU}")
        if code == "auth":
            source = f" The plug-in used {token_source}." if token_source else ""
            if url and not is_loopback_url(url):
                return (f"ControlCanvas: the server{where} refused the access token.{source} "
                        f"Paste that server's token (from the token file `controlcanvas "
                        f"serve` names on the server's computer) into {SETTINGS_MENU}")
            return (f"ControlCanvas: the server{where} refused the access token.{source} Start "
                    f"the server once on this computer with `controlcanvas serve` so it writes "
                    f"its token file, or paste the token it printed into {SETTINGS_MENU}")
        if code == "token_needed":  # a server elsewhere, no token: none was sent
            return f"ControlCanvas: {text}"
        if code == "connection_lost":
            return (f"ControlCanvas: the connection to the server{where} was lost{doing}; the "
                    f"job was stopped. Check that the server is still running (`controlcanvas "
                    f"serve`), then run the filter again.")
        if code == "model_missing":
            return f"ControlCanvas: a model is missing on the server. {text}"
        if code == "out_of_memory":
            return (f"ControlCanvas: the server ran out of GPU memory{doing}. {text} In the "
                    f"dialog, set 'Work at' to the model's native size and 'Variants' to 1.")
        if code == "version":
            return f"ControlCanvas: plug-in and server versions differ. {text}"
        if code == "cancelled":
            return "ControlCanvas: the job was cancelled on the server."
        if code == "usage":
            return f"ControlCanvas: {text}"
        if isinstance(err, Unsupported):
            return f"ControlCanvas: {text}"
        return f"ControlCanvas: {text}"
    if isinstance(err, TimeoutError):
        return (f"ControlCanvas: the server{where} did not answer in time{doing}. Check that "
                f"`controlcanvas serve` is running and not busy, then run the filter again.")
    if isinstance(err, (ConnectionError, OSError)):
        return (f"ControlCanvas: the network failed{doing} ({type(err).__name__}: {err}). "
                f"{START_SERVER}.")
    return (f"ControlCanvas failed unexpectedly{doing} ({type(err).__name__}: {err}). This is a "
            f"bug in the plug-in; the details went to GIMP's error output. Please report it.")


def short(text: Optional[str], limit: int = 40) -> str:
    """``text`` on one line, at most ``limit`` characters (with an ellipsis)."""
    one_line = " ".join((text or "").split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1].rstrip() + "…"
