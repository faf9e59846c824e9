"""ControlCanvas test fixture plug-in (copied under other names by run_smoke.sh)."""
import os

from krita import Extension, Krita

REGISTERED = False
MARKER = os.environ.get("CC_SMOKE_PLUGIN_MARKER")


class CCSmokeExtension(Extension):
    def setup(self):
        if MARKER:
            with open(MARKER, "a") as f:
                f.write("setup %s\n" % __name__)

    def createActions(self, window):
        pass


Krita.instance().addExtension(CCSmokeExtension(Krita.instance()))
REGISTERED = True
if MARKER:
    with open(MARKER, "a") as f:
        f.write("imported %s\n" % __name__)


def hello(args):
    """Entry point for `kritarunner -s <this package> -f hello`."""
    print("CC_PLUGIN_HELLO %s %s" % (__name__, args))
