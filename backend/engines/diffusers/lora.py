"""LoRAs on a loaded base: diffusers' ``load_lora_weights(path, adapter_name=...)`` and
``set_adapters(names, weights)`` (peft), cached per base.

* **Loaded once per base.** Each LoRA file is loaded into the base's UNet and text
  encoders as a peft adapter the first time a request names it, and stays loaded: a
  later request that switches LoRAs only changes which adapters are active and their
  strengths (no reload of the base, nor of a LoRA used before).  Every pipeline made from
  the base with ``from_pipe`` shares those modules, so all modes see the same adapters.
  At most :data:`MAX_LOADED` adapters stay loaded per base; the least recently used one
  not needed by the request is deleted first.  A replaced file (new size or time) is
  loaded again.
* **Strength 0 is off.** A LoRA at strength 0 is not activated; a request with no active
  LoRA turns the adapters off, so the UNet runs its own weights only: the same pixels,
  bit for bit, as a base that never had a LoRA.
* **Unfused.** The adapters run beside the base weights (no ``fuse_lora``): fusing adds
  the LoRA into the weights, and unfusing subtracts it again, which does not restore the
  weights bit for bit (the tiny model's pixels end up 1e-6 off; an SD1.5-size UNet's
  weights 7e-9), and a fused run gives other pixels than an unfused run of the same
  seed.  Unfused, a seed gives the same pixels whatever ran before.  The price, from
  ``controlcanvas bench lora-cost`` on the CPU: +6 % per step for one rank-32 LoRA, +10 %
  for two; fusing two and unfusing them costs about one step each time the set changes.
* **On the fast path** (:mod:`.acceleration`): a LoRA adapts the attention's separate
  ``to_q`` / ``to_k`` / ``to_v`` projections, which ``fuse_qkv`` merges into one (and
  drops), and its strengths change between requests, which a ``torch.compile`` graph
  would specialise on.  So the first LoRA used on a base splits that base's UNet
  attention back into its projections (bit-exact copies of the fused weights) and runs
  the UNet uncompiled from then on; the ControlNets keep both.  From then on that base
  computes as without ``fuse_qkv``: its pictures without a LoRA may differ in the last
  bits from those it made before its first LoRA.
* **Checked before loading.** A LoRA made for another family (or text-embedding width)
  than the base is refused with :class:`~shared.errors.LoraMismatch`
  (:func:`backend.engines.loras.fit_problem`); a file diffusers cannot read is
  :class:`~shared.errors.Unsupported`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from shared.errors import LoraMismatch, Unsupported
from shared.messages import LoraRef

from ..loras import LoraFile, LoraFolder, fit_problem
from .cache import BaseEntry, is_out_of_memory
from .compiled import uncompile

log = logging.getLogger(__name__)

MAX_LOADED = 12  # adapters kept loaded per base (a request uses at most MAX_LORAS = 8)


class _QuietLoraLoad(logging.Filter):
    """Drop diffusers' note that a LoRA has no text-encoder part (most have none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to" not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading():
    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base",
                                                    "diffusers.loaders.lora_pipeline",
                                                    "diffusers.loaders.peft")]
    quiet = _QuietLoraLoad()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            # peft: "Already found a peft_config attribute": several adapters, as meant.
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class LoraAdapters:
    """The LoRA adapters loaded into one base pipeline, and which of them are active."""

    def __init__(self, pipe, max_loaded: Optional[int] = None) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded or MAX_LOADED
        self.loaded: "OrderedDict[Tuple[str, int, int], Tuple[str, int]]" = OrderedDict()
        self.active: Optional[Tuple[Tuple[str, float], ...]] = ()  # None: unknown, set again
        self.loads = 0
        self._serial = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.loaded.values())

    def activate(self, loras: Sequence[Tuple[LoraFile, float]]) -> int:
        """Make exactly ``loras`` active with their strengths (strength 0: left out).
        Returns how many files were loaded for this call."""
        wanted = [(lora, strength) for lora, strength in loras if strength != 0.0]
        keep = {lora.key for lora, _ in wanted}
        before = self.loads
        names = [self._adapter(lora, keep) for lora, _ in wanted]
        state = tuple(zip(names, (strength for _, strength in wanted)))
        if state != self.active:
            if not state:
                if self.loaded:  # (after a failed first load there is nothing to turn off)
                    self.pipe.disable_lora()
            else:
                self.pipe.enable_lora()
                self.pipe.set_adapters(list(names), [strength for _, strength in state])
            self.active = state
        return self.loads - before

    def _adapter(self, lora: LoraFile, keep: set) -> str:
        """The adapter name of ``lora``, loading the file when it is not loaded yet."""
        found = self.loaded.get(lora.key)
        if found is not None:
            self.loaded.move_to_end(lora.key)
            return found[0]
        self._evict(keep)
        self._serial += 1
        name = f"lora{self._serial}"
        self.active = None  # a freshly loaded adapter is active: set the state again
        try:
            with _quiet_loading():
                # folder + weight_name: diffusers before 0.40 wants the file's name spelled
                # out when offline (a bare file path is "must specify a weight_name")
                self.pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name,
                                            adapter_name=name)
        except Exception as err:  # noqa: BLE001 - diffusers/peft raise many kinds
            self._forget(name)
            if is_out_of_memory(err):
                raise
            if "PEFT backend is required" in str(err):
                raise Unsupported("LoRAs need the peft package on the server: "
                                  "`pip install peft`, then restart the server.",
                                  field="loras") from None
            log.warning("could not load the LoRA %s from %s: %s: %s", lora.name, lora.path,
                        type(err).__name__, err)
            raise Unsupported(
                f"The LoRA {lora.name!r} could not be loaded: it may be a kind of LoRA "
                f"diffusers does not read (LyCORIS LoHa/LoKr) or a damaged file; the server "
                f"log says more. Try another LoRA.", field="loras") from None
        self.loaded[lora.key] = (name, self._adapter_bytes(name))
        self.loads += 1
        log.info("loaded LoRA %s (%s) as %s", lora.name, lora.family, name)
        return name

    def _evict(self, keep: set) -> None:
        while len(self.loaded) >= self.max_loaded:
            victim = next((key for key in self.loaded if key not in keep), None)
            if victim is None:
                return
            name, _ = self.loaded.pop(victim)
            self._forget(name)
            self.active = None
            log.info("unloaded LoRA adapter %s (%s)", name, victim[0])

    def _forget(self, name: str) -> None:
        with contextlib.suppress(Exception):  # a half-loaded adapter may not exist anywhere
            self.pipe.delete_adapters([name])

    def _adapter_bytes(self, name: str) -> int:
        total = 0
        for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, component, None)
            if module is None or not hasattr(module, "named_parameters"):
                continue
            total += sum(p.numel() * p.element_size() for key, p in module.named_parameters()
                         if f".{name}." in key or key.endswith(f".{name}"))
        return total


