"""The fast path: how the engine sets up a loaded model for speed, and what it reports.

:class:`FastPath` holds the choices; every one is an ``[engine]`` option in config.toml
(and some are ``serve`` flags).  Defaults are on where they are safe on CUDA and all off
on the CPU; a value set explicitly is honoured on any device (the tests and
``bench gpu --dry-run`` use that to run the same code on the CPU).

=================  ==============  =====================================================
option             CUDA default    what it does
=================  ==============  =====================================================
``sdpa``           on              attention through ``torch.nn.functional.
                                   scaled_dot_product_attention`` (``AttnProcessor2_0``;
                                   off: diffusers' plain ``AttnProcessor``, for debugging)
``fuse_qkv``       on              one matmul for q, k and v (self-attention) or k and v
                                   (cross-attention) in the UNet, the ControlNets and the
                                   VAE; the unfused projections are dropped, so it costs
                                   no memory
``channels_last``  on              NHWC memory format for the UNet, ControlNets and VAE
``compile``        off             ``torch.compile`` of the UNet and ControlNets (see
                                   ``compiled.py``): the first image at each new size
                                   pays the compilation (about a minute), so it is for
                                   sessions at one canvas size; ``compile_mode``
                                   (``default``, ``reduce-overhead`` = CUDA graphs,
                                   ``max-autotune``...), ``compile_shapes`` (sizes kept)
``vae_precision``  ``auto``        ``fp32``: the VAE runs in fp32 (inputs cast in, the
                                   encoded latents cast back), ``model``: in the model's
                                   dtype; ``auto``: fp32 exactly where diffusers would
                                   upcast (fp16 SDXL, whose VAE overflows to NaN = black
                                   images) unless an fp16-fix VAE is set
``sdxl_vae``       ``""``          an fp16-fix SDXL VAE (folder or cached hub id such as
                                   ``madebyollin/sdxl-vae-fp16-fix``) used instead of the
                                   model's own: fp16 speed without NaN
``taesd``          ``auto``        previews decoded by a tiny autoencoder (TAESD) instead
                                   of the linear latent approximation, when one is
                                   configured (``taesd_sd15``, ``taesd_sdxl``) or cached
                                   (``madebyollin/taesd``, ``madebyollin/taesdxl``);
                                   ``off``: always the linear approximation
=================  ==============  =====================================================

``fast_path = false`` turns the defaults of the first four off on CUDA too.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from shared.errors import ConfigError
from shared.images import Image

from ...imaging import from_array
from .loaders import dtype_kwargs

log = logging.getLogger(__name__)

Scalar = Union[bool, int, float, str]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
VAE_PRECISIONS = ("auto", "fp32", "model")
TAESD_CHOICES = ("auto", "off")
TAESD_REPOS = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
PREVIEW_SIDE = 256  # TAESD previews are scaled down to at most this side


@dataclass(frozen=True)
class FastPath:
    """The fast-path choices (see the module docstring)."""

    sdpa: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    compile_shapes: int = 4
    vae_precision: str = "auto"
    sdxl_vae: str = ""
    taesd: str = "off"
    taesd_sd15: str = ""
    taesd_sdxl: str = ""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], cuda: bool) -> "FastPath":
        """The choices for a device: CUDA defaults (or all off on the CPU, or with
        ``fast_path = false``), then every option given explicitly."""
        options = dict(options)
        on = _as_bool(options.pop("fast_path", True), "fast_path") and cuda
        values: Dict[str, Any] = dict(sdpa=on, fuse_qkv=on, channels_last=on,
                                      taesd="auto" if cuda else "off")
        for key, value in options.items():
            if key not in OPTION_NAMES:
                raise ConfigError(f"unknown fast-path option {key!r}; known: "
                                 f"{', '.join(sorted(OPTION_NAMES))}")
            values[key] = value
        return cls(**_checked(values))

    def describe(self) -> Dict[str, Scalar]:
        """What the doctor prints and the welcome carries (option -> value)."""
        out: Dict[str, Scalar] = {"sdpa": self.sdpa, "fuse_qkv": self.fuse_qkv,
                                  "channels_last": self.channels_last,
                                  "compile": self.compile_mode if self.compile else False,
                                  "vae_precision": self.vae_precision,
                                  "sdxl_vae": self.sdxl_vae or "model's own",
                                  "previews": "taesd" if self.taesd != "off" else "latent"}
        return out


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(FastPath)) | {"fast_path"}


def offload_setting(value: Any) -> Union[bool, str]:
    """``[engine] offload``: ``"auto"`` (plan each base's loading from its size and the free
    VRAM: :mod:`backend.engines.fit`), or true / false (model CPU offload always / never)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        return _as_bool(value, "offload")
    except ConfigError:
        raise ConfigError(f"[engine] offload must be \"auto\", true or false; got "
                          f"{value!r}") from None


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"[engine] {name} must be true or false; got {value!r}")


