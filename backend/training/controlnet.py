"""Train a ControlNet on (condition, image, prompt) pairs, as in the ControlNet paper.

1. Load the base (UNet, VAE, text encoder, tokenizer, noise schedule) and freeze
   it: ``requires_grad_(False)``, checked again against the optimizer.
2. Make the ControlNet with ``ControlNetModel.from_unet``: a trainable copy of the
   UNet's encoder whose outputs pass through zero convolutions, so at step 0 the
   base's output is unchanged.
3. Each step: a batch of pairs; each prompt is replaced by "" with probability
   ``prompt_drop`` (0.5 in the paper, so the ControlNet learns to read the
   condition on its own); target latents from the frozen VAE, noise and timestep
   drawn from one seeded generator; loss = MSE between the UNet's prediction (with
   the ControlNet's residuals added) and the noise (or velocity).
4. Checkpoints (weights, optimizer, LR schedule, generator and data order) every
   ``checkpoint_every`` steps and at the end; ``resume`` continues the same loss trajectory
   (bit-identical on the same machine and settings: every random draw comes from
   the saved generator).
5. Validation images every ``validation_every`` steps through diffusers'
   ``StableDiffusionControlNetPipeline``; an optional ``evaluate`` hook adds metrics.
6. The output folder holds ``config.json`` + ``diffusion_pytorch_model.safetensors``
   (``ControlNetModel.from_pretrained(out)``), ``training_log.json``, ``validation/``
   and ``checkpoints/``.

``progress`` is called after every step with a :class:`TrainProgress`; if it
raises (say :class:`shared.errors.Cancelled`), a checkpoint is written and the
exception propagates, so a cancelled job can be resumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import ControlNetModel, DDPMScheduler
from PIL import Image as PILImage

from .common import (BaseModel, PromptCache, check_frozen, condition_pixels, controlnet_pipeline,
                     freeze, image_grid, load_base, noise_target, pick_device, pixels)
from .dataset import PairImages, find_pairs
from .errors import TrainingError
from .folders import TrainRoots, check_output, mark_output

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
# Options that change the trajectory: a resume must use the same values.
LR_SCHEDULES = ("constant", "cosine")
TRAJECTORY_KEYS = ("data", "base", "batch", "lr", "lr_warmup_steps", "lr_schedule",
                   "resolution", "prompt_drop", "mixed_precision", "seed", "cache_latents",
                   "max_grad_norm", "weight_decay", "conditioning_channels")


@dataclass
class TrainConfig:
    data: str                       # dataset folder (see backend.training.dataset)
    base: str                       # base model: diffusers folder, .safetensors, catalogue name
    out: str                        # output folder (the trained ControlNet)
    steps: int = 1000
    batch: int = 4
    lr: float = 1e-5
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"   # "constant" | "cosine" (decays to 0 at ``steps``)
    resolution: int = 512
    prompt_drop: float = 0.5
    mixed_precision: str = "no"     # "no" | "bf16" | "fp16" (fp16 needs a GPU)
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500     # 0: only at the end
    checkpoints_kept: int = 2
    validation_every: int = 0       # 0: no validation images
    validation_count: int = 4
    validation_steps: int = 20      # sampling steps of the validation pipeline
    validation_guidance: float = 7.5
    resume: Optional[str] = None    # "latest" or a checkpoint folder
    cache_latents: bool = False     # encode every target once (small datasets, frozen VAE)
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    conditioning_channels: Optional[Tuple[int, ...]] = None  # default: one per VAE block
    device: Optional[str] = None

    def check(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append("steps must be at least 1")
        if self.batch < 1:
            problems.append("batch must be at least 1")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not 0.0 <= self.prompt_drop <= 1.0:
            problems.append("prompt_drop must be between 0 and 1")
        if self.resolution < 8 or self.resolution % 8:
            problems.append("resolution must be a multiple of 8")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if problems:
            raise TrainingError("Bad training options: " + "; ".join(problems) + ".")

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["conditioning_channels"] is not None:
            d["conditioning_channels"] = list(d["conditioning_channels"])
        return d


# Fields of the ``train`` message that are about the job, not the training.
_JOB_FIELDS = ("job_id", "cancel_on_disconnect", "resume")


def config_from_message(message, roots: TrainRoots) -> TrainConfig:
    """The :class:`TrainConfig` of a client's ``shared.messages.Train`` job: its fields
    carry over by name (resume means the latest checkpoint); its data, output and base
    are confined to ``roots`` (see backend.training.folders)."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)
              if f.name not in _JOB_FIELDS}
    fields["data"], fields["out"], fields["base"] = roots.confine(
        message.data, message.out, message.base)
    return TrainConfig(**fields, resume="latest" if message.resume else None)


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step ``s`` (0-based): a linear warm-up,
    then constant or a cosine decay that reaches 0 at ``config.steps``."""
    warmup, steps, cosine = max(0, config.lr_warmup_steps), config.steps, \
        config.lr_schedule == "cosine"

    def factor(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if not cosine or steps <= warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / (steps - warmup))))
    return factor


@dataclass(frozen=True)
class TrainProgress:
    stage: str          # "prepare" | "train" | "validate" | "done"
    step: int
    total: int
    loss: float = math.nan        # this step's loss
    loss_avg: float = math.nan    # mean of the last 50 steps
    lr: float = 0.0
    seconds: float = 0.0          # since this run started


ProgressFn = Callable[[TrainProgress], None]
EvaluateFn = Callable[[int, Any], Dict[str, float]]


class ConsoleProgress:
    """A one-line progress bar with the loss, for ``controlcanvas train`` (writes to
    ``stream``, default stderr)."""

    def __init__(self, stream=None, width: int = 24) -> None:
        self.stream, self.width = stream, width

    def __call__(self, p: TrainProgress) -> None:
        stream = self.stream or sys.stderr
        if p.stage == "train":
            done = int(self.width * p.step / max(1, p.total))
            rate = p.step / p.seconds if p.seconds else 0.0
            stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] step {p.step}/{p.total} "
                         f"loss {p.loss:.4f} (avg {p.loss_avg:.4f}) {rate:.2f} steps/s ")
        elif p.stage == "done":
            stream.write(f"\rdone: {p.step} steps, {p.seconds:.0f} s{' ' * 40}\n")
        else:
            stream.write(f"\r{p.stage} (step {p.step}){' ' * 40}")
        stream.flush()


def job_progress(ctx) -> ProgressFn:
    """Report training progress to a server job (``backend.engines.base.JobContext``); its
    ``progress`` raises Cancelled when the job is cancelled, which stops training
    after writing a checkpoint."""
    def report(p: TrainProgress) -> None:
        ctx.progress(p.step, p.total, stage="train" if p.stage == "train" else p.stage)
    return report


class _Order:
    """Epochs of seeded permutations; resumable from (perm, position)."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count, self.generator = count, generator
        self.perm = torch.randperm(count, generator=generator)
        self.pos = 0

    def take(self, n: int) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            if self.pos >= self.count:
                self.perm = torch.randperm(self.count, generator=self.generator)
                self.pos = 0
            k = min(n - len(out), self.count - self.pos)
            out.extend(self.perm[self.pos:self.pos + k].tolist())
            self.pos += k
        return out


