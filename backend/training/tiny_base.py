"""Train a tiny latent-diffusion base from scratch (VAE, then UNet + text encoder).

The demo model needs a base that actually draws something; no pretrained
weights are available offline, so this trains one on the targets of a dataset
(e.g. the shapes), on CPU, in minutes:

1. VAE (3 blocks, 4x downsampling: 64x64 px -> 16x16x4 latents, no attention so
   it is fully convolutional and trains on 32x32 crops, 4x cheaper) with an L1
   reconstruction loss and a small KL term; then ``scaling_factor`` = 1 / std of
   the latents, set with ``register_to_config`` so the pipelines use it.
2. UNet and CLIP text encoder trained jointly (a frozen random text encoder
   follows colours poorly), v-prediction loss on a zero-terminal-SNR schedule
   (see :func:`make_scheduler`), 10 % empty prompts so classifier-free guidance
   works.
3. Saved as a diffusers folder (``model_index.json``, unet/, vae/, text_encoder/,
   tokenizer/, scheduler/) that ``StableDiffusionPipeline.from_pretrained`` and the
   ControlNet trainer load.

Every random draw comes from ``seed``: the same seed, data and machine give the
same weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .common import noise_target, pick_device, pixels, tokenize, write_model_index
from .controlnet import ProgressFn, TrainProgress, _Order, drop_prompts
from .dataset import PairImages, find_pairs

log = logging.getLogger(__name__)


@dataclass
class TinyBaseConfig:
    resolution: int = 64
    seed: int = 0
    vae_channels: Tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 500
    vae_batch: int = 32
    vae_crop: int = 32        # train on random crops (the VAE is fully convolutional)
    vae_crop_on_shape: bool = False   # crops hold the picture's non-background centre
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_channels: Tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 2
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    unet_warmup_steps: int = 100
    prompt_drop: float = 0.1
    device: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def make_tokenizer() -> CLIPTokenizer:
    """The byte-level CLIP tokenizer of the tiny stack (backend.engines.tiny), built in memory."""
    from backend.engines.tiny import tiny_vocab

    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_models(config: TinyBaseConfig, tokenizer: CLIPTokenizer
                ) -> Tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(config.seed)
    blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=config.vae_channels, layers_per_block=1,
        sample_size=config.resolution,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, mid_block_add_attention=False)
    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (blocks - 1), in_channels=4, out_channels=4,
        layers_per_block=config.unet_layers_per_block, block_out_channels=config.unet_channels,
        norm_num_groups=32, cross_attention_dim=config.text_hidden, attention_head_dim=8,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=eos, pad_token_id=eos, hidden_size=config.text_hidden,
        intermediate_size=2 * config.text_hidden, num_attention_heads=4,
        num_hidden_layers=config.text_layers, vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=config.text_hidden))
    return vae, unet, text_encoder


def make_scheduler() -> DDIMScheduler:
    """Stable Diffusion's betas rescaled to zero terminal SNR, v-prediction, sampling
    from the last timestep ("trailing") -- Lin et al., "Common Diffusion Noise
    Schedules and Sample Steps are Flawed".

    With SD's own schedule sqrt(alpha_bar_T) = 0.068 of the signal survives the last
    step; on a 16x16 latent the starting noise's mean over the picture has about
    that size too, so an epsilon model reads the background colour out of the noise
    and pictures get random backgrounds (measured: most of them).  At zero terminal
    SNR the first step predicts the picture from the prompt alone, and v-prediction
    keeps that well conditioned (an epsilon model's x0 estimate blows up there).
    Every sampler of the engine accepts this schedule.
    """
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing",
                         prediction_type="v_prediction", rescale_betas_zero_snr=True)


class _Reporter:
    def __init__(self, progress: Optional[ProgressFn], total: int) -> None:
        self.progress, self.total, self.started = progress, total, time.monotonic()
        self.losses: List[float] = []

    def __call__(self, stage: str, step: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        if self.progress is not None:
            recent = self.losses[-50:]
            self.progress(TrainProgress(stage, step, self.total, loss, float(np.mean(recent)),
                                        lr, time.monotonic() - self.started))


def train_vae(vae: AutoencoderKL, images: PairImages, config: TinyBaseConfig,
              generator: torch.Generator, device: torch.device,
              progress: Optional[ProgressFn] = None) -> List[float]:
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    order = _Order(len(images), generator)
    report = _Reporter(progress, config.vae_steps)
    for step in range(1, config.vae_steps + 1):
        lr = config.vae_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.vae_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, target, _ = images.batch(order.take(config.vae_batch))
        x = pixels(_crops(target, config.vae_crop, generator, config.vae_crop_on_shape), device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape,
                                                         generator=generator).to(device)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report("vae", step, float(loss.detach()), lr)
    vae.eval().requires_grad_(False)
    return report.losses


def _foreground(batch: np.ndarray) -> np.ndarray:
    """N x H x W bool: pixels that differ from the picture's corner (background) colour."""
    corner = batch[:, :1, :1, :3]
    return (np.abs(batch[..., :3].astype(np.int16) - corner).max(axis=-1) > 24)


def _crops(batch: np.ndarray, size: int, generator: torch.Generator,
           on_shape: bool = False) -> np.ndarray:
    """One random ``size`` x ``size`` crop per image (all of it when it is that small);
    ``on_shape``: among the crops that hold the centre of the picture's foreground."""
    n, h, w = batch.shape[:3]
    if size >= min(h, w):
        return batch
    if not on_shape:
        ys = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
        xs = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
        return np.stack([img[y:y + size, x:x + size] for img, y, x in zip(batch, ys, xs)])
    u = torch.rand((n, 2), generator=generator).numpy()
    lo_y, hi_y = np.zeros(n, int), np.full(n, h - size)
    lo_x, hi_x = np.zeros(n, int), np.full(n, w - size)
    fg = _foreground(batch)
    for i in range(n):
        ys, xs = np.nonzero(fg[i])
        if len(ys):
            cy, cx = int(ys.mean()), int(xs.mean())
            lo_y[i], hi_y[i] = max(0, cy - size + 1), min(h - size, cy)
            lo_x[i], hi_x[i] = max(0, cx - size + 1), min(w - size, cx)
    ys = (lo_y + np.floor(u[:, 0] * (hi_y - lo_y + 1))).astype(int)
    xs = (lo_x + np.floor(u[:, 1] * (hi_x - lo_x + 1))).astype(int)
    return np.stack([img[y:y + size, x:x + size] for img, y, x in zip(batch, ys, xs)])


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: PairImages, device: torch.device
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), 64):
        _, target, _ = images.batch(range(start, min(start + 64, len(images))))
        dist = vae.encode(pixels(target, device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
               tokenizer: CLIPTokenizer, latents: Tuple[torch.Tensor, torch.Tensor],
               scaling: float, prompts: List[str], config: TinyBaseConfig,
               generator: torch.Generator, device: torch.device,
               progress: Optional[ProgressFn] = None) -> List[float]:
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(make_scheduler().config)
    order = _Order(len(prompts), generator)
    report = _Reporter(progress, config.unet_steps)
    steps, warmup = config.unet_steps, config.unet_warmup_steps
    for step in range(1, steps + 1):
        if step <= warmup:
            lr = config.unet_lr * step / warmup
        else:
            lr = config.unet_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order.take(config.unet_batch)
        batch_prompts, _ = drop_prompts([prompts[i] for i in idx], config.prompt_drop, generator)
        mean, std = latents[0][idx], latents[1][idx]
        z = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],),
                          generator=generator)
        noisy = noise_scheduler.add_noise(z, noise, t).to(device)
        hidden = text_encoder(tokenize(tokenizer, batch_prompts).to(device), return_dict=False)[0]
        pred = unet(noisy, t.to(device), encoder_hidden_states=hidden, return_dict=False)[0]
        loss = F.mse_loss(pred, noise_target(noise_scheduler, z, noise, t).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report("unet", step, float(loss.detach()), lr)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return report.losses


def train_tiny_base(data: str, out: str, config: Optional[TinyBaseConfig] = None,
                    progress: Optional[ProgressFn] = None) -> Path:
    """Train the tiny base on the targets and prompts of dataset ``data``; returns ``out``."""
    config = config or TinyBaseConfig()
    device = pick_device(config.device)
    out_path = Path(out)
    started = time.monotonic()
    images = PairImages(find_pairs(data), config.resolution)
    prompts = [images.prompt(i) for i in range(len(images))]
    tokenizer = make_tokenizer()
    vae, unet, text_encoder = make_models(config, tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    t0 = time.monotonic()
    vae_losses = train_vae(vae, images, config, generator, device, progress)
    vae_seconds = time.monotonic() - t0
    mean, std = encode_all(vae, images, device)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    t0 = time.monotonic()
    unet_losses = train_unet(unet, text_encoder, tokenizer, (mean, std), scaling, prompts,
                             config, generator, device, progress)
    unet_seconds = time.monotonic() - t0
    out_path.mkdir(parents=True, exist_ok=True)
    vae.to("cpu").save_pretrained(out_path / "vae")
    unet.to("cpu").save_pretrained(out_path / "unet")
    text_encoder.to("cpu").save_pretrained(out_path / "text_encoder")
    tokenizer.save_pretrained(out_path / "tokenizer")
    make_scheduler().save_pretrained(out_path / "scheduler")
    write_model_index(out_path)
    log_ = {"config": config.as_dict(), "samples": len(images), "scaling_factor": scaling,
            "vae_seconds": round(vae_seconds, 1), "unet_seconds": round(unet_seconds, 1),
            "seconds": round(time.monotonic() - started, 1),
            "vae_losses": vae_losses, "unet_losses": unet_losses}
    (out_path / "training_log.json").write_text(json.dumps(log_) + "\n", encoding="utf-8")
    return out_path
