"""IP-Adapter reference units on a loaded base: diffusers' ``load_ip_adapter`` into the
base's UNet, kept there and switched per request.

* **Loaded once per base.** The adapters a request needs (one *slot* per reference unit
  with a weight, in request order; several slots may hold the same adapter file) are
  loaded into the base's UNet with ``load_ip_adapter`` (state dicts read once and kept),
  and their CLIP image encoders once per encoder folder.  A later request with the same
  adapters only switches them on again; one with other adapters reloads the adapter
  weights (a few MB), never the base.  ``stats["ip_adapter_loads"]`` counts those loads.
* **Off is the base.** A request without a reference (or with every reference at weight
  0) puts the UNet's own attention processors back and takes the image projection away:
  the same pixels, bit for bit, as a base that never had an adapter.
* **Weight and window.** Each slot's scale is its weight inside its ``start``/``end``
  window and 0 outside (a step callback sets the scales before each step; the window is
  counted over the steps that run, as ControlNet units' are, :func:`.reuse.control_window`).
* **Modes** set which attention layers of the UNet read the reference (the InstantStyle
  scheme; the blocks are found from the UNet itself, so SD1.5, SDXL and the tiny models
  each get their matching ones):

  - ``reference``: every cross-attention, at the weight (plain IP-Adapter);
  - ``style``: only the middle attention of the lowest-resolution up block with
    attentions: SDXL ``up_blocks.0.attentions.1`` (InstantStyle's
    ``{"up": {"block_0": [0.0, w, 0.0]}}``), SD1.5 ``up_blocks.1.attentions.1``;
  - ``composition``: only the last attention of the lowest-resolution down block with
    attentions: SDXL ``down_blocks.2.attentions.1`` (``{"down": {"block_2": [0.0, w]}}``),
    SD1.5 ``down_blocks.2.attentions.1``;
  - ``face``: every cross-attention of a face adapter (``ip-adapter-plus-face``).

* **Flux.1** (XLabs-AI/flux-ip-adapter): the same, on the base's transformer (diffusers'
  ``FluxIPAdapterMixin.load_ip_adapter``: ``FluxIPAdapterAttnProcessor`` on each
  double-stream block; the file's XLabs key names are converted here, as diffusers does
  when it reads the file itself).  Only ``reference`` runs (see
  :mod:`backend.engines.references`); the negative embeddings are passed too, so the
  pipeline never encodes an image itself.  The Flux pipelines that take a reference are
  txt2img, img2img, inpaint, txt2img with ControlNet units and Kontext edits; the others
  (ControlNet img2img / inpaint, FLUX.1 Tools bases) are :class:`~shared.errors.Unsupported`.

* **Image embeddings** are computed here (the pipelines get ``ip_adapter_image_embeds``):
  the plain adapter reads the encoder's projected embedding (unconditional: zeros), a
  ``plus`` adapter its penultimate hidden states (unconditional: those of a black image),
  as diffusers' ``encode_image``.  They are kept for the last few reference images, so
  live painting with one reference encodes it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image as PILImage

from shared.errors import Unsupported
from shared.images import Image
from shared.messages import GenerateRequest, ReferenceUnit

from ...imaging import to_array
from ..catalogue import TINY_BASES, Catalogue
from ..references import ResolvedAdapter, resolve
from ..tiny import quiet_progress_bars
from .cache import BaseEntry, module_bytes
from .geometry import rgb_on_white
from .lora import _ready_for_adapters
from .reuse import control_window

log = logging.getLogger(__name__)

EMBED_CACHE = 8  # reference images whose embeddings are kept per base


class _QuietIpLoad(logging.Filter):
    """Drop diffusers' note that no image encoder is loaded (this module brings its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "image_encoder is not loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading():
    logger = logging.getLogger("diffusers.loaders.ip_adapter")
    quiet = _QuietIpLoad()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def mode_layers(unet, mode: str) -> Optional[Tuple[str, ...]]:
    """The attention-processor name prefixes a mode's reference reaches (None: every one;
    ``unet`` None: a transformer base, whose references run in ``reference`` mode only)."""
    if mode in ("reference", "face") or unet is None:
        return None
    if mode == "style":
        blocks, prefix = unet.up_blocks, "up_blocks"
        index = next(i for i, b in enumerate(blocks) if hasattr(b, "attentions"))
        count = len(blocks[index].attentions)
        chosen = 1 if count > 1 else 0
    else:  # composition
        blocks, prefix = unet.down_blocks, "down_blocks"
        index = [i for i, b in enumerate(blocks) if hasattr(b, "attentions")][-1]
        chosen = len(blocks[index].attentions) - 1
    return (f"{prefix}.{index}.attentions.{chosen}.",)


