"""What the docker remembers.

The token typed in the docker is kept here; which token goes to which address (the
local server's token file only to a loopback address) is ``shared.loopback``'s rule,
which the controller asks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .proto import messages

DEFAULT_URL = "ws://127.0.0.1:7351"
MODES = ("txt2img", "img2img", "inpaint")
MODE_LABELS = {"txt2img": "Text to image", "img2img": "Image to image (canvas)",
               "inpaint": "Inpaint selection"}
CONTROL_MODES = ("balanced", "prompt", "control")
CONTROL_MODE_LABELS = {"balanced": "Balanced", "prompt": "Prompt is more important",
                       "control": "Control is more important"}
PLACES = ("above", "below")
RESIZE_MODES = ("crop_and_resize", "just_resize", "resize_and_fill")
LORA_MIN, LORA_MAX = messages.LORA_STRENGTH  # a LoRA's strength
REFERENCE_MODES = messages.REFERENCE_MODES  # reference, style, composition, face
REFERENCE_MODE_LABELS = {"reference": "Reference", "style": "Style", "composition": "Composition",
                         "face": "Face"}
REFERENCE_WEIGHT = 0.8  # a new reference's weight (IP-Adapter's usual 0.5-1)
EDIT_REFERENCES = messages.MAX_EDIT_REFERENCES  # reference layers an edit may name (3)
RESIZE_MODE_LABELS = {"crop_and_resize": "Crop to fit", "just_resize": "Stretch",
                      "resize_and_fill": "Fit inside (pad)"}


@dataclass
class UnitSettings:
    """One control unit as the docker shows it, bound to a layer by its unique id."""
    layer_id: str = ""  # "" = the visible image (projection)
    condition: str = "lineart"
    annotator: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = "balanced"
    enabled: bool = True
    resize_mode: str = "crop_and_resize"  # how the layer is fitted to the generation size
    params: Dict[str, Any] = field(default_factory=dict)  # the annotator's, non-defaults


@dataclass
class LoraSettings:
    """One row of the docker's LoRA list: a LoRA the server lists, by name, and its
    strength (-2..2; 0 leaves it out in effect)."""
    name: str = ""
    strength: float = 1.0


@dataclass
class ReferenceSettings:
    """One reference (IP-Adapter) row: a layer whose picture steers the generation, with
    its weight (0..2), mode (reference, style, composition, face) and start/end window."""
    layer_id: str = ""
    weight: float = REFERENCE_WEIGHT
    mode: str = "reference"
    start: float = 0.0
    end: float = 1.0


@dataclass
class EditSettings:
    """The Edit section: the instruction, the edit model ("" = the server's default), its
    steps and guidance (FLUX.1 Kontext's usual 28 and 2.5) and the layers (by id) whose
    pictures the instruction may refer to, at most :data:`EDIT_REFERENCES` ("" = none)."""
    instruction: str = ""
    base_model: str = ""
    steps: int = 28
    cfg: float = 2.5
    references: List[str] = field(default_factory=list)


@dataclass
class Settings:
    url: str = DEFAULT_URL
    token: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    mode: str = "txt2img"
    strength: float = 0.75
    seed: int = 0
    seed_locked: bool = False
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "dpmpp_2m_karras"
    batch: int = 1
    units: List[UnitSettings] = field(default_factory=list)
    place: str = "above"  # "below": under the first unit's layer (colourising line art)
    preview_every: int = 4
    base_model: str = ""  # "" = the server's default
    hires: bool = False  # a second, full-size pass for detail
    loras: List[LoraSettings] = field(default_factory=list)
    references: List[ReferenceSettings] = field(default_factory=list)
    edit: EditSettings = field(default_factory=EditSettings)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: Optional[str]) -> "Settings":
        """Tolerant: unknown keys are dropped and bad values fall back to defaults."""
        try:
            raw: Dict[str, Any] = json.loads(text or "{}")
        except ValueError:
            return cls()
        if not isinstance(raw, dict):
            return cls()
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name == "units":
                units = []
                for item in value if isinstance(value, list) else []:
                    if isinstance(item, dict):
                        unit = UnitSettings()
                        for uf in dataclasses.fields(UnitSettings):
                            if uf.name in item and isinstance(item[uf.name],
                                                              type(getattr(unit, uf.name))):
                                setattr(unit, uf.name, item[uf.name])
                        if unit.resize_mode not in RESIZE_MODES:
                            unit.resize_mode = "crop_and_resize"
                        unit.params = {k: v for k, v in unit.params.items()
                                       if isinstance(k, str) and
                                       isinstance(v, (bool, int, float, str))}
                        units.append(unit)
                out.units = units
            elif f.name == "loras":
                out.loras = _loras_from(value)
            elif f.name == "references":
                out.references = _references_from(value)
            elif f.name == "edit":
                out.edit = _edit_from(value)
            elif isinstance(value, type(getattr(out, f.name))) or \
                    (isinstance(getattr(out, f.name), float) and type(value) is int):
                setattr(out, f.name, type(getattr(out, f.name))(value))
        if out.mode not in MODES:
            out.mode = "txt2img"
        if out.place not in PLACES:
            out.place = "above"
        return out


def _loras_from(value: Any) -> List[LoraSettings]:
    """The saved LoRA rows: a row with a name that is not text is dropped, a strength
    outside -2..2 (or not a number) falls back to 1."""
    rows = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("name", ""), str):
            continue
        strength = item.get("strength", 1.0)
        if type(strength) not in (int, float) or not LORA_MIN <= strength <= LORA_MAX:
            strength = 1.0
        rows.append(LoraSettings(name=item.get("name", ""), strength=float(strength)))
    return rows


def _references_from(value: Any) -> List[ReferenceSettings]:
    """The saved reference rows: a row whose layer id is not text is dropped; a weight,
    mode or window out of range falls back to the default."""
    rows = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("layer_id", ""), str):
            continue
        row = ReferenceSettings(layer_id=item.get("layer_id", ""))
        weight = item.get("weight", row.weight)
        if type(weight) in (int, float) and 0.0 <= weight <= 2.0:
            row.weight = float(weight)
        if item.get("mode") in REFERENCE_MODES:
            row.mode = item["mode"]
        start, end = item.get("start", 0.0), item.get("end", 1.0)
        if all(type(v) in (int, float) for v in (start, end)) and 0.0 <= start < end <= 1.0:
            row.start, row.end = float(start), float(end)
        rows.append(row)
    return rows


def _edit_from(value: Any) -> EditSettings:
    """The saved Edit section: text fields that are not text, steps or guidance out of
    range fall back to the defaults; reference layer ids that are not text are dropped,
    and at most :data:`EDIT_REFERENCES` are kept."""
    out = EditSettings()
    if not isinstance(value, dict):
        return out
    for name in ("instruction", "base_model"):
        if isinstance(value.get(name), str):
            setattr(out, name, value[name])
    steps, cfg = value.get("steps"), value.get("cfg")
    if type(steps) is int and 1 <= steps <= 150:
        out.steps = steps
    if type(cfg) in (int, float) and 0.0 <= cfg <= 30.0:
        out.cfg = float(cfg)
    refs = value.get("references")
    out.references = [r for r in refs if isinstance(r, str)][:EDIT_REFERENCES] \
        if isinstance(refs, list) else []
    return out
