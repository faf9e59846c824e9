"""What a run of same-shape jobs (live painting) reuses from one job to the next, and the
few-step rule for control windows.

* **Prompt embeddings** are cached per loaded base (:class:`BaseEntry.prompts`), keyed by
  prompt, negative prompt, whether classifier-free guidance runs, the clip skip the units
  need (a ControlNet's quirk, which depends on whether it is a union model:
  :func:`.pipelines.clip_skip`), the LoRA adapters active on the text encoders (names and
  strengths) and the family: the pipeline's own ``encode_prompt`` computes them once, with
  the arguments the pipeline would use itself, and the pipeline gets them as
  ``prompt_embeds`` (SDXL: and the pooled ones), so the pixels are the same as without
  the cache, bit for bit.  The text encoder is shortened for a clip skip only while the
  embeddings are computed, never during the pipeline call: a job run in this one's pause
  shares the encoder.  Least recently used dropped
  past :data:`PROMPT_CACHE_SIZE` entries; ``stats["prompt_cache_hits"]`` / ``misses``.
* **Control windows at few steps**: diffusers applies a unit at step ``i`` of ``n`` when
  ``i/n >= start`` and ``(i+1)/n <= end``.  With 1-8 steps a window such as 0-0.4 can
  fall between two steps, and the unit would never run; such a window is widened to the
  whole step it starts in (:func:`control_window`).  A window that covers a step is
  left as it is.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

from .cache import BaseEntry
from .pipelines import clip_skip

PROMPT_CACHE_SIZE = 32


def _lora_state(entry: BaseEntry) -> Hashable:
    adapters = entry.loras
    return tuple(adapters.active) if adapters is not None and adapters.active else ()


def prompt_kwargs(pipe, entry: BaseEntry, prompt: str, negative: Optional[str], do_cfg: bool,
                  stats: Dict[str, Any], size: int = PROMPT_CACHE_SIZE,
                  on_miss: Callable[[], None] = lambda: None, skip: int = 1,
                  encode: Optional[Callable[[], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The pipeline's prompt arguments: cached embeddings (see the module docstring), or
    with ``size`` 0 the texts themselves (the pipeline encodes them; with a clip skip the
    embeddings, not kept). ``on_miss`` runs when the texts are encoded (the engine's note
    on prompts longer than CLIP reads); ``skip``: the clip skip (1 = none); ``encode``: the
    family's own encoding (the transformer families, :mod:`.dit`), else SD1.5's / SDXL's."""
    if size <= 0 and skip <= 1:
        on_miss()
        return dict(prompt=prompt, negative_prompt=negative)
    cache: "OrderedDict[Hashable, Dict[str, Any]]" = entry.prompts
    key = (prompt, negative, do_cfg, skip, _lora_state(entry), entry.family)
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
        stats["prompt_cache_hits"] = stats.get("prompt_cache_hits", 0) + 1
        return dict(found)
    stats["prompt_cache_misses"] = stats.get("prompt_cache_misses", 0) + 1
    on_miss()
    device = pipe._execution_device
    with torch.no_grad(), clip_skip(pipe, skip):
        if encode is not None:
            found = encode()
        elif entry.family == "sdxl":
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative,
                negative_prompt_2=None, lora_scale=None, clip_skip=None)
            found = dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                         pooled_prompt_embeds=pooled,
                         negative_pooled_prompt_embeds=negative_pooled)
        else:
            embeds, negative_embeds = pipe.encode_prompt(
                prompt, device, 1, do_cfg, negative, lora_scale=None, clip_skip=None)
            found = dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    if size <= 0:
        return dict(found)
    cache[key] = found
    while len(cache) > size:
        cache.popitem(last=False)
    return dict(found)


def control_window(start: float, end: float, runs: int) -> Tuple[float, float]:
    """A unit's (start, end) such that it runs on at least one of ``runs`` steps (see the
    module docstring)."""
    if runs <= 0 or any(not (i / runs < start or (i + 1) / runs > end) for i in range(runs)):
        return start, end
    first = min(int(math.floor(start * runs)), runs - 1)
    return first / runs, (first + 1) / runs
