"""Every message of the ControlCanvas protocol, as frozen dataclasses.

Messages travel as JSON objects in text frames: ``{"type": "<name>", ...fields}``.
Images never travel in JSON: they follow as binary frames (see ``codec.py``) that
a request refers to by integer *slot*.

Decoding is strict.  ``from_json`` rejects malformed JSON, unknown message types,
unknown fields, missing fields, mistyped fields and out-of-range values with a
:class:`~shared.errors.FieldError` whose ``field`` names the offending path
(e.g. ``request.controls[1].weight``).  Constructing a message in code runs the
same checks, so a value that exists is a valid value.  One exception, for forward
compatibility: a client decoding a *server* message skips fields it does not know, so
a newer server may add optional fields (``Welcome.engine_info``, ``Models.loras``)
without cutting off plug-ins of an older release; the server stays strict.

Standard library only, Python >= 3.10: this module is bundled into the editors.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import re
import reprlib
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple, Union

from .errors import FieldError, MalformedMessage, UnknownMessage, VersionMismatch

PROTOCOL_VERSION = 1

Mode = Literal["txt2img", "img2img", "inpaint", "edit"]
ControlMode = Literal["balanced", "prompt", "control"]
ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
Sampler = Literal["dpmpp_2m_karras", "dpmpp_2m", "unipc", "euler_a", "euler", "ddim", "lcm"]
Condition = Literal["canny", "depth", "softedge", "mlsd", "seg", "openpose", "scribble",
                    "lineart", "lineart_anime", "normal", "tile", "shuffle", "inpaint"]
Scalar = Union[bool, int, float, str]
ReferenceMode = Literal["reference", "style", "composition", "face"]

CONDITIONS: Tuple[str, ...] = typing.get_args(Condition)
SAMPLERS: Tuple[str, ...] = typing.get_args(Sampler)
REFERENCE_MODES: Tuple[str, ...] = typing.get_args(ReferenceMode)

MAX_SEED = 2**32 - 1
_JOB_ID = re.compile(r"[0-9a-f]{32}\Z")
MAX_LORAS = 8  # LoRAs in one request
LORA_STRENGTH = (-2.0, 2.0)
LORA_SUFFIX = ".safetensors"
_LORA_NAME_MAX = 200
_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
MAX_REFERENCES = 4  # IP-Adapter reference units in one request
MAX_EDIT_REFERENCES = 3  # further reference images (layers) of an edit request


def new_job_id() -> str:
    """A fresh random job id (32 lowercase hex digits, a UUID4)."""
    return uuid.uuid4().hex


def _range(default, lo, hi, *, exclusive_lo=False):
    return field(default=default, metadata={"range": (lo, hi, exclusive_lo)})


# -----------------------------------------------------------------------------
# Validation: one function turns JSON-shaped or Python values into the declared
# type or raises FieldError with the path.  Dataclasses call it from
# __post_init__, so decoding and construction share it.
# -----------------------------------------------------------------------------

_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls) -> Dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = {k: v for k, v in typing.get_type_hints(cls).items()
                 if typing.get_origin(v) is not ClassVar}
        _HINTS[cls] = hints
    return hints


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel = 3


def _show(value) -> str:
    """A short, safe repr of a value for an error message: long strings and deep or big
    lists are cut, lone surrogates are escaped (repr never prints them raw)."""
    return _SHOW.repr(value)


def _escaped(text: str) -> str:
    """``text`` with lone surrogates written as escapes: safe to encode and to send."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_unicode(text: str, path: str) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate from a JSON escape such
    as "\\ud800"): it could be neither encoded, logged nor sent back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FieldError(f"{_escaped(path)} holds a lone surrogate "
                         f"({_escaped(text[err.start:err.end])}); text must be valid "
                         f"Unicode.", field=_escaped(path)) from None


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        return "a list of " + _describe(typing.get_args(tp)[0])
    if origin in (dict, Dict):
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise FieldError(f"{path} must be an object.", field=path)
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        raise FieldError(f"{path} must be {_describe(tp)}; got {_show(value)}.", field=path)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise FieldError(f"{path} must be {_describe(tp)}; got null.", field=path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except FieldError as err:
                if len([a for a in args if a is not type(None)]) == 1:
                    raise err
        raise FieldError(f"{path} must be {_describe(tp)}; got {_show(value)}.", field=path)
    if origin in (tuple, Tuple):
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise FieldError(f"{path} must be a list.", field=path)
        return tuple(_coerce(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin in (dict, Dict):
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise FieldError(f"{path} must be an object.", field=path)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FieldError(f"{path} keys must be strings.", field=path)
            _check_unicode(key, f"{path} key")
            out[key] = _coerce(val_tp, item, f"{path}.{key}")
        return out
    if tp is bool:
        if type(value) is bool:
            return value
    elif tp is int:
        if type(value) is int:
            return value
    elif tp is float:
        if type(value) in (int, float) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            _check_unicode(value, path)
            return value
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported annotation {tp!r}")
    raise FieldError(f"{path} must be {_describe(tp)}; got {_show(value)}.", field=path)


# True while a client decodes a server message: unknown fields are skipped (see above).
_SKIP_UNKNOWN: "contextvars.ContextVar[bool]" = contextvars.ContextVar("skip_unknown",
                                                                      default=False)


def _build(cls, values: dict, path: str):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    if _SKIP_UNKNOWN.get():
        values = {key: value for key, value in values.items() if key in names}
    for key in values:
        if key not in names:
            name = f"{prefix}{_escaped(key[:60])}"
            raise FieldError(f"{name} is not a field of {cls.__name__}; remove it "
                             f"(known fields: {', '.join(sorted(names))}).", field=name)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise FieldError(f"{prefix}{f.name} is missing.", field=f"{prefix}{f.name}")
    try:
        return cls(**values)
    except FieldError as err:
        if path and err.field and not err.field.startswith(prefix):
            raise FieldError(err.message.replace(err.field, prefix + err.field, 1),
                             field=prefix + err.field) from None
        raise


class _Checked:
    """Mixin: check and normalise every field on construction."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(hints[f.name], getattr(self, f.name), f.name)
            rng = f.metadata.get("range")
            if rng is not None and value is not None:
                lo, hi, exclusive_lo = rng
                if value < lo or value > hi or (exclusive_lo and value == lo):
                    low = f"more than {lo}" if exclusive_lo else f"at least {lo}"
                    raise FieldError(f"{f.name} must be {low} and at most {hi}; "
                                     f"got {_show(value)}.",
                                     field=f.name)
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Cross-field checks of a subclass."""


def lora_name_problem(name: str) -> str:
    """Why ``name`` cannot be a LoRA name ('' when it can): the one rule for LoRA names.

    A LoRA name is the name of a ``.safetensors`` file in the server's LoRA folder,
    without that suffix (``Models.loras`` lists them); never a path.  Refused: empty or
    longer than 200 characters, ``/``, ``\\``, ``:``, ``..``, a leading dot or space, a
    trailing dot or space, control characters."""
    if not name:
        return "is empty"
    if len(name) > _LORA_NAME_MAX:
        return f"is longer than {_LORA_NAME_MAX} characters"
    for bad in ("/", "\\", ":", ".."):
        if bad in name:
            return f"contains {bad!r}: a LoRA is named by its file name in the server's " \
                   f"LoRA folder, never by a path"
    if name[0] in ". " or name[-1] in ". ":
        return "starts or ends with a dot or a space"
    if any(not ch.isprintable() for ch in name):
        return "contains control characters"
    return ""


def _check_job_id(job_id: str, name: str = "job_id") -> None:
    if not _JOB_ID.match(job_id):
        raise FieldError(f"{name} must be 32 lowercase hex digits (a UUID4 hex); "
                         f"got {_show(job_id)}.", field=name)


# -----------------------------------------------------------------------------
# The request: everything that decides the pixels.
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Pose(_Checked):
    """OpenPose-18 body keypoints, in place of a control image (see backend.pose).

    ``keypoints`` holds 18 ``(x, y, confidence)`` triples per person, people one
    after the other, in canvas pixels of a ``width`` x ``height`` canvas (pixel
    centres; the first pixel's centre is 0.0), in the OpenPose/COCO-18 order:
    nose, neck, right shoulder, elbow, wrist, left shoulder, elbow, wrist, right
    hip, knee, ankle, left hip, knee, ankle, right eye, left eye, right ear, left
    ear.  Confidence is 0..1; 0 means the joint is missing (not drawn).
    """
    BODY_POINTS: ClassVar[int] = 18

    width: int
    height: int
    keypoints: Tuple[Tuple[float, ...], ...]

    def _check(self) -> None:
        for name in ("width", "height"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise FieldError(f"{name} must be the canvas size in pixels (1 or more); "
                                 f"got {getattr(self, name)}.", field=name)
        if not self.keypoints or len(self.keypoints) % self.BODY_POINTS:
            raise FieldError(f"keypoints must hold 18 (x, y, confidence) triples per person; "
                             f"got {len(self.keypoints)} triples.", field="keypoints")
        for i, point in enumerate(self.keypoints):
            if len(point) != 3 or not 0.0 <= point[2] <= 1.0:
                raise FieldError(f"keypoints[{i}] must be [x, y, confidence] with confidence "
                                 f"0..1; got {list(point)}.", field=f"keypoints[{i}]")


@dataclass(frozen=True)
class ControlUnit(_Checked):
    condition: Condition
    image: Optional[int] = None
    preprocessor: str = "none"
    params: Dict[str, Scalar] = field(default_factory=dict)
    model: str = ""
    weight: float = _range(1.0, 0.0, 2.0)
    start: float = _range(0.0, 0.0, 1.0)
    end: float = _range(1.0, 0.0, 1.0)
    control_mode: ControlMode = "balanced"
    resize_mode: ResizeMode = "crop_and_resize"
    pose: Optional[Pose] = None

    def _check(self) -> None:
        if self.start >= self.end:
            raise FieldError(f"start ({self.start}) must be smaller than end ({self.end}).",
                             field="start")
        if self.image is None and self.pose is None:
            raise FieldError("image must name the slot of this unit's control image (or give "
                             "a pose instead).", field="image")
        if self.image is not None and self.pose is not None:
            raise FieldError("give either image (a slot) or pose, not both.", field="pose")
        if self.image is not None and self.image < 0:
            raise FieldError("image slot must be 0 or more.", field="image")


@dataclass(frozen=True)
class LoraRef(_Checked):
    """One LoRA applied to the base model: ``name`` as ``Models.loras`` lists it (a file of
    the server's LoRA folder, without ``.safetensors``), ``strength`` -2..2 (0 = off)."""
    name: str
    strength: float = _range(1.0, *LORA_STRENGTH)

    def _check(self) -> None:
        name = self.name[:-len(LORA_SUFFIX)] if self.name.lower().endswith(LORA_SUFFIX) \
            else self.name
        problem = lora_name_problem(name)
        if problem:
            raise FieldError(f"name {_show(self.name)} {problem}; use a name the server lists "
                             f"(`controlcanvas models`).", field="name")
        object.__setattr__(self, "name", name)


@dataclass(frozen=True)
class ReferenceUnit(_Checked):
    """An IP-Adapter reference: the picture in image slot ``image`` (a layer) steers the
    generation with ``weight`` 0..2 (0 = no reference, bit for bit) between ``start`` and
    ``end`` (fractions of the denoising steps).  ``mode``: ``reference`` (the whole
    picture), ``style`` (its style only, InstantStyle's style block), ``composition`` (its
    layout only, InstantStyle's layout block), ``face`` (a face model: the person's face).
    ``model``: an IP-Adapter name the server lists (``controlcanvas models``), "" = the
    server's default for the base family and mode; a name, never a path."""
    image: int
    weight: float = _range(1.0, 0.0, 2.0)
    start: float = _range(0.0, 0.0, 1.0)
    end: float = _range(1.0, 0.0, 1.0)
    mode: ReferenceMode = "reference"
    model: str = ""

    def _check(self) -> None:
        if self.image < 0:
            raise FieldError("image slot must be 0 or more.", field="image")
        if self.start >= self.end:
            raise FieldError(f"start ({self.start}) must be smaller than end ({self.end}).",
                             field="start")
        if self.model and not _PRESET_NAME.match(self.model):
            raise FieldError(f"model {_show(self.model)} is not an IP-Adapter name (lowercase "
                             f"letters, digits, '.', '_', '-'); use a name the server lists "
                             f"(`controlcanvas models`), or leave it empty.", field="model")


@dataclass(frozen=True)
class GenerateRequest(_Checked):
    width: int = _range(512, 8, 1 << 20)
    height: int = _range(512, 8, 1 << 20)
    mode: Mode = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = _range(-1, -1, MAX_SEED)
    steps: int = _range(20, 1, 150)
    cfg: float = _range(7.0, 0.0, 30.0)
    sampler: Sampler = "dpmpp_2m_karras"
    strength: float = _range(0.75, 0.0, 1.0)
    batch: int = _range(1, 1, 16)
    base_model: str = ""
    init_image: Optional[int] = None
    mask_image: Optional[int] = None
    controls: Tuple[ControlUnit, ...] = ()
    hires: bool = False
    # Added within protocol 1: left out of the JSON when empty (see OMIT_WHEN_EMPTY), so
    # a server that predates LoRAs still takes a request without any.
    loras: Tuple[LoraRef, ...] = ()
    # A few-step preset (``Models.presets``: LoRA + scheduler + step and CFG range), "" = none.
    preset: str = ""
    # IP-Adapter references (added within protocol 1, left out of the JSON when empty).
    references: Tuple[ReferenceUnit, ...] = ()
    # Edit mode (added within protocol 1, left out of the JSON when empty): the image slots
    # of up to MAX_EDIT_REFERENCES further reference pictures (layers) the instruction may
    # name ("the jacket from the second picture").  In edit mode the prompt is the
    # instruction, init_image the layer to edit and mask_image (optional) the selection.
    edit_references: Tuple[int, ...] = ()
    OMIT_WHEN_EMPTY: ClassVar[Tuple[str, ...]] = ("loras", "preset", "references",
                                                  "edit_references")

    def _check(self) -> None:
        if self.preset and not _PRESET_NAME.match(self.preset):
            raise FieldError(f"preset {_show(self.preset)} is not a preset name (lowercase "
                             f"letters, digits, '.', '_', '-'); use a name the server lists.",
                             field="preset")
        if len(self.loras) > MAX_LORAS:
            raise FieldError(f"loras holds {len(self.loras)} LoRAs; at most {MAX_LORAS} per "
                             f"request.", field="loras")
        if len(self.references) > MAX_REFERENCES:
            raise FieldError(f"references holds {len(self.references)} units; at most "
                             f"{MAX_REFERENCES} per request.", field="references")
        names = [lora.name for lora in self.loras]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldError(f"loras[{i}].name {_show(name)} is named before; give each LoRA "
                                 f"once, with its strength.", field=f"loras[{i}].name")
        if self.mode in ("img2img", "inpaint", "edit") and self.init_image is None:
            raise FieldError(f"{self.mode} needs init_image: the slot of the canvas image.",
                             field="init_image")
        self._check_edit()
        if self.mode == "inpaint" and self.mask_image is None:
            raise FieldError("inpaint needs mask_image: the slot of the selection mask.",
                             field="mask_image")
        for name in ("init_image", "mask_image"):
            slot = getattr(self, name)
            if slot is not None and slot < 0:
                raise FieldError(f"{name} slot must be 0 or more.", field=name)

    def _check_edit(self) -> None:
        refs = self.edit_references
        if refs and self.mode != "edit":
            raise FieldError(f"edit_references are for edit mode; this request's mode is "
                             f"{self.mode!r}. Choose mode \"edit\", or leave them out.",
                             field="edit_references")
        if len(refs) > MAX_EDIT_REFERENCES:
            raise FieldError(f"edit_references holds {len(refs)} images; an edit takes at "
                             f"most {MAX_EDIT_REFERENCES} references beside the layer it "
                             f"edits. Remove {len(refs) - MAX_EDIT_REFERENCES}.",
                             field="edit_references")
        for i, slot in enumerate(refs):
            if slot < 0:
                raise FieldError("edit_references slots must be 0 or more.",
                                 field=f"edit_references[{i}]")

    def slots(self) -> Tuple[int, ...]:
        """Every image slot this request refers to, each once, in ascending order."""
        used = {s for s in (self.init_image, self.mask_image) if s is not None}
        used.update(self.edit_references)
        used.update(u.image for u in self.controls if u.image is not None)
        used.update(r.image for r in self.references)
        return tuple(sorted(used))

    def seeds(self, base_seed: int) -> Tuple[int, ...]:
        """The seed of each image of a batch: base, base+1, ... (wrapping at 2**32)."""
        return tuple((base_seed + i) % (MAX_SEED + 1) for i in range(self.batch))


# -----------------------------------------------------------------------------
# Descriptions the server gives out.
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits(_Checked):
    max_frame_bytes: int
    max_text_bytes: int
    max_image_side: int
    max_pixels: int
    max_queue: int
    max_batch: int
    max_images_per_job: int


@dataclass(frozen=True)
class ParamInfo(_Checked):
    name: str
    kind: Literal["int", "float", "bool", "str", "choice"]
    default: Scalar
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Tuple[str, ...] = ()
    help: str = ""


@dataclass(frozen=True)
class AnnotatorInfo(_Checked):
    name: str
    condition: str
    needs_weights: bool = False
    available: bool = True
    params: Tuple[ParamInfo, ...] = ()
    help: str = ""


@dataclass(frozen=True)
class ModelInfo(_Checked):
    """One model the server knows.  ``family`` is the base family (``sd15``, ``sdxl``; ''
    when the server cannot tell before the files are there).  ``conditions`` (added within
    protocol 1, bases only): the control types a request on this base can use, from the
    ControlNets (and union models) the server has for its family; left out of the JSON when
    empty, and an empty tuple means "not said" (an older server, or a base whose family is
    unknown): a plug-in then offers every condition and the server answers for itself.
    Names outside :data:`CONDITIONS` (a newer server's) are kept; a plug-in skips them.
    ``edit`` (added within protocol 1, left out when false): a base that runs edit mode
    (an instruction applied to a layer: FLUX.1 Kontext); a plug-in offers these for Edit."""
    OMIT_WHEN_EMPTY: ClassVar[Tuple[str, ...]] = ("conditions", "edit")
    name: str
    kind: Literal["base", "controlnet"]
    condition: str = ""
    family: str = ""
    present: bool = False
    source: str = ""
    conditions: Tuple[str, ...] = ()
    edit: bool = False


@dataclass(frozen=True)
class LoraInfo(_Checked):
    """One file of the server's LoRA folder: ``name`` (what ``LoraRef.name`` takes),
    ``family`` the base family it fits, read from its tensors (``sd15``, ``sdxl``,
    ``flux``, ``sd3``, or ``unknown``), ``size`` in bytes."""
    name: str
    family: str = "unknown"
    size: int = 0


@dataclass(frozen=True)
class PresetInfo(_Checked):
    """A few-step preset the server offers (``GenerateRequest.preset``): what it is called,
    the base family it fits, its default steps and CFG and their ranges, the scheduler, the
    LoRA it needs (``lora``, "" for a distilled base) and whether that is there
    (``present``; if not, ``download`` is the command that fetches it), its licence and
    whether that allows commercial use."""
    name: str
    label: str = ""
    family: str = ""
    steps: int = 4
    min_steps: int = 1
    max_steps: int = 8
    cfg: float = 1.0
    max_cfg: float = 2.0
    scheduler: str = ""
    lora: str = ""
    base: str = ""
    present: bool = False
    download: str = ""
    licence: str = ""
    commercial: bool = True
    note: str = ""


@dataclass(frozen=True)
class ResultImage(_Checked):
    slot: int
    width: int
    height: int
    seed: Optional[int] = None


@dataclass(frozen=True)
class JobInfo(_Checked):
    job_id: str
    state: Literal["receiving", "queued", "running", "done", "failed", "cancelled"]
    position: int = 0


# -----------------------------------------------------------------------------
# Messages.  TYPE is the wire name; a name may be used by both directions.
# -----------------------------------------------------------------------------

class Message(_Checked):
    TYPE: ClassVar[str] = ""


def _message(cls):
    return dataclass(frozen=True)(cls)


# client -> server

@_message
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    protocol: int
    token: str
    client: str = ""

    def __repr__(self) -> str:  # keep the token out of logs
        return f"Hello(protocol={self.protocol}, client={self.client!r}, token=***)"


@_message
class Generate(Message):
    TYPE: ClassVar[str] = "generate"
    # ``live`` (added within protocol 1, left out of the JSON when false): a throwaway frame
    # of live painting. It supersedes the client's previous live job, jumps the queue, is
    # never kept on disk, and is cancelled when the connection goes (docs/live.md).
    OMIT_WHEN_EMPTY: ClassVar[Tuple[str, ...]] = ("live",)
    job_id: str
    request: GenerateRequest
    cancel_on_disconnect: bool = False
    preview_every: int = _range(0, 0, 1000)
    live: bool = False

    def _check(self) -> None:
        _check_job_id(self.job_id)
        if self.live and (self.request.batch != 1 or self.request.hires):
            raise FieldError("A live job makes one frame: batch must be 1 and hires off.",
                             field="request.batch" if self.request.batch != 1 else
                             "request.hires")

    def slots(self) -> Tuple[int, ...]:
        return self.request.slots()


@_message
class Preprocess(Message):
    TYPE: ClassVar[str] = "preprocess"
    job_id: str
    annotator: str
    image: int = 0
    params: Dict[str, Scalar] = field(default_factory=dict)
    width: int = _range(0, 0, 1 << 20)
    height: int = _range(0, 0, 1 << 20)
    cancel_on_disconnect: bool = False

    def _check(self) -> None:
        _check_job_id(self.job_id)
        if self.image < 0:
            raise FieldError("image slot must be 0 or more.", field="image")
        if (self.width == 0) != (self.height == 0):
            raise FieldError("give both width and height for the control image, or neither.",
                             field="width")

    def slots(self) -> Tuple[int, ...]:
        return (self.image,)


@_message
class Train(Message):
    """Train a ControlNet on a dataset folder of the server's machine (see
    ``controlcanvas train``); the result carries no image, its ``info["out"]`` names the
    trained ControlNet folder, which the model catalogue can use at once."""
    TYPE: ClassVar[str] = "train"
    job_id: str
    data: str
    base: str
    out: str
    steps: int = _range(1000, 1, 10_000_000)
    batch: int = _range(4, 1, 4096)
    lr: float = _range(1e-5, 0.0, 1.0, exclusive_lo=True)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = _range(0, 0, 10_000_000)
    resolution: int = _range(512, 8, 4096)
    prompt_drop: float = _range(0.5, 0.0, 1.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    resume: bool = False
    cancel_on_disconnect: bool = False

    def _check(self) -> None:
        _check_job_id(self.job_id)
        for name in ("data", "base", "out"):
            if not getattr(self, name).strip():
                raise FieldError(f"{name} must name a folder or model on the server.",
                                 field=name)
        if self.resolution % 8:
            raise FieldError("resolution must be a multiple of 8.", field="resolution")

    def slots(self) -> Tuple[int, ...]:
        return ()


@_message
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    job_id: str


@_message
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    job_ids: Tuple[str, ...]


@_message
class Resume(Message):
    TYPE: ClassVar[str] = "resume"
    job_ids: Tuple[str, ...]


@_message
class StatusRequest(Message):
    TYPE: ClassVar[str] = "status"


@_message
class ModelsRequest(Message):
    TYPE: ClassVar[str] = "models"


# server -> client

@_message
class Welcome(Message):
    """``engine_info`` (added within protocol 1, optional): the engine's settings as
    ``name -> scalar`` (device, dtype, offload, the fast-path choices such as ``sdpa``,
    ``compile``, ``vae_precision``, ``previews``), for display.  It is left out of the JSON
    when empty, and a welcome without it decodes to ``{}``."""
    TYPE: ClassVar[str] = "welcome"
    OMIT_WHEN_EMPTY: ClassVar[Tuple[str, ...]] = ("engine_info",)
    protocol: int
    server: str
    engine: str
    limits: Limits
    engine_info: Dict[str, Scalar] = field(default_factory=dict)


@_message
class Queued(Message):
    TYPE: ClassVar[str] = "queued"
    job_id: str
    position: int


@_message
class Progress(Message):
    TYPE: ClassVar[str] = "progress"
    job_id: str
    step: int
    total: int
    stage: str = "denoise"


@_message
class Preview(Message):
    """Announces one binary frame (kind PREVIEW) with a low-resolution preview."""
    TYPE: ClassVar[str] = "preview"
    job_id: str
    step: int
    width: int
    height: int


@_message
class Result(Message):
    """Announces len(images) binary frames (kind RESULT), slots 0..n-1, in order."""
    TYPE: ClassVar[str] = "result"
    job_id: str
    images: Tuple[ResultImage, ...]
    elapsed: float = 0.0
    info: Dict[str, Scalar] = field(default_factory=dict)


@_message
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    job_id: Optional[str] = None
    field: Optional[str] = None


@_message
class Status(Message):
    TYPE: ClassVar[str] = "status"
    queue_length: int
    jobs: Tuple[JobInfo, ...] = ()


@_message
class Models(Message):
    """``loras`` (added within protocol 1): the server's LoRA folder; ``presets`` (added
    within protocol 1): its few-step presets; ``default_edit_base`` (added within protocol
    1): the base an edit request naming none runs on (the server's edit model); each left
    out of the JSON when empty (a plug-in older than the client's forward compatibility then
    still reads the message)."""
    TYPE: ClassVar[str] = "models"
    OMIT_WHEN_EMPTY: ClassVar[Tuple[str, ...]] = ("loras", "presets", "default_edit_base")
    models: Tuple[ModelInfo, ...] = ()
    annotators: Tuple[AnnotatorInfo, ...] = ()
    default_base: str = ""
    loras: Tuple[LoraInfo, ...] = ()
    presets: Tuple[PresetInfo, ...] = ()
    default_edit_base: str = ""


CLIENT_MESSAGES: Dict[str, type] = {m.TYPE: m for m in (
    Hello, Generate, Preprocess, Train, Cancel, Ack, Resume, StatusRequest, ModelsRequest)}
SERVER_MESSAGES: Dict[str, type] = {m.TYPE: m for m in (
    Welcome, Queued, Progress, Preview, Result, Error, Status, Models)}


def to_dict(message: Message) -> Dict[str, Any]:
    out = {"type": message.TYPE}
    out.update(_plain(message))
    return out


def _plain(value) -> Any:
    """``dataclasses.asdict``, leaving out each dataclass's ``OMIT_WHEN_EMPTY`` fields when
    they are empty: fields added within a protocol version, so that a peer that predates
    them never sees them unless they are used."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        omit = getattr(value, "OMIT_WHEN_EMPTY", ())
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.name in omit and not getattr(value, f.name))}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def to_json(message: Message) -> str:
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False)


def from_json(text: Union[str, bytes], registry: Dict[str, type]) -> Message:
    """Decode one message of ``registry`` (CLIENT_MESSAGES or SERVER_MESSAGES)."""
    try:
        raw = json.loads(text)
    except RecursionError:
        raise MalformedMessage("The message nests lists or objects too deeply to read; "
                               "send one flat JSON object per text frame.") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedMessage(f"The message is not valid JSON ({err}); send one JSON "
                               f"object per text frame.") from None
    if not isinstance(raw, dict):
        raise MalformedMessage("A message must be a JSON object with a \"type\" field.")
    kind = raw.pop("type", None)
    if not isinstance(kind, str):
        raise FieldError("type is missing; every message needs \"type\".", field="type")
    cls = registry.get(kind)
    if cls is None:
        raise UnknownMessage(f"Unknown message type {_show(kind)}; expected one of "
                             f"{', '.join(sorted(registry))}.", field="type")
    if cls is Hello and raw.get("protocol") != PROTOCOL_VERSION \
            and type(raw.get("protocol")) is int:
        raise VersionMismatch(
            f"This server speaks protocol {PROTOCOL_VERSION} but the client speaks "
            f"{raw['protocol']}; update the plug-in and the server to the same release.",
            field="protocol")
    skip = _SKIP_UNKNOWN.set(registry is SERVER_MESSAGES)
    try:
        return _build(cls, raw, "")
    finally:
        _SKIP_UNKNOWN.reset(skip)
