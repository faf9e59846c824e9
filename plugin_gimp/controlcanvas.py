#!/usr/bin/env python3
"""ControlCanvas for GIMP 3.0 / 3.2: Filters ▸ ControlNet.

GIMP loads this file from its user plug-in folder as
``plug-ins/controlcanvas/controlcanvas.py`` (the folder must be called like the
file, and the file must be executable).  The folder also holds the plug-in's
package ``controlcanvas_gimp`` and the bundled ``shared`` protocol and
``websockets`` client, so nothing needs installing into GIMP's Python.
Build that folder with ``python packaging/build.py``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.realpath(os.path.abspath(__file__)))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
if not os.path.isdir(os.path.join(_HERE, "shared")):
    # A developer's link to plugin_gimp/ in a source checkout: shared/ is one level up.
    sys.path.append(os.path.dirname(_HERE))

from controlcanvas_gimp.canvas import main  # noqa: E402

main(sys.argv)
