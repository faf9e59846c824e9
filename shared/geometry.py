"""Size rules both plug-ins and the backend apply the same way.

* The *native working size* of a model family: a ControlNet works best at its base
  model's training resolution (the side of a square): 512 for SD1.5, 1024 for SDXL.
* The *inpaint context*: a plug-in sends the selection's bounding box plus
  :data:`INPAINT_MARGIN` pixels on every side (inside the layer), so the model sees what
  surrounds the part it repaints.
"""

from __future__ import annotations

from typing import Dict, Tuple

Box = Tuple[int, int, int, int]  # x, y, width, height

NATIVE_SIDE: Dict[str, int] = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd3": 1024,
                               "zimage": 1024, "qwen": 1328,
                               "klein": 1024}
DEFAULT_NATIVE_SIDE = NATIVE_SIDE["sd15"]
INPAINT_MARGIN = 64  # context pixels around a selection, each side


def context_box(bounds: Box, width: int, height: int, margin: int = INPAINT_MARGIN) -> Box:
    """The selection's bounding box plus ``margin`` pixels of context on every side,
    clipped to the layer (``width`` x ``height``)."""
    x, y, w, h = bounds
    left, top = max(0, x - margin), max(0, y - margin)
    return (left, top, min(width, x + w + margin) - left, min(height, y + h + margin) - top)
