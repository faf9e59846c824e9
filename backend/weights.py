"""Annotator weight files (lllyasviel/Annotators): found locally, loaded safely.

Shared by the controlnet-aux annotators (:mod:`backend.annotators.aux`) and pose
detection (:mod:`backend.pose.openpose`).  Never downloads: a missing file is a
:class:`~shared.errors.ModelMissing` that says which file and how to fetch it.
Weights load with ``torch.load(..., weights_only=True)``; :func:`random_weights`
builds networks with random weights instead (tests, offline).  Importing this
module imports neither torch nor controlnet_aux.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from shared.errors import EngineError, ModelMissing

log = logging.getLogger(__name__)

HUB_REPO = "lllyasviel/Annotators"
DIR_ENV = "CONTROLCANVAS_ANNOTATORS_DIR"
INSTALL_HINT = ("install the optional extra: `controlcanvas setup annotators` (controlnet-aux "
                "with the torch 2.14.1 + torchvision 0.29.1 pair it needs).")

_random_weights = False
_cache: Dict[Tuple[str, Tuple[Optional[str], ...]], Any] = {}


@functools.lru_cache(maxsize=1)
def aux_installed() -> bool:
    """Whether controlnet_aux (and torch) can be imported, without importing them."""
    return all(importlib.util.find_spec(m) is not None for m in ("controlnet_aux", "torch"))


@contextlib.contextmanager
def random_weights(seed: int = 0) -> Iterator[None]:
    """Build detectors with random weights instead of files (tests; offline)."""
    global _random_weights
    import torch
    torch.manual_seed(seed)
    previous, _random_weights = _random_weights, True
    _cache.clear()
    try:
        yield
    finally:
        _random_weights = previous
        _cache.clear()


# -----------------------------------------------------------------------------
# Weight files
# -----------------------------------------------------------------------------

def _annotators_dir() -> Optional[Path]:
    value = os.environ.get(DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def find_weight(filename: str) -> Optional[Path]:
    """Local path of one ``lllyasviel/Annotators`` file, or None (never downloads)."""
    folder = _annotators_dir()
    if folder is not None and (folder / filename).is_file():
        return folder / filename
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return None
    found = try_to_load_from_cache(HUB_REPO, filename)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def missing_message(name: str, filenames) -> str:
    files = " ".join(filenames)
    where = f" or copy them into the folder named by {DIR_ENV}"
    folder = _annotators_dir()
    if folder is not None:
        where = f" or copy them into {folder} ({DIR_ENV})"
    return (f"The {name} annotator needs {files} from the Hugging Face repo {HUB_REPO}, and "
            f"they are not on this machine. Fetch them once (online): "
            f"`hf download {HUB_REPO} {files}` (they go to the Hugging Face cache){where}.")


def resolve_weights(name: str, filenames: Tuple[str, ...]) -> Tuple[Optional[str], ...]:
    if _random_weights:
        return tuple(None for _ in filenames)
    paths = [find_weight(f) for f in filenames]
    missing = [f for f, p in zip(filenames, paths) if p is None]
    if missing:
        raise ModelMissing(missing_message(name, missing), field="annotator")
    return tuple(str(p) for p in paths)


def weights_present(filenames: Tuple[str, ...]) -> bool:
    return all(find_weight(f) is not None for f in filenames)


def load_weights(path: str):
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never code."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise EngineError(
            f"{path} could not be read as plain weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). ControlCanvas only loads tensor "
            f"files (weights_only); delete the file and fetch it again from {HUB_REPO}.",
            field="annotator") from None


def load_state(path: Optional[str], key: Optional[str] = None,
               strip: str = "module.") -> Optional[dict]:
    """State dict from a checkpoint, tensors only (``weights_only=True``)."""
    if path is None:
        return None
    state = load_weights(path)
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    return {(k[len(strip):] if strip and k.startswith(strip) else k): v for k, v in state.items()}


def ready(module, state: Optional[dict], strict: bool = True):
    if state is not None:
        module.load_state_dict(state, strict=strict)
    return module.float().eval()


def using_random_weights() -> bool:
    """Whether detectors are being built with random weights (inside :func:`random_weights`)."""
    return _random_weights


def cached_detector(name: str, files: Tuple[str, ...],
                    build: Callable[[Tuple[Optional[str], ...]], Any]):
    """The detector ``name`` built by ``build(paths)`` once per (name, weight files)."""
    paths = resolve_weights(name, files)
    key = (name, paths)
    det = _cache.get(key)
    if det is None:
        log.info("loading annotator %s%s", name, " (random weights)" if _random_weights else "")
        det = build(paths)
        _cache[key] = det
    return det
