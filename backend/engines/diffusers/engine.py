"""DiffusersEngine: ControlNet generation with diffusers (SD1.5 and SDXL, each also with a
9-channel inpainting UNet; classic and union ControlNets; the transformer bases Flux.1 and
SD3 / SD3.5, whose differences - pipelines, units, guidance, sizes in multiples of 16,
scheduler, previews - live in :mod:`.dit`: the steps below ask ``dit_family`` and
dispatch).

This module imports torch and diffusers; nothing else in ``backend`` does at
import time.  It is called from the job worker thread only (one thread owns the
GPU), so it keeps its caches without locks.

How one request becomes pixels (``generate``):

1. **Models.** The base model and each unit's ControlNet are resolved by
   :class:`backend.engines.catalogue.Catalogue` (hub cache, folder, single file, or the
   built-in tiny stack; what each is - family, inpainting UNet, union ControlNet - comes
   from :mod:`backend.engines.families`) and loaded once (:mod:`.loaders`).  Loaded bases
   and ControlNets live in
   one LRU bounded by a memory budget.  The pipelines for each mode are made
   from the loaded base with ``from_pipe`` (shared modules, no reload) and kept.
   The request's LoRAs (``request.loras``, files of the LoRA folder) are loaded into the
   base as adapters and kept there; each request sets which are active and how strong
   (:mod:`.lora`), so switching LoRAs reloads nothing.  The request's references
   (``request.references``: IP-Adapter units) load their adapters into the base once and
   are switched on and off per request the same way (:mod:`.ipadapter`).
2. **Geometry.** The *region* is the whole canvas, or for inpaint the bounding
   box of the selection plus a margin of context.  The region is generated at
   the model's *native scale*: the area is brought into [N², (1.5 N)²] where
   N = ``unet.config.sample_size * vae_scale_factor`` (512 for SD1.5, 1024 for
   SDXL, 64 for the tiny model), keeping the aspect ratio, sides multiples of 8.
   The result is resized back to exactly the region's size.  A model trained on squares
   only (``square_only``, the demo) generates txt2img on a non-square canvas on the square
   around the control strokes (:func:`geometry.square_region`) and paints the rest of the
   canvas with that square's background.  With ``hires`` a
   second img2img pass runs at up to ``hires_scale`` x the work size (VAE tiling
   on above ``vae_tiling_pixels``).
3. **Control images** are mapped onto the canvas with the unit's resize mode
   (see :func:`fit_image`), cropped to the region and resized to the work size.
   Transparent pixels count as black (no control); the init image is composited
   on white.
4. **Units.** All units go through :class:`ControlUnits`, a
   ``MultiControlNetModel`` that applies each unit's control mode on its own:

   * ``balanced``: residuals x weight, in both halves of the CFG batch.
   * ``control`` ("ControlNet is more important") = diffusers' guess mode for
     this unit only: the ControlNet sees the conditional half of the batch, the
     unconditional half gets no control, and the residuals are scaled over depth
     by ``logspace(-1, 0)`` (0.1 at the first block ... 1.0 at the middle block).
   * ``prompt`` ("prompt is more important"): A1111's soft injection - residual k
     of n (mid block last) is scaled by ``weight * 0.825 ** (n - 1 - k)``, so the
     shallow, detail-carrying residuals are damped (to 0.1 for SD1.5's 13) while
     the deep ones keep their strength; both CFG halves get control.

   A unit whose scale is 0 at a step (weight 0, or outside its start/end range)
   is not run at all; when no unit runs the UNet gets no residuals, so weight 0
   is exactly "no control".  The units served by one union ControlNet (SDXL's default)
   with the same control mode run as one call with one control type each.  A unit whose
   model is a T2I-Adapter is no ControlNet: :mod:`.adapters` gives its features to the
   UNet of the same pipeline (every mode, beside ControlNet units).  A ControlNet's
   quirks (SD1.5 lineart_anime: clip skip 2, no guess mode) come from the families table.
5. **Inpaint.** Only the selection changes: the generated region is pasted back
   with a feathered weight that is zero outside the selection, and every pixel
   with weight zero is copied from the input unchanged (bit for bit).
6. **Progress, cancel, previews** through ``callback_on_step_end``: every step
   calls ``ctx.progress`` and, when asked, sends a preview made by a linear
   latent->RGB approximation.  Cancel is also checked before every block of the
   UNet, the ControlNets, the text encoder and the VAE (forward pre-hooks), so a
   cancelled job stops within a fraction of a step, also while encoding or decoding.
7. **Memory and speed.** CUDA fp16 (or bf16) when available, else CPU fp32; the fast
   path of :mod:`.acceleration` (SDPA, fused QKV, channels-last, optional
   ``torch.compile``, the VAE in fp32 where fp16 would overflow, TAESD previews) is
   applied to every model as it loads; optional model CPU offload; VAE tiling above a
   pixel threshold.  A CUDA out-of-memory error frees the caches and retries once
   with VAE tiling and CPU offload on (compile off); a second one raises
   :class:`OutOfMemory`.  A decoded image with NaN/inf pixels is counted
   (``stats["nonfinite"]``) and logged with what to change.

Batches run image by image with seeds ``request.seeds(request.seed)``, so image
i of a batch is the same image as a single generation with its seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image as PILImage

from diffusers import ControlNetModel

from shared.errors import (ConfigError, ControlCanvasError, EngineError, ModelMissing, OutOfMemory,
                           Unsupported)
from shared.images import Image
from shared.messages import GenerateRequest, Models, Preprocess

from ...annotators.controls import ControlCache, prepare_controls
from ...annotators.library import annotate, list_annotators
from ...annotators.registry import Annotated
from ...imaging import from_array, to_array
from ..base import Generated, JobContext, step_boundary
from ..catalogue import DEMO_BASE, Catalogue, ModelConfig, Resolved
from ..families import REFERENCE_CONTROLS, check_unit, quirks, union_control_type
from ..presets import Sampling, apply_preset, check_family
from ..tiny import quiet_progress_bars
from .adapters import AdapterUnits, check_adapter_fits, check_adapter_unit, read_adapter
from .acceleration import (OPTION_NAMES as FAST_OPTIONS, FastPath, TinyPreviews, choose_device,
                           choose_dtype, dtype_name, load_sdxl_vae, offload_setting, prepare_model,
                           prepare_pipeline, settings, vae_in_fp32)
from .cache import (BaseEntry, NetEntry, default_budget, disk_bytes, free_memory,
                    is_out_of_memory, module_bytes)
from .compiled import uncompile
from .devices import available_ram, free_bytes
from .. import fit
from .. import quantize as quantization
from .dit_families import dit_family
from .edit import EDIT_KINDS, check_edit, edit_kind, reference_arrays
from .geometry import (INPAINT_MARGIN_FRACTION, INPAINT_MIN_MARGIN, Pass, Plan, denoise_steps,
                       crop_padded, feather_weights, fit_image, mask_values, region_of, resize,
                       rgb_on_black, rgb_on_white, square_region, work_size)
from .loaders import dtype_kwargs, pipe_from_pipe, read_base, read_controlnet
from .ipadapter import prepare_references
from .lora import apply_loras
from .reuse import PROMPT_CACHE_SIZE, control_window, prompt_kwargs
from .pipelines import (PIPELINES, cancel_points, control_image, full_mask_pass,
                        inpaint_condition, latent_preview)
from .samplers import make_scheduler
from .units import ControlUnits

log = logging.getLogger(__name__)


class _QuietCasts(logging.Filter):
    """Drop diffusers' warning about ``.to(dtype)`` on models that keep no fp32 modules
    (from_pipe and SDXL's VAE upcast trigger it on every call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_QuietCasts())


def _note_long_prompts(pipe, request) -> None:
    """One short line for a prompt longer than CLIP reads (instead of the library's dump of
    the cut-off text, which the CLI silences)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", 0) or 0
    for what, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not text or tokenizer is None or len(text) < limit:  # fewer characters than tokens
            continue
        count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if count > limit:
            log.warning("%s is %d tokens; CLIP reads the first %d", what, count, limit)

def _log_unloadable(resolved: Resolved, err: BaseException) -> None:
    """A loader's own words (paths, library internals) go to the server log only: the
    client gets our sentence naming the model."""
    log.warning("could not load the %s %r from %s: %s: %s", resolved.kind, resolved.name,
                resolved.path, type(err).__name__, err)


class DiffusersEngine:
    """The real engine; see the module docstring.

    ``catalogue`` resolves names (default: ``Catalogue(ModelConfig.from_toml())``).
    ``device``: "cuda", "cpu", ... (default: CUDA when available).  ``dtype``:
    "fp16" | "bf16" | "fp32" (default fp16 on CUDA, fp32 on CPU).  ``offload``:
    ``"auto"`` (default): each base's loading is planned from its size and the GPU's free
    memory (:mod:`backend.engines.fit`: all on the GPU, model or sequential CPU offload, or
    ``DoesNotFit``); True: model CPU offload always; False: all on the GPU (CUDA only).  ``memory_budget``: bytes of loaded models kept
    (default 90 % of VRAM on CUDA, half the RAM on CPU).  ``fast_options``: the options of
    :class:`~.acceleration.FastPath` (defaults: on where safe on CUDA, off on the CPU).
    """

    name = "diffusers"

    def __init__(self, catalogue: Optional[Catalogue] = None, *, device: Optional[str] = None,
                 dtype: Optional[str] = None, offload: Union[bool, str] = "auto",
                 memory_budget: Optional[int] = None, vae_tiling_pixels: Optional[int] = None,
                 max_work_scale: float = 1.5, hires_scale: float = 2.0,
                 hires_strength: float = 0.35,
                 inpaint_margin: float = INPAINT_MARGIN_FRACTION,
                 inpaint_min_margin: int = INPAINT_MIN_MARGIN, feather: float = 0.015,
                 square_only: bool = False, cpu_threads: Optional[int] = None,
                 fast_options: Optional[Mapping[str, Any]] = None,
                 prompt_cache: int = PROMPT_CACHE_SIZE, control_cache: int = 16,
                 quantize: str = "none") -> None:
        if cpu_threads:
            # Process-wide. On a CPU that other programs keep busy, fewer intra-op threads
            # than cores avoids stalls at OpenMP barriers (measured on 2 cores with one
            # busy: the tiny model's step 33 -> 15 ms, cancel p95 90 -> 4 ms with 1 thread).
            torch.set_num_threads(int(cpu_threads))
        self.catalogue = catalogue or Catalogue(ModelConfig.from_toml())
        self.device = choose_device(device)
        cuda = self.device.type == "cuda"
        self.dtype = choose_dtype(dtype, cuda)
        self.offload_setting = offload_setting(offload)
        self.offload = self.offload_setting is True and cuda
        self.loadings: Dict[str, "fit.Plan"] = {}  # base name -> its planned loading
        self.quantize = quantization.choose(quantize, self.device.type)  # [engine] quantize
        if self.quantize.reason:
            log.warning("[engine] quantize = %r: %s", self.quantize.setting,
                        self.quantize.reason)
        if self.offload_setting is True and not cuda:
            log.warning("CPU offload needs CUDA; ignored on %s", self.device)
        self.fast = FastPath.from_options(fast_options or {}, cuda)
        self.previews = TinyPreviews(self.fast, self.catalogue, self.dtype, self.device)
        self.memory_budget = memory_budget or default_budget(self.device, self.offload)
        self.vae_tiling_pixels = vae_tiling_pixels
        self.max_work_scale = max_work_scale
        self.hires_scale = hires_scale
        self.hires_strength = hires_strength
        self.inpaint_margin = inpaint_margin
        self.inpaint_min_margin = inpaint_min_margin
        self.feather = feather
        # A model trained on squares only (the demo): txt2img on a non-square canvas is
        # generated on the square around the drawing (geometry.square_region) and placed back.
        self.square_only = square_only
        self._bases: "OrderedDict[str, BaseEntry]" = OrderedDict()
        self._nets: "OrderedDict[str, NetEntry]" = OrderedDict()
        self.last_plan: Optional[Plan] = None
        self.stats: Dict[str, Any] = {"oom_retries": 0, "loads": 0, "nonfinite": 0,
                                      "compile_s": 0.0, "compile_fallbacks": 0,
                                      "lora_loads": 0, "ip_adapter_loads": 0,
                                      "prompt_cache_hits": 0,
                                      "prompt_cache_misses": 0}
        # live painting: same-shape jobs reuse prompt embeddings and control images
        # (.reuse), and a job may run in another's pause between two steps
        self.prompt_cache_size = prompt_cache
        self.controls_cache = ControlCache(control_cache)
        self._depth = 0  # > 0 while a job runs in another job's pause
        self._started = 0  # generate calls so far
        self._in_use: List[List[str]] = []  # model keys of the jobs running (outer first)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None,
                     config_file: Optional[Path] = None) -> "DiffusersEngine":
        """Build from ``[engine]`` options (device, dtype, offload, quantize, memory_budget_gb,
        vae_tiling_pixels, hires_scale, hires_strength, cpu_threads and the fast-path
        options of :class:`~.acceleration.FastPath`) and the config file's model tables.
        ``trust_request_paths``: requests may name any local model path (a server only the
        user's own command talks to: ``controlcanvas generate`` without ``--url``);
        ``lora_dir`` (``serve --lora-dir``) overrides the file's ``[models] lora_dir``."""
        options = dict(options or {})
        models = ModelConfig.from_toml(config_file)
        if options.pop("trust_request_paths", False):
            models = dataclasses.replace(models, trust_request_paths=True)
        lora_dir = options.pop("lora_dir", None)
        if lora_dir:
            models = dataclasses.replace(models, lora_dir=str(lora_dir))
        return cls(Catalogue(models), **engine_options(options))

    @classmethod
    def embedded(cls, device: Optional[str] = None, family: str = "sd15",
                 tiny_root: Optional[str] = None, lora_dir: Optional[str] = None,
                 **options) -> "DiffusersEngine":
        """The engine on the random-weight tiny models (built locally, every condition):
        for tests and benchmarks; requests with an empty base_model use them."""
        return cls(Catalogue(ModelConfig(base=f"tiny-{family}", tiny_root=tiny_root,
                                         lora_dir=str(lora_dir) if lora_dir else None)),
                   device=device, **engine_options(options))

    @classmethod
    def demo(cls, device: Optional[str] = None, lora_dir: Optional[str] = None,
             **options) -> "DiffusersEngine":
        """The engine on the embedded trained demo model (``shapes-demo``: a coloured shape
        where its outline is drawn): what ``controlcanvas demo`` runs. It generates at the
        64-pixel size it was trained at (no larger work size), whatever the canvas. It was
        trained on 64² squares only, so on a non-square canvas it generates the square around
        the drawing (no drawing: the centred square) and paints the rest of the canvas with
        that square's background (``square_only``)."""
        options.setdefault("square_only", True)
        engine = cls(Catalogue(ModelConfig(base=DEMO_BASE,
                                           lora_dir=str(lora_dir) if lora_dir else None)),
                     device=device, max_work_scale=1.0, **engine_options(options))
        engine.name = "demo"  # what the log and the plug-ins' welcome call it
        return engine

    # -- Engine protocol -----------------------------------------------------

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        try:
            return self._generate(request, images, ctx, low_memory=False)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if self._depth:  # in another job's pause: no offload switch under its feet
                raise OutOfMemory(f"Out of memory at {request.width}x{request.height} while "
                                  f"another job was paused; try again when it is done, or "
                                  f"make the frame smaller.") from None
            log.warning("out of memory; freeing caches and retrying with VAE tiling%s",
                        " and CPU offload" if self.device.type == "cuda" else "")
        # (Leaving the except block dropped the traceback and the tensors it held.)
        self._free_memory()
        self.stats["oom_retries"] += 1
        if self.device.type == "cuda" and not self.offload:
            self._turn_on_offload()
        try:
            return self._generate(request, images, ctx, low_memory=True)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
        self._free_memory()
        raise OutOfMemory(
            f"Out of memory at {request.width}x{request.height} (batch {request.batch}"
            f"{', hires' if request.hires else ''}) even with VAE tiling and CPU offload. Lower "
            f"the size or the batch, turn off hires, use fewer control units, or close other "
            f"programs using the GPU.")

    def _turn_on_offload(self) -> None:
        """Model CPU offload from now on (the next jobs would run out of memory too).
        Offload wraps each model's forward itself, so compiled models go back to eager."""
        self.offload = True
        for entry in self._bases.values():
            entry.offload_owner = None
            uncompile(getattr(entry.pipe, "unet", None) or entry.pipe.transformer)
        for net in self._nets.values():
            uncompile(net.model)

    def info(self) -> Dict[str, Any]:
        """What the doctor prints and the welcome carries: device, precision, offload and
        the fast-path choices (``compile`` says ``eager (failed)`` after a fall back)."""
        info = settings(self.device, self.dtype, self.offload, self.fast,
                        compile_failed=bool(self.stats["compile_fallbacks"]))
        if self._plans_loading() and not self.offload:
            info["offload"] = "auto"
        info["quantize"] = self.quantize.label()
        if self.loadings:
            info["loading"] = "; ".join(f"{name}: {plan.line()}"
                                        for name, plan in self.loadings.items())
        return info

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        """The annotator registry (backend.annotators.library); "none" is the layer itself."""
        return annotate(message, image, ctx)

    def models(self) -> Models:
        return self.catalogue.models_message(annotators=list_annotators())

    def close(self) -> None:
        self._bases.clear()
        self._nets.clear()
        self._free_memory()

    # -- loading -------------------------------------------------------------

    def _load_base(self, resolved: Resolved, keep: Sequence[str] = ()) -> BaseEntry:
        key = resolved.key
        entry = self._bases.get(key)
        if entry is not None:
            self._bases.move_to_end(key)
            return entry
        self._make_room(disk_bytes(resolved.path), keep=keep)
        family = resolved.family
        loading = self._plan_loading(resolved)
        dit = dit_family(family)
        cls, kwargs = dit.base_pipeline(resolved) if dit else \
            (PIPELINES[(family, "txt2img", False)], {})
        if family == "sd15":
            kwargs.update(safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
        try:
            with quiet_progress_bars():
                pipe = read_base(resolved, cls, self.dtype, self.catalogue,
                                 quantize=self.quantize, **kwargs)
        except ModelMissing:
            raise  # the loader said what is missing and what to do (loaders)
        except Exception as err:  # noqa: BLE001 - loaders raise many kinds; say which model
            if is_out_of_memory(err):
                raise
            hint = ""
            if resolved.source == "file":
                hint = (f" Loading a single file needs the small diffusers config of "
                        f"{family.upper()}: run it once online, or `controlcanvas models "
                        f"download {family}`.")
            _log_unloadable(resolved, err)
            raise ModelMissing(f"Could not load the base model {resolved.name!r}: a file of it "
                               f"is missing or damaged; the server log says which.{hint}",
                               field="base_model") from None
        pipe.set_progress_bar_config(disable=True)
        vae_fp32 = self._prepare_base(pipe, family, resolved.name)
        native = resolved.native_size if dit else \
            int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        entry = BaseEntry(resolved, pipe, family, native, dict(pipe.scheduler.config),
                          module_bytes(*pipe.components.values()), vae_fp32=vae_fp32,
                          loading=loading)
        self._bases[key] = entry
        self.stats["loads"] += 1
        log.info("loaded base %s (%s, %.0f MB)", resolved.name, family, entry.nbytes / 2**20)
        return entry

    def _plan_loading(self, resolved: Resolved) -> str:
        """With ``offload = "auto"`` on CUDA: the loading :mod:`..fit` plans for this base
        from its size and the free memory (model or sequential offload turn the engine's
        offload on); raises DoesNotFit when nothing fits.  Else what the setting says."""
        if not self._plans_loading():
            return "model" if self.offload else "gpu"
        quantized = self.quantize.setting if self.quantize.active and \
            resolved.source != "file" else "none"  # a single file loads as stored
        plan = fit.plan_base(resolved.name, resolved.family, resolved.path,
                             dtype_name(self.dtype), free_bytes(str(self.device)),
                             available_ram(), quantize=quantized)
        self.loadings[resolved.name] = plan
        log.info("loading %s: %s", resolved.name, plan.line())
        if plan.choice != "gpu" and not self.offload:
            self._turn_on_offload()
        return plan.choice

    def _plans_loading(self) -> bool:
        return self.device.type == "cuda" and self.offload_setting == "auto"

    def _prepare_base(self, pipe, family: str, name: str) -> bool:
        """The fast path on a freshly loaded base (see .acceleration), on its device.
        Returns whether its VAE is kept in fp32."""
        fixed_vae = load_sdxl_vae(self.fast, self.catalogue, self.dtype) \
            if family == "sdxl" else None
        if fixed_vae is not None:
            pipe.register_modules(vae=fixed_vae)
        if not self.offload:
            pipe.to(self.device)
        if dit_family(family):  # its own attention processors; compile only (.dit)
            if self.fast.compile and not self.offload:
                prepare_model(pipe.transformer, dataclasses.replace(
                    self.fast, sdpa=False, fuse_qkv=False, channels_last=False),
                    f"transformer of {name}", self.stats, compile_it=True)
            return False
        return prepare_pipeline(pipe, self.fast, family, self.dtype, self.stats, name,
                                compile_it=not self.offload)

    def _load_net(self, resolved: Resolved, keep: Sequence[str]) -> ControlNetModel:
        key = resolved.key
        entry = self._nets.get(key)
        if entry is not None:
            self._nets.move_to_end(key)
            return entry.model
        self._make_room(disk_bytes(resolved.path), keep=keep)
        try:
            with quiet_progress_bars():
                dit = dit_family(resolved.family)
                if resolved.adapter:
                    model = read_adapter(resolved, self.dtype)
                elif dit:
                    model = dit.read_controlnet(resolved, self.dtype)
                else:
                    model = read_controlnet(resolved, self.dtype, self.catalogue)
        except ControlCanvasError:
            raise  # our loader's own typed error says what to do
        except Exception as err:  # noqa: BLE001 - loaders raise many kinds; say which model
            if is_out_of_memory(err):
                raise
            _log_unloadable(resolved, err)
            raise ModelMissing(f"Could not load the ControlNet {resolved.name!r}: a file of it "
                               f"is missing or damaged; the server log says which.",
                               field="model") from None
        if not self.offload:
            model.to(self.device)
        model.eval()
        if not dit_family(resolved.family):
            prepare_model(model, self.fast, f"ControlNet {resolved.name}", self.stats,
                          compile_it=not self.offload)
        self._nets[key] = NetEntry(model, module_bytes(model))
        self.stats["loads"] += 1
        return model

    def _make_room(self, needed: int, keep: Sequence[str]) -> None:
        """Evict least recently used models until ``needed`` more bytes fit the budget."""
        def used() -> int:
            return sum(e.nbytes for e in self._bases.values()) + \
                sum(n.nbytes for n in self._nets.values())

        keep = set(keep).union(*self._in_use)  # the paused job's models stay too
        evicted = False
        while used() + needed > self.memory_budget:
            # Least recently used first; ControlNets go before bases (cheaper to reload).
            victims = [("net", k) for k in self._nets if k not in keep] + \
                [("base", k) for k in self._bases if k not in keep]
            if not victims:
                break
            kind, key = victims[0]
            if kind == "net":
                del self._nets[key]
            else:
                del self._bases[key]
            log.info("evicted %s %s to stay within the memory budget", kind, key)
            evicted = True
        if evicted:
            self._free_memory()

    def _free_memory(self) -> None:
        free_memory()

    def _pipeline(self, entry: BaseEntry, mode: str, controls: bool, units: Optional[ControlUnits],
                  request: Optional[GenerateRequest] = None):
        dit = dit_family(entry.family)
        cls = dit.pipeline_class(mode, controls, request, entry.resolved) if dit else \
            PIPELINES[(entry.family, mode, controls)]
        # a job run in another's pause gets pipelines of its own (a pipeline keeps its
        # call's state in attributes); they share every model with the paused job's
        pipes = entry.nested_pipes if self._depth else entry.pipes
        pipe = pipes.get(cls)
        if pipe is None:
            if cls is type(entry.pipe) and not self._depth:
                pipe = entry.pipe
            elif controls:
                pipe = pipe_from_pipe(cls, entry.pipe, self.dtype, controlnet=units)
            else:
                pipe = pipe_from_pipe(cls, entry.pipe, self.dtype)
            if entry.vae_fp32:  # from_pipe cast the shared VAE to the pipeline's dtype
                vae_in_fp32(pipe.vae, self.dtype)
            pipe.set_progress_bar_config(disable=True)
            pipes[cls] = pipe
        if controls:
            pipe.controlnet = units
        if self.offload and (entry.offload_owner is not pipe or controls):
            if entry.loading == "sequential":  # the last resort: one block at a time
                pipe.enable_sequential_cpu_offload(device=self.device)
            else:
                pipe.enable_model_cpu_offload(device=self.device)
            entry.offload_owner = pipe
        return pipe

    # -- planning ------------------------------------------------------------

    def _annotate(self, request: GenerateRequest, images: Mapping[int, Image],
                  entry: BaseEntry) -> Tuple[GenerateRequest, Mapping[int, Image]]:
        """Run units' annotators (and render poses) at the scale the region is generated at
        (with the hires pass: its scale), never above the canvas' own resolution."""
        if not any(u.preprocessor != "none" or getattr(u, "pose", None) is not None
                   for u in request.controls):
            return request, images

        W, H = request.width, request.height
        side = math.sqrt(W * H)
        if self._square(request):
            side = min(W, H)  # the square generated is at most this big (unless letterboxed)
        if request.mode == "inpaint" and request.mask_image in images:
            mask = mask_values(to_array(images[request.mask_image]))
            found = region_of(mask, self.inpaint_margin, self.inpaint_min_margin)
            if found is not None:
                x0, y0, x1, y1 = found
                # the mask may be another size than the canvas: measure in canvas pixels
                side = math.sqrt((x1 - x0) * (y1 - y0) * (W * H) / mask.size)
        target = entry.native * self.max_work_scale * (self.hires_scale if request.hires
                                                        else 1.0)
        scale = min(1.0, target / side)
        size = (max(8, int(round(W * scale))), max(8, int(round(H * scale))))
        return prepare_controls(request, images, size, cache=self.controls_cache)

    def _plan(self, request: GenerateRequest, images: Mapping[int, Image], entry: BaseEntry,
              low_memory: bool) -> Plan:
        W, H = request.width, request.height
        native = entry.native
        plan_init = None
        weights = None
        region = (0, 0, W, H)
        mask_region = None
        if request.mode in ("img2img", "inpaint", "edit"):
            init = to_array(_image(images, request.init_image, "init_image"))
            if init.shape[:2] != (H, W):
                init = resize(np.ascontiguousarray(init), W, H)
            plan_init = init
        if request.mode == "inpaint" or edit_kind(request) == "edit_inpaint":
            mask_img = to_array(_image(images, request.mask_image, "mask_image"))
            mask = mask_values(mask_img)
            if mask.shape != (H, W):
                mask = cv2.resize(mask, (W, H), interpolation=cv2.INTER_NEAREST)
            found = region_of(mask, self.inpaint_margin, self.inpaint_min_margin)
            if found is None:
                return Plan((W, H), region, native, entry.family,
                            Pass("inpaint", (W, H), 0, 0), init_canvas=plan_init,
                            unchanged=True)
            region = found
            x0, y0, x1, y1 = region
            mask_region = mask[y0:y1, x0:x1]
            radius = max(2.0, self.feather * max(x1 - x0, y1 - y0))
            weights = feather_weights(mask_region, radius)
        if request.mode not in ("txt2img", "edit") and request.strength == 0.0:
            return Plan((W, H), region, native, entry.family, Pass(request.mode, (W, H), 0, 0),
                        init_canvas=plan_init, weights=weights, unchanged=True)
        square = self._square(request)
        if square:
            region = square_region(self._strokes(request, images), W, H)
        x0, y0, x1, y1 = region
        rw, rh = x1 - x0, y1 - y0
        dit = dit_family(entry.family)
        multiple = dit.multiple if dit else 8  # a DiT's latents come in 2x2 patches
        size = work_size(rw, rh, native, self.max_work_scale, multiple)
        kind = edit_kind(request) if request.mode == "edit" else request.mode
        first = self._pass(request, images, kind, size, region, plan_init, mask_region,
                           request.strength, low_memory, native)
        plan = Plan((W, H), region, native, entry.family, first, init_canvas=plan_init,
                    weights=weights, square=square)
        if request.hires and request.mode != "edit":  # an edit has no hires pass (.edit)
            scale = min(self.hires_scale, math.sqrt((rw * rh) / (size[0] * size[1])))
            if scale > 1.05:
                hires = (max(multiple, int(round(size[0] * scale / multiple)) * multiple),
                         max(multiple, int(round(size[1] * scale / multiple)) * multiple))
                plan.hires = hires
                plan.hires_runs = denoise_steps(request.steps, self.hires_strength)[1]
        return plan

    def _square(self, request: GenerateRequest) -> bool:
        return self.square_only and request.mode == "txt2img" and request.width != request.height

    def _strokes(self, request: GenerateRequest, images: Mapping[int, Image]
                 ) -> Optional[np.ndarray]:
        """Where the units with a weight draw anything, on the canvas (None: no unit)."""
        strokes = None
        for unit in request.controls:
            if unit.weight == 0:
                continue
            array = rgb_on_black(to_array(_image(images, unit.image, "controls.image")))
            drawn = fit_image(array, request.width, request.height, unit.resize_mode).max(
                axis=2) > 32
            strokes = drawn if strokes is None else strokes | drawn
        return strokes

    def _pass(self, request: GenerateRequest, images: Mapping[int, Image], kind: str,
              size: Tuple[int, int], region, init_canvas, mask_region, strength: float,
              low_memory: bool, native: int) -> Pass:
        w, h = size
        x0, y0, x1, y1 = region
        W, H = request.width, request.height
        full = region == (0, 0, W, H)
        if kind == "txt2img":
            steps, runs = request.steps, request.steps
        elif kind in EDIT_KINDS:  # an edit regenerates what it covers (.edit)
            steps, runs, strength = request.steps, request.steps, 1.0
        else:
            steps, runs = denoise_steps(request.steps, strength)
        p = Pass(kind, size, steps, runs, strength)
        if init_canvas is not None and kind != "txt2img":
            p.init = resize(rgb_on_white(init_canvas[y0:y1, x0:x1]), w, h)
        if mask_region is not None and kind in ("inpaint", "edit_inpaint"):
            # Any coverage of a work pixel selects it (a thin selection must not vanish);
            # only the selection itself is pasted back later.
            covered = cv2.resize(mask_region.astype(np.float32), (w, h),
                                 interpolation=cv2.INTER_AREA) > 0.02
            p.mask = covered.astype(np.uint8) * 255
        if kind in EDIT_KINDS:
            p.references = reference_arrays(request, lambda s, n: _image(images, s, n))
        for unit in request.controls:
            array = rgb_on_black(to_array(_image(images, unit.image, "controls.image")))
            if full:
                control = fit_image(array, w, h, unit.resize_mode)
            else:
                on_canvas = fit_image(array, W, H, unit.resize_mode)
                control = resize(crop_padded(on_canvas, region), w, h)
            if unit.condition == "inpaint" and p.mask is not None and p.init is not None:
                control = inpaint_condition(p.init, p.mask)
            p.controls.append(control)
        threshold = self.vae_tiling_pixels or int((native * self.max_work_scale) ** 2)
        p.vae_tiling = low_memory or w * h > threshold
        return p

    # -- running -------------------------------------------------------------

    def _generate(self, request: GenerateRequest, images: Mapping[int, Image], ctx: JobContext,
                  low_memory: bool) -> List[Generated]:
        self._started += 1
        request, sampling, preset = apply_preset(
            request, (lora.name for lora in self.catalogue.loras.scan()))
        base = self.catalogue.resolve_base(self.catalogue.edit_base(request.base_model)
                                           if request.mode == "edit" else request.base_model)
        check_edit(request, base)  # edit mode: an edit base, no units (.edit)
        resolved_nets = [self.catalogue.resolve_controlnet(u.condition, base, u.model)
                         for u in request.controls] \
            if not base.control and base.family not in REFERENCE_CONTROLS else []
        # (a Flux Tools base takes the unit's image itself, Klein as a reference: .dit_klein)
        types = [_control_type(u, r, base) for u, r in zip(request.controls, resolved_nets)]
        keep = [base.key] + [r.key for r in resolved_nets]
        self._in_use.append(keep)  # a job run in a pause must not evict these
        try:
            return self._generate_on(request, images, ctx, low_memory, base, resolved_nets,
                                     types, sampling, preset)
        finally:
            self._in_use.pop()

    def _generate_on(self, request, images, ctx, low_memory, base, resolved_nets, types,
                     sampling, preset) -> List[Generated]:
        keep = self._in_use[-1]
        entry = self._load_base(base, keep)
        check_family(preset, entry.family, base.name)
        nets = [self._load_net(r, keep) for r in resolved_nets]
        for resolved, net in zip(resolved_nets, nets):
            if resolved.adapter:
                check_adapter_fits(resolved, net, entry.pipe.unet)
            else:
                _check_compatible(resolved, net, entry)
        apply_loras(entry, request.loras, self.catalogue.loras, self.stats)
        references = prepare_references(request, images, entry, self.catalogue, self.device,
                                        self.dtype, self.stats,
                                        lambda slot, name: _image(images, slot, name))
        request, images = self._annotate(request, images, entry)
        plan = self._plan(request, images, entry, low_memory)
        self.last_plan = plan
        seeds = request.seeds(request.seed)
        if plan.unchanged:
            ctx.progress(1, 1)
            image = from_array(plan.init_canvas) if plan.init_canvas is not None else None
            return [Generated(image, seed) for seed in seeds]

        # Units in an order that keeps the pipeline out of its global guess mode (it looks
        # at the first net's global_pool_conditions only); control is additive, so the
        # order does not change the sum.
        dit = dit_family(entry.family)
        adapters = None
        if dit:  # its own multi-ControlNet, units with a weight only (.dit)
            cfg, units, order = dit.job_units(request, nets, types)
        else:
            # T2I-Adapter units are not ControlNets: they run beside them (.adapters).
            order = sorted((i for i, r in enumerate(resolved_nets) if not r.adapter),
                           key=lambda i: bool(nets[i].config.global_pool_conditions))
            cfg = request.cfg > 1.0 and entry.pipe.unet.config.time_cond_proj_dim is None
            units = ControlUnits([nets[i] for i in order],
                                 [request.controls[i].control_mode for i in order], cfg,
                                 [types[i] for i in order]) if order else None
            adapters = AdapterUnits.of(request.controls, nets,
                                       [r.adapter for r in resolved_nets])

        run = _JobRun(ctx, len(seeds) * plan.steps_per_image, sampling, cfg,
                      adapters=adapters, references=references)
        out = []
        for seed in seeds:
            ctx.check_cancelled()
            rgb = self._run_pass(request, plan.first, entry, units, order, seed, run)
            if plan.hires:
                rgb = self._hires(request, images, plan, entry, units, order, rgb, seed, run,
                                  low_memory)
            out.append(Generated(self._compose(plan, rgb), seed))
        return out

    def _hires(self, request, images, plan: Plan, entry: BaseEntry, units, order, rgb, seed,
               run: "_JobRun", low_memory) -> np.ndarray:
        w, h = plan.hires
        kind = "inpaint" if request.mode == "inpaint" else "img2img"
        x0, y0, x1, y1 = plan.region
        mask_region = None
        if request.mode == "inpaint":
            mask_region = mask_values(to_array(images[request.mask_image]))
            if mask_region.shape != (request.height, request.width):
                mask_region = cv2.resize(mask_region, (request.width, request.height),
                                         interpolation=cv2.INTER_NEAREST)
            mask_region = mask_region[y0:y1, x0:x1]
        p = self._pass(request, images, kind, (w, h), plan.region, plan.init_canvas,
                       mask_region, self.hires_strength, low_memory, plan.native)
        p.init = resize(rgb, w, h)  # the first pass, enlarged, is what gets refined
        dit = dit_family(entry.family)
        if dit and not dit.refine_controls:  # SD3: no ControlNet img2img pipeline (.dit)
            units = None
        return self._run_pass(request, p, entry, units, order, seed, run)

    def _scheduler(self, entry: BaseEntry, name: str):
        """The scheduler for ``name``: kept per base (``set_timesteps`` resets it), but a
        fresh one for a job run in another job's pause (the paused job's is mid-run)."""
        dit = dit_family(entry.family)
        make = dit.scheduler if dit else make_scheduler  # a DiT: its own flow-matching one
        if self._depth:
            return make(name, entry.scheduler_config)
        scheduler = entry.schedulers.get(name)
        if scheduler is None:
            scheduler = make(name, entry.scheduler_config)
            entry.schedulers[name] = scheduler
        return scheduler

    def _run_pass(self, request: GenerateRequest, p: Pass, entry: BaseEntry, units, order,
                  seed: int, run: "_JobRun") -> np.ndarray:
        controls = units is not None  # ControlNet units (adapter units need no pipeline)
        dit = dit_family(entry.family)
        if entry.resolved.inpaint and p.kind != "inpaint":
            p = full_mask_pass(p)  # a 9-channel UNet runs in the inpaint pipelines only
        pipe = self._pipeline(entry, p.kind, controls, units, request)
        pipe.scheduler = self._scheduler(entry, run.sampling.scheduler)
        _set_vae_tiling(pipe, p.vae_tiling)
        ctx, family, refs = run.ctx, entry.family, run.references

        def on_step(pipeline, i, t, tensors):
            if refs is not None:
                refs.step(i + 1)  # the scales of the next step (IP-Adapter windows)
            run.done += 1
            done = min(run.done, run.total)
            ctx.progress(done, run.total)
            if ctx.wants_preview(done):
                latents = tensors["latents"]
                if dit:
                    latents = dit.preview_latents(pipeline, latents, p.size)
                image = self.previews.decode(latents, family)
                ctx.preview(done, image if image is not None else
                            latent_preview(latents, family))
            if run.done < run.total:
                self._pause(ctx, lambda: self._resume(entry, request, pipe, p, refs))
            return {}

        kwargs = self._call_kwargs(request, p, entry, pipe, units, order, seed, run)
        kwargs.update(callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["latents"])
        if refs is not None:
            kwargs.update(refs.kwargs(run.cfg, pipe))
            refs.begin(p.runs)
        depth = self._depth
        active = lambda: self._depth == depth  # noqa: E731 - this job, not one in its pause
        adapted = run.adapters.injected(pipe.unet, p.controls, p.runs, active) \
            if run.adapters is not None else contextlib.nullcontext()
        with cancel_points(pipe, ctx, active=active), adapted:
            result = dit.run(pipe, kwargs, seed, self.device) if dit else \
                pipe(**kwargs).images[0]
        result = self._check_finite(result, entry)
        return (np.clip(result, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def _call_kwargs(self, request: GenerateRequest, p: Pass, entry: BaseEntry, pipe, units,
                     order, seed: int, run: "_JobRun") -> Dict[str, Any]:
        """The pipeline's arguments for one pass (the step callback apart)."""
        w, h = p.size
        generator = torch.Generator(device=self._generator_device()).manual_seed(seed)
        dit = dit_family(entry.family)
        if dit:
            return dit.call_kwargs(request, p, entry, pipe, units, order, generator, run.cfg,
                                   self.stats, self.prompt_cache_size)
        negative = request.negative_prompt or None
        skip = _clip_skip(request.controls, order, units.control_types, entry.family) \
            if units else 1
        kwargs: Dict[str, Any] = prompt_kwargs(pipe, entry, request.prompt, negative, run.cfg,
                                               self.stats, self.prompt_cache_size,
                                               lambda: _note_long_prompts(pipe, request), skip)
        kwargs.update(num_inference_steps=p.steps, guidance_scale=request.cfg,
                      generator=generator, height=h, width=w, output_type="np")
        if run.sampling.eta is not None:
            kwargs["eta"] = run.sampling.eta
        if units is not None:
            images = [control_image(p.controls[i], union=units.control_types[k] is not None)
                      for k, i in enumerate(order)]
            units_ = request.controls
            windows = [control_window(units_[i].start, units_[i].end, p.runs) for i in order]
            kwargs.update(
                controlnet_conditioning_scale=[units_[i].weight for i in order],
                control_guidance_start=[start for start, _ in windows],
                control_guidance_end=[end for _, end in windows])
            if p.kind == "txt2img":
                kwargs["image"] = images
            else:
                kwargs["control_image"] = images
        if p.kind != "txt2img":
            kwargs.update(image=PILImage.fromarray(p.init), strength=p.strength)
        if p.kind == "inpaint":
            kwargs["mask_image"] = PILImage.fromarray(p.mask)
        return kwargs

    # -- another job in this one's pause (live painting's preemption) -------------------

    @property
    def preempts_between_steps(self) -> bool:
        """A job may run between two steps of another: its own pipelines and scheduler,
        and the paused job's LoRAs and VAE tiling set back before it goes on (not with CPU
        offload, whose hooks follow one pipeline)."""
        return not self.offload

    def _pause(self, ctx: JobContext, resume) -> None:
        """Between two steps: let the server run waiting live jobs (``ctx.step_boundary``),
        then set back what they changed (``resume``)."""
        if not self.preempts_between_steps or self._depth:
            return
        plan, started = self.last_plan, self._started
        self._depth += 1
        try:
            step_boundary(ctx)
        finally:
            self._depth -= 1
            if self._started != started:  # a job ran meanwhile
                self.last_plan = plan
                resume()

    def _resume(self, entry: BaseEntry, request: GenerateRequest, pipe, p: Pass,
                references=None) -> None:
        apply_loras(entry, request.loras, self.catalogue.loras, self.stats)
        if references is not None:
            references.resume()
        elif entry.references is not None:
            entry.references.off()
        _set_vae_tiling(pipe, p.vae_tiling)

    def _check_finite(self, result: np.ndarray, entry: BaseEntry) -> np.ndarray:
        """NaN/inf pixels (fp16 overflow) are counted, logged with the setting that avoids
        them, and come out black (NaN, -inf) or white (+inf)."""
        if np.isfinite(result).all():
            return result
        self.stats["nonfinite"] += 1
        log.warning("%s produced NaN/inf pixels (shown black) in %s: set [engine] "
                    "vae_precision = \"fp32\" (or an fp16-fix sdxl_vae), or dtype = \"bf16\" "
                    "or \"fp32\"", entry.resolved.name, dtype_name(self.dtype))
        return np.nan_to_num(result, nan=0.0, posinf=1.0, neginf=0.0)

    def _generator_device(self) -> torch.device:
        """The engine's own CUDA device (``cuda:1`` stays ``cuda:1``), else the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _compose(self, plan: Plan, rgb: np.ndarray) -> Image:
        """The generated region at exactly the canvas size (inpaint: pasted into the input)."""
        W, H = plan.canvas
        x0, y0, x1, y1 = plan.region
        region = resize(rgb, x1 - x0, y1 - y0)
        if plan.square:
            # the rest of the canvas gets the square's own background: the median colour of
            # its outer ring of pixels (white for the demo), then the square where it lies
            ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
            out = np.empty((H, W, 4), np.uint8)
            out[..., :3] = np.median(ring, axis=0).round().astype(np.uint8)
            out[..., 3] = 255
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
            out[iy0:iy1, ix0:ix1, :3] = region[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            return from_array(out)
        if plan.weights is None:
            return from_array(cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2RGBA))
        out = plan.init_canvas.copy()
        old = out[y0:y1, x0:x1].astype(np.float32)
        wgt = plan.weights[..., None]
        new = np.concatenate([region.astype(np.float32),
                              np.full(region.shape[:2] + (1,), 255.0, np.float32)], axis=2)
        blended = np.clip(np.rint(old * (1.0 - wgt) + new * wgt), 0, 255).astype(np.uint8)
        changed = plan.weights > 0
        target = out[y0:y1, x0:x1]
        target[changed] = blended[changed]
        return from_array(out)



def _clip_skip(units, order, control_types, family: str) -> int:
    """The clip skip the units with a weight need (a ControlNet's quirk: SD1.5's
    lineart_anime was trained with clip skip 2); 1 = none."""
    return max((quirks(family, units[i].condition, control_types[k] is not None).clip_skip
                for k, i in enumerate(order) if units[i].weight > 0), default=1)


def _control_type(unit, resolved: Resolved, base: Resolved) -> Optional[int]:
    """The unit's union control type (None for a classic ControlNet); typed errors, before
    anything loads, for a ControlNet of another family (as its files say) and for what it
    cannot do."""
    if resolved.adapter:
        check_adapter_unit(unit, resolved, base)
        return None
    if resolved.family != base.family:
        raise _another_family(resolved, base)
    dit = dit_family(base.family)
    if dit:
        return dit.control_type(unit.condition, unit.control_mode, resolved)
    check_unit(base.family, unit.condition, unit.control_mode, resolved.union)
    if not resolved.union:
        return None
    return union_control_type(unit.condition, resolved.control_types, resolved.name)


# [engine] options of the engine itself (the fast path's are acceleration.OPTION_NAMES),
# with the type each must have in config.toml
_BASIC_OPTIONS: Dict[str, Tuple[type, ...]] = {
    "device": (str,), "dtype": (str,), "offload": (str, bool), "memory_budget_gb": (int, float),
    "vae_tiling_pixels": (int,), "max_work_scale": (int, float), "hires_scale": (int, float),
    "hires_strength": (int, float), "inpaint_margin": (int, float),
    "inpaint_min_margin": (int,), "feather": (int, float), "square_only": (bool,),
    "cpu_threads": (int,), "quantize": (str,)}
_TYPE_WORDS = {str: "text in quotes", bool: "true or false", int: "a whole number",
               float: "a number"}


def engine_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``[engine]`` options -> DiffusersEngine keyword arguments: the fast-path options are
    gathered into ``fast_options``, ``memory_budget_gb`` becomes bytes; an unknown name or
    a value of the wrong type is a ConfigError (a ValueError) naming it."""
    kwargs: Dict[str, Any] = {}
    fast: Dict[str, Any] = {}
    for key, value in dict(options or {}).items():
        if key in FAST_OPTIONS:
            fast[key] = value
            continue
        if key not in _BASIC_OPTIONS:
            raise ConfigError(f"unknown engine option {key!r} in [engine]; known: "
                              f"{', '.join(sorted(set(_BASIC_OPTIONS) | set(FAST_OPTIONS)))}")
        kinds = _BASIC_OPTIONS[key]
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ConfigError(f"[engine] {key} must be {_TYPE_WORDS[kinds[-1]]}; got "
                              f"{type(value).__name__}.")
        if key == "memory_budget_gb":
            kwargs["memory_budget"] = int(float(value) * (1 << 30))
        elif key == "offload":
            kwargs[key] = offload_setting(value)  # "auto", true or false
        elif key == "quantize":
            kwargs[key] = quantization.quantize_setting(value)  # none | nf4 | int8 | fp8
        else:
            kwargs[key] = value
    if fast:
        kwargs["fast_options"] = fast
    return kwargs


@dataclasses.dataclass
class _JobRun:
    """One job's run through its passes: its context, steps done of all, how it samples,
    whether classifier-free guidance runs."""
    ctx: JobContext
    total: int
    sampling: Sampling
    cfg: bool
    adapters: Optional[AdapterUnits] = None  # the T2I-Adapter units
    references: Any = None  # ipadapter.ReferenceRun: the request's IP-Adapter references
    done: int = 0


def _set_vae_tiling(pipe, on: bool) -> None:
    if on:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def _check_compatible(resolved: Resolved, net: ControlNetModel, entry: BaseEntry) -> None:
    """A ControlNet must match its base's text-embedding width and conditioning type."""
    dit = dit_family(entry.family)
    if dit:
        if not dit.check_compatible(net, entry):
            raise _another_family(resolved, entry.resolved)
        return
    unet = entry.pipe.unet.config
    ours = (net.config.cross_attention_dim, net.config.addition_embed_type)
    theirs = (unet.cross_attention_dim, unet.addition_embed_type)
    if ours != theirs:
        raise _another_family(resolved, entry.resolved)


def _another_family(net: Resolved, base: Resolved) -> Unsupported:
    return Unsupported(
        f"The ControlNet {net.name!r} was made for another model family than the base "
        f"model {base.name!r} ({base.family.upper()}): use a {base.family.upper()} "
        f"ControlNet for this base, or pick another base model.", field="model")


def _image(images: Mapping[int, Image], slot: Optional[int], name: str) -> Image:
    if slot is None or slot not in images:
        raise EngineError(f"The request's {name} refers to image slot {slot}, which was not "
                          f"sent.", field=name)
    return images[slot]
