"""Test fixture plug-in for tests/test_krita_real.py (installed only in the test chroot).

With CC_DRIVER_WORK set, it waits for Krita's main window, runs
krita_real_runner.gui_main (module folder CC_DRIVER_MODDIR) and ends the process
(closing the window would ask to save the test documents).
"""
import os
import sys

from krita import Krita

if os.environ.get("CC_DRIVER_WORK"):
    from controlcanvas.qt import QtCore  # PyQt5 in Krita 5, PyQt6 in Krita 6

    def _run():
        try:
            sys.path.insert(0, os.environ["CC_DRIVER_MODDIR"])
            import krita_real_runner
            krita_real_runner.gui_main(os.environ["CC_DRIVER_WORK"], os.environ["CC_DRIVER_URL"],
                                       os.environ["CC_DRIVER_SCREENSHOT"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    _notifier = Krita.instance().notifier()
    _notifier.setActive(True)
    _notifier.windowCreated.connect(lambda: QtCore.QTimer.singleShot(1500, _run))
