"""The ControlCanvas protocol and client, from the copy bundled with the plug-in.

The release zip carries ``controlcanvas/_vendor/shared`` (the protocol package,
imported here as ``controlcanvas._vendor.shared`` so no top-level ``shared`` name
is claimed) and ``controlcanvas/_vendor/websockets`` (pure Python).  In a source
checkout (tests) there is no ``_vendor`` and the repository's ``shared`` package
is used instead.

websockets is imported by its own top-level name (``shared.client`` imports it so).
If another plug-in already loaded a usable websockets (>= 13), that one is shared;
otherwise ours is loaded from ``_vendor`` and ``sys.path`` is restored at once, so
other plug-ins' imports are not redirected.
"""

from __future__ import annotations

import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(_HERE, "_vendor")
BUNDLED = os.path.isdir(os.path.join(VENDOR, "shared"))
WEBSOCKETS_PROBLEM = ""  # a sentence for the docker when websockets cannot be used


def _version_tuple(text: str) -> tuple:
    out = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _load_websockets() -> None:
    global WEBSOCKETS_PROBLEM
    loaded = sys.modules.get("websockets")
    if loaded is None and os.path.isdir(os.path.join(VENDOR, "websockets")):
        sys.path.insert(0, VENDOR)
        try:
            importlib.import_module("websockets")
            importlib.import_module("websockets.sync.client")
        except Exception as err:
            WEBSOCKETS_PROBLEM = (f"The websockets copy bundled with ControlCanvas does not load "
                                  f"({err}); reinstall the plug-in.")
        finally:
            try:
                sys.path.remove(VENDOR)
            except ValueError:
                pass
        loaded = sys.modules.get("websockets")
    if loaded is None:
        try:
            loaded = importlib.import_module("websockets")
        except ImportError:
            WEBSOCKETS_PROBLEM = WEBSOCKETS_PROBLEM or (
                "The websockets package is missing; reinstall the ControlCanvas plug-in "
                "from its release zip.")
            return
    version = getattr(loaded, "__version__", "0")
    if _version_tuple(version) < (13, 0):
        WEBSOCKETS_PROBLEM = (f"Another plug-in loaded websockets {version}, which is too old "
                              f"for ControlCanvas (13 or newer is needed); disable that plug-in "
                              f"or update it.")


_load_websockets()

if BUNDLED:
    from ._vendor.shared import (client, codec, doc_history, errors, geometry,  # noqa: F401
                                 images, loopback, messages, naming, offers, paths, pose,
                                 session)
else:
    client = importlib.import_module("shared.client")
    codec = importlib.import_module("shared.codec")
    errors = importlib.import_module("shared.errors")
    images = importlib.import_module("shared.images")
    messages = importlib.import_module("shared.messages")
    session = importlib.import_module("shared.session")
    paths = importlib.import_module("shared.paths")
    loopback = importlib.import_module("shared.loopback")
    pose = importlib.import_module("shared.pose")
    geometry = importlib.import_module("shared.geometry")
    naming = importlib.import_module("shared.naming")
    doc_history = importlib.import_module("shared.doc_history")
    offers = importlib.import_module("shared.offers")

Image = images.Image
Client = client.Client
ControlCanvasError = errors.ControlCanvasError
PreviewReady = session.PreviewReady
ResultReady = session.ResultReady
