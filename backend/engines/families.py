"""Model families: what a base model or a ControlNet *is*, read from its own files.

Detection reads configs (a diffusers folder's ``model_index.json`` and
``unet/config.json``, a ControlNet's ``config.json``) or the header of a single
``.safetensors`` file (tensor names and shapes through ``safe_open``; no tensor is
read), never the model's name: an Illustrious, Pony or NoobAI checkpoint is an SDXL
file whatever it is called.

What the engine runs (``SUPPORTED``): Stable Diffusion 1.5 and SDXL, each also as a
9-channel inpainting base, with classic and (SDXL) union ControlNets and T2I-Adapters (their
family from ``adapter_type``: ``full_adapter_xl`` is SDXL's layout); Flux.1 (classic and
InstantX / Shakker union ControlNets, ``FLUX_UNION_MODES``) and SD3 / SD3.5 (SD3
ControlNets) and Qwen-Image (InstantX's union and inpainting ControlNets,
``QWEN_UNION_MODES``), run by :mod:`backend.engines.diffusers.dit`.  SD2 is recognised so that a
request for it ends in a typed :class:`~shared.errors.UnsupportedFamily` instead of a
crash.  A new family slots in
with an entry in ``FAMILIES``, its detection rules below, its pipelines in
``engines.diffusers.pipelines`` and its entry in ``SUPPORTED``.

Union ControlNets (xinsir's ControlNet++ / ProMax) serve several conditions with one
model; ``UNION_CONTROL_TYPES`` maps each condition to its control type.

Nothing here imports torch or diffusers (the catalogue resolves names with it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from shared.errors import UnsupportedCondition, UnsupportedFamily

from . import gguf_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    native: int       # native generation size (pixels of a square side)
    supported: bool   # does the engine run it


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("sd15", "Stable Diffusion 1.5", 512, True),
    Family("sdxl", "SDXL (also Pony, Illustrious, NoobAI)", 1024, True),
    Family("sd2", "Stable Diffusion 2.x", 768, False),
    Family("sd3", "Stable Diffusion 3 / 3.5", 1024, True),
    Family("flux", "Flux.1", 1024, True),
    Family("zimage", "Z-Image", 1024, True),
    Family("klein", "Flux.2 Klein", 1024, True),
    Family("qwen", "Qwen-Image", 1328, True),
)}
SUPPORTED: Tuple[str, ...] = tuple(name for name, f in FAMILIES.items() if f.supported)


@dataclass(frozen=True)
class Detected:
    """What a model is.  ``name`` spells it the way docs and logs do: ``sd15``,
    ``sd15-inpaint`` (a 9-channel inpainting UNet), ``sdxl``, ``sdxl-inpaint``,
    ``sdxl-union`` (a union ControlNet), ``flux``, ``sd3``."""

    kind: str                 # "base" | "controlnet" | "adapter" (another control model)
    family: str               # a key of FAMILIES
    inpaint: bool = False     # a base whose UNet takes 9 channels (latents + mask + image)
    union: bool = False       # a ControlNet serving several conditions (control types)
    control_types: int = 0    # a union ControlNet's number of control types (ProMax: 8)
    what: str = ""            # for kind "adapter": what it is ("a T2I-Adapter")
    control: bool = False     # a Flux Tools base (canny / depth dev): takes the control image
    edit: bool = False        # an edit base (FLUX.1 Kontext): an instruction applied to a layer

    @property
    def t2i_adapter(self) -> bool:
        """A T2I-Adapter (diffusers ``T2IAdapter``): runs as a unit's control model."""
        return self.kind == "adapter" and self.what == T2I_ADAPTER

    @property
    def name(self) -> str:
        return self.family + ("-inpaint" if self.inpaint else "") + \
            ("-union" if self.union else "") + ("-control" if self.control else "") + \
            ("-edit" if self.edit else "")


# -----------------------------------------------------------------------------
# Folders (diffusers layout)
# -----------------------------------------------------------------------------

