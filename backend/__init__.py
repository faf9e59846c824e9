"""ControlCanvas backend: the websocket server, job queue and image engines.

Importing ``backend`` is cheap: torch and diffusers are imported only by the
modules that run models, and only when they are used.
"""

__version__ = "0.1.0"
