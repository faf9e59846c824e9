"""ControlCanvas for Krita: ControlNet generation from layers, in a docker.

Inside Krita, importing this package registers the docker and the extension.
Outside Krita (tests, scripts) it registers nothing and the pure modules
(plan, pose, pixels, settings, worker, controller) import as usual.
"""

__version__ = "0.1.0"

from . import canvas as _canvas

REGISTERED = _canvas.register()
