"""What a server offers, read from its ``models`` message: the rules both plug-ins follow.

* Which control types a base model can use: ``ModelInfo.conditions``, which the server
  computes from the ControlNets (and union models) it has for the base's family.  A
  server that does not say (an older one, or a base whose family it cannot tell, or a
  base typed by hand that it does not list) leaves every condition open: the server
  answers for itself when the request comes.
* Whether a base's control units are emulated (``REFERENCE_CONTROL_FAMILIES``: Flux.2 Klein
  has no ControlNet; the server gives each unit's image to the model as a reference with a
  fitting instruction): :meth:`Offers.control_note` is what a plug-in shows then.
* Which LoRAs fit a base: a LoRA made for one family (``LoraInfo.family``) fits bases of
  that family only; when either side's family is unknown it is offered, and the server
  checks when it loads it.
* The text form of a LoRA list, for a plain text field (GIMP's procedure argument):
  ``"name:0.8, other"`` (strength -2..2, 1 when left out), parsed and checked against
  the server's list.

Errors are the ones the server would answer with, raised before anything is sent:
:class:`~shared.errors.ModelMissing` (a LoRA or a ControlNet the server does not
have), :class:`~shared.errors.LoraMismatch`, :class:`~shared.errors.FieldError` (the
text form).  Standard library only, Python >= 3.10: this module is bundled into the
editors.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from .errors import FieldError, LoraMismatch, ModelMissing
from .messages import (CONDITIONS, LORA_STRENGTH, MAX_LORAS, LoraInfo, LoraRef, ModelInfo,
                       Models)

FAMILY_LABELS = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
FAMILY_LABELS["klein"] = "Flux.2 Klein"
# Families without ControlNets whose control units the server emulates: each unit's image
# goes to the model as a reference picture with an instruction fitting its condition.
REFERENCE_CONTROL_FAMILIES: Tuple[str, ...] = ("klein",)
UNKNOWN_FAMILY = ("", "unknown")
CONDITION_LABELS = {
    "lineart": "Line art", "lineart_anime": "Anime line art", "scribble": "Scribble",
    "softedge": "Soft edge", "canny": "Canny edges", "depth": "Depth", "normal": "Normal map",
    "openpose": "Pose", "mlsd": "Straight lines", "seg": "Segmentation", "tile": "Tile",
    "shuffle": "Shuffle", "inpaint": "Inpaint",
}
_SEPARATORS = re.compile(r"[,;\n]")
_LIST_SHOWN = 12  # names listed in a message before "and N more"


def family_label(family: str) -> str:
    """``SDXL`` for ``sdxl``; "an unknown family" for '' / ``unknown``."""
    if family in UNKNOWN_FAMILY:
        return "an unknown family"
    return FAMILY_LABELS.get(family, family)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST_SHOWN])
    more = len(names) - _LIST_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


class Offers:
    """The server's ``models`` message, asked per base model (``""`` = its default base).
    ``Offers(None)``, before the server answered, offers everything and checks nothing."""

    def __init__(self, models: Optional[Models]) -> None:
        self.models = models

    # -- bases and conditions -------------------------------------------------------------

    def base(self, name: str = "") -> Optional[ModelInfo]:
        """What the server lists for base ``name`` (its default base for ''), None when it
        does not list it."""
        if self.models is None:
            return None
        name = name.strip() or self.models.default_base
        return next((m for m in self.models.models if m.kind == "base" and m.name == name),
                    None)

    def family(self, base: str = "") -> str:
        """The base's family (``sd15``, ``sdxl``), '' when the server does not say."""
        info = self.base(base)
        return info.family if info is not None else ""

    def says_conditions(self, base: str = "") -> bool:
        """Whether the server told which conditions ``base`` serves."""
        info = self.base(base)
        return info is not None and bool(info.conditions)

    def conditions(self, base: str = "") -> Tuple[str, ...]:
        """The conditions ``base`` serves, in :data:`CONDITIONS` order; every condition
        when the server does not say (see the module docstring)."""
        info = self.base(base)
        if info is None or not info.conditions:
            return CONDITIONS
        return tuple(c for c in CONDITIONS if c in info.conditions)

    def control_note(self, base: str = "") -> str:
        """What a plug-in shows beside the control units when ``base`` has no ControlNet and
        the server emulates them ('' for every other base, or when the server does not say)."""
        family = self.family(base)
        if family not in REFERENCE_CONTROL_FAMILIES:
            return ""
        return (f"{family_label(family)} has no ControlNet: each control layer is given to "
                f"the model as a reference image with an instruction to follow it (its "
                f"weight only turns it on; start and end are not used).")

    def bases_serving(self, condition: str) -> List[str]:
        """The listed bases that say they serve ``condition``, downloaded ones first."""
        if self.models is None:
            return []
        bases = [m for m in self.models.models if m.kind == "base" and condition in m.conditions]
        return [m.name for m in sorted(bases, key=lambda m: not m.present)]

    def condition_problem(self, condition: str, base: str = "") -> str:
        """Why ``base`` cannot serve ``condition`` ('' when it can, or the server does not
        say): names the bases that do, and the conditions this base serves."""
        if condition in self.conditions(base):
            return ""
        info = self.base(base)
        label = CONDITION_LABELS.get(condition, condition)
        name = info.name if info is not None else base
        served = [CONDITION_LABELS.get(c, c) for c in self.conditions(base) if c != "inpaint"]
        others = [b for b in self.bases_serving(condition) if b != name]
        where = (f"bases that serve it: {_listed(others)}" if others else
                 "no base model on this server serves it")
        family = family_label(info.family if info is not None else "")
        return (f"The base model {name!r} ({family}) has no ControlNet for "
                f"{label.lower()} ({condition}); {where}. Pick another base model, or one of "
                f"the conditions it serves: {_listed(served) or 'none'}.")

    def check_condition(self, condition: str, base: str = "", field: str = "condition") -> None:
        """ModelMissing when ``base`` cannot serve ``condition`` (see condition_problem)."""
        problem = self.condition_problem(condition, base)
        if problem:
            raise ModelMissing(problem, field=field)

    # -- LoRAs ------------------------------------------------------------------------------

    @property
    def loras(self) -> Tuple[LoraInfo, ...]:
        return self.models.loras if self.models is not None else ()

    def lora(self, name: str) -> Optional[LoraInfo]:
        return next((info for info in self.loras if info.name == name), None)

    def lora_problem(self, lora: LoraInfo, base: str = "") -> str:
        """Why ``lora`` does not fit ``base`` ('' when it fits or a family is unknown)."""
        family = self.family(base)
        if lora.family in UNKNOWN_FAMILY or family in UNKNOWN_FAMILY or lora.family == family:
            return ""
        name = self.base(base).name if self.base(base) is not None else base
        return (f"the LoRA {lora.name!r} was made for {family_label(lora.family)} base "
                f"models, and {name!r} is {family_label(family)}")

    def lora_choices(self, base: str = "") -> List[Tuple[LoraInfo, str]]:
        """Every LoRA the server lists with why it does not fit ``base`` ('' = it fits),
        the fitting ones first, each group by name."""
        pairs = [(info, self.lora_problem(info, base)) for info in self.loras]
        return sorted(pairs, key=lambda pair: (bool(pair[1]), pair[0].name.lower()))

    def describe_loras(self, base: str = "") -> str:
        """The LoRAs that fit ``base``, for a message: ``ink (SD1.5), paper (SD1.5)``."""
        fit = [f"{info.name} ({family_label(info.family)})"
               if info.family not in UNKNOWN_FAMILY else info.name
               for info, problem in self.lora_choices(base) if not problem]
        return _listed(fit) if fit else "none"

    def check_loras(self, refs: Sequence[LoraRef], base: str = "",
                    field: str = "loras") -> None:
        """ModelMissing for a LoRA the server does not list (naming those it has),
        LoraMismatch for one of another family than ``base``.  Nothing is checked before
        the server answered (``Offers(None)``)."""
        if self.models is None:
            return
        for ref in refs:
            info = self.lora(ref.name)
            if info is None:
                if not self.loras:
                    raise ModelMissing(
                        f"The server lists no LoRAs, so it has no {ref.name!r}: its LoRA "
                        f"folder is empty (or the server predates LoRAs). Put the LoRA's "
                        f".safetensors file in the server's LoRA folder "
                        f"(`controlcanvas models` shows where), then connect again.",
                        field=field)
                raise ModelMissing(
                    f"The server has no LoRA named {ref.name!r}. LoRAs for this base model: "
                    f"{self.describe_loras(base)}.", field=field)
            problem = self.lora_problem(info, base)
            if problem:
                raise LoraMismatch(f"{problem[0].upper()}{problem[1:]}. Pick a LoRA made for "
                                   f"it ({self.describe_loras(base)}) or another base model.",
                                   field=field)


