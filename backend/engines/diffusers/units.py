"""Control units: every unit's control mode (balanced / prompt / control) applied on its own
inside one ``MultiControlNetModel``; union ControlNets serve several units in one call."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from diffusers import ControlNetModel, MultiControlNetModel

from .compiled import is_compiled

SOFT_INJECTION_BASE = 0.825


def soft_injection_scales(count: int) -> List[float]:
    """A1111's "prompt is more important" scales for ``count`` residuals (mid last)."""
    return [SOFT_INJECTION_BASE ** (count - 1 - k) for k in range(count)]


class _Call(NamedTuple):
    """One ControlNet call: a classic ControlNet with one image, or a union ControlNet with
    the images of every unit that shares it and its control mode (``types``: their
    control types; None for a classic ControlNet)."""

    net: torch.nn.Module
    mode: str
    images: list
    scales: list
    types: Optional[list]


class ControlUnits(MultiControlNetModel):
    """MultiControlNetModel with a control mode per unit (see the module docstring).

    ``cfg`` says whether the pipeline batches [unconditional, conditional]; it is set
    per job.  Units with scale 0 at a step are skipped; when none runs the UNet gets
    ``None`` residuals, exactly as without a ControlNet.

    ``control_types``: per unit, its union control type (an index of
    ``families.UNION_CONTROL_TYPES``) when its ControlNet is a ``ControlNetUnionModel``,
    else None.  The units of one union model with the same control mode run as one call
    with several conditions, as xinsir's union pipelines do: with one condition the
    unit's weight scales the residuals (as for a classic ControlNet); with several each
    weight scales its condition's features inside the union model.
    """

    def __init__(self, controlnets: Sequence[ControlNetModel], modes: Sequence[str],
                 cfg: bool, control_types: Sequence[Optional[int]] = ()) -> None:
        super().__init__(list(controlnets))
        self.modes = tuple(modes)
        self.cfg = cfg
        self.control_types = tuple(control_types) or (None,) * len(self.modes)

    def _calls(self, images, scales) -> List[_Call]:
        calls: List[_Call] = []
        grouped = {}
        for image, scale, net, mode, kind in zip(images, scales, self.nets, self.modes,
                                                  self.control_types):
            if float(scale) == 0.0:
                continue
            if kind is None:
                calls.append(_Call(net, mode, [image], [scale], None))
                continue
            key = (id(net), mode)
            if key not in grouped:
                grouped[key] = _Call(net, mode, [], [], [])
                calls.append(grouped[key])
            grouped[key].images.append(image)
            grouped[key].scales.append(scale)
            grouped[key].types.append(kind)
        return calls

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                conditioning_scale, class_labels=None, timestep_cond=None, attention_mask=None,
                added_cond_kwargs=None, cross_attention_kwargs=None, guess_mode=False,
                return_dict=True):
        common = dict(sample=sample, timestep=timestep,
                      encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                      timestep_cond=timestep_cond, attention_mask=attention_mask,
                      added_cond_kwargs=added_cond_kwargs)
        down, mid = None, None
        for call in self._calls(controlnet_cond, conditioning_scale):
            d, m = self._run(call, common, cross_attention_kwargs, guess_mode)
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        if down is None and guess_mode:
            # The pipeline itself is in guess mode and will pad our output: it needs tensors.
            first = _Call(self.nets[0], "balanced", [controlnet_cond[0]], [0.0],
                          None if self.control_types[0] is None else [self.control_types[0]])
            d, m = self._run(first, common, cross_attention_kwargs, False)
            down, mid = list(d), m
        return down, mid

    def _run(self, call: _Call, common: dict, cross_attention_kwargs, guess_mode: bool):
        sample = common["sample"]
        pooled = bool(call.net.config.global_pool_conditions)
        split = self.cfg and not guess_mode and (call.mode == "control" or pooled)
        args = dict(common)
        images = call.images
        if split:
            args = {k: _cond_half(v, sample.shape[0]) for k, v in args.items()}
            images = [_cond_half(image, sample.shape[0]) for image in images]
        guess = guess_mode or call.mode == "control"
        if call.types is None:
            d, m = call.net(**args, controlnet_cond=images[0],
                            conditioning_scale=_scale_argument(call.net, call.scales[0], sample),
                            cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess,
                            return_dict=False)
        else:
            d, m = call.net(**args, controlnet_cond=images,
                            control_type=_control_type(call.net, call.types, args["sample"],
                                                       args["encoder_hidden_states"]),
                            control_type_idx=list(call.types),
                            conditioning_scale=[_scale_argument(call.net, float(s), sample)
                                                for s in call.scales],
                            cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess,
                            return_dict=False)
        if call.mode == "prompt":
            scales = soft_injection_scales(len(d) + 1)
            d = [r * s for r, s in zip(d, scales)]
            m = m * scales[-1]
        if split:
            d = [torch.cat([torch.zeros_like(r), r]) for r in d]
            m = torch.cat([torch.zeros_like(m), m])
        return d, m


def _control_type(net, types: Sequence[int], sample: torch.Tensor,
                  text: torch.Tensor) -> torch.Tensor:
    """The union model's control-type switches (1 for each type in use), one row per
    sample, as the union pipelines make them."""
    switches = torch.zeros(net.config.num_control_type)
    switches[list(types)] = 1.0
    return switches.reshape(1, -1).to(sample.device, dtype=text.dtype).repeat(sample.shape[0], 1)


def _scale_argument(net, scale, sample):
    """The scale as the ControlNet gets it: a plain float, or for a compiled ControlNet a
    0-d tensor (a float would be baked into the graph: one compilation per weight)."""
    if is_compiled(net):
        return torch.tensor(float(scale), dtype=torch.float32, device=sample.device)
    return scale


def _cond_half(value, batch: int):
    """The conditional half of a CFG-batched tensor (or of a dict of them)."""
    if isinstance(value, dict):
        return {k: _cond_half(v, batch) for k, v in value.items()}
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch and batch % 2 == 0:
        return value.chunk(2)[1]
    return value
