"""``controlcanvas bench gpu --groups klein``: Flux.2 Klein 4B at 1024², 4 steps (issue 23).

Nothing is downloaded: the pipeline is built where it runs, with random weights:

* a ``Flux2Transformer2DModel`` with FLUX.2 [klein] 4B's own config (:data:`KLEIN_4B`: 5
  double- and 20 single-stream blocks, 24 heads of 128, text width 3 x 2560; about 3.9 B
  parameters, bf16 on CUDA),
* an ``AutoencoderKLFlux2`` of the real size (diffusers' defaults are Klein's VAE),
* a **small** Qwen3 text encoder: Klein's width (2560) and depth (28 layers: the pipeline
  stacks hidden states 9, 18 and 27) but 4 heads and a narrow MLP, about 0.17 B parameters
  instead of Qwen3-4B's 4 B.  The text encoder runs once per image and is not what is
  timed; the transformer sees text features of the real shape (512 tokens x 7680), so the
  denoising costs what Klein's does.

Two cases, each one image, seed 42, distilled (no classifier-free guidance, as the 4B):
``klein4b`` (text to image) and ``klein4b_control`` (one 1024² reference picture, which is
how the engine emulates a control unit on Klein: the picture's tokens join the sequence).
Per case: median seconds end to end (``seconds``: text, 4 steps, VAE decode) and of the
denoising alone (``denoise_s``: the same call up to the latents), ``its`` = steps /
denoise_s, peak VRAM (MiB, CUDA), whether the pixels are finite, build seconds.

``dry_run`` builds the tiny Klein stack's parts (:mod:`backend.engines.tiny_klein`) in
memory instead and runs 64² on the CPU, with the same keys.  This times the bare diffusers
pipeline; the engine's overhead over bare diffusers is what the ``sd15`` / ``sdxl`` groups
measure.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROMPT = "a knight in armour, full body"
# FLUX.2 [klein] 4B's transformer/config.json (as diffusers' conversion script writes it).
KLEIN_4B: Dict[str, Any] = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
    guidance_embeds=False)
TEXT_WIDTH, TEXT_LAYERS = 2560, 28  # Qwen3-4B's width; the pipeline reads layers 9, 18, 27
SMALL_TEXT = dict(intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64)


def build_pipeline(dry_run: bool, device: str, dtype):
    """Flux2KleinPipeline with random weights: Klein 4B's transformer and VAE, a small text
    encoder (see the module docstring); the tiny stack's parts for ``dry_run``."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,
                           Flux2KleinPipeline, Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3Model

    from ..engines import tiny, tiny_klein, tiny_zimage

    with tempfile.TemporaryDirectory(prefix="cc-bench-klein-tok-") as folder:
        tok = tiny_zimage._tokenizer(Path(folder), list(tiny._bytes_to_unicode().values()))
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: seconds, not minutes
        if dry_run:
            transformer = Flux2Transformer2DModel(**tiny_klein.TRANSFORMER)
            vae = tiny_klein._vae()
            encoder = tiny_zimage._text_encoder(len(tok), pad, tiny_klein.TEXT_LAYERS)
        else:
            assert KLEIN_4B["joint_attention_dim"] == 3 * TEXT_WIDTH  # 3 stacked layers
            transformer = Flux2Transformer2DModel(**KLEIN_4B)
            vae = AutoencoderKLFlux2()
            encoder = Qwen3Model(Qwen3Config(
                vocab_size=len(tok), hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
                max_position_embeddings=1024, pad_token_id=pad, tie_word_embeddings=False,
                **SMALL_TEXT))
        text = tiny_klein._causal_lm(encoder)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                  use_dynamic_shifting=True),
        vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer, is_distilled=True)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(module) -> float:
    """Millions of parameters."""
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def _call(pipe, size: int, steps: int, reference, device: str,
          output_type: str) -> Callable[[], Any]:
    import torch

    def call():
        generator = torch.Generator(device=device).manual_seed(42)
        return pipe(image=reference, prompt=PROMPT, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=1.0, generator=generator,
                    output_type=output_type).images
    return call


def run_case(pipe, dev, name: str, size: int, steps: int, repeats: int,
             with_reference: bool) -> Dict[str, Any]:
    """Warm up once, then ``repeats`` rounds of the whole image and of the denoising."""
    from PIL import Image as PILImage

    reference = None
    if with_reference:  # a stand-in control image: grey with a dark frame
        pixels = np.full((size, size, 3), 200, np.uint8)
        pixels[size // 8:-size // 8, size // 8:size // 8 + 4] = 20
        reference = PILImage.fromarray(pixels)
    whole = _call(pipe, size, steps, reference, dev.type, "np")
    denoise = _call(pipe, size, steps, reference, dev.type, "latent")
    first_s, _, image = dev.timed(whole)
    times: Dict[str, List[float]] = {"seconds": [], "denoise_s": []}
    peak = 0.0
    for _ in range(repeats):
        for key, fn in (("seconds", whole), ("denoise_s", denoise)):
            seconds, used, _ = dev.timed(fn)
            times[key].append(seconds)
            peak = max(peak, used or 0.0)
    row: Dict[str, Any] = {"name": name, "family": "klein", "size": size, "steps": steps,
                           "repeats": repeats, "reference_images": int(with_reference),
                           "first_s": round(first_s, 4)}
    row.update({key: round(statistics.median(values), 4) for key, values in times.items()})
    row["its"] = round(steps / row["denoise_s"], 2)
    row["peak_vram_mb"] = round(peak, 1) if dev.cuda else None
    row["finite"] = {"bare": bool(np.isfinite(np.asarray(image)).all())}
    log.info("bench gpu %s: %.3f s per image, %.2f it/s", name, row["seconds"], row["its"])
    return row


def run_group(run, cases: Sequence[Any]) -> Dict[str, Any]:
    """The ``klein`` group of :func:`backend.bench.gpu.run` (``run`` its state)."""
    import torch

    dev = run.dev
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    start = time.perf_counter()
    pipe = build_pipeline(run.dry_run, dev.type, dtype)
    out: Dict[str, Any] = {
        "build_s": round(time.perf_counter() - start, 2), "dtype": str(dtype).split(".")[-1],
        "transformer_params_m": _params(pipe.transformer),
        "text_encoder_params_m": _params(pipe.text_encoder),
        "text_encoder": "tiny-klein's" if run.dry_run else
                        "small Qwen3 (Klein 4B's width and depth, narrow heads and MLP): "
                        "the denoising is what is timed", "cases": {}, "skipped": []}
    try:
        for case in cases:
            if time.monotonic() > run.deadline:
                out["skipped"].append(case.name)
                continue
            out["cases"][case.name] = run_case(pipe, dev, case.name, case.size, case.steps,
                                               case.repeats, case.name.endswith("_control"))
    finally:
        del pipe
        dev.free()
    return out
