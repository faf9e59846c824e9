"""T2I-Adapter units: a unit whose model is a T2I-Adapter (diffusers ``T2IAdapter``, told
from its config by :mod:`backend.engines.families`, never by its name).

How an adapter steers a picture: it turns the control image into one feature map per UNet
down block, once per pass, and the UNet adds them inside its encoder at every step it is
given them (``down_intrablock_additional_residuals``).  diffusers'
``StableDiffusion{,XL}AdapterPipeline`` do exactly that, but only for txt2img, with one
window for every adapter (SDXL: ``adapter_conditioning_factor``, the first fraction of
the steps; SD1.5: none) and without ``callback_on_step_end`` (the SD1.5 one), so the engine
does not run them.  :class:`AdapterUnits` gives the UNet the adapter features itself, from a
forward pre-hook, inside the pipeline the request runs anyway.  That way:

* every mode works (txt2img, img2img, inpaint, the hires pass, a 9-channel inpainting base),
  and adapter units mix with ControlNet units in one request (the UNet takes both kinds of
  residuals);
* each unit keeps its own ``weight`` and ``start``/``end``, with the ControlNet units' rule
  (a unit runs at step i of n when ``start <= i/n`` and ``(i+1)/n <= end``; a window
  shorter than a step still gets one step: ``reuse.control_window``);
* progress, previews, cancel and live painting's pauses are the pipeline's, as for
  ControlNet units;
* weight 0 (or outside its window) is exactly no control: the UNet gets no adapter
  features at that step.

With the adapter pipelines' own settings (txt2img, whole range, sizes that are multiples of
the adapter's downscale factor) the pixels are theirs (a test checks it).  A control image
whose size is not a multiple of that factor is resized to the next multiple and each
feature map then to the size the UNet block has.  A T2I-Adapter runs in "balanced" control
mode only, and serves no inpaint condition (those are typed errors naming what works).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from diffusers import T2IAdapter

from shared.errors import Unsupported, UnsupportedCondition

from ..catalogue import Resolved
from ..families import FAMILIES
from .loaders import dtype_kwargs
from .reuse import control_window


def read_adapter(resolved: Resolved, dtype) -> T2IAdapter:
    """A T2I-Adapter from its diffusers folder (hub snapshot or local)."""
    kwargs = dtype_kwargs(dtype)
    if resolved.weights_variant:
        kwargs["variant"] = resolved.weights_variant
    return T2IAdapter.from_pretrained(resolved.path, local_files_only=True, **kwargs)


def check_adapter_unit(unit, resolved: Resolved, base: Resolved) -> None:
    """Typed errors, before anything loads, for what an adapter unit cannot do."""
    if resolved.family != base.family:
        raise Unsupported(
            f"The T2I-Adapter {resolved.name!r} was made for {FAMILIES[resolved.family].label}, "
            f"not for the base model {base.name!r} ({FAMILIES[base.family].label}): use a "
            f"{base.family.upper()} T2I-Adapter or ControlNet for this unit.", field="model")
    if unit.condition == "inpaint":
        raise UnsupportedCondition(
            f"A T2I-Adapter ({resolved.name!r}) has no inpaint condition: leave the unit's "
            f"model empty to use the inpaint ControlNet, or use the inpaint mode itself.",
            field="condition")
    if unit.control_mode != "balanced":
        raise UnsupportedCondition(
            f"The T2I-Adapter {resolved.name!r} runs in \"balanced\" control mode only; "
            f"choose \"balanced\" for this unit (or a ControlNet for the "
            f"{unit.control_mode!r} mode).", field="control_mode")


def check_adapter_fits(resolved: Resolved, adapter: T2IAdapter, unet) -> None:
    """An adapter's feature maps must match the UNet's down blocks (channels, in order)."""
    channels = list(adapter.config.channels)
    blocks = list(unet.config.block_out_channels)
    if len(channels) > len(blocks) or channels != blocks[:len(channels)]:
        raise Unsupported(
            f"The T2I-Adapter {resolved.name!r} does not fit this base model's UNet (its "
            f"feature maps have {channels} channels, the UNet's blocks {blocks}): use a "
            f"T2I-Adapter made for this base model's family.", field="model")


class _Unit(NamedTuple):
    index: int            # the unit's place in request.controls
    adapter: T2IAdapter
    weight: float
    start: float
    end: float


class _PassFeatures(NamedTuple):
    """One pass' weighted feature maps per unit and the steps each runs on."""

    weighted: List[List[torch.Tensor]]   # per unit: weight x features, per UNet down block
    keep: List[List[bool]]               # per unit: runs at step i


