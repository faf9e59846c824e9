"""Few-step presets (live painting, fast iteration): one data file, ``live.toml`` here.

A preset names what a few-step model needs: a LoRA of the LoRA folder (LCM-LoRA, Hyper-SD,
SDXL-Lightning, TCD, DMD2) or a distilled base (SD-Turbo, SDXL-Turbo), the scheduler it
was distilled for, its default steps and the range it works in, its CFG and the most that
still works, and its licence (non-commercial ones are marked).  A request names one with
``GenerateRequest.preset``; :func:`apply_preset` turns the request into the one the engine
runs: steps and CFG brought into the preset's range, the preset's LoRA added (at its
strength) or its base chosen, and the :class:`Sampling` to use.  A missing LoRA or base
is :class:`~shared.errors.ModelMissing` with the exact ``controlcanvas models download
PRESET`` command; ``models download`` knows every preset's name (see the catalogue).

No torch here: listing presets and checking requests is cheap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from shared.errors import ConfigError, ModelMissing, Unsupported
from shared.messages import GenerateRequest, LoraRef, PresetInfo, lora_name_problem

from ...configfile import load_toml

DATA_FILE = Path(__file__).with_name("live.toml")
SCHEDULERS = ("lcm", "tcd", "ddim_trailing", "euler_trailing")
_FIELDS = {"label": str, "family": str, "lora": str, "hub": str, "file": str, "base": str,
           "scheduler": str, "steps": int, "min_steps": int, "max_steps": int,
           "cfg": float, "max_cfg": float, "eta": float, "lora_strength": float,
           "licence": str, "commercial": bool, "note": str}
_REQUIRED = ("label", "family", "scheduler", "steps", "min_steps", "max_steps", "cfg",
             "max_cfg", "licence", "commercial")


@dataclass(frozen=True)
class Sampling:
    """How a request is sampled: a scheduler name (a request's ``sampler`` or a preset's
    scheduler, see ``diffusers.samplers``) and its ``eta`` (None: the pipeline's default)."""
    scheduler: str
    eta: Optional[float] = None


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    family: str
    scheduler: str
    steps: int
    min_steps: int
    max_steps: int
    cfg: float
    max_cfg: float
    licence: str
    commercial: bool
    lora: str = ""
    hub: str = ""
    file: str = ""
    base: str = ""
    eta: Optional[float] = None
    lora_strength: float = 1.0
    note: str = ""

    @property
    def download(self) -> str:
        return f"controlcanvas models download {self.name}"

    def info(self, present: bool) -> PresetInfo:
        return PresetInfo(name=self.name, label=self.label, family=self.family,
                          steps=self.steps, min_steps=self.min_steps,
                          max_steps=self.max_steps, cfg=self.cfg, max_cfg=self.max_cfg,
                          scheduler=self.scheduler, lora=self.lora, base=self.base,
                          present=present, download="" if present else self.download,
                          licence=self.licence, commercial=self.commercial, note=self.note)


def _check(name: str, raw: object, where: str) -> Preset:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{name}] must be a table.")
    values = {}
    for key, value in raw.items():
        kind = _FIELDS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: [{name}] {key} is not a preset field; known: "
                              f"{', '.join(sorted(_FIELDS))}.")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: [{name}] {key} must be {kind.__name__}.")
        values[key] = value
    missing = [key for key in _REQUIRED if key not in values]
    if missing:
        raise ConfigError(f"{where}: [{name}] lacks {', '.join(missing)}.")
    preset = Preset(name=name, **values)
    problems = []
    if preset.scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}")
    if not 1 <= preset.min_steps <= preset.steps <= preset.max_steps <= 150:
        problems.append("steps must lie in min_steps..max_steps (1..150)")
    if not 0.0 <= preset.cfg <= preset.max_cfg <= 30.0:
        problems.append("cfg must lie in 0..max_cfg")
    if bool(preset.lora) == bool(preset.base):
        problems.append("name either a LoRA (lora, hub, file) or a base, not both")
    if preset.lora and (lora_name_problem(preset.lora) or not preset.hub or not preset.file):
        problems.append("a LoRA preset needs a valid lora name, its hub repo and file")
    if problems:
        raise ConfigError(f"{where}: [{name}]: " + "; ".join(problems) + ".")
    return preset


@functools.lru_cache(maxsize=4)
def load_presets(path: Path = DATA_FILE) -> Dict[str, Preset]:
    """The presets of the data file, checked (a ConfigError names a bad entry)."""
    document = load_toml(path)
    return {name: _check(name, raw, str(path)) for name, raw in document.items()}


def find(name: str, presets: Optional[Dict[str, Preset]] = None) -> Preset:
    presets = load_presets() if presets is None else presets
    preset = presets.get(name)
    if preset is None:
        raise Unsupported(f"There is no preset {name!r} on this server; its presets: "
                          f"{', '.join(sorted(presets))}.", field="preset")
    return preset


def infos(lora_names: Iterable[str], base_present, presets=None) -> Tuple[PresetInfo, ...]:
    """Every preset as the ``models`` message lists it; ``present`` from the LoRA folder's
    names, or ``base_present(hub_id)`` for a base preset."""
    names = set(lora_names)
    presets = load_presets() if presets is None else presets
    return tuple(p.info(p.lora in names if p.lora else bool(base_present(p.base)))
                 for p in presets.values())


def apply_preset(request: GenerateRequest, lora_names: Iterable[str],
                 presets: Optional[Dict[str, Preset]] = None
                 ) -> Tuple[GenerateRequest, Sampling, Optional[Preset]]:
    """The request the engine runs for ``request`` and how it is sampled (see the module
    docstring); a request without a preset is returned as it is."""
    if not request.preset:
        return request, Sampling(request.sampler), None
    preset = find(request.preset, presets)
    changes = dict(steps=min(max(request.steps, preset.min_steps), preset.max_steps),
                   cfg=min(request.cfg, preset.max_cfg))
    if preset.base:
        if request.base_model and request.base_model != preset.base:
            raise Unsupported(f"The preset {preset.name!r} is the base model {preset.base!r}; "
                              f"leave the base model empty to use it, or pick a LoRA preset "
                              f"for {request.base_model!r}.", field="preset")
        changes["base_model"] = preset.base
    elif preset.lora not in {ref.name for ref in request.loras}:
        if preset.lora not in set(lora_names):
            raise ModelMissing(
                f"The preset {preset.name!r} needs the LoRA {preset.lora!r}, which is not in "
                f"the server's LoRA folder. Fetch it once with: `{preset.download}`",
                field="preset")
        changes["loras"] = tuple(request.loras) + (LoraRef(name=preset.lora,
                                                           strength=preset.lora_strength),)
    return replace(request, **changes), Sampling(preset.scheduler, preset.eta), preset


def check_family(preset: Optional[Preset], family: str, base_name: str) -> None:
    """A preset made for another family than the base's is refused, naming the right one."""
    if preset is None or preset.family == family:
        return
    others = [p.name for p in load_presets().values() if p.family == family]
    raise Unsupported(f"The preset {preset.name!r} is for {preset.family.upper()} bases; the "
                      f"base {base_name!r} is {family.upper()}. Presets for it: "
                      f"{', '.join(others) or 'none'}.", field="preset")
