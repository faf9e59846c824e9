"""Model catalogue and resolution: which weights a request uses, and where they are.

Names a user can write (in ``config.toml``, a request's ``base_model``, a control
unit's ``model``, or ``controlcanvas models download NAME``):

* a Hugging Face hub id (``owner/name``), used from the local hub cache only;
  fetching is an explicit step (``controlcanvas models download``);
* a local diffusers folder (``model_index.json`` for a base, ``config.json`` for a
  ControlNet);
* a single ``.safetensors`` / ``.ckpt`` file (loaded with ``from_single_file``), or a
  ``.gguf`` transformer file (its family from its tensor names, the rest of the pipeline
  from the family's default repo; :mod:`backend.engines.gguf_files`);
* ``shapes-demo``: the embedded trained demo model (``backend/assets/shapes-demo``, a
  tiny base and an outline ControlNet trained here on synthetic shapes; see
  docs/training.md); its ControlNet serves the outline conditions ``DEMO_CONDITIONS``;
* ``tiny-sd15`` / ``tiny-sdxl``: random-weight tiny models built by :mod:`backend.engines.tiny`
  (every condition; for tests and benchmarks); ``tiny-flux`` / ``tiny-sd3`` / ``tiny-qwen``:
  the same for Flux.1, SD3.5 and Qwen-Image (:mod:`backend.engines.tiny_dit`,
  :mod:`backend.engines.tiny_qwen`; the conditions their ControlNets serve);
  ``tiny-flux-kontext``: the tiny Flux stack as an edit base (:mod:`backend.engines.tiny_kontext`;
  edit mode; ``EDIT_BASES`` names the real one, FLUX.1 Kontext [dev], non-commercial);
  ``tiny-qwen-edit``: the tiny Qwen-Image stack as an edit base
  (:mod:`backend.engines.tiny_qwen_edit`; the real one: Qwen-Image-Edit-2509, Apache-2.0);
* the aliases ``sd15`` / ``sdxl`` (default bases) and ``CONDITION`` /
  ``sdxl:CONDITION`` (default ControlNets) for ``models download``; and the few-step
  presets' names (:mod:`backend.engines.presets`): ``models download lcm-sd15`` fetches
  that preset's LoRA file into the LoRA folder under the name the preset uses (a base
  preset: its base model).

The family of a model (SD1.5, SDXL - Pony, Illustrious and NoobAI are SDXL -, a
9-channel inpainting base, a union ControlNet, Flux.1, SD3 / SD3.5; SD2 is recognised and
refused)
is read from its files by :mod:`backend.engines.families`, never from its name.

A request (a client of the server) may name a model path only inside a models folder:
``models`` in the per-user data folder (where training writes, ``models/trained``) and
the ``[models] roots`` folders; relative names are looked up there. Every other path it
names — a system file, a folder, one that does not exist — is one
:class:`shared.errors.PathRefused`, worded the same. Names configured here (``base``,
``bases``, ``controlnets``) are the owner's and resolve wherever they point, and so does
any path when ``trust_request_paths`` is set (``controlcanvas generate`` without
``--url``: the requests are the user's own).

The catalogue (``CONTROLNETS``) gives the default ControlNet per condition and
family: lllyasviel's ControlNet 1.1 set for SD1.5, one union ControlNet (xinsir's
ProMax) for every SDXL condition it serves, Shakker-Labs' FLUX.1 union ControlNet for the
Flux conditions it has a mode for, Stability's SD3.5 Large canny / depth / blur ControlNets
for SD3, InstantX's union and inpainting ControlNets for Qwen-Image (``LICENCES`` names the
Flux, SD3.5 and Qwen-Image models' licences: FLUX.1 [dev] and its ControlNets are
non-commercial, Qwen-Image and its ControlNets Apache-2.0).  The ``[models]`` and ``[controlnets]``
tables of ``config.toml`` override it::

    [models]
    base = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # or a folder / a .safetensors file
    family = "sd15"                      # only needed when the files do not tell
    cache_dir = "D:/hf-cache"            # optional Hugging Face cache folder
    roots = ["D:/models"]                # folders a client may name models in (+ DATA/models)
    lora_dir = "D:/loras"                # LoRA .safetensors files (default: see loras.py)
    [models.bases]                       # named bases a request can pick by name
    anime = "C:/models/anything.safetensors"
    xl = { path = "C:/models/juggernaut.safetensors", family = "sdxl" }
    [controlnets]                        # every family (unless its own table says otherwise)
    lineart = "C:/models/my_lineart_controlnet"
    [controlnets.sdxl]                   # SDXL only
    lineart = "owner/some-sdxl-lineart-controlnet"

Nothing here imports torch or diffusers: listing models and resolving names is
cheap; :mod:`backend.engines.diffusers` loads what this module resolves.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from shared.errors import (ConfigError, ControlCanvasError, ModelMissing, PathRefused,
                           UnsupportedFamily)
from shared.messages import CONDITIONS, AnnotatorInfo, ModelInfo, Models
from shared.geometry import NATIVE_SIDE
from shared.paths import config_dir, data_dir

from ..configfile import load_toml
from ..configfile import table as toml_table
from ..confine import confine
from . import downloads, gguf_files, references, tiny, tiny_kontext, tiny_qwen_edit
from . import presets as few_step
from .families import (FLUX_UNION_MODES, QWEN_UNION_MODES, UNION_CONTROL_TYPES,
                       ZIMAGE_CONDITIONS, Detected, check_runnable, detect, detect_base_folder,
                       detect_file)
from .families import REFERENCE_CONTROLS
from .loras import LoraFolder

log = logging.getLogger(__name__)

# what config.toml may name (families.SUPPORTED)
FAMILIES = ("sd15", "sdxl", "flux", "sd3", "zimage", "qwen", "klein")
DEFAULT_BASES: Dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-dev",
    "sd3": "stabilityai/stable-diffusion-3.5-large",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
    "qwen": "Qwen/Qwen-Image",
    "klein": "black-forest-labs/FLUX.2-klein-4B",
}
TINY_BASES: Dict[str, str] = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-flux": "flux",
                              "tiny-sd3": "sd3", "tiny-zimage": "zimage", "tiny-qwen": "qwen"}
TINY_BASES["tiny-klein"] = "klein"  # Flux.2 Klein (backend.engines.tiny_klein), also an edit base
TINY_BASES[tiny_kontext.NAME] = "flux"  # the tiny Flux stack as an edit base (Kontext)
TINY_BASES[tiny_qwen_edit.NAME] = "qwen"  # the tiny Qwen-Image stack as Qwen-Image-Edit-Plus
# the tiny edit bases, each built from its family's tiny stack
TINY_EDIT = {tiny_kontext.NAME: tiny_kontext.ensure_kontext,
             tiny_qwen_edit.NAME: tiny_qwen_edit.ensure_edit}
# the built-in bases that run edit mode (tiny Klein generates and edits: its own stack)
TINY_EDIT_BASES = {*TINY_EDIT, "tiny-klein"}
# Edit bases (edit mode: an instruction applied to a layer) per family.
EDIT_BASES: Dict[str, str] = {"flux": "black-forest-labs/FLUX.1-Kontext-dev",
                              "qwen": "Qwen/Qwen-Image-Edit-2509"}
EDIT_BASES["klein"] = DEFAULT_BASES["klein"]  # Klein generates and edits: one model
EDIT_FAMILIES = {"klein"}  # every base of these families edits (Flux2KleinPipeline)
# Larger variants listed beside a family's default base (Klein 9B: non-commercial).
MORE_BASES: Dict[str, str] = {"black-forest-labs/FLUX.2-klein-9B": "klein"}
DEMO_BASE = "shapes-demo"
# The demo ControlNet reads white outlines on black: what these conditions' annotators make.
DEMO_CONDITIONS = ("lineart", "scribble", "canny", "softedge")
DEMO_NATIVE_SIZE = 64
# Native generation size (pixels of a square side) per family: the rule the plug-ins use too.
NATIVE_SIZE: Dict[str, int] = NATIVE_SIDE


def default_models_root() -> Path:
    """``models`` in the per-user data folder: a request may name models inside it (the
    server's training writes its ControlNets to ``models/trained`` there)."""
    return data_dir() / "models"


def demo_folder() -> Path:
    """The embedded demo model: ``base/`` (diffusers pipeline) and ``controlnet/``."""
    return Path(__file__).resolve().parents[1] / "assets" / DEMO_BASE


# The SDXL default for every condition a union ControlNet serves: xinsir's ControlNet++
# ProMax (8 control types, tile and inpaint included) in diffusers layout, as an fp16
# variant (2.5 GB; the same weights are in brad-twinkl/controlnet-union-sdxl-1.0-promax).
SDXL_UNION = "OzzyGT/controlnet-union-promax-sdxl-1.0"
# Flux.1: Shakker-Labs' union ControlNet Pro (InstantX's union model, further trained: the
# same control modes, families.FLUX_UNION_MODES) for every condition it has a mode for.
FLUX_UNION = "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro"
# Qwen-Image: InstantX's union ControlNet (canny, soft edge, depth, pose: the condition read
# from the image, families.QWEN_UNION_MODES) and inpainting ControlNet (Apache-2.0, as
# Qwen-Image itself).
QWEN_UNION = "InstantX/Qwen-Image-ControlNet-Union"
QWEN_INPAINT = "InstantX/Qwen-Image-ControlNet-Inpainting"
# SD3.5 Large: Stability's canny / depth / blur ControlNets (blur serves tile upscaling).
SD35_CANNY = "stabilityai/stable-diffusion-3.5-large-controlnet-canny"
# Z-Image Turbo: alibaba-pai's Fun ControlNet Union 2.1 in diffusers layout (the repo
# diffusers' single-file loader takes its config from; the 2.x models also inpaint).
ZIMAGE_UNION = "hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
UNION_MODELS = frozenset({SDXL_UNION, FLUX_UNION, QWEN_UNION, ZIMAGE_UNION})  # the defaults'

# Default ControlNet per condition.  SD1.5: lllyasviel's ControlNet 1.1 set.  SDXL: the
# union model (one download for all of them); shuffle needs a [controlnets.sdxl] entry.
CONTROLNETS: Dict[str, Dict[str, str]] = {
    "sd15": {
        "canny": "lllyasviel/control_v11p_sd15_canny",
        "depth": "lllyasviel/control_v11f1p_sd15_depth",
        "softedge": "lllyasviel/control_v11p_sd15_softedge",
        "mlsd": "lllyasviel/control_v11p_sd15_mlsd",
        "seg": "lllyasviel/control_v11p_sd15_seg",
        "openpose": "lllyasviel/control_v11p_sd15_openpose",
        "scribble": "lllyasviel/control_v11p_sd15_scribble",
        "lineart": "lllyasviel/control_v11p_sd15_lineart",
        "lineart_anime": "lllyasviel/control_v11p_sd15s2_lineart_anime",
        "normal": "lllyasviel/control_v11p_sd15_normalbae",
        "tile": "lllyasviel/control_v11f1e_sd15_tile",
        "shuffle": "lllyasviel/control_v11e_sd15_shuffle",
        "inpaint": "lllyasviel/control_v11p_sd15_inpaint",
    },
    "sdxl": {condition: SDXL_UNION for condition in UNION_CONTROL_TYPES},
    "flux": {condition: FLUX_UNION for condition in FLUX_UNION_MODES},
    "sd3": {"canny": SD35_CANNY, "lineart": SD35_CANNY, "lineart_anime": SD35_CANNY,
            "mlsd": SD35_CANNY, "softedge": SD35_CANNY, "scribble": SD35_CANNY,
            "depth": "stabilityai/stable-diffusion-3.5-large-controlnet-depth",
            "tile": "stabilityai/stable-diffusion-3.5-large-controlnet-blur"},
    "zimage": {condition: ZIMAGE_UNION for condition in ZIMAGE_CONDITIONS},
    "qwen": dict({condition: QWEN_UNION for condition in QWEN_UNION_MODES},
                 inpaint=QWEN_INPAINT),
}
# Licences of the default Flux and SD3.5 models (the SD1.5 / SDXL ones are open RAIL):
# FLUX.1-dev and every ControlNet made for it are non-commercial; schnell is Apache-2.0.
LICENCES: Dict[str, str] = {
    "black-forest-labs/FLUX.1-dev": "FLUX.1 [dev] Non-Commercial License",
    "black-forest-labs/FLUX.1-schnell": "Apache-2.0",
    FLUX_UNION: "FLUX.1 [dev] Non-Commercial License",
    EDIT_BASES["flux"]: "FLUX.1 [dev] Non-Commercial License",
    EDIT_BASES["qwen"]: "Apache-2.0",
    "stabilityai/stable-diffusion-3.5-large": "Stability AI Community License",
    "stabilityai/stable-diffusion-3.5-medium": "Stability AI Community License",
    SD35_CANNY: "Stability AI Community License",
    "stabilityai/stable-diffusion-3.5-large-controlnet-depth": "Stability AI Community License",
    "stabilityai/stable-diffusion-3.5-large-controlnet-blur": "Stability AI Community License",
    "Tongyi-MAI/Z-Image-Turbo": "Apache-2.0",
    ZIMAGE_UNION: "Apache-2.0",
    "Qwen/Qwen-Image": "Apache-2.0", QWEN_UNION: "Apache-2.0", QWEN_INPAINT: "Apache-2.0",
    "black-forest-labs/FLUX.2-klein-4B": "Apache-2.0",
    "black-forest-labs/FLUX.2-klein-9B": "FLUX Non-Commercial License",
}
assert all(c in CONDITIONS for table in CONTROLNETS.values() for c in table)

# TencentARC's T2I-Adapters (diffusers layout): lighter control models a unit may pick as
# its ``model`` (or config.toml may make a condition's default); the ControlNets above stay
# the defaults.  Listed by ``controlcanvas models``, fetched by hub id.
T2I_ADAPTERS: Dict[str, Dict[str, str]] = {
    "sd15": {
        "canny": "TencentARC/t2iadapter_canny_sd15v2",
        "depth": "TencentARC/t2iadapter_depth_sd15v2",
        "scribble": "TencentARC/t2iadapter_sketch_sd15v2",
        "lineart": "TencentARC/t2iadapter_sketch_sd15v2",
        "openpose": "TencentARC/t2iadapter_openpose_sd14v1",
        "seg": "TencentARC/t2iadapter_seg_sd14v1",
    },
    "sdxl": {
        "canny": "TencentARC/t2i-adapter-canny-sdxl-1.0",
        "depth": "TencentARC/t2i-adapter-depth-midas-sdxl-1.0",
        "scribble": "TencentARC/t2i-adapter-sketch-sdxl-1.0",
        "lineart": "TencentARC/t2i-adapter-lineart-sdxl-1.0",
        "openpose": "TencentARC/t2i-adapter-openpose-sdxl-1.0",
    },
}
assert all(c in CONDITIONS for table in T2I_ADAPTERS.values() for c in table)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", gguf_files.SUFFIX)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")
# What a download fetches (and that fp16 weights come first): backend.engines.downloads.
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# The fp16 variant (``from_pretrained(..., variant="fp16")``): what some repos hold only.
_FP16_NAMES = ("diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
               "diffusion_pytorch_model.safetensors.index.fp16.json",
               "model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16.bin",
               "pytorch_model.fp16.bin")