def _checked(values: Dict[str, Any]) -> Dict[str, Any]:
    for name in ("sdpa", "fuse_qkv", "channels_last", "compile"):
        if name in values:
            values[name] = _as_bool(values[name], name)
    choices = {"compile_mode": COMPILE_MODES, "vae_precision": VAE_PRECISIONS,
               "taesd": TAESD_CHOICES}
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            raise ConfigError(f"[engine] {name} must be one of {', '.join(allowed)}; got "
                             f"{values[name]!r}")
    if "compile_shapes" in values:
        shapes = values["compile_shapes"]
        if isinstance(shapes, bool) or not isinstance(shapes, (int, str)) or \
                not str(shapes).isdigit() or not 1 <= int(shapes) <= 8:
            raise ConfigError(f"[engine] compile_shapes must be a whole number from 1 to 8; "
                             f"got {shapes!r}")
        values["compile_shapes"] = int(shapes)
    for name in ("compile_backend", "sdxl_vae", "taesd_sd15", "taesd_sdxl"):
        if name in values and not isinstance(values[name], str):
            raise ConfigError(f"[engine] {name} must be a string; got {values[name]!r}")
    return values


# -----------------------------------------------------------------------------
# Device, precision and the report (the engine's info(), the doctor)
# -----------------------------------------------------------------------------

