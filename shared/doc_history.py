"""The result history kept inside the document (Krita annotation, GIMP parasite).

One small JSON record, the same for both editors, so reopening a .kra or .xcf shows
what made its result layers: prompt, negative prompt, seed(s), a settings summary, the
layers' names and ids, and when.  No pixels: the layers themselves are in the file.

    {"format": "controlcanvas.history", "version": 1,
     "entries": [{"prompt": ..., "negative": ..., "seeds": [7], "settings": {...},
                  "layers": [["<id>", "red coat · seed 7"]], "time": 1764694800.0}, ...]}

The newest entry comes first.  ``encode`` keeps at most :data:`MAX_ENTRIES` and drops the
oldest until the record fits :data:`MAX_BYTES`.  ``decode`` never raises: a record that
is corrupt, too big, of another format or of a newer version gives no entries and a
sentence saying why, which the plug-in shows as a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

NAME = "controlcanvas.history"  # annotation type (Krita) / parasite name (GIMP)
DESCRIPTION = "ControlCanvas result history"
VERSION = 1
MAX_ENTRIES = 20
MAX_BYTES = 64 * 1024
MAX_TEXT = 2000  # characters kept of a prompt
_SETTING_TYPES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Entry:
    prompt: str = ""
    negative: str = ""
    seeds: Tuple[Optional[int], ...] = ()
    settings: Dict[str, object] = field(default_factory=dict)  # flat: name -> scalar
    layers: Tuple[Tuple[str, str], ...] = ()  # (layer id, layer name)
    time: float = 0.0

    @property
    def seed(self) -> Optional[int]:
        """The first known seed, None when the entry has none."""
        return next((s for s in self.seeds if s is not None), None)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt[:MAX_TEXT], "negative": self.negative[:MAX_TEXT],
                "seeds": list(self.seeds), "settings": dict(self.settings),
                "layers": [list(pair) for pair in self.layers], "time": self.time}


class RecordError(ValueError):
    pass


def _entry(raw: object) -> Entry:
    if not isinstance(raw, dict):
        raise RecordError("an entry is not an object")
    prompt, negative = raw.get("prompt", ""), raw.get("negative", "")
    seeds, settings = raw.get("seeds", []), raw.get("settings", {})
    layers, when = raw.get("layers", []), raw.get("time", 0.0)
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise RecordError("a prompt is not text")
    if not isinstance(seeds, list) or not all(
            s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seeds):
        raise RecordError("the seeds are not whole numbers")
    if not isinstance(settings, dict) or not all(
            isinstance(k, str) and isinstance(v, _SETTING_TYPES) for k, v in settings.items()):
        raise RecordError("the settings are not a flat table")
    if not isinstance(layers, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in layers):
        raise RecordError("the layers are not (id, name) pairs")
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise RecordError("the time is not a number")
    return Entry(prompt, negative, tuple(seeds), dict(settings),
                 tuple((a, b) for a, b in layers), float(when))


def decode(data: Optional[bytes]) -> Tuple[List[Entry], str]:
    """(entries newest first, problem); problem is '' when the record was fine or absent."""
    if not data:
        return [], ""
    what = "The ControlCanvas history stored in this document"
    if len(data) > MAX_BYTES:
        return [], f"{what} is {len(data)} bytes (more than {MAX_BYTES}); it was ignored."
    try:
        raw = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return [], f"{what} is not readable (damaged); it was ignored."
    if not isinstance(raw, dict) or raw.get("format") != NAME:
        return [], f"{what} is not a ControlCanvas record; it was ignored."
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return [], f"{what} has no valid version; it was ignored."
    if version > VERSION:
        return [], (f"{what} was written by a newer ControlCanvas (record version "
                    f"{version}); update the plug-in to see it. It was left as it is.")
    entries = raw.get("entries")
    if not isinstance(entries, list):
        return [], f"{what} has no entry list; it was ignored."
    try:
        return [_entry(e) for e in entries[:MAX_ENTRIES]], ""
    except RecordError as err:
        return [], f"{what} is damaged ({err}); it was ignored."


def encode(entries: Sequence[Entry]) -> bytes:
    """The record for ``entries`` (newest first), at most MAX_ENTRIES and MAX_BYTES."""
    kept = [e.to_dict() for e in entries[:MAX_ENTRIES]]
    while True:
        data = json.dumps({"format": NAME, "version": VERSION, "entries": kept},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(data) <= MAX_BYTES or not kept:
            return data
        kept.pop()  # the oldest


def add(data: Optional[bytes], entry: Entry) -> Tuple[bytes, str]:
    """The stored record ``data`` with ``entry`` as its newest, and the problem with the
    old record if any (a damaged record is replaced; a newer version's is kept: '' bytes)."""
    old, problem = decode(data)
    if problem and "newer ControlCanvas" in problem:
        return b"", problem
    return encode([entry] + old), problem


def summary(settings: Dict[str, object]) -> str:
    """One line for a settings table, e.g. 'steps 20 · cfg 7 · lineart'."""
    parts = []
    for key in ("condition", "steps", "cfg", "sampler", "strength", "base_model", "loras",
                "batch"):
        value = settings.get(key)
        if value not in (None, ""):
            parts.append(str(value) if key in ("condition", "base_model", "sampler", "loras")
                         else f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    return " · ".join(parts)