def download_command(name: str) -> str:
    return f"controlcanvas models download {name}"


# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """The ``[models]`` and ``[controlnets]`` tables of config.toml, checked."""

    base: str = ""
    family: str = ""
    bases: Mapping[str, Tuple[str, str]] = field(default_factory=dict)  # name -> (where, family)
    controlnets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # family|"*"
    cache_dir: Optional[str] = None
    tiny_root: Optional[str] = None  # where tiny models are built (default: user cache)
    roots: Tuple[str, ...] = ()  # folders a request may name models in, besides DATA/models
    trust_request_paths: bool = False  # any local path a request names (the user's own CLI)
    lora_dir: Optional[str] = None  # the LoRA folder (default: loras.default_lora_dir())

    @property
    def model_roots(self) -> Tuple[Path, ...]:
        """Where a request may name a model by path: DATA/models, then ``roots``."""
        return (default_models_root(), *(Path(r).expanduser() for r in self.roots))

    @classmethod
    def from_tables(cls, tables: Mapping[str, Any], where: str = "config") -> "ModelConfig":
        """Build from the parsed TOML document (only ``models`` and ``controlnets`` are read)."""
        models = dict(toml_table(tables, "models", where))
        nets = dict(toml_table(tables, "controlnets", where))
        known = {"base", "family", "bases", "cache_dir", "tiny_root", "roots", "lora_dir"}
        for key in models:
            if key not in known:
                raise ConfigError(f"{where}: unknown setting [models] {key}; known: "
                                  f"{', '.join(sorted(known))}")
        family = models.get("family", "")
        if family and family not in FAMILIES:
            raise ConfigError(f"{where}: [models] family must be one of {', '.join(FAMILIES)}; "
                              f"got {family!r}")
        bases: Dict[str, Tuple[str, str]] = {}
        for name, value in toml_table(models, "bases", f"{where}: [models]").items():
            if isinstance(value, str):
                bases[name] = (value, "")
            elif isinstance(value, dict) and isinstance(value.get("path"), str):
                fam = value.get("family", "")
                if fam and fam not in FAMILIES:
                    raise ConfigError(f"{where}: [models.bases] {name} family must be one of "
                                      f"{', '.join(FAMILIES)}")
                bases[name] = (value["path"], fam)
            else:
                raise ConfigError(f"{where}: [models.bases] {name} must be a string (hub id or "
                                  f"path) or {{ path = \"...\", family = \"sd15|sdxl\" }}")
        controlnets: Dict[str, Dict[str, str]] = {"*": {}}
        for key, value in nets.items():
            if isinstance(value, dict):
                if key not in FAMILIES:
                    raise ConfigError(f"{where}: [controlnets.{key}] must be a family: "
                                      f"{', '.join(FAMILIES)}")
                family_nets = controlnets.setdefault(key, {})
                for cond, where_ in value.items():
                    _check_condition(cond, where_, f"{where}: [controlnets.{key}]")
                    family_nets[cond] = where_
            else:
                _check_condition(key, value, f"{where}: [controlnets]")
                controlnets["*"][key] = value
        for key in ("base", "cache_dir", "tiny_root", "lora_dir"):
            if key in models and not isinstance(models[key], str):
                raise ConfigError(f"{where}: [models] {key} must be a string")
        roots = models.get("roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
            raise ConfigError(f"{where}: [models] roots must be a list of folder paths, e.g. "
                              f"roots = [\"D:/models\"]")
        return cls(base=models.get("base", ""), family=family, bases=bases,
                   controlnets=controlnets, cache_dir=models.get("cache_dir") or None,
                   tiny_root=models.get("tiny_root") or None, roots=tuple(roots),
                   lora_dir=models.get("lora_dir") or None)

    @classmethod
    def from_toml(cls, path: Optional[Path] = None) -> "ModelConfig":
        """Read ``path`` (default: config.toml in the user config folder); missing = defaults."""
        path = Path(path) if path else config_dir() / "config.toml"
        return cls.from_tables(load_toml(path), str(path))


def _check_condition(cond: str, value: Any, where: str) -> None:
    if cond not in CONDITIONS:
        raise ConfigError(f"{where}: unknown condition {cond!r}; known: {', '.join(CONDITIONS)}")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {cond} must be a hub id or a path")


# -----------------------------------------------------------------------------
# Resolution
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    """Where one model's weights are, ready to load, and what the files say it is."""

    name: str        # what the user (or the catalogue) called it
    kind: str        # "base" | "controlnet"
    family: str      # "sd15" | "sdxl"
    source: str      # "hub" | "folder" | "file" | "builtin"
    path: str        # local folder or file to load from
    repo_id: str = ""
    native_size: int = 512
    builtin: str = ""  # the built-in model's own name (``shapes-demo``, ``tiny-sd15``)
    inpaint: bool = False     # a base with a 9-channel (inpainting) UNet
    control: bool = False     # a Flux Tools base: the unit's image goes to the base itself
    union: bool = False       # a union ControlNet (several conditions in one model)
    control_types: int = 0    # a union ControlNet's number of control types
    weights_variant: str = ""  # "fp16": the folder holds only fp16-variant weights
    adapter: bool = False     # a T2I-Adapter serving the unit (engines.diffusers.adapters)
    edit: bool = False        # an edit base (FLUX.1 Kontext, Qwen-Image-Edit): runs edit mode
    quant: str = ""           # a GGUF transformer file's quantization ("Q8_0", "Q4_K")

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"


def _looks_like_path(name: str) -> bool:
    """True for anything that is not shaped like a hub id ``owner/name``."""
    if name.startswith(("/", ".", "~")) or "\\" in name or re.match(r"[A-Za-z]:", name):
        return True
    return name.lower().endswith(SINGLE_FILE_SUFFIXES) or not _HUB_ID.match(name)


def _weights(folder: Path) -> Optional[str]:
    """Which weights a component folder holds: "" full ones, "fp16" only the fp16
    variant, None none."""
    if any((folder / name).is_file() for name in _WEIGHT_NAMES):
        return ""
    if any((folder / name).is_file() for name in _FP16_NAMES):
        return "fp16"
    return None


def _weights_variant(folder: Path, kind: str) -> Optional[str]:
    """The variant to load ``folder`` with ("" or "fp16"); None when it is incomplete.
    A base loads with "fp16" when any component has only fp16 weights (diffusers falls
    back to the full weights for the others)."""
    if kind == "controlnet":
        return _weights(folder) if (folder / "config.json").is_file() else None
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except ValueError:
        return None
    variant = ""
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if name in ("safety_checker", "feature_extractor", "image_encoder"):
            continue  # not used by ControlCanvas
        sub = folder / name
        if not sub.is_dir():
            return None
        if name.startswith(("unet", "vae", "text_encoder", "transformer")):
            found = _weights(sub)
            if found is None:
                return None
            variant = variant or found
    return variant


def _folder_complete(folder: Path, kind: str) -> bool:
    return _weights_variant(folder, kind) is not None


def family_of_folder(folder: Path) -> str:
    """A base folder's family from its configs ("" = unknown)."""
    found = detect_base_folder(folder)
    return found.family if found else ""


def family_of_file(path: Path) -> str:
    """A single-file checkpoint's family from its tensor names ("" = unknown)."""
    found = detect_file(path)
    return found.family if found else ""


class Catalogue:
    """Resolves model names to local weights, lists them, downloads them."""

    def __init__(self, config: Optional[ModelConfig] = None) -> None:
        self.config = config or ModelConfig()
        self.loras = LoraFolder(self.config.lora_dir)

    # -- names ---------------------------------------------------------------

    @property
    def default_base(self) -> str:
        return self.config.base or DEFAULT_BASES["sd15"]

    def edit_base(self, name: str = "") -> str:
        """The base an edit request runs on: the one it names; else the default base when
        that is an edit model; else, with a built-in default, the built-in edit model; else
        the first edit model that is downloaded, else FLUX.1 Kontext [dev] (its absence then
        says how to get it).  So an artist need not know the edit model's name."""
        if name:
            return name
        default = self.default_base
        try:
            if self.resolve_base(default).edit:
                return default
        except ControlCanvasError:
            pass
        where = self.config.bases[default][0] if default in self.config.bases else default
        if where == DEMO_BASE or where in TINY_BASES:
            return sorted(TINY_EDIT_BASES)[0]
        for candidate in EDIT_BASES.values():
            try:
                self.resolve_base(candidate)
            except ControlCanvasError:
                continue
            return candidate
        return next(iter(EDIT_BASES.values()))

    def controlnet_name(self, condition: str, family: str, base: Optional[Resolved] = None) -> str:
        """The configured (or default) ControlNet name for ``condition`` on ``family``."""
        if condition not in CONDITIONS:
            raise ModelMissing(f"Unknown condition {condition!r}; known: "
                               f"{', '.join(CONDITIONS)}.", field="condition")
        nets = self.config.controlnets
        for table in (nets.get(family, {}), nets.get("*", {})):
            if condition in table:
                return table[condition]
        if base is not None and base.source == "builtin":
            return f"{base.builtin or base.name}:{condition}"
        name = CONTROLNETS.get(family, {}).get(condition)
        if not name:
            union = " (the union ControlNet serves every other condition)" \
                if family == "sdxl" else ""
            raise ModelMissing(
                f"There is no default {family.upper()} ControlNet for {condition!r}{union}. "
                f"Put one in config.toml: [controlnets.{family}] {condition} = \"hub id or "
                f"path\", or use an SD1.5 base (`{download_command(condition)}`).",
                field="model")
        return name

    # -- resolution ----------------------------------------------------------

    def resolve_base(self, name: str = "") -> Resolved:
        """Resolve a base model name (``""`` = the configured default); ModelMissing if absent,
        UnsupportedFamily for a family the engine does not run, PathRefused for a path a
        request may not name (see the module docstring)."""
        name = name or self.default_base
        family = ""
        where = name
        trusted = self._configured(name)
        if name in self.config.bases:
            where, family = self.config.bases[name]
        if where == self.config.base or name == self.config.base:
            family = family or self.config.family
        return self._resolve(name, where, "base", family, trusted)

    def resolve_controlnet(self, condition: str, base: Resolved, override: str = "") -> Resolved:
        """Resolve the ControlNet for one unit (its ``model`` override, else config/default)."""
        name = override or self.controlnet_name(condition, base.family, base)
        trusted = not override or self._configured(override)
        return self._resolve(name, name, "controlnet", base.family, trusted)

    def _configured(self, name: str) -> bool:
        """Whether ``name`` is the owner's: config.toml's base, a base's name or path, or a
        configured ControlNet (what the ``models`` list shows a client)."""
        c = self.config
        return name in (c.base, self.default_base) or name in c.bases \
            or any(name == where for where, _ in c.bases.values()) \
            or any(name in table.values() for table in c.controlnets.values())

    def _resolve(self, name: str, where: str, kind: str, family: str,
                 trusted: bool = True) -> Resolved:
        """``family``: what config.toml says (a base) or the base's family (a ControlNet);
        a ControlNet's own files win over the latter."""
        builtin = self._builtin(name, where, kind)
        if builtin is not None:
            return builtin
        if trusted or self.config.trust_request_paths:
            path = Path(where).expanduser()
            local = path if path.exists() or _looks_like_path(where) else None
        else:
            local = self._request_path(where, kind)
        if local is not None:
            return self._resolve_local(name, where, local, kind, family)
        # A hub id: only the local cache is used here.
        folder = self.cached_snapshot(where, kind)
        if folder is None:
            raise ModelMissing(
                f"The {kind} model {where!r} is not downloaded. Fetch it once with: "
                f"`{download_command(where)}`", field="model")
        return self._resolved(name, kind, family, "hub", folder, repo_id=where,
                              weights_variant=_weights_variant(folder, kind) or "")

    def _resolved(self, name: str, kind: str, family: str, source: str, path: Path,
                  **extra) -> Resolved:
        """The Resolved for local files, with what they say about themselves."""
        found: Optional[Detected] = detect(path, kind)
        check_runnable(found, name, kind)
        if found is not None and (kind == "controlnet" or not family):
            family = found.family  # a ControlNet is what its files say; a base unless told
        family = family or "sd15"
        return Resolved(name, kind, family, source, str(path), native_size=NATIVE_SIZE[family],
                        inpaint=bool(found and found.inpaint), union=bool(found and found.union),
                        control=bool(found and found.control), edit=bool(found and found.edit),
                        control_types=found.control_types if found else 0,
                        adapter=bool(found and found.t2i_adapter), **extra)

    def _request_path(self, where: str, kind: str) -> Optional[Path]:
        """A name from a request: the real path inside a models folder it stands for, or
        None for a hub id (looked up in the hub cache only, never on the disk at large).
        Any other path is PathRefused, with one wording for every reason."""
        def refuse() -> PathRefused:
            return PathRefused(
                f"The {kind} model {where!r} is not one this server offers. Pick one from its "
                f"model list, or ask the server's owner to put it in a models folder ([models] "
                f"roots in config.toml; see docs/remote.md).", field="model")

        roots = self.config.model_roots
        if _HUB_ID.match(where):
            try:
                found = confine(where, roots, refuse)
            except PathRefused:
                return None
            return found if found.exists() else None
        return confine(where, roots, refuse)

    def _resolve_local(self, name: str, where: str, path: Path, kind: str,
                       family: str) -> Resolved:
        if path.is_dir():
            check_runnable(detect(path, kind), name, kind)  # before "incomplete"
            variant = _weights_variant(path, kind)
            if variant is None:
                what = "model_index.json and each component's weights" if kind == "base" \
                    else "config.json and diffusion_pytorch_model.safetensors"
                raise ModelMissing(f"The {kind} model folder {str(path)!r} is incomplete: "
                                   f"it needs {what}.", field="model")
            return self._resolved(name, kind, family, "folder", path, weights_variant=variant)
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelMissing(f"{str(path)!r} is not a model file; use a .safetensors, "
                                   f".ckpt or .gguf file or a diffusers folder.", field="model")
            if gguf_files.is_gguf(path):
                return self._resolved_gguf(name, kind, family, path)
            return self._resolved(name, kind, family, "file", path)
        raise ModelMissing(f"The {kind} model {where!r} does not exist: no such file or "
                           f"folder. Check the path in config.toml or the request.",
                           field="model")

    def _resolved_gguf(self, name: str, kind: str, family: str, path: Path) -> Resolved:
        """A GGUF transformer file: a base of the family its tensor names say (the rest of
        its pipeline comes from the family's default repo when it is loaded)."""
        if not gguf_files.available():
            raise ModelMissing(f"The GGUF file {str(path)!r} {gguf_files.MISSING_GGUF}.",
                               field="model")
        header = gguf_files.read_header(path)
        found = detect(path, kind)
        if kind != "base" or header is None or found is None or found.kind != "base":
            what = "cannot be read" if header is None else "holds no transformer ControlCanvas " \
                "knows (Flux.1, Flux.2 Klein, SD3, Z-Image or Qwen-Image)"
            raise ModelMissing(f"The GGUF file {str(path)!r} {what}; GGUF files serve as base "
                               f"models' transformers only.", field="model")
        return replace(self._resolved(name, kind, family, "file", path), quant=header.quant)

    def _builtin(self, name: str, where: str, kind: str) -> Optional[Resolved]:
        if kind == "base" and where == DEMO_BASE:
            return Resolved(name, kind, "sd15", "builtin", str(demo_folder() / "base"),
                            native_size=DEMO_NATIVE_SIZE, builtin=DEMO_BASE)
        if kind == "controlnet" and where.startswith(DEMO_BASE + ":"):
            condition = where.split(":", 1)[1]
            if condition not in DEMO_CONDITIONS:
                raise ModelMissing(
                    f"The embedded demo model only has an outline ControlNet (for "
                    f"{', '.join(DEMO_CONDITIONS)}), not one for {condition!r}. Pick one of "
                    f"those conditions, or use a real Stable Diffusion 1.5 base: "
                    f"`{download_command('sd15')}` and `{download_command(condition)}`, then "
                    f"choose that base.", field="condition")
            return Resolved(name, kind, "sd15", "builtin", str(demo_folder() / "controlnet"),
                            native_size=DEMO_NATIVE_SIZE)
        root = Path(self.config.tiny_root) if self.config.tiny_root else None
        if kind == "base" and where in TINY_BASES:
            family = TINY_BASES[where]
            folder = TINY_EDIT[where](root) if where in TINY_EDIT \
                else tiny.ensure_tiny(family, root)
            found = detect(folder, kind)
            return Resolved(name, kind, family, "builtin", str(folder),
                            native_size=tiny.NATIVE_SIZE, builtin=where,
                            edit=bool(found and found.edit))
        if kind == "controlnet" and ":" in where and where.split(":", 1)[0] in TINY_BASES:
            base, condition = where.split(":", 1)
            family = TINY_BASES[base]
            try:
                sub = tiny.controlnet_for(condition, family)
            except KeyError:
                raise ModelMissing(f"Unknown condition {condition!r} in {where!r}.",
                                   field="model") from None
            folder = tiny.ensure_tiny(family, root) / "controlnets" / sub
            found = detect(folder, kind)
            return Resolved(name, kind, family, "builtin", str(folder),
                            native_size=tiny.NATIVE_SIZE, union=bool(found and found.union),
                            control_types=found.control_types if found else 0)
        return None

    def cached_snapshot(self, repo_id: str, kind: str, complete: bool = True) -> Optional[Path]:
        """The local snapshot folder of a hub repo when it holds a complete model (or with
        ``complete=False``, at least its configs: what a single file needs), else None."""
        from huggingface_hub import try_to_load_from_cache

        marker = "model_index.json" if kind == "base" else "config.json"
        try:
            found = try_to_load_from_cache(repo_id, marker, cache_dir=self.config.cache_dir)
        except Exception:  # noqa: BLE001 - an invalid id or cache is "not present"
            return None
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
        return folder if not complete or _folder_complete(folder, kind) else None

    # -- listing -------------------------------------------------------------

    def entries(self) -> List[ModelInfo]:
        """Every configured or catalogued model, with whether it is present locally."""
        out: List[ModelInfo] = []
        seen: Dict[Tuple[str, str, str], int] = {}

        def add(name: str, kind: str, condition: str = "", family: str = "") -> None:
            key = (name, kind, family)
            if key in seen:  # one entry per model: a union ControlNet lists its conditions
                if condition:
                    entry = out[seen[key]]
                    out[seen[key]] = replace(entry, condition=f"{entry.condition},{condition}")
                return
            seen[key] = len(out)
            found = family or self._family_guess(name)
            try:
                if kind == "base":
                    resolved = self.resolve_base(name)
                else:
                    resolved = self._resolve(name, name, kind, family)
                present, source, found = True, _describe_source(resolved), resolved.family
                edit = resolved.edit
            except ModelMissing:
                present = False
                edit = kind == "base" and (name in EDIT_BASES.values() or found in EDIT_FAMILIES)
                source = "hub" if _HUB_ID.match(name) and not Path(name).exists() else "local"
            except UnsupportedFamily as err:
                present, source, edit = False, f"not runnable: {err.message}", False
            out.append(ModelInfo(name=name, kind=kind, condition=condition, family=found,
                                 present=present, source=source, edit=edit))

        add(self.default_base, "base")
        for name in self.config.bases:
            add(name, "base")
        for name in (*DEFAULT_BASES.values(), *EDIT_BASES.values(), *MORE_BASES):
            add(name, "base")
        if not any(m.name == DEMO_BASE for m in out):
            out.append(ModelInfo(name=DEMO_BASE, kind="base", family="sd15", present=True,
                                 source="built in (trained demo: a coloured shape from its "
                                        "outline, 64 px)"))
        for tiny_name, family in TINY_BASES.items():
            if any(m.name == tiny_name for m in out):
                continue
            out.append(ModelInfo(name=tiny_name, kind="base", family=family, present=True,
                                 source="built in (random weights, for the demo and tests)",
                                 edit=tiny_name in TINY_EDIT_BASES))
        for family in FAMILIES:
            for condition in CONDITIONS:
                try:
                    name = self.controlnet_name(condition, family)
                except ModelMissing:
                    continue
                add(name, "controlnet", condition, family)
        for family, table in T2I_ADAPTERS.items():  # optional, lighter: T2I-Adapters
            for condition, name in table.items():
                add(name, "controlnet", condition, family)
        return [replace(m, conditions=self.served_conditions(m.name, m.family))
                if m.kind == "base" else m for m in out]

    def served_conditions(self, base: str, family: str) -> Tuple[str, ...]:
        """The conditions a request on ``base`` (of ``family``) can use, in CONDITIONS order:
        each one config.toml or the catalogue gives a ControlNet for on that family (a union
        model counts for every condition it serves); a built-in base serves its own
        (the demo only its outline conditions).  () when the family is unknown: the
        plug-ins then offer every condition and the server answers for itself.  Whether
        the ControlNet is downloaded is the ControlNet entry's ``present``."""
        where = self.config.bases[base][0] if base in self.config.bases else base
        if not family and where != DEMO_BASE and where not in TINY_BASES:
            return ()
        if family in REFERENCE_CONTROLS:  # no ControlNet: control images as references
            return tuple(c for c in CONDITIONS if c in REFERENCE_CONTROLS[family])
        served = []
        for condition in CONDITIONS:
            if any(condition in self.config.controlnets.get(table, {})
                   for table in (family, "*")):
                served.append(condition)
            elif where == DEMO_BASE:
                if condition in DEMO_CONDITIONS:
                    served.append(condition)
            elif where in TINY_BASES:
                if _tiny_serves(condition, TINY_BASES[where]):
                    served.append(condition)
            elif condition in CONTROLNETS.get(family, {}):
                served.append(condition)
        return tuple(served)

    def _family_guess(self, name: str) -> str:
        if name in self.config.bases and self.config.bases[name][1]:
            return self.config.bases[name][1]
        if name == self.default_base and self.config.family:
            return self.config.family
        for family, default in (*DEFAULT_BASES.items(), *EDIT_BASES.items(),
                                *((f, n) for n, f in MORE_BASES.items())):
            if name == default:
                return family
        return ""  # not on this machine: its files would tell, its name does not

    def models_message(self, annotators: Tuple[AnnotatorInfo, ...] = ()) -> Models:
        loras = self.loras.infos()
        return Models(models=tuple(self.entries()), annotators=annotators,
                      default_base=self.default_base, default_edit_base=self.edit_base(),
                      loras=loras,
                      presets=few_step.infos([lora.name for lora in loras],
                                             lambda hub: self.cached_snapshot(hub, "base")))

    # -- downloading ---------------------------------------------------------

    def download_names(self) -> List[str]:
        """The names ``controlcanvas models download`` knows besides hub ids."""
        names = list(DEFAULT_BASES) + [n for n in self.config.bases if n not in DEFAULT_BASES]
        names += list(CONTROLNETS["sd15"]) + [f"{family}:{c}" for family in FAMILIES
                                              if family != "sd15"
                                              for c in CONTROLNETS.get(family, {})]
        return names + list(few_step.load_presets()) + list(references.ADAPTERS)

    def download_target(self, name: str) -> Tuple[str, str]:
        """(hub id, kind) that ``controlcanvas models download NAME`` fetches for ``name``."""
        if name in references.ADAPTERS:  # an IP-Adapter: a few files of its hub repo
            return references.ADAPTERS[name].repo, "ipadapter"
        if name in DEFAULT_BASES:
            return DEFAULT_BASES[name], "base"
        if name in self.config.bases:
            name = self.config.bases[name][0]
        preset = few_step.load_presets().get(name)
        if preset is not None:
            return (preset.hub, "lora") if preset.lora else (preset.base, "base")
        family, _, condition = name.rpartition(":")
        if condition in CONDITIONS and family in ("", *FAMILIES):
            return self.controlnet_name(condition, family or "sd15"), "controlnet"
        if name in TINY_BASES or name == DEMO_BASE:
            raise ModelMissing(f"{name} is built in; it needs no download.", field="model")
        if Path(name).exists():
            raise ModelMissing(f"{name!r} is a local path, not a hub id: nothing to download.",
                               field="model")
        if not _HUB_ID.match(name):
            raise ModelMissing(f"{name!r} is not a known model name. Known: "
                               f"{', '.join(self.download_names())}, or a Hugging Face hub id "
                               f"(owner/name).", field="model")
        # A guess for names outside the catalogue; download() checks the repo's files.
        kind = "controlnet" if any(name == v for t in (*CONTROLNETS.values(),
                                                       *T2I_ADAPTERS.values())
                                   for v in t.values()) \
            or "control" in name.lower() else "base"
        return name, kind

    def _download_repo(self, name: str) -> Tuple[str, Optional[Path]]:
        """(hub id, its complete snapshot folder when already downloaded) for ``name``."""
        repo_id, kind = self.download_target(name)
        if _HUB_ID.match(repo_id) is None:
            raise ModelMissing(f"{repo_id!r} is a local path, not a hub id: nothing to download.",
                               field="model")
        for guess in (kind, "base" if kind == "controlnet" else "controlnet"):
            folder = self.cached_snapshot(repo_id, guess)
            if folder is not None:
                return repo_id, folder
        return repo_id, None

    def download_plan(self, name: str, api=None) -> downloads.DownloadPlan:
        """What ``models download NAME`` would fetch, with sizes (asks the hub; offline:
        HubUnreachable, the size is unknown); a preset's LoRA: that one file."""
        if self.download_target(name)[1] == "lora":
            return _lora_plan(few_step.find(name), api)
        if name in references.ADAPTERS:
            return references.download_plan(name, api)
        repo_id, _ = self._download_repo(name)
        return downloads.plan(repo_id, api)

    def download(self, name: str, *, progress: bool = True, api=None, snapshot=None,
                 on_plan: Optional[Callable[[downloads.DownloadPlan], None]] = None) -> Path:
        """Fetch ``name`` (hub id or alias) into the hub cache; returns the snapshot folder.
        The files are chosen first (fp16 weights where the repo has them) and ``on_plan``
        hears what they weigh before the transfer starts (see backend.engines.downloads).
        A preset's LoRA: its file, copied into the LoRA folder (see _download_lora)."""
        if self.download_target(name)[1] == "lora":
            return self._download_lora(few_step.find(name), api, on_plan)
        if name in references.ADAPTERS:
            return references.download(name, self.config.cache_dir, progress=progress,
                                       api=api, snapshot=snapshot, on_plan=on_plan)
        repo_id, folder = self._download_repo(name)
        if folder is not None:
            return folder
        found = downloads.plan(repo_id, api, "download")
        if on_plan is not None:
            on_plan(found)
        return downloads.fetch(found, self.config.cache_dir, progress=progress,
                               snapshot=snapshot)

    def download_sizes(self, api=None) -> Tuple[Dict[str, str], str]:
        """({hub id: download size text} for every catalogued hub model not downloaded
        yet, why the hub could not be asked or ''); offline every size is unknown."""
        missing = [m.name for m in self.entries() if not m.present and m.source == "hub"]
        return downloads.sizes_of(dict.fromkeys(missing), api)

    def _download_lora(self, preset: "few_step.Preset", api=None,
                       on_plan: Optional[Callable[[downloads.DownloadPlan], None]] = None
                       ) -> Path:
        """A preset's LoRA file, fetched into the hub cache and copied into the LoRA folder
        as ``<preset.lora>.safetensors`` (the name the preset asks for)."""
        target = self.loras.folder / f"{preset.lora}.safetensors"
        if target.is_file():
            return target
        from huggingface_hub import constants, hf_hub_download

        if constants.HF_HUB_OFFLINE:
            raise ModelMissing(
                f"Cannot download the LoRA of {preset.name}: offline mode is on (HF_HUB_OFFLINE "
                f"is set). Unset it and run `{preset.download}` on a connected machine, or put "
                f"{preset.file} from {preset.hub} in the LoRA folder as {target.name}.",
                field="preset")
        if on_plan is not None:
            on_plan(_lora_plan(preset, api))
        try:
            source = Path(hf_hub_download(preset.hub, preset.file,
                                          cache_dir=self.config.cache_dir))
        except Exception as err:  # noqa: BLE001 - hub and network errors vary by version
            raise ModelMissing(f"Cannot download {preset.file} from {preset.hub} "
                               f"({type(err).__name__}: {err}). Check the connection and "
                               f"retry `{preset.download}`.", field="preset") from None
        _copy_into(source, target)
        log.info("LoRA of preset %s: %s", preset.name, target)
        return target


def _lora_plan(preset: "few_step.Preset", api=None) -> downloads.DownloadPlan:
    """The one file of a preset's LoRA, with its size (asks the hub)."""
    files = downloads.list_files(preset.hub, api)
    return downloads.DownloadPlan(preset.hub, "lora", tuple(
        f for f in files if f.path == preset.file) or (downloads.HubFile(preset.file),))


def _copy_into(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name (never a half file)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _tiny_serves(condition: str, family: str) -> bool:
    try:
        tiny.controlnet_for(condition, family)
    except KeyError:
        return False
    return True


def _describe_source(resolved: Resolved) -> str:
    if resolved.source == "hub":
        return f"hub cache ({resolved.repo_id})"
    if resolved.source == "builtin":
        return "built in"
    if resolved.quant:
        return (f"{resolved.path} (GGUF {resolved.quant} transformer; the rest from "
                f"{DEFAULT_BASES[resolved.family]})")
    return resolved.path


def list_models(config: Optional[ModelConfig] = None) -> Models:
    """The ``models`` message for the server (no torch import)."""
    return Catalogue(config).models_message()
