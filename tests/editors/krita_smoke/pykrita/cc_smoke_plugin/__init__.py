"""ControlCanvas test fixture plug-in (run_smoke.sh installs copies under other names).

On import it registers an Extension and appends lines to $CC_SMOKE_PLUGIN_MARKER.
With CC_SMOKE_GUI_OUT set (full `krita` started offscreen), it runs
cc_krita_smoke.main([CC_SMOKE_GUI_OUT, CC_SMOKE_PORT, "gui"]) once the main window
exists (module dir from CC_SMOKE_MODDIR) and then ends the process.
"""
import os
import sys

from krita import Extension, Krita

REGISTERED = False
MARKER = os.environ.get("CC_SMOKE_PLUGIN_MARKER")


def _mark(text):
    if MARKER:
        with open(MARKER, "a") as f:
            f.write("%s %s\n" % (text, __name__))


class CCSmokeExtension(Extension):
    def setup(self):
        _mark("setup")

    def createActions(self, window):
        _mark("createActions")


def _run_gui_smoke():
    _mark("gui_run")
    try:
        sys.path.insert(0, os.environ["CC_SMOKE_MODDIR"])
        import cc_krita_smoke
        cc_krita_smoke.main([os.environ["CC_SMOKE_GUI_OUT"],
                             os.environ.get("CC_SMOKE_PORT", ""), "gui"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # closing the window would ask to save the test documents


Krita.instance().addExtension(CCSmokeExtension(Krita.instance()))
REGISTERED = True
_mark("imported")

if os.environ.get("CC_SMOKE_GUI_OUT"):
    from PyQt5.QtCore import QTimer
    _notifier = Krita.instance().notifier()
    _notifier.setActive(True)
    _notifier.windowCreated.connect(lambda: QTimer.singleShot(500, _run_gui_smoke))


def hello(args):
    """Entry point for `kritarunner -s <this package> -f hello`."""
    print("CC_PLUGIN_HELLO %s %s" % (__name__, args))
