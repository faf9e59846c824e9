"""The ControlCanvas protocol, shared by the backend and both editor plug-ins.

Standard library only (Python >= 3.10); ``shared.client`` additionally needs the
pure-Python ``websockets`` package, which packaging bundles into the plug-ins.
"""

from .messages import PROTOCOL_VERSION

__version__ = "0.1.0"
__all__ = ["PROTOCOL_VERSION", "__version__"]