def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _unet_family(config: Mapping) -> str:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd15"


# FLUX.1 Tools' Canny / Depth [dev] transformers read the control image's latents beside
# their own: 2 x 64 packed channels.
FLUX_CONTROL_CHANNELS = 128
# model_index classes of edit bases (an instruction applied to a layer) -> their family.
EDIT_PIPELINES: Dict[str, str] = {"FluxKontextPipeline": "flux",
                                  "FluxKontextInpaintPipeline": "flux"}
EDIT_PIPELINES.update(dict.fromkeys(("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
                                    "klein"))  # Klein: txt2img and edit, one pipeline
EDIT_PIPELINES.update(dict.fromkeys(("QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                                     "QwenImageEditInpaintPipeline"), "qwen"))
_BASE_CLASSES = (("ZImage", "zimage"), ("Flux2Klein", "klein"), ("Flux", "flux"),
                 ("StableDiffusion3", "sd3"), ("StableDiffusionXL", "sdxl"), ("QwenImage", "qwen"))


def detect_base_folder(folder: Path) -> Optional[Detected]:
    """A diffusers pipeline folder: from model_index.json's class and the UNet's config."""
    index = _read_json(Path(folder) / "model_index.json")
    if index is None:
        return None
    cls = str(index.get("_class_name", ""))
    unet = _read_json(Path(folder) / "unet" / "config.json")
    inpaint = bool(unet and unet.get("in_channels") == 9)
    transformer = _read_json(Path(folder) / "transformer" / "config.json") or {}
    if cls.startswith("Flux") and not cls.startswith("Flux2") and \
            transformer.get("in_channels") == FLUX_CONTROL_CHANNELS:
        return Detected("base", "flux", control=True)  # FLUX.1 Canny / Depth [dev]
    # before the base classes ("QwenImage" also starts "QwenImageEdit..."):
    if cls in EDIT_PIPELINES:  # FLUX.1 Kontext, Qwen-Image-Edit: an edit pipeline
        return Detected("base", EDIT_PIPELINES[cls], edit=True)
    for prefix, family in _BASE_CLASSES:
        if cls.startswith(prefix):
            return Detected("base", family, inpaint=inpaint)
    if transformer.get("_class_name") == KLEIN_TRANSFORMER and \
            not transformer.get("guidance_embeds", True):  # Klein under another class name
        return Detected("base", "klein", edit=True)
    if "transformer" in index and "unet" not in index:
        family = "sd3" if "text_encoder_3" in index else "flux"
        return Detected("base", family)
    if unet is not None:
        return Detected("base", _unet_family(unet), inpaint=inpaint)
    if "text_encoder_2" in index:
        return Detected("base", "sdxl")
    return None


T2I_ADAPTER = "a T2I-Adapter"
_OTHER_CONTROL_CLASSES = {"T2IAdapter": T2I_ADAPTER, "MultiAdapter": "a saved MultiAdapter",
                          "ControlNetXSAdapter": "a ControlNet-XS adapter",
                          "SparseControlNetModel": "a SparseCtrl (AnimateDiff) ControlNet"}


def detect_controlnet_folder(folder: Path) -> Optional[Detected]:
    """A ControlNet folder: from config.json's class and its embedding settings."""
    config = _read_json(Path(folder) / "config.json")
    if config is None:
        return None
    cls = str(config.get("_class_name", ""))
    if cls == "ControlNetUnionModel":
        return Detected("controlnet", "sdxl", union=True,
                        control_types=int(config.get("num_control_type", 6)))
    if cls.startswith("Flux"):  # InstantX / Shakker's union model has control modes
        modes = int(config.get("num_mode") or 0)
        return Detected("controlnet", "flux", union=bool(modes), control_types=modes)
    if cls.startswith("SD3"):
        return Detected("controlnet", "sd3")
    if cls == "ZImageControlNetModel":
        return _zimage_controlnet(config.get("control_in_dim"))
    if cls.startswith("QwenImage"):
        return qwen_controlnet(int(config.get("extra_condition_channels") or 0))
    if cls == "T2IAdapter":  # SDXL's adapters have their own layout (one fewer level)
        family = "sdxl" if config.get("adapter_type") == "full_adapter_xl" else "sd15"
        return Detected("adapter", family, what=T2I_ADAPTER)
    if cls in _OTHER_CONTROL_CLASSES:
        return Detected("adapter", _unet_family(config), what=_OTHER_CONTROL_CLASSES[cls])
    if cls in ("", "ControlNetModel"):
        return Detected("controlnet", _unet_family(config))
    return None


# -----------------------------------------------------------------------------
# Single files: the safetensors header only
# -----------------------------------------------------------------------------

Shape = Callable[[str], Tuple[int, ...]]


def _header(path: Path) -> Optional[Tuple[Tuple[str, ...], Shape]]:
    """Tensor names and a shape lookup from a .safetensors header (lazy: no tensor read),
    or a GGUF file's (:mod:`.gguf_files`; the same rules read its names)."""
    if gguf_files.is_gguf(path):
        found = gguf_files.read_header(path)
        return None if found is None else (found.names, lambda key: found.shapes.get(key, ()))
    if Path(path).suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            keys = tuple(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys
                      if k in _SHAPED_KEYS}
    except Exception as err:  # noqa: BLE001 - a broken file is "unknown", loading says more
        log.debug("cannot read the header of %s: %s", path, err)
        return None
    return keys, lambda key: shapes.get(key, ())


_LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_LDM_SD2_ATTN = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_ZIMAGE_CONTROL_EMBEDDER = "control_all_x_embedder.2-1.weight"  # (width, 2x2 x control_in_dim)
_SHAPED_KEYS = frozenset({_LDM_CONV_IN, _LDM_SD2_ATTN, "conv_in.weight", "task_embedding",
                          "controlnet_mode_embedder.weight", _ZIMAGE_CONTROL_EMBEDDER,
                          "controlnet_x_embedder.weight", "img_in.weight"})


def _starts(keys: Iterable[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _nine_channels(shape: Tuple[int, ...]) -> bool:
    return len(shape) > 1 and shape[1] == 9


def _detect_keys(keys: Tuple[str, ...], shape: Shape) -> Optional[Detected]:
    """The rules, most specific first (a Flux ControlNet also has transformer blocks)."""
    zimage = _detect_zimage_keys(keys, shape) or _detect_klein_keys(keys)
    if zimage is not None:
        return zimage
    qwen = _detect_qwen_keys(keys, shape)
    if qwen is not None:
        return qwen
    if _starts(keys, "controlnet_x_embedder.", "controlnet_single_blocks."):
        modes = shape("controlnet_mode_embedder.weight")
        return Detected("controlnet", "flux", union=bool(modes), control_types=modes[0]
                        if modes else 0)
    if _starts(keys, "controlnet_blocks.") and _starts(keys, "transformer_blocks."):
        family = "flux" if _starts(keys, "single_transformer_blocks.") else "sd3"
        return Detected("controlnet", family)
    if _starts(keys, "double_blocks.", "model.diffusion_model.double_blocks.") or \
            (_starts(keys, "single_transformer_blocks.") and _starts(keys, "x_embedder.")):
        return Detected("base", "flux")
    if _starts(keys, "joint_blocks.", "model.diffusion_model.joint_blocks."):
        return Detected("base", "sd3")
    if "task_embedding" in keys or _starts(keys, "control_add_embedding."):
        types = shape("task_embedding")
        return Detected("controlnet", "sdxl", union=True,
                        control_types=types[0] if types else 6)
    if _starts(keys, "control_model.", "input_hint_block.", "controlnet_cond_embedding."):
        xl = _starts(keys, "add_embedding.", "label_emb.", "control_model.label_emb.")
        return Detected("controlnet", "sdxl" if xl else "sd15")
    inpaint = _nine_channels(shape(_LDM_CONV_IN)) or _nine_channels(shape("conv_in.weight"))
    if _starts(keys, "conditioner.embedders.", "model.diffusion_model.label_emb."):
        return Detected("base", "sdxl", inpaint=inpaint)
    if _starts(keys, "cond_stage_model.model."):  # OpenCLIP: SD2
        return Detected("base", "sd2", inpaint=inpaint)
    if _starts(keys, "model.diffusion_model.", "cond_stage_model."):
        sd2 = shape(_LDM_SD2_ATTN)[-1:] == (1024,)
        return Detected("base", "sd2" if sd2 else "sd15", inpaint=inpaint)
    if _starts(keys, "add_embedding."):  # a diffusers-keyed SDXL UNet
        return Detected("base", "sdxl", inpaint=inpaint)
    if _starts(keys, "down_blocks.") and "conv_in.weight" in keys:
        return Detected("base", "sd15", inpaint=inpaint)
    return None


def _detect_zimage_keys(keys: Tuple[str, ...], shape: Shape) -> Optional[Detected]:
    """Z-Image's transformer (original or diffusers keys: its per-layer ``adaLN_modulation``
    beside a ``context_refiner``) and alibaba-pai's union ControlNet
    (``control_all_x_embedder``), as diffusers' single-file loader tells them."""
    if _ZIMAGE_CONTROL_EMBEDDER in keys:
        width = shape(_ZIMAGE_CONTROL_EMBEDDER)
        return _zimage_controlnet(width[1] // 4 if len(width) > 1 else None)
    if _starts(keys, "layers.0.adaLN_modulation.0.", "model.diffusion_model.layers.0."
               "adaLN_modulation.0.") and _starts(keys, "context_refiner.",
                                                  "model.diffusion_model.context_refiner."):
        return Detected("base", "zimage")
    return None


# Flux.2's transformer: one modulation shared by every single-stream block
# (``single_stream_modulation``, the key diffusers' single-file loader tells Flux.2 by), where
# Flux.1 modulates per block.  Klein is the Flux.2 transformer without a guidance embedding
# (Flux.2 [dev] has one); Klein bases also run edit mode (references in the pipeline call).
KLEIN_TRANSFORMER = "Flux2Transformer2DModel"
_FLUX2_KEYS = ("single_stream_modulation.", "model.diffusion_model.single_stream_modulation.")
_FLUX2_GUIDANCE = ("guidance_in.", "model.diffusion_model.guidance_in.",
                   "time_guidance_embed.guidance_embedder.")


def _detect_klein_keys(keys: Tuple[str, ...]) -> Optional[Detected]:
    """A Flux.2 Klein transformer file (original or diffusers keys; see KLEIN_TRANSFORMER)."""
    if _starts(keys, *_FLUX2_KEYS) and not _starts(keys, *_FLUX2_GUIDANCE):
        return Detected("base", "klein", edit=True)
    return None


def _detect_qwen_keys(keys: Tuple[str, ...], shape: Shape) -> Optional[Detected]:
    """Qwen-Image's transformer (diffusers' names, as its single files keep them, or
    ComfyUI's ``model.diffusion_model.`` prefix): a text norm and an image input projection
    beside the blocks, which Flux's and SD3's lack; its ControlNets add an x embedder."""
    prefix = "model.diffusion_model." if _starts(keys, "model.diffusion_model.txt_norm.") \
        else ""
    if not (_starts(keys, prefix + "txt_norm.") and _starts(keys, prefix + "img_in.")):
        return None
    if not _starts(keys, "controlnet_x_embedder."):
        return Detected("base", "qwen")
    extra = shape("controlnet_x_embedder.weight")[1:2] or (0,)
    inner = shape("img_in.weight")[1:2] or extra
    return qwen_controlnet(extra[0] - inner[0])


def detect_file(path: Path) -> Optional[Detected]:
    """A single ``.safetensors`` or ``.gguf`` file, from its tensor names and a few shapes
    (None for other formats, an unreadable header, or keys no rule knows)."""
    header = _header(Path(path))
    return None if header is None else _detect_keys(*header)


def detect(path: Path, kind: str) -> Optional[Detected]:
    """Whatever ``path`` (folder or single file) holds, as far as its files tell."""
    path = Path(path)
    if path.is_dir():
        return detect_base_folder(path) if kind == "base" else detect_controlnet_folder(path)
    return detect_file(path)


# -----------------------------------------------------------------------------
# What runs
# -----------------------------------------------------------------------------

def check_runnable(detected: Optional[Detected], name: str, kind: str) -> None:
    """UnsupportedFamily for a model the engine cannot run yet, or one of another kind
    than asked (a ControlNet given as a base); nothing for unknown or runnable models."""
    if detected is None:
        return
    family = FAMILIES[detected.family]
    if detected.t2i_adapter and kind == "controlnet" and family.supported:
        return  # a unit's control model (engines.diffusers.adapters)
    if detected.kind == "adapter":
        raise UnsupportedFamily(
            f"{name!r} is {detected.what}, not a ControlNet; ControlCanvas does not run those "
            f"yet. Use a ControlNet for this condition.", field="model")
    if detected.kind != kind:
        wanted = "base model (a checkpoint)" if kind == "base" else "ControlNet"
        raise UnsupportedFamily(
            f"{name!r} is a {detected.kind}, not a {wanted}: "
            f"{'pick a base model' if kind == 'base' else 'pick a ControlNet'} there.",
            field="base_model" if kind == "base" else "model")
    if not family.supported:
        labels = " and ".join(FAMILIES[f].label for f in SUPPORTED)
        raise UnsupportedFamily(
            f"{name!r} is a {family.label} {'model' if kind == 'base' else 'ControlNet'}; "
            f"ControlCanvas runs {labels} so far ({family.label} is planned). Pick one of "
            f"those.", field="base_model" if kind == "base" else "model")


# xinsir's ControlNet++ union control types (the ProMax model has all 8; the first
# union release has the first 6).
UNION_CONTROL_TYPES: Dict[str, int] = {
    "openpose": 0, "depth": 1, "softedge": 2, "scribble": 2, "canny": 3, "lineart": 3,
    "lineart_anime": 3, "mlsd": 3, "normal": 4, "seg": 5, "tile": 6, "inpaint": 7,
}
UNION_PROMAX_TYPES = 8


def union_control_type(condition: str, control_types: int, name: str) -> int:
    """The control type a union ControlNet uses for ``condition``; UnsupportedCondition
    naming what would serve it when it has none."""
    index = UNION_CONTROL_TYPES.get(condition)
    served = ", ".join(c for c, i in UNION_CONTROL_TYPES.items() if i < control_types)
    if index is None:
        raise UnsupportedCondition(
            f"The union ControlNet {name!r} has no {condition!r} control (it serves "
            f"{served}). For {condition} use an SD1.5 base (its default {condition} "
            f"ControlNet), or an SDXL {condition} ControlNet: [controlnets.sdxl] "
            f"{condition} = \"hub id or path\" in config.toml.", field="condition")
    if index >= control_types:
        raise UnsupportedCondition(
            f"The union ControlNet {name!r} has {control_types} control types, without "
            f"{condition!r} (it serves {served}). The ProMax union model has all "
            f"{UNION_PROMAX_TYPES}: `controlcanvas models download sdxl:{condition}`.",
            field="condition")
    return index


# The InstantX / Shakker-Labs union ControlNet for FLUX.1 ("control_mode" per unit): its
# modes are canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6.  Edge-like
# conditions use the canny mode (white lines on black, as canny's map).
FLUX_UNION_MODES: Dict[str, int] = {
    "canny": 0, "lineart": 0, "lineart_anime": 0, "mlsd": 0, "softedge": 0, "scribble": 0,
    "tile": 1, "depth": 2, "openpose": 4,
}


# alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union reads one control image and tells the
# kind from the picture itself (no control modes): Canny, HED, depth, pose and MLSD maps;
# line art and scribbles are white lines on black, as a canny map.  Union 2.x also reads
# the mask and the masked picture (33 control channels: ZIMAGE_INPAINT_CONTROL_DIM), which
# serves inpainting.
ZIMAGE_CONDITIONS: Tuple[str, ...] = ("canny", "softedge", "depth", "openpose", "mlsd",
                                      "lineart", "lineart_anime", "scribble")
ZIMAGE_INPAINT_CONTROL_DIM = 33

# Flux.2 Klein has no ControlNet: a unit's control image becomes a reference image with an
# instruction fitting its condition (backend.engines.diffusers.dit_klein), as Black Forest
# Labs recommend.  The conditions so emulated, per family that emulates control this way:
KLEIN_REFERENCE_CONDITIONS: Tuple[str, ...] = (
    "canny", "lineart", "lineart_anime", "scribble", "softedge", "mlsd", "depth", "normal",
    "openpose", "seg", "tile", "shuffle")
REFERENCE_CONTROLS: Dict[str, Tuple[str, ...]] = {"klein": KLEIN_REFERENCE_CONDITIONS}


def _zimage_controlnet(control_in_dim) -> Detected:
    """A Z-Image union ControlNet; ``inpaint`` when it reads the mask and masked picture."""
    return Detected("controlnet", "zimage", union=True,
                    control_types=len(ZIMAGE_CONDITIONS),
                    inpaint=control_in_dim == ZIMAGE_INPAINT_CONTROL_DIM)


# InstantX's Qwen-Image union ControlNet has no control-mode input: it reads the condition
# from the image and was trained on canny, soft edge, depth and pose (its model card).  Our
# conditions map onto those four (edge-like ones onto canny, white lines on black); the
# numbers order the four (a Qwen union Detected counts them as its control types).
QWEN_UNION_MODES: Dict[str, int] = {
    "canny": 0, "lineart": 0, "lineart_anime": 0, "mlsd": 0, "scribble": 0, "softedge": 1,
    "depth": 2, "openpose": 3,
}
QWEN_UNION_TYPES = 4


def qwen_controlnet(extra_channels: int) -> Detected:
    """A QwenImageControlNetModel: the inpainting one (InstantX's) takes extra condition
    channels (the mask beside the image latents): a classic single-condition ControlNet;
    without them, the union model (see :data:`QWEN_UNION_MODES`)."""
    if extra_channels > 0:
        return Detected("controlnet", "qwen")
    return Detected("controlnet", "qwen", union=True, control_types=QWEN_UNION_TYPES)


@dataclass(frozen=True)
class Quirks:
    """What a (family, condition) ControlNet needs from the rest of the request."""

    clip_skip: int = 1        # A1111's clip skip: 1 = CLIP's last layer, 2 = the one before
    guess_mode: bool = True   # may run in guess mode ("ControlNet is more important")


# lllyasviel's model card: control_v11p_sd15s2_lineart_anime was trained with clip skip 2
# ("s2") and does not support guess mode.
QUIRKS: Dict[Tuple[str, str], Quirks] = {
    ("sd15", "lineart_anime"): Quirks(clip_skip=2, guess_mode=False),
}
NO_QUIRKS = Quirks()


def quirks(family: str, condition: str, union: bool = False) -> Quirks:
    """The quirks of a classic ControlNet (union models have none)."""
    return NO_QUIRKS if union else QUIRKS.get((family, condition), NO_QUIRKS)


def check_unit(family: str, condition: str, control_mode: str, union: bool = False) -> None:
    """UnsupportedCondition for a control mode the unit's ControlNet does not support."""
    if control_mode == "control" and not quirks(family, condition, union).guess_mode:
        raise UnsupportedCondition(
            f"The {FAMILIES[family].label} {condition} ControlNet does not work in "
            f"\"ControlNet is more important\" mode (guess mode; its model card says so): "
            f"choose \"balanced\" or \"prompt is more important\" for this unit.",
            field="control_mode")