_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16",
           "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def choose_device(device: Optional[str] = None):
    """The torch device: as given, else CUDA when available, else the CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def choose_dtype(name: Optional[str], cuda: bool):
    """The torch dtype for ``fp16`` | ``bf16`` | ``fp32`` (default: fp16 on CUDA, else fp32)."""
    import torch

    if name is None:
        return torch.float16 if cuda else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}; got {name!r}")
    return getattr(torch, _DTYPES[name])


def dtype_name(dtype) -> str:
    return _SHORT.get(str(dtype).replace("torch.", ""), str(dtype))


def settings(device, dtype, offload: Union[bool, str], fast: FastPath,
             compile_failed: bool = False) -> Dict[str, Scalar]:
    """Device, precision, offload and the fast path, as the doctor and the welcome show it."""
    out: Dict[str, Scalar] = {"device": str(device), "dtype": dtype_name(dtype),
                              "offload": offload if offload == "auto" else bool(offload)}
    out.update(fast.describe())
    if offload is True and out["compile"]:
        out["compile"] = False  # offload wraps forward itself: compile stays off
    elif compile_failed and out["compile"]:
        out["compile"] = "eager (failed)"
    return out


def planned_settings(options: Mapping[str, Any]) -> Dict[str, Scalar]:
    """What an engine built from these ``[engine]`` options would report, without loading
    a model (``controlcanvas doctor``)."""
    device = choose_device(options.get("device"))
    cuda = device.type == "cuda"
    fast = FastPath.from_options({k: v for k, v in options.items() if k in OPTION_NAMES}, cuda)
    offload = offload_setting(options.get("offload")) if cuda else False
    return settings(device, choose_dtype(options.get("dtype"), cuda), offload, fast)


# -----------------------------------------------------------------------------
# Applying the choices to loaded models (torch is imported here, when a model loads)
# -----------------------------------------------------------------------------

def prepare_model(model, fast: FastPath, label: str, stats: Dict[str, Any],
                  compile_it: bool = False) -> Dict[str, Scalar]:
    """Attention processor, fused projections, memory format and (optionally) compile, in
    that order, on a UNet, ControlNet or VAE; returns what was done (for the log)."""
    import torch

    done: Dict[str, Scalar] = {}
    if fast.sdpa or fast.fuse_qkv:
        done["attention"] = _set_attention(model, fast, label)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if compile_it and fast.compile:
        from .compiled import compile_module
        compile_module(model, label, mode=fast.compile_mode, backend=fast.compile_backend,
                       shapes=fast.compile_shapes, stats=stats)
        done["compile"] = fast.compile_mode
    return done


def prepare_pipeline(pipe, fast: FastPath, family: str, dtype, stats: Dict[str, Any],
                     name: str = "the model", compile_it: bool = True) -> bool:
    """The fast path on a pipeline's UNet and VAE (its device already set), and the VAE's
    precision; returns whether the VAE is kept in fp32 (``vae_in_fp32``)."""
    prepare_model(pipe.unet, fast, f"UNet of {name}", stats, compile_it=compile_it)
    prepare_model(pipe.vae, fast, f"VAE of {name}", stats)
    fp32 = wants_fp32_vae(fast, pipe.vae, dtype, family)
    if fp32:
        vae_in_fp32(pipe.vae, dtype)
    log.info("fast path for %s: attention %s, VAE %s%s", name, loaded_attention(pipe.unet),
             "fp32" if fp32 else dtype_name(pipe.vae.dtype),
             ", compiled UNet" if compile_it and fast.compile else "")
    return fp32


def _set_attention(model, fast: FastPath, label: str) -> str:
    from diffusers.models.attention_processor import (Attention, AttnProcessor,
                                                      AttnProcessor2_0, FusedAttnProcessor2_0)

    if not hasattr(model, "set_attn_processor"):
        return "unchanged"
    if fast.fuse_qkv:
        processors = getattr(model, "attn_processors", {})
        if any("Added" in type(p).__name__ for p in processors.values()):
            log.info("%s: added-KV attention cannot be fused; plain SDPA instead", label)
        else:
            for module in model.modules():
                if isinstance(module, Attention) and not module.fused_projections:
                    _fuse(module)
            model.set_attn_processor(FusedAttnProcessor2_0())
            return "FusedAttnProcessor2_0"
    processor = AttnProcessor2_0() if fast.sdpa else AttnProcessor()
    model.set_attn_processor(processor)
    return type(processor).__name__


def _fuse(attn) -> None:
    """diffusers' ``fuse_projections``, then the projections the fused processor no longer
    reads are dropped (diffusers keeps them: up to 1 GB of duplicate SDXL weights)."""
    attn.fuse_projections(fuse=True)
    unused = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
    for name in unused:
        setattr(attn, name, None)


# -- the VAE --------------------------------------------------------------------

def wants_fp32_vae(fast: FastPath, vae, dtype, family: str) -> bool:
    """``auto``: fp32 where diffusers itself would upcast the decode (fp16 SDXL whose VAE
    says ``force_upcast``); an fp16-fix VAE says it does not need to."""
    import torch

    if fast.vae_precision == "fp32":
        return True
    if fast.vae_precision == "model":
        return False
    return dtype == torch.float16 and family == "sdxl" and \
        bool(getattr(vae.config, "force_upcast", False))


def vae_in_fp32(vae, compute_dtype) -> None:
    """Keep ``vae`` in fp32 inside a pipeline whose other models use ``compute_dtype``:
    inputs are cast to fp32 on the way in; the latents the encoder makes are cast back to
    ``compute_dtype`` (the pipelines feed them to the UNet as they are).  The VAE's
    ``force_upcast`` is cleared: the SDXL pipelines would otherwise cast it back and forth
    around every encode and decode.  Idempotent: call it again after ``from_pipe``, which
    casts every component to the pipeline's dtype."""
    import torch

    vae.to(dtype=torch.float32)
    if getattr(vae, "_controlcanvas_fp32", None) is not None:
        return
    if hasattr(vae.config, "force_upcast"):
        vae.register_to_config(force_upcast=False)

    def cast_in(module, args):
        # to the weights' dtype: fp32, unless a pipeline cast the VAE itself (MPS)
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)

    def cast_out(module, args, output):
        return output.to(compute_dtype) if torch.is_tensor(output) else output

    handles = [m.register_forward_pre_hook(cast_in)
               for m in (vae.encoder, vae.decoder, getattr(vae, "quant_conv", None),
                         getattr(vae, "post_quant_conv", None)) if m is not None]
    last = getattr(vae, "quant_conv", None) or vae.encoder
    handles.append(last.register_forward_hook(cast_out))
    vae._controlcanvas_fp32 = handles


