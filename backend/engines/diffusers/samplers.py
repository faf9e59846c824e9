"""Samplers: a sampler name -> a diffusers scheduler on the model's own noise schedule."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, TCDScheduler,
                       UniPCMultistepScheduler)

from shared.errors import Unsupported

# Only the noise-schedule keys of a model's scheduler config are carried over, so a
# sampler means the same thing whatever scheduler the model shipped with.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "trained_betas", "prediction_type", "steps_offset", "timestep_spacing",
                  "rescale_betas_zero_snr")
SAMPLERS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler,
                        dict(algorithm_type="dpmsolver++", solver_order=2,
                             use_karras_sigmas=True)),
    "dpmpp_2m": (DPMSolverMultistepScheduler,
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "unipc": (UniPCMultistepScheduler, dict()),
    "euler_a": (EulerAncestralDiscreteScheduler, dict()),
    "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=False)),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False)),
    "lcm": (LCMScheduler, dict()),
    # the few-step presets' schedulers (backend.engines.presets.SCHEDULERS)
    "tcd": (TCDScheduler, dict()),
    "ddim_trailing": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False,
                                          timestep_spacing="trailing")),
    "euler_trailing": (EulerDiscreteScheduler, dict(use_karras_sigmas=False,
                                                    timestep_spacing="trailing")),
}


def make_scheduler(sampler: str, base_config: Mapping[str, Any]):
    """A fresh scheduler for ``sampler`` (a request's sampler or a preset's scheduler) on
    the model's noise schedule."""
    try:
        cls, options = SAMPLERS[sampler]
    except KeyError:
        raise Unsupported(f"Unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}.",
                          field="sampler") from None
    config = {k: base_config[k] for k in _SCHEDULE_KEYS if k in base_config}
    return cls.from_config(config, **options)