def _pil(image: Image) -> PILImage.Image:
    return PILImage.fromarray(rgb_on_white(to_array(image)))


@dataclass
class _Slot:
    adapter: ResolvedAdapter
    unit: ReferenceUnit
    image: PILImage.Image
    layers: Optional[Tuple[str, ...]] = None
    window: Tuple[float, float] = (0.0, 1.0)
    embeds: Any = None  # (positive, negative) tensors


class ReferenceAdapters:
    """The IP-Adapters loaded into one base's UNet, their image encoders, and whether they
    are switched on."""

    def __init__(self, entry: BaseEntry, device: torch.device, dtype: torch.dtype) -> None:
        _ready_for_adapters(entry)  # unfused attention, uncompiled: .lora's rule for adapters
        self.pipe = entry.pipe
        self.device = device
        self.dtype = dtype
        self.flux = entry.family == "flux"
        unet = self.denoiser
        self.plain = dict(unet.attn_processors)  # the UNet's (transformer's) own processors
        self.plain_hid_type = getattr(unet.config, "encoder_hid_dim_type", None)
        self.slots: Tuple[str, ...] = ()  # the adapter file of each loaded slot
        self.loaded: Optional[Tuple[Dict[str, Any], Any]] = None  # (processors, projection)
        self.on = False
        self.loads = 0
        self._state_dicts: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        self._encoders: Dict[str, Tuple[Any, Any]] = {}
        self._embeds: "OrderedDict[Tuple[str, bool, str], Tuple[Any, Any]]" = OrderedDict()

    @property
    def nbytes(self) -> int:
        procs = self.loaded[0].values() if self.loaded else ()
        return module_bytes(*procs, *(self.loaded[1:] if self.loaded else ()),
                            *(model for model, _ in self._encoders.values()))

    @property
    def denoiser(self):
        """The model the adapters go into: the UNet, or Flux's transformer."""
        return self.pipe.transformer if self.flux else self.pipe.unet

    # -- switching ---------------------------------------------------------------

    def off(self) -> None:
        if not self.on:
            return
        unet = self.denoiser
        # the projection first: a plus adapter's Resampler holds attentions of its own,
        # which attn_processors counts while it is there
        unet.encoder_hid_proj = None
        unet.set_attn_processor(dict(self.plain))
        unet.config.encoder_hid_dim_type = self.plain_hid_type
        self.on = False

    def use(self, adapters: Sequence[ResolvedAdapter]) -> int:
        """Switch on exactly ``adapters`` (one slot each); returns how many loads it took."""
        keys = tuple(a.key for a in adapters)
        unet = self.denoiser
        if keys != self.slots or self.loaded is None:
            self.off()
            dicts = [self._state_dict(a) for a in adapters]
            names = [a.name for a in adapters]
            with _quiet_loading():
                if self.flux:  # FluxIPAdapterMixin: its own argument for "no encoder"
                    self.pipe.load_ip_adapter(dicts, weight_name=names,
                                              image_encoder_pretrained_model_name_or_path=None)
                else:
                    self.pipe.load_ip_adapter(dicts, subfolder=[""] * len(dicts),
                                              weight_name=names, image_encoder_folder=None)
            self.loaded = (dict(unet.attn_processors), unet.encoder_hid_proj)
            self.slots = keys
            self.loads += 1
            self.on = True
            log.info("loaded IP-Adapter(s) %s", ", ".join(a.name for a in adapters))
            return 1
        if not self.on:
            unet.encoder_hid_proj = self.loaded[1]  # (before the processors: see off)
            unet.set_attn_processor(dict(self.loaded[0]))
            unet.config.encoder_hid_dim_type = "ip_image_proj"
            self.on = True
        return 0

    def set_scales(self, scales: Sequence[Tuple[Optional[Tuple[str, ...]], float]]) -> None:
        """Slot i reaches the processors under its layer prefixes (None: all) at its scale,
        every other processor at 0."""
        for name, proc in self.denoiser.attn_processors.items():
            if not hasattr(proc, "to_k_ip"):
                continue
            for i, (layers, scale) in enumerate(scales):
                reached = layers is None or name.startswith(layers)
                proc.scale[i] = scale if reached else 0.0

    # -- weights and embeddings --------------------------------------------------

    def _state_dict(self, adapter: ResolvedAdapter) -> Dict[str, Dict[str, torch.Tensor]]:
        found = self._state_dicts.get(adapter.key)
        if found is None:
            from safetensors import safe_open

            found = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(adapter.weight, framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, rest = _flux_key(key) if self.flux else _unet_key(key)
                    if part in found:
                        found[part][rest] = f.get_tensor(key).to(self.dtype)
            self._state_dicts[adapter.key] = found
        return found

    def _encoder(self, folder: str):
        found = self._encoders.get(folder)
        if found is None:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            with quiet_progress_bars():
                model = CLIPVisionModelWithProjection.from_pretrained(
                    folder, local_files_only=True, dtype=self.dtype).to(self.device).eval()
            if (Path(folder) / "preprocessor_config.json").is_file():
                processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            else:  # h94's encoder folders hold none: diffusers' default for the encoder size
                size = int(model.config.image_size)
                processor = CLIPImageProcessor(size=size, crop_size=size)
            found = (model, processor)
            self._encoders[folder] = found
        return found

    @torch.no_grad()
    def embeds(self, adapter: ResolvedAdapter, image: PILImage.Image) -> Tuple[Any, Any]:
        """(positive, unconditional) embeddings of ``image`` for ``adapter``, each shaped
        (1, 1, ...) as ``ip_adapter_image_embeds`` takes them."""
        digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        key = (adapter.encoder, adapter.plus, digest)
        found = self._embeds.get(key)
        if found is not None:
            self._embeds.move_to_end(key)
            return found
        model, processor = self._encoder(adapter.encoder)
        pixels = processor(images=image, return_tensors="pt").pixel_values.to(
            self.device, self.dtype)
        if adapter.plus:
            positive = model(pixels, output_hidden_states=True).hidden_states[-2]
            negative = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            positive = model(pixels).image_embeds
            negative = torch.zeros_like(positive)
        found = (positive[None], negative[None])
        self._embeds[key] = found
        while len(self._embeds) > EMBED_CACHE:
            self._embeds.popitem(last=False)
        return found


def _unet_key(key: str) -> Tuple[str, str]:
    """(part, name in it) of a key of h94's layout: ``image_proj.*`` / ``ip_adapter.*``."""
    part, _, rest = key.partition(".")
    return part, rest


_FLUX_PARTS = {"ip_adapter_proj_model": "image_proj", "image_proj": "image_proj",
               "double_blocks": "ip_adapter", "ip_adapter": "ip_adapter"}


def _flux_key(key: str) -> Tuple[str, str]:
    """(part, diffusers' name) of a key of XLabs-AI/flux-ip-adapter's layout, as
    ``FluxIPAdapterMixin.load_ip_adapter`` converts it when it reads the file:
    ``ip_adapter_proj_model.proj.weight`` -> image_proj ``proj.weight``,
    ``double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight`` -> ip_adapter
    ``0.to_k_ip.weight``."""
    head, _, rest = key.partition(".")
    part = _FLUX_PARTS.get(head, "")
    if part == "ip_adapter":
        rest = (rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                .replace("ip_adapter_double_stream_v_proj", "to_v_ip")
                .replace("processor.", ""))
    return part, rest


@dataclass
class ReferenceRun:
    """One request's references on a base: what each slot holds, its embeddings, and the
    scales per step."""
    adapters: ReferenceAdapters
    slots: List[_Slot]
    runs: int = 1
    current: int = 0  # the step whose scales are set

    def resume(self) -> None:
        """Switch this request's adapters on again (a job run in this one's pause may have
        changed them)."""
        self.adapters.use([s.adapter for s in self.slots])
        self.step(self.current)

    def begin(self, runs: int) -> None:
        """Before a pass of ``runs`` steps: each slot's window, the scales of step 0."""
        self.runs = runs
        for slot in self.slots:
            slot.window = control_window(slot.unit.start, slot.unit.end, runs)
        self.step(0)

    def step(self, i: int) -> None:
        """Set each slot's scale for step ``i`` (0 outside its window, as diffusers keeps
        ControlNet units: ``i / n < start or (i + 1) / n > end`` is off)."""
        n = max(self.runs, 1)
        self.current = i
        scales = []
        for slot in self.slots:
            start, end = slot.window
            inside = not (i / n < start or (i + 1) / n > end)
            scales.append((slot.layers, slot.unit.weight if inside else 0.0))
        self.adapters.set_scales(scales)

    def kwargs(self, cfg: bool, pipe=None) -> Dict[str, Any]:
        """The pipeline's image-embedding arguments (Unsupported: ``pipe`` takes none)."""
        if pipe is not None:
            check_pipeline(pipe)
        if self.adapters.flux:
            return _flux_kwargs(self.slots)
        embeds = []
        for slot in self.slots:
            positive, negative = slot.embeds
            embeds.append(torch.cat([negative, positive]) if cfg else positive)
        return {"ip_adapter_image_embeds": embeds}


def _flux_kwargs(slots: Sequence[_Slot]) -> Dict[str, Any]:
    """Flux's pipelines take the negative embeddings apart (used by true CFG only; given so
    that the pipeline does not encode a black image with an encoder it does not have)."""
    return {"ip_adapter_image_embeds": [s.embeds[0] for s in slots],
            "negative_ip_adapter_image_embeds": [s.embeds[1] for s in slots]}


def check_pipeline(pipe) -> None:
    """Unsupported when ``pipe`` cannot take a reference (Flux's ControlNet img2img /
    inpaint pipelines and the FLUX.1 Tools ones have no IP-Adapter argument)."""
    import inspect

    if "ip_adapter_image_embeds" in inspect.signature(type(pipe).__call__).parameters:
        return
    raise Unsupported(
        f"diffusers' {type(pipe).__name__} takes no reference (IP-Adapter). References run "
        f"in txt2img, img2img and inpaint, and with ControlNet units in txt2img; turn the "
        f"references off for this job, or its control units.", field="references")


def resolve_references(request: GenerateRequest, entry: BaseEntry,
                       catalogue: Catalogue) -> List[Tuple[int, ResolvedAdapter]]:
    """(index, adapter) of each reference with a weight (typed errors from
    :func:`backend.engines.references.resolve`)."""
    base = entry.resolved
    tiny = base.builtin in TINY_BASES
    root = Path(catalogue.config.tiny_root) if catalogue.config.tiny_root else None
    return [(i, resolve(unit.model, unit.mode, entry.family, base.name, tiny_base=tiny,
                        tiny_root=root, cache_dir=catalogue.config.cache_dir,
                        field=f"references[{i}]"))
            for i, unit in enumerate(request.references) if unit.weight > 0]


def prepare_references(request: GenerateRequest, images, entry: BaseEntry,
                       catalogue: Catalogue, device: torch.device, dtype: torch.dtype,
                       stats: Dict[str, Any], image_of) -> Optional[ReferenceRun]:
    """The request's references switched on for ``entry`` (None, and the adapters off,
    when it has none with a weight).  ``image_of(slot, field)`` reads an image slot."""
    chosen = resolve_references(request, entry, catalogue)
    if not chosen:
        if entry.references is not None:
            entry.references.off()
        return None
    if entry.references is None:
        entry.references = ReferenceAdapters(entry, device, dtype)
    adapters = entry.references
    before = adapters.nbytes
    loaded = adapters.use([adapter for _, adapter in chosen])
    stats["ip_adapter_loads"] = stats.get("ip_adapter_loads", 0) + loaded
    if loaded:
        entry.offload_owner = None  # set the engine's offload hooks again
    slots = []
    for i, adapter in chosen:
        unit = request.references[i]
        image = _pil(image_of(unit.image, f"references[{i}].image"))
        slot = _Slot(adapter, unit, image,
                     mode_layers(getattr(entry.pipe, "unet", None), unit.mode))
        slot.embeds = adapters.embeds(adapter, image)
        slots.append(slot)
    entry.nbytes += adapters.nbytes - before
    return ReferenceRun(adapters, slots)
