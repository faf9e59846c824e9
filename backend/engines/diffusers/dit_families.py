"""Every transformer (DiT) family the engine runs, by name: :mod:`.dit` (Flux.1, SD3 /
SD3.5 and the :class:`~.dit.DitFamily` they share) and one module per further family
(:mod:`.dit_zimage`, :mod:`.dit_qwen`,
:mod:`.dit_klein`).  A family's module builds on :mod:`.dit`; this one
only lists them (so that no family module imports another)."""

from __future__ import annotations

from typing import Dict, Optional

from .dit import FLUX, SD3, DitFamily
from .dit_klein import KLEIN
from .dit_qwen import QWEN
from .dit_zimage import ZIMAGE

DIT_FAMILIES: Dict[str, DitFamily] = {f.name: f for f in (FLUX, SD3, ZIMAGE, QWEN, KLEIN)}


def dit_family(family: str) -> Optional[DitFamily]:
    """The transformer family ``family`` is, or None for a UNet family."""
    return DIT_FAMILIES.get(family)
