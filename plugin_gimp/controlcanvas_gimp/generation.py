"""Dialog values → the :class:`GenerateRequest` the server runs, and result naming.

Size rule (WORKFLOWS "canvas size"): a ControlNet works at its model's native
scale, so by default the request has the layer's aspect ratio at about the
native pixel count (512² for SD1.5, 1024² for SDXL), sides multiples of 8; the
result is scaled back to the layer's exact size by the editor.  ``size='layer'``
asks for the layer's own size instead (rounded to multiples of 8).  Either way
the server's limits are respected.

*Regenerate selection* works on the selection's bounding box plus
:data:`shared.geometry.INPAINT_MARGIN` pixels of context (inside the layer): that box is what is
sent, sized by the same rule, and what comes back.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from shared.geometry import DEFAULT_NATIVE_SIDE, NATIVE_SIDE
from shared.images import Image
from shared.errors import FieldError
from shared.messages import (ControlUnit, GenerateRequest, Limits, LoraRef, Models, Pose,
                             ReferenceUnit)
from shared.offers import Offers, parse_loras

from .problems import UsageError

GINT_MAX = 2**31 - 1  # GIMP's int arguments are 32-bit signed: the seeds the plug-in picks fit
SAME_SEED = -2  # the seed argument's "the seed of this image's last result"


@dataclass(frozen=True)
class GenerateOptions:
    condition: str
    annotate: bool
    annotator: str
    prompt: str
    negative_prompt: str
    seed: int
    batch: int
    steps: int
    cfg: float
    sampler: str
    control_weight: float
    control_start: float
    control_end: float
    control_mode: str
    size: str
    base_model: str
    loras: Tuple[LoraRef, ...] = ()
    reference_layer: str = ""  # a layer's name: its picture steers (IP-Adapter); "" none
    reference_weight: float = 0.8
    reference_mode: str = "reference"

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "GenerateOptions":
        """From checked procedure values (see procedures.check_values)."""
        opts = cls(
            condition=values["condition"], annotate=values["annotate"],
            annotator=values["annotator"].strip(), prompt=values["prompt"].strip(),
            negative_prompt=values["negative-prompt"].strip(), seed=values["seed"],
            batch=values["batch"], steps=values["steps"], cfg=values["cfg"],
            sampler=values["sampler"], control_weight=values["control-weight"],
            control_start=values["control-start"], control_end=values["control-end"],
            control_mode=values["control-mode"], size=values["size"],
            base_model=values["base-model"].strip(), loras=_loras(values.get("loras", "")),
            reference_layer=values.get("reference-layer", "").strip(),
            reference_weight=values.get("reference-weight", 0.8),
            reference_mode=values.get("reference-mode", "reference"))
        if opts.control_start >= opts.control_end:
            raise UsageError(f"Control start ({opts.control_start:g}) must be smaller than "
                             f"control end ({opts.control_end:g}).", field="control-start")
        return opts


def _loras(text: str) -> Tuple[LoraRef, ...]:
    """The 'LoRAs' argument ("ink:0.8, watercolour") as the request's LoRAs."""
    try:
        return parse_loras(text, field="LoRAs")
    except FieldError as err:
        raise UsageError(f"{err.message} Example: \"ink:0.8, watercolour\"; Settings / "
                         f"connection test… lists the server's LoRAs.", field="loras") from None


def check_offered(opts: GenerateOptions, models: Optional[Models]) -> None:
    """Refuse, before anything is sent, a condition the chosen base cannot serve (the
    server's per-base list; it names the bases that can) and a LoRA the server does not
    list (naming those it has) or that was made for another family than the base."""
    offer = Offers(models)
    if opts.condition != "none":
        offer.check_condition(opts.condition, opts.base_model)
    offer.check_loras(opts.loras, opts.base_model)


def _round8(value: float) -> int:
    return max(8, int(math.floor(value / 8.0 + 0.5)) * 8)


def _floor8(value: float) -> int:
    return max(8, int(math.floor(value / 8.0)) * 8)


def generation_size(width: int, height: int, size: str, native_side: int,
                    limits: Optional[Limits] = None) -> Tuple[int, int]:
    """The (width, height) to generate at for a layer of ``width`` x ``height``."""
    if width <= 0 or height <= 0:
        raise UsageError("The layer is empty (0 pixels); select a layer with content.")
    if size == "layer":
        w, h = _round8(width), _round8(height)
    else:
        scale = native_side / math.sqrt(width * height)
        w, h = _round8(width * scale), _round8(height * scale)
    if limits is not None:
        shrink = min(1.0, limits.max_image_side / max(w, h),
                     math.sqrt(limits.max_pixels / (w * h)))
        if shrink < 1.0:
            w, h = _floor8(w * shrink), _floor8(h * shrink)
    return w, h


def family_of(models: Optional[Models], base_model: str = "") -> str:
    """The family (sd15, sdxl, ...) of the base model a request will use; '' if unknown."""
    return Offers(models).family(base_model)


def native_side(models: Optional[Models], base_model: str = "") -> int:
    return NATIVE_SIDE.get(family_of(models, base_model), DEFAULT_NATIVE_SIDE)