class AdapterUnits:
    """The adapter units of one request (see the module docstring)."""

    def __init__(self, units: Sequence[_Unit]) -> None:
        self.units = list(units)

    @classmethod
    def of(cls, controls, models, adapters: Sequence[bool]) -> Optional["AdapterUnits"]:
        """The request's adapter units (``adapters[i]``: unit i is one); None when none."""
        units = [_Unit(i, models[i], float(c.weight), float(c.start), float(c.end))
                 for i, c in enumerate(controls) if adapters[i]]
        return cls(units) if units else None

    def features(self, controls: Sequence, runs: int) -> _PassFeatures:
        """Each unit's weighted features for a pass (``controls``: the pass' control
        images, by unit index) and its steps out of ``runs``."""
        weighted, keep = [], []
        with torch.no_grad():
            for unit in self.units:
                start, end = control_window(unit.start, unit.end, runs)
                steps = [unit.weight != 0.0 and not (i / runs < start or (i + 1) / runs > end)
                         for i in range(runs)]
                if not any(steps):
                    continue
                maps = unit.adapter(adapter_input(controls[unit.index], unit.adapter))
                weighted.append([unit.weight * f for f in maps])
                keep.append(steps)
        return _PassFeatures(weighted, keep)

    @contextmanager
    def injected(self, unet, controls: Sequence, runs: int,
                 active: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """While the block runs (one pipeline call of ``runs`` steps), every UNet call of
        this job (``active()``; another job may run in its pause) gets the features of
        the units that run at that step."""
        found = self.features(controls, runs)
        if not found.weighted:
            yield
            return
        calls = [0]
        sizes: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}

        def hook(module, args, kwargs):
            if not active():
                return None
            step = min(calls[0], runs - 1)
            calls[0] += 1
            sample = args[0] if args else kwargs["sample"]
            residuals = _step_residuals(found, step, sample, unet, sizes)
            kwargs = dict(kwargs, down_intrablock_additional_residuals=residuals)
            return args, kwargs

        handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _step_residuals(found: _PassFeatures, step: int, sample: torch.Tensor, unet,
                    sizes: Dict) -> Optional[List[torch.Tensor]]:
    """The summed features of the units running at ``step``, at the UNet's block sizes and
    batch (both halves of a CFG batch, as the adapter pipelines do); None when none runs."""
    chosen = [maps for maps, keep in zip(found.weighted, found.keep) if keep[step]]
    if not chosen:
        return None
    total = list(chosen[0])
    for maps in chosen[1:]:
        total = [a + b for a, b in zip(total, maps)]
    shape = tuple(sample.shape[-2:])
    if shape not in sizes:
        sizes[shape] = feature_sizes(unet, *shape)
    out = []
    for feature, size in zip(total, sizes[shape]):
        if tuple(feature.shape[-2:]) != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        feature = feature.to(sample.device, sample.dtype)
        out.append(torch.cat([feature] * (sample.shape[0] // feature.shape[0])))
    return out


def feature_sizes(unet, height: int, width: int) -> List[Tuple[int, int]]:
    """Where the UNet adds each adapter feature map, for a latent of ``height`` x
    ``width``: inside a cross-attention down block before its downsampler, after a plain
    one (a stride-2 downsampler gives ceil(n / 2))."""
    sizes = []
    for block in unet.down_blocks:
        after = (math.ceil(height / 2), math.ceil(width / 2)) \
            if getattr(block, "downsamplers", None) else (height, width)
        sizes.append((height, width) if getattr(block, "has_cross_attention", False)
                     else after)
        height, width = after
    return sizes


def adapter_input(control, adapter: T2IAdapter) -> torch.Tensor:
    """A control image (H x W x 3 uint8) as the adapter reads it, the way the adapter
    pipelines make it: grey for a 1-channel adapter (canny, sketch), values in [0, 1],
    sides resized (Lanczos) up to a multiple of the adapter's downscale factor."""
    image = PILImage.fromarray(np.ascontiguousarray(control))
    if int(adapter.config.in_channels) == 1:
        image = image.convert("L")
    factor = int(getattr(adapter, "total_downscale_factor", 8))
    w, h = image.size
    size = (math.ceil(w / factor) * factor, math.ceil(h / factor) * factor)
    if size != (w, h):
        image = image.resize(size, resample=PILImage.LANCZOS)
    # made as the pipelines make it (a contiguous N x H x W x C array seen as N x C x H x W):
    # another memory layout would convolve in another order and differ in the last bits
    array = np.asarray(image)
    array = array[None, ..., None] if array.ndim == 2 else array[None]
    array = np.ascontiguousarray(array).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array.transpose(0, 3, 1, 2))
    param = next(adapter.parameters())
    return tensor.to(param.device, param.dtype)
