"""Annotators: turn what is on a canvas layer into the control image a ControlNet expects.

One typed registry, name -> :class:`Annotator`.  An annotator declares

* its parameters (:class:`~shared.messages.ParamInfo`: kind, range, default,
  choices), checked by :func:`validate_params` with a :class:`FieldError` whose
  ``field`` is ``params.NAME`` and whose message says what to send instead;
* the condition it feeds (``canny``, ``lineart``, ...), whether it needs weights,
  and whether it can run here (``available``), all listed to clients by
  :func:`list_annotators`;
* what an empty layer means to it: a fully transparent layer is refused by every
  annotator but ``none``; an edge/line/pose annotator also refuses a uniform one
  (there is nothing to find), with :class:`EmptyLayer`.

The weight-free annotators are ours (numpy + OpenCV).  The weight-based ones
(HED, PidiNet, MLSD, Lineart, LineartAnime, Zoe, MiDaS, NormalBae, OpenPose) wrap
controlnet-aux and live in :mod:`backend.annotators.aux`; nothing heavy is
imported until one of them runs.

**Pixel perfect.**  :func:`run` takes the size the engine will generate at and
runs the annotator *at that size* (an edge map is detected on the resized image;
line art is thickened before a big reduction so thin lines survive), so the
control image is never rescaled afterwards.  :func:`prepare_controls` applies
every control unit's preprocessor (or renders its pose) for a generate request,
honouring the unit's resize mode, and hands back a request whose units point
at the annotated images.

Input: straight-alpha RGBA8 :class:`~shared.images.Image`.  Transparent pixels
are paper: line-type annotators composite onto white, depth onto black (far),
normals onto "facing the camera".  Greyscale and 16-bit files are converted by
the loader (:func:`backend.imaging.load_image`).  Outputs are opaque RGB
except ``none`` and ``invert``, which keep the layer's alpha.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from shared.errors import FieldError, Unsupported
from shared.images import Image
from shared.messages import CONDITIONS, AnnotatorInfo, ParamInfo

from ..imaging import on_white

log = logging.getLogger(__name__)

Size = Tuple[int, int]
Params = Dict[str, Any]
# fn(rgba at the input's own size, target (w, h), validated params) -> HxWx{1,3,4} uint8 at (w, h)
RunFn = Callable[[np.ndarray, Size, Params], np.ndarray]

MAX_SIDE = 16384


class EmptyLayer(FieldError):
    """The layer has nothing an annotator could read (transparent or one flat colour).

    A :class:`FieldError` (code ``bad_field``, field ``image``) so it travels with the
    existing protocol error codes.
    """


# -----------------------------------------------------------------------------
# Registry
# -----------------------------------------------------------------------------

def _always() -> bool:
    return True


@dataclass(frozen=True)
class Annotator:
    name: str
    condition: str                      # a CONDITIONS entry, or "" for "none"
    fn: RunFn
    params: Tuple[ParamInfo, ...] = ()
    help: str = ""
    needs_weights: bool = False
    is_available: Callable[[], bool] = _always
    unavailable_hint: str = ""          # what to install when is_available() is False
    refuse_empty: str = "transparent"   # "never" | "transparent" | "uniform"
    check: Optional[Callable[[Params], None]] = None  # cross-parameter checks

    def info(self) -> AnnotatorInfo:
        try:
            available = bool(self.is_available())
        except Exception:  # an availability probe must never break listing
            log.exception("availability check of annotator %s failed", self.name)
            available = False
        return AnnotatorInfo(name=self.name, condition=self.condition,
                             needs_weights=self.needs_weights, available=available,
                             params=self.params, help=self.help)

    def defaults(self) -> Params:
        return {p.name: p.default for p in self.params}


@dataclass(frozen=True)
class Annotated:
    """A preprocess result: the control image, and what else the annotator found (sent
    to the client as the result's ``info``, e.g. detected pose keypoints)."""
    image: Image
    info: Mapping[str, object] = field(default_factory=dict)


class Registry:
    """name -> :class:`Annotator`.  Knows no annotator itself: the implementations are
    registered into it explicitly (:mod:`backend.annotators.library`)."""

    def __init__(self) -> None:
        self._by_name: Dict[str, Annotator] = {}

    def register(self, annotator: Annotator) -> Annotator:
        if annotator.condition and annotator.condition not in CONDITIONS:
            raise ValueError(f"annotator {annotator.name}: unknown condition "
                             f"{annotator.condition}")
        if annotator.refuse_empty not in ("never", "transparent", "uniform"):
            raise ValueError(f"annotator {annotator.name}: bad refuse_empty")
        self._by_name[annotator.name] = annotator
        return annotator

    def infos(self) -> Tuple[AnnotatorInfo, ...]:
        """Every registered annotator, weight-free ones first, as the protocol lists them."""
        return tuple(a.info() for a in sorted(self._by_name.values(),
                                              key=lambda a: (a.needs_weights, a.name)))

    def get(self, name: str) -> Annotator:
        annotator = self._by_name.get(name)
        if annotator is None:
            raise Unsupported(f"There is no annotator {name!r}. Choose one of: "
                              f"{', '.join(sorted(self._by_name))}.", field="annotator")
        return annotator

    def run_with_info(self, name: str, image: Image, params: Optional[Mapping[str, Any]] = None,
                      size: Optional[Size] = None) -> Tuple[Image, Dict[str, Any]]:
        """Run annotator ``name`` on ``image`` at ``size`` (default: the image's); returns the
        result and what the annotator found besides pixels (for ``pose_from_photo``:
        ``{"keypoints": <OpenPose JSON>}``), for the result's ``info``."""
        annotator = self.get(name)
        values = validate_params(annotator, params)
        size = check_size(size) if size is not None else image.size
        if not annotator.is_available():
            raise Unsupported(f"The annotator {name} cannot run here: "
                              f"{annotator.unavailable_hint}", field="annotator")
        rgba = np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 4)
        check_not_empty(annotator, rgba)
        out = annotator.fn(rgba, size, values)
        info: Dict[str, Any] = {}
        if isinstance(out, tuple):  # (pixels, info)
            out, info = out
        return _to_image(out, size, annotator.name), info


