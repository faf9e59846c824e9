"""Pieces both trainers share: loading a base model, prompts, pixels, freezing, saving.

Imports torch, diffusers and transformers at module level: import it only where
training actually happens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler,
                       StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import TrainingError
from .folders import base_path

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.0"


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion 1.x-shaped model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: Dict[str, Any]
    path: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_base_path(name: str) -> str:
    """A local folder or file as it is (``controlcanvas train`` in the user's own shell);
    anything else through the model catalogue. A client's ``train`` message resolves its
    base through ``folders.TrainRoots`` instead, before it gets here."""
    path = Path(name).expanduser()
    if path.is_dir() or path.is_file():
        return str(path)
    from backend.engines.catalogue import Catalogue, ModelConfig

    return base_path(name, Catalogue(ModelConfig(trust_request_paths=True)))


def load_base(name: str) -> BaseModel:
    """Load unet, vae, text encoder, tokenizer and noise schedule of ``name``
    (a diffusers folder, a single .safetensors file, or a catalogue name)."""
    where = resolve_base_path(name)
    path = Path(where)
    if path.is_file():
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                where, safety_checker=None, requires_safety_checker=False)
        except Exception as err:  # noqa: BLE001 - loaders raise many kinds; log, not client
            raise _unloadable(name, where, err) from None
        return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                         dict(pipe.scheduler.config), where)
    if (path / "text_encoder_2").is_dir():
        raise TrainingError(f"{where} is an SDXL model; training ControlNets for SDXL is not "
                            f"supported yet. Pick a Stable Diffusion 1.x base.", field="base")
    if not (path / "model_index.json").is_file():
        raise TrainingError(f"{where} is not a diffusers model folder (no model_index.json); "
                            f"pass a base model folder or a .safetensors file.", field="base")
    kwargs = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kwargs)
        scheduler_config = dict(DDIMScheduler.load_config(where, subfolder="scheduler", **kwargs))
    except Exception as err:  # noqa: BLE001 - loaders raise many kinds; log, not client
        raise _unloadable(name, where, err) from None
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler_config, where)


def _unloadable(name: str, where: str, err: BaseException) -> TrainingError:
    """The loader's own words go to the log only; the error names the model."""
    log.warning("could not load the base model %s: %s: %s", where, type(err).__name__, err)
    return TrainingError(f"Could not load the base model {name!r}: a file of it is missing or "
                         f"damaged; the server log says which.", field="base")


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def check_frozen(frozen: Mapping[str, torch.nn.Module], trainable: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    """Raise unless every frozen parameter has requires_grad False and the optimizer
    holds exactly the trainable module's parameters."""
    for name, module in frozen.items():
        wrong = [n for n, p in module.named_parameters() if p.requires_grad]
        if wrong:
            raise TrainingError(f"internal: the {name} must be frozen but {wrong[0]} "
                                f"(and {len(wrong) - 1} more) would be trained")
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    wanted = {id(p) for p in trainable.parameters() if p.requires_grad}
    if optimised != wanted:
        raise TrainingError("internal: the optimizer does not hold exactly the trainable "
                            "parameters")
    frozen_ids = {id(p) for m in frozen.values() for p in m.parameters()}
    if optimised & frozen_ids:
        raise TrainingError("internal: the optimizer holds frozen parameters")


def pixels(batch: np.ndarray, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """uint8 N x H x W x 3 -> N x 3 x H x W in [-1, 1] (the VAE's input)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return (tensor.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(dtype)


def condition_pixels(batch: np.ndarray, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """uint8 N x H x W x 3 -> N x 3 x H x W in [0, 1] (what the ControlNet pipeline feeds)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return (tensor.to(device=device, dtype=torch.float32) / 255.0).to(dtype)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as the Stable Diffusion pipelines make them."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class PromptCache:
    """Frozen text encoder outputs per prompt, each encoded alone (so a prompt's
    embedding never depends on what it was batched with)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 device: torch.device, max_entries: int = 4096) -> None:
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.max_entries = max_entries
        self._cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Iterable[str]) -> torch.Tensor:
        out = []
        for prompt in prompts:
            hidden = self._cache.get(prompt)
            if hidden is None:
                ids = tokenize(self.tokenizer, [prompt]).to(self.device)
                hidden = self.text_encoder(ids, return_dict=False)[0][0]
                if len(self._cache) < self.max_entries:
                    self._cache[prompt] = hidden
            out.append(hidden)
        return torch.stack(out)


def noise_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"Unsupported prediction type {kind!r} in the base model's scheduler.")


def sampling_scheduler(scheduler_config: Mapping[str, Any]) -> DDIMScheduler:
    """DDIM on the model's noise schedule (what validation and the fidelity metric use)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    config = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)


def controlnet_pipeline(base: BaseModel, controlnet: ControlNetModel
                        ) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnet, scheduler=sampling_scheduler(base.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_grid(rows: List[List[np.ndarray]]) -> np.ndarray:
    """Tile equally sized uint8 H x W x 3 arrays (rows of columns) with 2-px gaps."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2) - 2, cols * (w + 2) - 2, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile[..., :3]
    return grid


def write_model_index(folder: Path, scheduler_class: str = "DDIMScheduler") -> None:
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                   encoding="utf-8")
