"""Control images for a generate request: each unit's annotator (or pose) at the size the
engine generates at, honouring the unit's resize mode."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Dict, Hashable, Mapping, Optional, Tuple

import numpy as np

from shared.errors import FieldError, MissingImage, Unsupported
from shared.images import Image
from shared.messages import GenerateRequest
from shared import pose as shared_pose

from . import library
from .registry import Size, check_size


def fit_source(image: Image, size: Size, resize_mode: str) -> Tuple[Image, Size, Tuple[int, int]]:
    """Geometry of a unit's resize mode *before* annotating.

    Returns (source to annotate, size to annotate it at, offset in the frame).
    ``crop_and_resize`` crops the source to the frame's aspect ratio (centred);
    ``resize_and_fill`` annotates at the fitted size and the caller pads with
    transparent black (no control), as the engines' ``fit_image`` does.
    """
    W, H = size
    w, h = image.size
    if resize_mode == "just_resize" or (w, h) == (W, H):
        return image, size, (0, 0)
    if resize_mode == "crop_and_resize":
        scale = max(W / w, H / h)
        cw = min(w, max(1, int(round(W / scale))))
        ch = min(h, max(1, int(round(H / scale))))
        return image.crop((w - cw) // 2, (h - ch) // 2, cw, ch), size, (0, 0)
    if resize_mode == "resize_and_fill":
        scale = min(W / w, H / h)
        nw = min(W, max(1, int(round(w * scale))))
        nh = min(H, max(1, int(round(h * scale))))
        return image, (nw, nh), ((W - nw) // 2, (H - nh) // 2)
    raise Unsupported(f"Unknown resize mode {resize_mode!r}.", field="resize_mode")


def annotate_unit(name: str, image: Image, params: Optional[Mapping[str, Any]], size: Size,
                  resize_mode: str = "just_resize") -> Image:
    """Run an annotator for a frame of ``size`` with a unit's resize mode."""
    source, inner, (x0, y0) = fit_source(image, size, resize_mode)
    out = library.run(name, source, params, inner)
    if inner == tuple(size):
        return out
    frame = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    frame[y0:y0 + inner[1], x0:x0 + inner[0]] = \
        np.frombuffer(out.data, np.uint8).reshape(inner[1], inner[0], 4)
    return Image(size[0], size[1], frame.tobytes())


class ControlCache:
    """The control images made lately, so a live frame whose unit layer did not change
    reuses its annotation: keyed by a hash of the source pixels (BLAKE2b), the annotator,
    its parameters, the resize mode, the pose and the size; least recently used dropped
    past ``size`` entries. ``hits`` and ``misses`` count lookups."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: "OrderedDict[Hashable, Image]" = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(image: Optional[Image], unit_key: Hashable, size: Size) -> Hashable:
        digest = None
        if image is not None:
            digest = (image.width, image.height,
                      hashlib.blake2b(image.data, digest_size=16).digest())
        return (digest, unit_key, tuple(size))

    def get(self, key: Hashable) -> Optional[Image]:
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return found

    def put(self, key: Hashable, image: Image) -> None:
        if self.size <= 0:
            return
        self._items[key] = image
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def _prefixed(err: FieldError, prefix: str) -> FieldError:
    field = f"{prefix}.{err.field}" if err.field else prefix
    new = type(err)(f"{prefix}: {err.message}", field=field)
    return new


def prepare_controls(request: GenerateRequest, images: Mapping[int, Image],
                     size: Optional[Size] = None, cache: Optional[ControlCache] = None
                     ) -> Tuple[GenerateRequest, Dict[int, Image]]:
    """Annotate every control unit of ``request`` at ``size`` (default: the request's size).

    Returns ``(request', images')``: each unit with a preprocessor other than
    ``none`` or with a ``pose`` now points at a new slot holding its control
    image (``size``, opaque RGB or RGBA), with ``preprocessor="none"``, no params
    and no pose, so an engine just uses it; ``none`` units are left as they are
    (the engine fits them itself).  Units that share image, preprocessor, params
    and resize mode share one annotation.  Errors name the unit
    (``controls[1].params.low``).  Pass ``size`` = the size the engine generates at
    (pixel perfect); it must have the request's aspect ratio.  With a ``cache``, a unit
    whose source pixels, annotator, parameters and size were annotated lately reuses that
    control image (the same pixels: annotators are deterministic).
    """
    size = check_size(size if size is not None else (request.width, request.height))
    out: Dict[int, Image] = dict(images)
    used = set(images) | {u.image for u in request.controls if u.image is not None}
    next_slot = max(used, default=-1) + 1
    done: Dict[Any, int] = {}
    units = []
    for i, unit in enumerate(request.controls):
        prefix = f"controls[{i}]"
        pose = getattr(unit, "pose", None)
        if pose is None and unit.preprocessor == "none":
            units.append(unit)
            continue
        key = (unit.image, unit.preprocessor, tuple(sorted(unit.params.items())),
               unit.resize_mode, pose)
        slot = done.get(key)
        if slot is None:
            control = _control_image(unit, images, size, prefix, cache, key[1:])
            slot = next_slot
            next_slot += 1
            out[slot] = control
            done[key] = slot
        changes = dict(image=slot, preprocessor="none", params={})
        if pose is not None:
            changes["pose"] = None
        units.append(replace(unit, **changes))
    new_request = replace(request, controls=tuple(units))
    keep = set(new_request.slots())
    return new_request, {s: img for s, img in out.items() if s in keep}


def _control_image(unit, images: Mapping[int, Image], size: Size, prefix: str,
                   cache: Optional[ControlCache], unit_key: Hashable) -> Image:
    """One unit's control image (its pose drawn, or its annotator run), from ``cache``
    when the same source was annotated the same way lately."""
    pose = getattr(unit, "pose", None)
    if pose is None and unit.image not in images:
        raise MissingImage(f"{prefix}.image: slot {unit.image} was not sent.",
                           field=f"{prefix}.image")
    key = None
    if cache is not None:
        key = cache.key(images[unit.image] if pose is None else None, unit_key, size)
        found = cache.get(key)
        if found is not None:
            return found
    try:
        if pose is not None:
            control = shared_pose.render_message(pose, size, unit.resize_mode)
        else:
            control = annotate_unit(unit.preprocessor, images[unit.image], unit.params,
                                    size, unit.resize_mode)
    except FieldError as err:
        raise _prefixed(err, prefix) from None
    except Unsupported as err:
        raise Unsupported(f"{prefix}: {err.message}", field=f"{prefix}.preprocessor") from None
    if cache is not None:
        cache.put(key, control)
    return control
