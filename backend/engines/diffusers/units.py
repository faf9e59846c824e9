"""Control units: every unit's control mode (balanced / prompt / control) applied on its own
inside one ``MultiControlNetModel``."""

from __future__ import annotations

from typing import List, Sequence

import torch
from diffusers import ControlNetModel, MultiControlNetModel

from .compiled import is_compiled

SOFT_INJECTION_BASE = 0.825


def soft_injection_scales(count: int) -> List[float]:
    """A1111's "prompt is more important" scales for ``count`` residuals (mid last)."""
    return [SOFT_INJECTION_BASE ** (count - 1 - k) for k in range(count)]


class ControlUnits(MultiControlNetModel):
    """MultiControlNetModel with a control mode per unit (see the module docstring).

    ``cfg`` says whether the pipeline batches [unconditional, conditional]; it is set
    per job.  Units with scale 0 at a step are skipped; when none runs the UNet gets
    ``None`` residuals, exactly as without a ControlNet.
    """

    def __init__(self, controlnets: Sequence[ControlNetModel], modes: Sequence[str],
                 cfg: bool) -> None:
        super().__init__(list(controlnets))
        self.modes = tuple(modes)
        self.cfg = cfg

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                conditioning_scale, class_labels=None, timestep_cond=None, attention_mask=None,
                added_cond_kwargs=None, cross_attention_kwargs=None, guess_mode=False,
                return_dict=True):
        down, mid = None, None
        for image, scale, net, mode in zip(controlnet_cond, conditioning_scale, self.nets,
                                           self.modes):
            if float(scale) == 0.0:
                continue
            pooled = bool(net.config.global_pool_conditions)
            split = self.cfg and not guess_mode and (mode == "control" or pooled)
            args = dict(sample=sample, timestep=timestep,
                        encoder_hidden_states=encoder_hidden_states, controlnet_cond=image,
                        class_labels=class_labels, timestep_cond=timestep_cond,
                        attention_mask=attention_mask, added_cond_kwargs=added_cond_kwargs)
            if split:
                args = {k: _cond_half(v, sample.shape[0]) for k, v in args.items()}
            d, m = net(**args, conditioning_scale=_scale_argument(net, scale, sample),
                       cross_attention_kwargs=cross_attention_kwargs,
                       guess_mode=guess_mode or mode == "control", return_dict=False)
            if mode == "prompt":
                scales = soft_injection_scales(len(d) + 1)
                d = [r * s for r, s in zip(d, scales)]
                m = m * scales[-1]
            if split:
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        if down is None and guess_mode:
            # The pipeline itself is in guess mode and will pad our output: it needs tensors.
            d, m = self.nets[0](sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                controlnet_cond=controlnet_cond[0],
                                conditioning_scale=_scale_argument(self.nets[0], 0.0, sample),
                                added_cond_kwargs=added_cond_kwargs, return_dict=False)
            down, mid = list(d), m
        return down, mid


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