def P(name: str, kind: str, default, lo=None, hi=None, choices: Iterable[str] = (),
      help: str = "") -> ParamInfo:  # noqa: N802 - a declaration helper, read like a table
    return ParamInfo(name=name, kind=kind, default=default,
                     min=None if lo is None else float(lo), max=None if hi is None else float(hi),
                     choices=tuple(choices), help=help)


def validate_params(annotator: Annotator, params: Optional[Mapping[str, Any]]) -> Params:
    """Check ``params`` against the declaration; returns every parameter, defaults filled in."""
    params = dict(params or {})
    declared = {p.name: p for p in annotator.params}
    out = annotator.defaults()
    for key, value in params.items():
        spec = declared.get(key)
        if spec is None:
            known = ", ".join(declared) or "no parameters"
            raise FieldError(f"params.{key} is not a parameter of {annotator.name}; it takes: "
                             f"{known}.", field=f"params.{key}")
        out[key] = _coerce_param(annotator.name, spec, value)
    if annotator.check is not None:
        annotator.check(out)
    return out


def _coerce_param(owner: str, spec: ParamInfo, value):
    where = f"params.{spec.name}"
    kind = spec.kind
    if kind == "bool":
        if type(value) is bool:
            return value
        raise FieldError(f"{where} of {owner} must be true or false; got {value!r}.", field=where)
    if kind in ("int", "float"):
        ok = type(value) in (int, float) and math.isfinite(value)
        if ok and kind == "int" and value != int(value):
            ok = False
        if not ok:
            what = "a whole number" if kind == "int" else "a number"
            raise FieldError(f"{where} of {owner} must be {what}{_range_text(spec)}; "
                             f"got {value!r}.", field=where)
        value = int(value) if kind == "int" else float(value)
        if (spec.min is not None and value < spec.min) or \
                (spec.max is not None and value > spec.max):
            raise FieldError(f"{where} of {owner} must be{_range_text(spec)}; got {value!r}.",
                             field=where)
        return value
    if kind == "choice":
        if isinstance(value, str) and value in spec.choices:
            return value
        raise FieldError(f"{where} of {owner} must be one of {', '.join(spec.choices)}; "
                         f"got {value!r}.", field=where)
    if isinstance(value, str):
        return value
    raise FieldError(f"{where} of {owner} must be a string; got {value!r}.", field=where)


def _range_text(spec: ParamInfo) -> str:
    def num(x):
        return str(int(x)) if float(x).is_integer() else str(x)
    if spec.min is not None and spec.max is not None:
        return f" from {num(spec.min)} to {num(spec.max)}"
    if spec.min is not None:
        return f" of at least {num(spec.min)}"
    if spec.max is not None:
        return f" of at most {num(spec.max)}"
    return ""


# -----------------------------------------------------------------------------
# Running one annotator
# -----------------------------------------------------------------------------

def check_size(size, field: str = "size") -> Size:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise FieldError(f"{field} must be (width, height); got {size!r}.", field=field) from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise FieldError(f"{field} must be between 1x1 and {MAX_SIDE}x{MAX_SIDE}; got {w}x{h}.",
                         field=field)
    return w, h


def check_not_empty(annotator: Annotator, rgba: np.ndarray) -> None:
    if annotator.refuse_empty == "never":
        return
    alpha = rgba[..., 3]
    if not alpha.any():
        raise EmptyLayer(f"The layer is empty: every pixel is transparent, so {annotator.name} "
                         f"has nothing to read. Draw on the layer or choose another one.",
                         field="image")
    if annotator.refuse_empty == "uniform":
        flat = on_white(rgba)
        if int(flat.max()) - int(flat.min()) == 0 or \
                (flat.reshape(-1, 3) == flat.reshape(-1, 3)[0]).all():
            colour = tuple(int(c) for c in flat.reshape(-1, 3)[0])
            raise EmptyLayer(f"The layer is empty: every pixel has the same colour {colour}, so "
                             f"{annotator.name} has nothing to find in it. Draw on the layer or "
                             f"choose another one.", field="image")


def _to_image(out: np.ndarray, size: Size, name: str) -> Image:
    out = np.asarray(out)
    if out.dtype != np.uint8:
        raise TypeError(f"annotator {name} returned {out.dtype}, not uint8")
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[:2] != (size[1], size[0]):
        raise AssertionError(f"annotator {name} returned {out.shape[1]}x{out.shape[0]}, "
                             f"not {size[0]}x{size[1]}")
    channels = out.shape[2]
    if channels == 4:
        rgba = out
    else:
        rgba = np.empty(out.shape[:2] + (4,), dtype=np.uint8)
        rgba[..., :3] = out if channels == 3 else out[..., :1]
        rgba[..., 3] = 255
    rgba = np.ascontiguousarray(rgba)
    return Image(rgba.shape[1], rgba.shape[0], rgba.tobytes())


# -----------------------------------------------------------------------------
# Pixel helpers (numpy / OpenCV)
# -----------------------------------------------------------------------------