def drop_prompts(prompts: Sequence[str], rate: float, generator: torch.Generator
                 ) -> Tuple[List[str], int]:
    """Replace each prompt by "" with probability ``rate``; also return how many were."""
    draws = torch.rand(len(prompts), generator=generator).tolist()
    kept = [("" if d < rate else p) for d, p in zip(draws, prompts)]
    return kept, sum(d < rate for d in draws)


def default_conditioning_channels(vae_blocks: int) -> Tuple[int, ...]:
    """diffusers' (16, 32, 96, 256) cut to one entry per VAE block, so the condition
    embedding downsamples exactly as much as the VAE."""
    channels = (16, 32, 96, 256)
    if vae_blocks <= len(channels):
        return channels[:vae_blocks]
    return channels + (256,) * (vae_blocks - len(channels))


def make_controlnet(base: BaseModel, channels: Optional[Sequence[int]] = None,
                    seed: int = 0) -> ControlNetModel:
    """``from_unet`` (zero convolutions) with a seeded condition embedding."""
    blocks = len(base.vae.config.block_out_channels)
    channels = tuple(channels or default_conditioning_channels(blocks))
    if len(channels) != blocks:
        raise TrainingError(f"conditioning_channels needs {blocks} entries (one per VAE block, "
                            f"so the condition is downsampled {2 ** (blocks - 1)}x like the "
                            f"image); got {len(channels)}.")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels)
    finally:
        torch.random.set_rng_state(state)


