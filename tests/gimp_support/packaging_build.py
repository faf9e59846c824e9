"""Load packaging/build.py as a module (it is a script: packaging/ must never be a package,
or it would shadow the PyPI ``packaging`` that pip and pytest import)."""

import importlib.util
import sys
from pathlib import Path

BUILD_PY = Path(__file__).resolve().parents[2] / "packaging" / "build.py"


def load_build():
    name = "controlcanvas_packaging_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
