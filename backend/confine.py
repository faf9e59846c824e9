"""Names a client gives for files on the server's machine, kept inside the folders (roots)
the server's owner set aside for them: training data and output, model folders.

The rule, in one place: a relative name resolves inside a root; an absolute name must lie
inside one; a ``..`` part, a NUL, or a symbolic link that leads out of the root is refused.
Every refusal is the caller's one error, whatever the reason and whether or not the path
exists, so a client learns nothing about the rest of the machine.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePath
from typing import Callable, Optional, Sequence

from shared.errors import ControlCanvasError

log = logging.getLogger(__name__)


def _real(path: Path) -> Optional[Path]:
    """``path`` with every symbolic link resolved (None if that fails: a link loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(name: str, roots: Sequence[Path], refuse: Callable[[], ControlCanvasError],
            allow_root: bool = True) -> Path:
    """The real path ``name`` stands for inside one of ``roots``; raises ``refuse()``
    otherwise. A relative name is looked up in each root in turn (the first where it
    exists, else the first root). ``allow_root``: whether the root itself may be named."""
    text = name.strip() if isinstance(name, str) else ""
    if not text or "\0" in text or ".." in PurePath(text).parts or ".." in text.split("\\"):
        raise refuse()
    reals = [r for r in (_real(Path(root)) for root in roots) if r is not None]
    candidates = [Path(text)] if Path(text).is_absolute() else [root / text for root in reals]
    found = None
    for candidate in candidates:
        real = _real(candidate)
        if real is None:
            continue
        if found is None or _exists(real):
            found = real
        if _exists(real):
            break
    if found is not None:
        for root in reals:
            if _inside(found, root) and (allow_root or found != root):
                return found
    log.info("refused a client's path %r: outside %s", name, ", ".join(map(str, reals)))
    raise refuse()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