class _Run:
    """State of one training run (fresh or resumed)."""

    def __init__(self, config: TrainConfig, progress: Optional[ProgressFn],
                 evaluate: Optional[EvaluateFn]) -> None:
        config.check()
        self.config = config
        self.progress_fn = progress
        self.evaluate = evaluate
        self.out = Path(config.out)
        self.started = time.monotonic()
        self.losses: List[float] = []
        self.validation: List[Dict[str, Any]] = []
        self.dropped = 0
        self.samples = 0
        self.step = 0

    # -- setup -----------------------------------------------------------------

    def prepare(self) -> None:
        c = self.config
        device = pick_device(c.device)
        if c.mixed_precision == "fp16" and device.type != "cuda":
            raise TrainingError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no.")
        # accelerate keeps one process-wide state; a long-running server trains many times
        # with different settings, so start each run from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision,
                                       cpu=device.type == "cpu")
        self.device = self.accelerator.device
        self._report("prepare", 0)
        self.pairs = find_pairs(c.data)
        self.images = PairImages(self.pairs, c.resolution)
        self.base = base = load_base(c.base)
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16,
                             "fp16": torch.float16}[c.mixed_precision]
        freeze(base.unet, base.vae, base.text_encoder)
        for module in (base.unet, base.vae, base.text_encoder):
            module.to(self.device, dtype=self.weight_dtype)
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.controlnet = make_controlnet(base, c.conditioning_channels, c.seed)
        self.controlnet.train()
        if c.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            base.unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=c.lr,
                                      weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(c))
        self.controlnet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.controlnet, optimizer, scheduler)
        check_frozen({"UNet": base.unet, "VAE": base.vae, "text encoder": base.text_encoder},
                     self.accelerator.unwrap_model(self.controlnet), self.optimizer)
        self.prompts = PromptCache(base.tokenizer, base.text_encoder, self.device)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.order = _Order(len(self.images), self.generator)
        self.latent_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if c.cache_latents:
            self.latent_cache = self._encode_all()
        if c.resume:
            self._resume(c.resume)

    @torch.no_grad()
    def _encode_all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for start in range(0, len(self.images), 64):
            idx = list(range(start, min(start + 64, len(self.images))))
            _, target, _ = self.images.batch(idx)
            dist = self.base.vae.encode(pixels(target, self.device, self.weight_dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    # -- one step ----------------------------------------------------------------

    def train_step(self) -> float:
        c, base, gen = self.config, self.base, self.generator
        idx = self.order.take(c.batch)
        cond, target, prompts = self.images.batch(idx)
        prompts, dropped = drop_prompts(prompts, c.prompt_drop, gen)
        self.dropped += dropped
        self.samples += len(prompts)
        with torch.no_grad():
            if self.latent_cache is not None:
                mean, std = self.latent_cache[0][idx], self.latent_cache[1][idx]
                latents = mean + std * torch.randn(mean.shape, generator=gen)
            else:
                dist = base.vae.encode(pixels(target, self.device, self.weight_dtype)).latent_dist
                latents = (dist.mean.float().cpu() + dist.std.float().cpu()
                           * torch.randn(dist.mean.shape, generator=gen))
            latents = latents * base.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps,
                                      (latents.shape[0],), generator=gen)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target_ = noise_target(self.noise_scheduler, latents, noise, timesteps)
            noisy, timesteps = noisy.to(self.device, self.weight_dtype), timesteps.to(self.device)
            hidden = self.prompts(prompts).to(self.weight_dtype)
            control = condition_pixels(cond, self.device, self.weight_dtype)
        with self.accelerator.autocast():
            down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=hidden,
                                        controlnet_cond=control, return_dict=False)
            pred = base.unet(noisy, timesteps, encoder_hidden_states=hidden,
                             down_block_additional_residuals=[
                                 r.to(self.weight_dtype) for r in down],
                             mid_block_additional_residual=mid.to(self.weight_dtype),
                             return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target_.to(self.device).float())
        self.accelerator.backward(loss)
        if c.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.controlnet.parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # -- loop ----------------------------------------------------------------------

    def run(self) -> Path:
        c = self.config
        check_output(self.out, c.resume)
        self.prepare()
        mark_output(self.out)
        (self.out / "train_config.json").write_text(json.dumps(c.as_dict(), indent=2) + "\n",
                                                    encoding="utf-8")
        while self.step < c.steps:
            loss = self.train_step()
            self.step += 1
            self.losses.append(loss)
            self._report_or_stop("train", self.step, loss)
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 \
                    and self.step < c.steps:
                self.save_checkpoint()
            if c.validation_every and self.step % c.validation_every == 0:
                self.validate()
        if c.validation_every and c.steps % c.validation_every:
            self.validate()
        self.save_checkpoint()
        self.save_final()
        self._report("done", self.step)
        return self.out

    def _report_or_stop(self, stage: str, step: int, loss: float = math.nan) -> None:
        """Report; if the callback raises (cancelled), checkpoint this step first."""
        try:
            self._report(stage, step, loss)
        except BaseException:
            if not self._has_checkpoint():
                log.info("training stopped at step %d; writing a checkpoint", self.step)
                self.save_checkpoint()
            raise

    def _has_checkpoint(self) -> bool:
        return (self.out / "checkpoints" / f"step-{self.step:06d}").is_dir()

    def _report(self, stage: str, step: int, loss: float = math.nan) -> None:
        if self.progress_fn is None:
            return
        recent = self.losses[-50:]
        lr = self.lr_scheduler.get_last_lr()[0] if hasattr(self, "lr_scheduler") else 0.0
        self.progress_fn(TrainProgress(stage, step, self.config.steps, loss,
                                       float(np.mean(recent)) if recent else math.nan, lr,
                                       time.monotonic() - self.started))

    # -- validation -------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> None:
        c = self.config
        self._report_or_stop("validate", self.step)
        controlnet = self.accelerator.unwrap_model(self.controlnet)
        controlnet.eval()
        try:
            pipe = controlnet_pipeline(self.base, controlnet)
            count = min(c.validation_count, len(self.images))
            rows = []
            if count:
                conds, targets, prompts = self.images.batch(list(range(count)))
                with self.accelerator.autocast():
                    result = pipe(prompt=prompts, image=[PILImage.fromarray(x) for x in conds],
                                  num_inference_steps=c.validation_steps,
                                  guidance_scale=c.validation_guidance,
                                  height=c.resolution, width=c.resolution, output_type="np",
                                  generator=[torch.Generator().manual_seed(c.seed + i)
                                             for i in range(count)]).images
                made = (np.clip(result, 0, 1) * 255).round().astype(np.uint8)
                rows = [[conds[i], made[i], targets[i]] for i in range(count)]
            entry: Dict[str, Any] = {"step": self.step}
            if rows:
                folder = self.out / "validation"
                folder.mkdir(parents=True, exist_ok=True)
                name = f"step-{self.step:06d}.png"
                PILImage.fromarray(image_grid(rows)).save(folder / name)
                entry["image"] = f"validation/{name}"
            if self.evaluate is not None:
                with self.accelerator.autocast():
                    entry["metrics"] = self.evaluate(self.step, pipe)
            entry["loss_avg"] = float(np.mean(self.losses[-50:])) if self.losses else None
            self.validation = [v for v in self.validation if v["step"] != self.step] + [entry]
            self._write_log()
        finally:
            controlnet.train()

    # -- checkpoints -------------------------------------------------------------------

    def _checkpoint_dirs(self) -> List[Path]:
        root = self.out / "checkpoints"
        return sorted(root.glob("step-*")) if root.is_dir() else []

    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints" / f"step-{self.step:06d}"
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.accelerator.unwrap_model(self.controlnet).save_pretrained(tmp / "controlnet")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        torch.save({"step": self.step, "generator": self.generator.get_state(),
                    "perm": self.order.perm, "pos": self.order.pos,
                    "dropped": self.dropped, "samples": self.samples}, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": self.step, "config": self.config.as_dict(), "losses": self.losses,
             "validation": self.validation}) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        kept = self.config.checkpoints_kept
        for old in self._checkpoint_dirs()[:-kept] if kept > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        self._write_log()
        return folder

    def _resume(self, which: str) -> None:
        if which == "latest":
            found = self._checkpoint_dirs()
            if not found:
                raise TrainingError(f"Nothing to resume: {self.out / 'checkpoints'} has no "
                                    f"checkpoint. Start without --resume.", field="resume")
            folder = found[-1]
        else:
            folder = Path(which)
        if not (folder / "state.pt").is_file():
            raise TrainingError(f"{folder} is not a training checkpoint (no state.pt).",
                                field="resume")
        saved = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        mine = self.config.as_dict()
        defaults = TrainConfig(data="", base="", out="").as_dict()
        keys = TRAJECTORY_KEYS + (("steps",) if mine["lr_schedule"] == "cosine" else ())
        differ = [k for k in keys if saved["config"].get(k, defaults[k]) != mine.get(k)]
        if differ:
            raise TrainingError(
                "Cannot resume with different settings: " + ", ".join(
                    f"{k} was {saved['config'].get(k)!r}, now {mine.get(k)!r}" for k in differ)
                + ". Resume with the checkpoint's settings (only steps may change, and not "
                "with the cosine schedule, which ends at steps).",
                field="resume")
        state = torch.load(folder / "state.pt", weights_only=True)
        if state["step"] > self.config.steps:
            raise TrainingError(f"The checkpoint is at step {state['step']}, beyond steps="
                                f"{self.config.steps}.", field="steps")
        net = ControlNetModel.from_pretrained(folder / "controlnet", local_files_only=True)
        self.accelerator.unwrap_model(self.controlnet).load_state_dict(net.state_dict())
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt",
                                                     weights_only=True))
        self.generator.set_state(state["generator"])
        self.order.perm, self.order.pos = state["perm"], int(state["pos"])
        self.step = int(state["step"])
        self.dropped, self.samples = int(state["dropped"]), int(state["samples"])
        self.losses = list(saved["losses"])
        self.validation = list(saved["validation"])
        log.info("resumed from %s at step %d", folder, self.step)

    # -- output ----------------------------------------------------------------------

    def _write_log(self) -> None:
        log_ = {"config": self.config.as_dict(), "step": self.step, "losses": self.losses,
                "validation": self.validation, "prompts_dropped": self.dropped,
                "samples_seen": self.samples,
                "seconds_this_run": round(time.monotonic() - self.started, 2)}
        (self.out / "training_log.json").write_text(json.dumps(log_) + "\n", encoding="utf-8")

    def save_final(self) -> None:
        net = self.accelerator.unwrap_model(self.controlnet)
        net.save_pretrained(self.out, safe_serialization=True)
        self._write_log()


def train_controlnet(config: TrainConfig, progress: Optional[ProgressFn] = None,
                     evaluate: Optional[EvaluateFn] = None) -> Path:
    """Train a ControlNet as ``config`` says; returns the output folder, which
    ``ControlNetModel.from_pretrained`` loads.  See the module docstring."""
    return _Run(config, progress, evaluate).run()
