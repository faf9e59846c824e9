"""The lowest torch and diffusers releases the engine works with: one owner for
``pyproject.toml`` (a test keeps them equal), ``controlcanvas doctor`` and the floor tier of
the test suite (``tests/floor_env.sh`` runs the engine tests on exactly these releases).

* diffusers 0.39: the first release whose single-file loading works with transformers
  >= 5.6 (``CLIPTextModel`` lost its ``text_model`` wrapper there); the union ControlNet
  code the engine calls is as in 0.35+.  Releases before 0.40 do not know the ``dtype``
  keyword (``engines.diffusers.loaders.dtype_kwargs`` passes ``torch_dtype`` to them).
* torch 2.6: what diffusers 0.39 itself declares; ``torch.OutOfMemoryError`` (the engine's
  out-of-memory test) needs 2.5.
"""

from __future__ import annotations

from typing import Tuple

DIFFUSERS_FLOOR: Tuple[int, int] = (0, 39)
TORCH_FLOOR: Tuple[int, int] = (2, 6)


def release(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string: "0.40.0.dev0" -> (0, 40), "2.6.0+cu124" -> (2, 6)."""
    parts = []
    for part in version.split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def floor_text(floor: Tuple[int, int]) -> str:
    return f"{floor[0]}.{floor[1]}"