def find_model_folder(reference: str, catalogue) -> Optional[Path]:
    """A single-model folder (``config.json`` + weights): a path, or a hub id in the cache."""
    if not reference:
        return None
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    return catalogue.cached_snapshot(reference, "controlnet")


def load_sdxl_vae(fast: FastPath, catalogue, dtype):
    """The configured fp16-fix SDXL VAE, or None.  A configured one that cannot be found is
    an error that says so (a silent fall back would bring the black images back)."""
    if not fast.sdxl_vae:
        return None
    from diffusers import AutoencoderKL

    from shared.errors import ModelMissing

    folder = find_model_folder(fast.sdxl_vae, catalogue)
    if folder is None:
        raise ModelMissing(f"The SDXL VAE {fast.sdxl_vae!r} set as [engine] sdxl_vae is not on "
                           f"this machine: `controlcanvas models download {fast.sdxl_vae}`, or "
                           f"point sdxl_vae at its folder.", field="sdxl_vae")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, **dtype_kwargs(dtype))


# -- TAESD previews ------------------------------------------------------------------

class TinyPreviews:
    """Previews decoded by TAESD (``AutoencoderTiny``), loaded once per family on first use;
    ``decode`` returns None where there is none (the engine then uses the linear
    approximation)."""

    def __init__(self, fast: FastPath, catalogue, dtype, device) -> None:
        self.fast = fast
        self.catalogue = catalogue
        self.dtype = dtype
        self.device = device
        self._models: Dict[str, Any] = {}

    def model(self, family: str):
        if self.fast.taesd == "off":
            return None
        if family not in self._models:
            self._models[family] = self._load(family)
        return self._models[family]

    def _load(self, family: str):
        from diffusers import AutoencoderTiny

        configured = getattr(self.fast, f"taesd_{family}", "")
        folder = find_model_folder(configured or TAESD_REPOS.get(family, ""), self.catalogue)
        if folder is None:
            if configured:
                log.warning("taesd_%s = %r not found; previews use the latent approximation",
                            family, configured)
            return None
        try:
            model = AutoencoderTiny.from_pretrained(folder, local_files_only=True,
                                                    **dtype_kwargs(self.dtype))
        except Exception as err:  # noqa: BLE001 - a broken preview model must not fail jobs
            log.warning("could not load TAESD from %s (%s); previews use the latent "
                        "approximation", folder, err)
            return None
        log.info("previews decoded by TAESD from %s", folder)
        return model.to(self.device).eval()

    def decode(self, latents, family: str) -> Optional[Image]:
        """The first latent of the batch as an RGBA preview (at most PREVIEW_SIDE pixels a
        side), or None without a TAESD for ``family``."""
        import torch
        import torch.nn.functional as F

        model = self.model(family)
        if model is None or latents.shape[1] != model.config.latent_channels:
            return None
        with torch.no_grad():
            image = model.decode(latents[:1].to(self.device, self.dtype)).sample
            scale = PREVIEW_SIDE / max(image.shape[-2:])
            if scale < 1.0:
                image = F.interpolate(image.float(), scale_factor=scale, mode="area")
            rgb = ((image[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        rgb = rgb.permute(1, 2, 0).cpu().numpy()
        out = np.empty(rgb.shape[:2] + (4,), np.uint8)
        out[..., :3] = rgb
        out[..., 3] = 255
        return from_array(out)


def loaded_attention(model) -> str:
    """The attention processor a loaded model uses now (for the report)."""
    processors = getattr(model, "attn_processors", None) or {}
    names = sorted({type(p).__name__ for p in processors.values()})
    return ",".join(names) or "none"
