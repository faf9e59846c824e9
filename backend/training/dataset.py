"""Training pairs on disk: find them, check every one, read them at a resolution.

Two layouts are accepted (``find_pairs`` picks by what the folder holds):

* **fill50k** — ``source/`` (conditions), ``target/`` (images) and ``prompt.json``
  with one JSON object per line: ``{"source": "source/0.png", "target":
  "target/0.png", "prompt": "..."}`` (paths relative to the dataset folder).
* **pairs by file name** — ``source/`` and ``target/`` without ``prompt.json``:
  ``source/NAME.png`` pairs with ``target/NAME.<any image suffix>``; the prompt is
  the text of ``target/NAME.txt`` when it exists, else empty.

Every pair is checked before training starts (the file exists, decodes as an
image, and source and target have the same size).  Problems are never skipped:
they are collected and raised together as one :class:`DatasetError` that names
each file, so a user fixes them all in one go.

No torch here: pixels are numpy ``uint8`` arrays, H x W x 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image as PILImage

from .errors import DatasetError, Problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Pair:
    """One training example: condition image, target image, prompt."""

    source: Path
    target: Path
    prompt: str


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_prompt_json(root: Path, problems: List[Problem]) -> List[Tuple[str, str, str]]:
    entries = []
    text = (root / "prompt.json").read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt.json line {number}"
        try:
            item = json.loads(line)
        except ValueError as err:
            problems.append(Problem(where, f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(item, dict):
            problems.append(Problem(where, "expected an object with source, target, prompt"))
            continue
        missing = [k for k in ("source", "target") if not isinstance(item.get(k), str)
                   or not item.get(k)]
        if missing:
            problems.append(Problem(where, f"missing or non-text {' and '.join(missing)}"))
            continue
        prompt = item.get("prompt", "")
        if not isinstance(prompt, str):
            problems.append(Problem(where, "prompt must be text"))
            continue
        entries.append((item["source"], item["target"], prompt))
    return entries


def _by_stem(folder: Path, root: Path, problems: List[Problem]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            problems.append(Problem(_rel(path, root), f"same name as "
                                    f"{_rel(found[path.stem], root)}; keep one of them"))
            continue
        found[path.stem] = path
    return found


def _pairs_by_name(root: Path, problems: List[Problem]) -> List[Pair]:
    sources = _by_stem(root / "source", root, problems)
    targets = _by_stem(root / "target", root, problems)
    for stem in sorted(set(sources) - set(targets)):
        problems.append(Problem(_rel(sources[stem], root),
                                f"has no target (expected target/{stem}.png or another image)"))
    for stem in sorted(set(targets) - set(sources)):
        problems.append(Problem(_rel(targets[stem], root),
                                f"has no source (expected source/{stem}.png or another image)"))
    pairs = []
    for stem in sorted(set(sources) & set(targets)):
        caption = targets[stem].with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        pairs.append(Pair(sources[stem], targets[stem], prompt))
    return pairs


def _image_size(path: Path) -> Tuple[int, int]:
    """Decode the whole file (a truncated image fails here, not mid-training)."""
    with PILImage.open(path) as image:
        image.load()
        return image.size


def find_pairs(folder, check: bool = True) -> List[Pair]:
    """All pairs of a dataset folder, in a stable order; DatasetError names every bad one.

    ``check`` decodes every image once to catch unreadable files and size
    mismatches up front (a few ms per small image).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(root, [Problem(str(root), "is not a folder")])
    problems: List[Problem] = []
    for sub in ("source", "target"):
        if not (root / sub).is_dir():
            problems.append(Problem(f"{sub}/", "folder is missing (a dataset needs source/ "
                                    "with the condition images and target/ with the images)"))
    if problems:
        raise DatasetError(root, problems)
    if (root / "prompt.json").is_file():
        pairs = []
        for source, target, prompt in _read_prompt_json(root, problems):
            pairs.append(Pair(root / source, root / target, prompt))
    else:
        pairs = _pairs_by_name(root, problems)
    if check:
        pairs = _check_pairs(root, pairs, problems)
    if not pairs and not problems:
        problems.append(Problem(_rel(root, root.parent), "has no pairs"))
    if problems:
        raise DatasetError(root, problems)
    return pairs


def _check_pairs(root: Path, pairs: Iterable[Pair], problems: List[Problem]) -> List[Pair]:
    good = []
    sizes: Dict[Path, Optional[Tuple[int, int]]] = {}
    for pair in pairs:
        ok = True
        for path in (pair.source, pair.target):
            if path in sizes:
                ok = ok and sizes[path] is not None
                continue
            sizes[path] = None
            if not path.is_file():
                problems.append(Problem(_rel(path, root), "file is missing"))
                ok = False
                continue
            try:
                sizes[path] = _image_size(path)
            except Exception as err:  # PIL raises many kinds for broken files
                problems.append(Problem(_rel(path, root), f"cannot be read as an image "
                                        f"({type(err).__name__}: {err})"))
                ok = False
        if not ok:
            continue
        ss, ts = sizes[pair.source], sizes[pair.target]
        if ss != ts:
            problems.append(Problem(
                _rel(pair.source, root), f"is {ss[0]}x{ss[1]} but its target "
                f"{_rel(pair.target, root)} is {ts[0]}x{ts[1]}; a pair must have one size"))
            continue
        good.append(pair)
    return good


def read_image(path: Path, resolution: int) -> np.ndarray:
    """RGB uint8 H x W x 3 at ``resolution`` (shorter side scaled, then centre crop)."""
    with PILImage.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        if (w, h) != (resolution, resolution):
            scale = resolution / min(w, h)
            nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), PILImage.Resampling.BICUBIC)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        return np.asarray(image, dtype=np.uint8).copy()


class PairImages:
    """Pixels of a list of pairs at one resolution, read on demand and kept in memory
    when they fit ``keep_bytes`` (small datasets are read once)."""

    def __init__(self, pairs: Sequence[Pair], resolution: int,
                 keep_bytes: int = 1 << 30) -> None:
        self.pairs = list(pairs)
        self.resolution = resolution
        self._keep = len(self.pairs) * resolution * resolution * 6 <= keep_bytes
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def prompt(self, index: int) -> str:
        return self.pairs[index].prompt

    def get(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(condition, target) uint8 arrays for pair ``index``."""
        item = self._cache.get(index)
        if item is None:
            pair = self.pairs[index]
            item = (read_image(pair.source, self.resolution),
                    read_image(pair.target, self.resolution))
            if self._keep:
                self._cache[index] = item
        return item

    def batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        items = [self.get(i) for i in indices]
        return (np.stack([c for c, _ in items]), np.stack([t for _, t in items]),
                [self.prompt(i) for i in indices])
