"""The one place that imports PyQt: Krita 5 embeds PyQt5, Krita 6 embeds PyQt6.

Every other module does ``from .qt import QtCore, QtGui, QtWidgets, Signal``.
The choice, in order: ``CONTROLCANVAS_QT=5|6`` (tests), ``pykrita.qt_major_version()``
(Krita 6; Krita 5.1 lacks it), whichever PyQt is already loaded, then PyQt5 and finally PyQt6
(Krita 6 refuses ``import PyQt5``, so a failure there falls through).

Code written against this module uses fully qualified enums
(``Qt.AlignmentFlag.AlignLeft``), which both PyQt5 (>= 5.11) and PyQt6 accept.
"""

from __future__ import annotations

import importlib
import os
import sys


def _wanted_major() -> int:
    forced = os.environ.get("CONTROLCANVAS_QT", "").strip()
    if forced in ("5", "6"):
        return int(forced)
    try:
        import pykrita  # only inside Krita
        major = getattr(pykrita, "qt_major_version", None)
        if major is not None:
            return int(major())
    except Exception:  # not in Krita, or an old pykrita without the function
        pass
    if "PyQt6.QtCore" in sys.modules:
        return 6
    if "PyQt5.QtCore" in sys.modules:
        return 5
    return 0


def _load():
    major = _wanted_major()
    order = {5: ("PyQt5",), 6: ("PyQt6",)}.get(major, ("PyQt5", "PyQt6"))
    errors = []
    for name in order:
        try:
            core = importlib.import_module(name + ".QtCore")
            gui = importlib.import_module(name + ".QtGui")
            widgets = importlib.import_module(name + ".QtWidgets")
            return name, core, gui, widgets
        except Exception as err:  # ImportError, or Krita 6's refusal of PyQt5
            errors.append(f"{name}: {err}")
    raise ImportError("ControlCanvas needs PyQt5 or PyQt6 (" + "; ".join(errors) + ")")


API, QtCore, QtGui, QtWidgets = _load()
QT_MAJOR = 6 if API == "PyQt6" else 5
Signal = QtCore.pyqtSignal
Qt = QtCore.Qt
# QAction moved from QtWidgets (Qt 5) to QtGui (Qt 6).
QAction = getattr(QtGui, "QAction", None) or getattr(QtWidgets, "QAction")


def exec_dialog(dialog) -> int:
    """``exec`` on Qt 6, ``exec_`` on Qt 5."""
    run = getattr(dialog, "exec", None) or getattr(dialog, "exec_")
    return run()


def qimage_from_rgba(width: int, height: int, data: bytes):
    """A QImage that owns a copy of straight-alpha RGBA8 bytes."""
    image = QtGui.QImage(data, width, height, 4 * width, QtGui.QImage.Format.Format_RGBA8888)
    return image.copy()


__all__ = ["API", "QT_MAJOR", "QtCore", "QtGui", "QtWidgets", "Signal", "Qt", "QAction",
           "exec_dialog", "qimage_from_rgba"]
