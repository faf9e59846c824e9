"""GGUF files (quantized transformers, as city96's and unsloth's): what a ``.gguf`` holds,
read from its header through the ``gguf`` package's reader (a memory map: names, shapes,
quantization types; no weight is dequantized or copied).

:func:`read_header` gives the tensor names and shapes (in torch's order) that
:mod:`backend.engines.families` detects a family from, with the same rules as a
``.safetensors`` header; its parameter count and dominant quantization size it in
:mod:`backend.engines.fit` and label it in ``controlcanvas models``.

Needs the ``gguf`` package (``pip install "controlcanvas[quant]"``): :data:`MISSING_GGUF`
says so when it is not installed.  No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
MISSING_GGUF = ("needs the gguf package to be read: pip install \"controlcanvas[quant]\" "
                "(or pip install gguf) in the backend's environment")


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's tensors: names, shapes (torch order), parameters, bytes, and the
    quantization most of its parameters are stored in (``Q8_0``, ``Q4_K``, ``BF16``...)."""
    names: Tuple[str, ...]
    shapes: Dict[str, Tuple[int, ...]]
    params: int
    nbytes: int
    quant: str
    block_params: int = 0  # the biggest ``<name>.<number>.`` block (what fit calls a block)


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def available() -> bool:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def read_header(path) -> Optional[GgufHeader]:
    """The header of the GGUF file at ``path``; None when it is not one, cannot be read,
    or the gguf package is missing (:func:`available` tells that case apart)."""
    if not is_gguf(path):
        return None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except ImportError:
        return None
    except Exception as err:  # noqa: BLE001 - a broken file is "unknown", loading says more
        log.debug("cannot read the GGUF header of %s: %s", path, err)
        return None
    names, shapes, per_type, blocks = [], {}, {}, {}
    total = nbytes = 0
    for tensor in reader.tensors:
        count = int(tensor.n_elements)
        names.append(tensor.name)
        shapes[tensor.name] = tuple(int(d) for d in reversed(list(tensor.shape)))
        kind = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
        per_type[kind] = per_type.get(kind, 0) + count
        total += count
        nbytes += int(tensor.n_bytes)
        parts = tensor.name.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                block = ".".join(parts[:i + 1])
                blocks[block] = blocks.get(block, 0) + count
                break
    quant = max(per_type, key=per_type.get) if per_type else "F32"
    return GgufHeader(tuple(names), shapes, total, nbytes, quant,
                      max(blocks.values(), default=0))