# -- the text form: "name:0.8, other" ---------------------------------------------------------

def parse_loras(text: str, field: str = "loras") -> Tuple[LoraRef, ...]:
    """``"ink:0.8, paper"`` -> (LoraRef("ink", 0.8), LoraRef("paper", 1.0)); '' -> ().
    Items are separated by commas, semicolons or new lines; the strength follows the last
    ':' (a LoRA name never holds one).  FieldError naming ``field`` and the item otherwise."""
    refs: List[LoraRef] = []
    for item in _SEPARATORS.split(text or ""):
        item = item.strip()
        if not item:
            continue
        name, colon, strength_text = item.rpartition(":")
        if not colon:
            name, strength_text = item, ""
        name = name.strip()
        strength = 1.0
        if strength_text.strip():
            try:
                strength = float(strength_text)
            except ValueError:
                strength = float("nan")
            lo, hi = LORA_STRENGTH
            if not lo <= strength <= hi:  # NaN fails too
                raise FieldError(f"{field}: in {item!r} the strength after ':' must be a "
                                 f"number from {lo:g} to {hi:g} (1 when left out), e.g. "
                                 f"\"{name or 'name'}:0.8\".", field=field)
        try:
            ref = LoraRef(name, strength)
        except FieldError as err:
            raise FieldError(f"{field}: {item!r}: {err.message}", field=field) from None
        if any(other.name == ref.name for other in refs):
            raise FieldError(f"{field}: {ref.name!r} is named twice; give each LoRA once, "
                             f"with its strength.", field=field)
        refs.append(ref)
    if len(refs) > MAX_LORAS:
        raise FieldError(f"{field}: {len(refs)} LoRAs; at most {MAX_LORAS} in one request.",
                         field=field)
    return tuple(refs)


def format_loras(refs: Sequence[LoraRef]) -> str:
    """The text form of ``refs``: ``"ink:0.8, paper:1"`` (what parse_loras reads back)."""
    return ", ".join(f"{ref.name}:{ref.strength:g}" for ref in refs)