def split_attention(model) -> int:
    """Undo ``acceleration``'s fused q/k/v projections on ``model`` (a UNet): each fused
    attention gets its ``to_q`` / ``to_k`` / ``to_v`` (cross-attention: ``to_k`` / ``to_v``)
    back as bit-exact slices of the fused weights, and the model the unfused SDPA
    processor.  Returns how many attention modules were split."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    split = 0
    for attn in model.modules():
        if not isinstance(attn, Attention) or not attn.fused_projections:
            continue
        cross = attn.is_cross_attention
        fused = attn.to_kv if cross else attn.to_qkv
        rows = fused.weight.shape[0]
        sizes = [rows // 2] * 2 if cross else [attn.inner_dim, *[(rows - attn.inner_dim) // 2] * 2]
        names = ("to_k", "to_v") if cross else ("to_q", "to_k", "to_v")
        biases = fused.bias.data.split(sizes) if fused.bias is not None else [None] * len(sizes)
        for name, weight, bias in zip(names, fused.weight.data.split(sizes), biases):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                     device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            setattr(attn, name, linear)
        delattr(attn, "to_kv" if cross else "to_qkv")
        attn.fused_projections = False
        split += 1
    if split:
        model.set_attn_processor(AttnProcessor2_0())
    return split


def _ready_for_adapters(entry: BaseEntry) -> None:
    """The base's UNet as adapters need it: unfused attention, not compiled (see above)."""
    unet = getattr(entry.pipe, "unet", None)
    if unet is None:
        return
    uncompile(unet)
    if split_attention(unet):
        log.info("LoRAs on %s: its UNet attention is unfused and runs uncompiled",
                 entry.resolved.name)


def base_context(entry: BaseEntry) -> int:
    """The width of the text embeddings the base's denoiser reads (0: not a UNet)."""
    unet = getattr(entry.pipe, "unet", None)
    return int(getattr(getattr(unet, "config", None), "cross_attention_dim", 0) or 0)


def resolve(refs: Sequence[LoraRef], folder: LoraFolder, entry: BaseEntry
            ) -> List[Tuple[LoraFile, float]]:
    """The files of a request's LoRAs, each checked against the base (typed errors)."""
    out = []
    for i, ref in enumerate(refs):
        lora = folder.find(ref.name, field=f"loras[{i}].name")
        problem = fit_problem(lora, entry.resolved.name, entry.family, base_context(entry))
        if problem:
            raise LoraMismatch(problem, field=f"loras[{i}].name")
        out.append((lora, ref.strength))
    return out


def apply_loras(entry: BaseEntry, refs: Sequence[LoraRef], folder: LoraFolder,
                stats: Dict[str, int]) -> None:
    """Make the request's LoRAs (and only those) active on ``entry``'s pipelines."""
    loras = resolve(refs, folder, entry)
    if entry.loras is None:
        if not any(strength for _, strength in loras):
            return  # nothing to apply, nothing loaded: leave the base untouched
        _ready_for_adapters(entry)
        entry.loras = LoraAdapters(entry.pipe)
    before = entry.loras.nbytes
    loaded = entry.loras.activate(loras)
    stats["lora_loads"] = stats.get("lora_loads", 0) + loaded
    entry.nbytes += entry.loras.nbytes - before
    if loaded:
        # load_lora_weights takes CPU offload's hooks off and puts them back for the default
        # CUDA device: the engine sets them again for its own device and pipeline.
        entry.offload_owner = None
