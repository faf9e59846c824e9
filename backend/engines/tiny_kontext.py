"""The tiny FLUX.1 Kontext stack (``tiny-flux-kontext``): the tiny Flux stack of
:mod:`backend.engines.tiny_dit` (FLUX.1 Kontext [dev] is the Flux transformer trained to
edit) in a folder of its own whose ``model_index.json`` names ``FluxKontextPipeline``: what
:func:`backend.engines.families.detect_base_folder` reads to call it an edit base.  Random
weights, for tests and benchmarks; built offline on first use from the tiny Flux folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

NAME = "tiny-flux-kontext"
PIPELINE = "FluxKontextPipeline"


def kontext_dir(root: Optional[Path] = None) -> Path:
    from . import tiny, tiny_dit

    return (root or tiny.cache_root()) / "models" / f"{tiny_dit.VERSION}-flux-kontext"


def ensure_kontext(root: Optional[Path] = None) -> Path:
    """The tiny Kontext folder, made on first use (atomic) from the tiny Flux stack."""
    from . import tiny

    folder = kontext_dir(root)
    if tiny.is_built(folder):
        return folder
    flux = tiny.ensure_tiny("flux", root)

    def fill(tmp: Path) -> None:
        shutil.copytree(flux, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("controlnets"))
        index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
        index["_class_name"] = PIPELINE
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "README.txt").write_text(
            f"ControlCanvas tiny FLUX.1 Kontext model ({NAME}): the tiny Flux stack's random "
            f"weights as an edit base, built locally by backend/engines/tiny_kontext.py for "
            f"tests and benchmarks. Not a trained model.\n", encoding="utf-8")

    return tiny.build_once(folder, fill)