# Which annotator "Annotate the layer first" means when none is named: the detector the
# ControlNet was trained with first, then weight-free stand-ins (backend.preprocess names);
# any other available annotator of the condition comes after these.
PREFERRED_ANNOTATORS = {
    "lineart": ("lineart", "lineart_from_drawing"),
    "lineart_anime": ("lineart_anime", "lineart_from_drawing"),
    "scribble": ("scribble",),
    "softedge": ("pidinet", "hed"),
    "canny": ("canny",),
    "depth": ("midas", "zoe"),
    "normal": ("normal_bae",),
    "openpose": ("openpose", "pose_from_photo"),
    "mlsd": ("mlsd", "straight_lines"),
    "seg": ("seg_passthrough",),
    "tile": ("tile",),
    "shuffle": ("shuffle",),
}


def default_annotator(models: Optional[Models], condition: str) -> Optional[str]:
    """The annotator to use for ``condition`` on this server, or None if it has none."""
    if models is None:
        return None
    available = [a.name for a in models.annotators if a.condition == condition and a.available]
    for name in PREFERRED_ANNOTATORS.get(condition, ()):
        if name in available:
            return name
    return available[0] if available else None


def preprocessor_for(opts: GenerateOptions, models: Optional[Models]) -> str:
    """The control unit's preprocessor: 'none' when the layer is already the control image."""
    if not opts.annotate:
        return "none"
    if opts.annotator:
        return opts.annotator
    name = default_annotator(models, opts.condition)
    if name is None:
        raise UsageError(
            f"The server has no annotator for {opts.condition!r}. If the layer already is a "
            f"{opts.condition} control image, switch 'Annotate the layer first' off; otherwise "
            f"name an annotator the server has.", field="annotator")
    return name


def choose_seed(seed: int, batch: int, rng: Optional[random.Random] = None) -> int:
    """``seed``, or for -1 a random one such that seed..seed+batch-1 all fit GIMP's ints."""
    if seed >= 0:
        return seed
    return (rng or random.SystemRandom()).randint(0, GINT_MAX - (batch - 1))


def build_request(opts: GenerateOptions, width: int, height: int, *, seed: int,
                  models: Optional[Models] = None, limits: Optional[Limits] = None,
                  pose: Optional[Pose] = None,
                  inpaint_strength: Optional[float] = None,
                  reference_slot: Optional[int] = None) -> GenerateRequest:
    """The request for a layer (or a region of it) of ``width`` x ``height``.

    Its pixels go in slot 0 and steer the control unit, or, given a ``pose`` (keypoints
    on the layer), the unit carries the pose itself and the server draws it at the size
    it generates at.  With ``inpaint_strength`` the request repaints slot 0 where the
    mask in slot 1 is white; the control unit is left out for condition ``none``.
    ``reference_slot``: the slot of the reference layer's picture (IP-Adapter), if any.
    """
    check_offered(opts, models)
    w, h = generation_size(width, height, opts.size, native_side(models, opts.base_model),
                           limits)
    units = ()
    if opts.condition != "none":
        source = dict(pose=pose, preprocessor="none") if pose is not None else \
            dict(image=0, preprocessor=preprocessor_for(opts, models))
        units = (ControlUnit(condition=opts.condition, weight=opts.control_weight,
                             start=opts.control_start, end=opts.control_end,
                             control_mode=opts.control_mode, resize_mode="just_resize",
                             **source),)
    mode = {} if inpaint_strength is None else dict(
        mode="inpaint", init_image=0, mask_image=1, strength=inpaint_strength)
    references = () if reference_slot is None else (ReferenceUnit(
        image=reference_slot, weight=opts.reference_weight, mode=opts.reference_mode),)
    return GenerateRequest(width=w, height=h, prompt=opts.prompt,
                           negative_prompt=opts.negative_prompt, seed=seed, steps=opts.steps,
                           cfg=opts.cfg, sampler=opts.sampler, batch=opts.batch,
                           base_model=opts.base_model, controls=units, loras=opts.loras,
                           references=references, **mode)


def build_edit_request(values: Mapping[str, Any], width: int, height: int, *, seed: int,
                       masked: bool, reference_slots: Tuple[int, ...],
                       models: Optional[Models] = None,
                       limits: Optional[Limits] = None) -> GenerateRequest:
    """An edit request (Edit with instruction) for a layer or region of ``width`` x
    ``height``: its pixels in slot 0, the selection mask in slot 1 when ``masked``, the
    reference layers' pictures in ``reference_slots``."""
    base = values["base-model"].strip()
    # a blank Edit model: the server's edit model does the work (sized for it, not for
    # the default base; an older server does not say, and its default base is used)
    runs_on = base or (models.default_edit_base if models is not None else "")
    w, h = generation_size(width, height, values["size"], native_side(models, runs_on), limits)
    prompt = values["prompt"].strip()
    if not prompt:
        raise UsageError("Type the instruction first: what to change, in words (for example "
                         "'make the jacket red').", field="prompt")
    return GenerateRequest(width=w, height=h, mode="edit", prompt=prompt, seed=seed,
                           steps=values["steps"], cfg=values["cfg"], batch=values["batch"],
                           base_model=base, init_image=0, mask_image=1 if masked else None,
                           edit_references=tuple(reference_slots))


_GREY_TO_RGBA = tuple(bytes((v, v, v, 255)) for v in range(256))


def mask_image(width: int, height: int, coverage: bytes) -> Image:
    """The protocol's inpaint mask (opaque, white = repaint) from selection coverage,
    one byte per pixel."""
    return Image(width, height, b"".join(map(_GREY_TO_RGBA.__getitem__, coverage)))
