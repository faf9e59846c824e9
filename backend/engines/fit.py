"""Fitting a model in memory: which loading a base gets on a GPU, from its size alone.

Pure planning (no torch, no weights read): a model is its components' parameter counts
(read from safetensors headers, or the table of real sizes below) and the bytes each
parameter takes in its dtype or quantization; the device is its free memory (and the
free RAM that offloaded weights wait in).  :func:`plan` picks, in this order:

* ``gpu``: every component on the GPU (fastest); needs all weights + the working memory.
* ``model``: model CPU offload (diffusers' ``enable_model_cpu_offload``): one component
  on the GPU at a time; needs the biggest component + the working memory on the GPU and
  every weight in RAM.
* ``sequential``: sequential CPU offload (``enable_sequential_cpu_offload``), the last
  resort: one block at a time (slow: weights cross the bus every step); needs the biggest
  block + the working memory.
* none: :class:`shared.errors.DoesNotFit`, naming the variant that would fit with the
  least change (a GGUF quantization of the same transformer, then a smaller sibling such
  as Klein 4B for 9B), or the smallest there is.

The working memory (activations, attention, the VAE decode at the family's native size)
is an estimate per family, :data:`WORKING`; the weights are exact.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from shared.errors import DoesNotFit

from . import gguf_files

GIB = 1 << 30
CHOICES = ("gpu", "model", "sequential")

# Bytes per parameter: plain dtypes, GGUF block quantizations (block bits incl. scales:
# Q8_0 = 34 bytes per 32 weights, Q4_K = 144 per 256...), bitsandbytes / torchao formats.
BYTES_PER_PARAM: Dict[str, float] = {
    "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0,
    "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k": 176 / 256, "q4_k": 144 / 256,
    "q4_0": 18 / 32, "q3_k": 110 / 256, "q2_k": 84 / 256, "nf4": 0.5 + 4 / 64,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "q4_1": 20 / 32,
}
# A GGUF tensor type (gguf's GGMLQuantizationType names) -> its key above.
GGUF_TYPES: Dict[str, str] = {"F32": "fp32", "F16": "fp16", "BF16": "bf16",
                              **{q.upper(): q for q in ("q8_0", "q6_k", "q5_k", "q4_k", "q4_0",
                                                        "q3_k", "q2_k", "q5_0", "q5_1",
                                                        "q4_1")}}
GGUF_QUANTS = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k")  # mildest first
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                      "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# Working memory on the GPU beside the weights at the native size, batch 1 (estimates).
WORKING: Dict[str, int] = {"sd15": GIB * 3 // 4, "sdxl": 2 * GIB, "flux": 3 * GIB,
                           "sd3": 3 * GIB, "zimage": 3 * GIB, "qwen": 4 * GIB,
                           "klein": 3 * GIB}
DEFAULT_WORKING = 2 * GIB


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: its parameters, the biggest block's (what sequential
    offload holds at once) and how they are stored."""
    name: str
    params: int
    dtype: str = "bf16"
    block_params: int = 0  # 0: unknown, taken as the whole component

    @property
    def nbytes(self) -> int:
        return int(self.params * BYTES_PER_PARAM[self.dtype])

    @property
    def block_bytes(self) -> int:
        return int((self.block_params or self.params) * BYTES_PER_PARAM[self.dtype])


@dataclass(frozen=True)
class Sized:
    """A model as the planner sees it: its name, family, components."""
    name: str
    family: str
    components: Tuple[Component, ...]
    quantizable: str = "transformer"  # the component a GGUF file replaces ("" : none)

    def weights(self) -> int:
        return sum(c.nbytes for c in self.components)

    def needs(self) -> Dict[str, int]:
        """GPU bytes each loading choice needs."""
        work = WORKING.get(self.family, DEFAULT_WORKING)
        return {"gpu": self.weights() + work,
                "model": max(c.nbytes for c in self.components) + work,
                "sequential": max(c.block_bytes for c in self.components) + work}

    def with_dtype(self, dtype: str) -> "Sized":
        """Every unquantized component stored in ``dtype`` (what the engine loads in)."""
        return replace(self, components=tuple(
            replace(c, dtype=dtype) if c.dtype in ("fp32", "fp16", "bf16") else c
            for c in self.components))

    def quantizations(self) -> List["Sized"]:
        """Its GGUF transformers, mildest first (none for a UNet family)."""
        return [self.quantized(q) for q in GGUF_QUANTS] if self.quantizable else []

    def quantized(self, quant: str) -> "Sized":
        """The same model with a ``quant`` GGUF file for its transformer."""
        return replace(self, name=f"{self.name} (GGUF {quant.upper()} transformer)",
                       components=tuple(replace(c, dtype=quant) if c.name == self.quantizable
                                        else c for c in self.components))


@dataclass(frozen=True)
class Plan:
    choice: str                     # one of CHOICES
    needs: Dict[str, int]           # choice -> GPU bytes
    free: Optional[int]             # the GPU's free bytes (None: unknown -> gpu)
    weights: int = 0
    notes: List[str] = field(default_factory=list)

    def line(self) -> str:
        need = self.needs[self.choice] / GIB
        free = "?" if self.free is None else f"{self.free / GIB:.1f}"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.choice} (needs {need:.1f} GiB, {free} GiB free{notes})"


def choose(model: Sized, free: Optional[int], ram: Optional[int] = None) -> Optional[str]:
    """The first loading choice that fits ``free`` GPU bytes (offload also needs every
    weight in ``ram`` when known); None when none does."""
    if free is None:
        return "gpu"
    needs = model.needs()
    for choice in CHOICES:
        if needs[choice] > free:
            continue
        if choice != "gpu" and ram is not None and model.weights() > ram:
            continue
        return choice
    return None


def plan(model: Sized, free: Optional[int], ram: Optional[int] = None,
         variants: Iterable[Sized] = ()) -> Plan:
    """The loading for ``model``; :class:`DoesNotFit` when nothing fits (see the module)."""
    variants = list(variants)
    choice = choose(model, free, ram)
    if choice is not None:
        notes = []
        if choice == "sequential":  # the slow last resort: say what would run faster
            faster = next((c for c in model.quantizations() + variants
                           if choose(c, free, ram) in ("gpu", "model")), None)
            if faster is not None:
                notes.append(f"faster: {faster.name} with {choose(faster, free, ram)} loading")
        return Plan(choice, model.needs(), free, model.weights(), notes)
    raise DoesNotFit(_refusal(model, free, ram, list(variants)), field="base_model")


def _refusal(model: Sized, free: int, ram: Optional[int], variants: List[Sized]) -> str:
    needs = model.needs()
    ram_text = f" and {ram / GIB:.1f} GiB of free RAM" if ram is not None else ""
    head = (f"{model.name} does not fit this GPU's {free / GIB:.1f} GiB of free memory"
            f"{ram_text}: it needs {needs['gpu'] / GIB:.1f} GiB on the GPU, "
            f"{needs['sequential'] / GIB:.1f} GiB even with sequential CPU offload "
            f"(weights {model.weights() / GIB:.1f} GiB).")
    candidates = model.quantizations() + list(variants)
    for candidate in candidates:
        fits = choose(candidate, free, ram)
        if fits is not None:
            how = "everything on the GPU" if fits == "gpu" else f"{fits} CPU offload"
            return (f"{head} The smallest change that fits: {candidate.name} "
                    f"({candidate.weights() / GIB:.1f} GiB of weights, with {how}). "
                    f"Or close other programs using the GPU to free more.")
    smallest = min(candidates, key=lambda c: (c.needs()["sequential"], c.weights()),
                   default=model)
    return (f"{head} Nothing of its family fits: even {smallest.name} needs "
            f"{smallest.needs()['sequential'] / GIB:.1f} GiB. Close other GPU programs, or "
            f"run on the CPU (device = \"cpu\" in [engine]).")


# -----------------------------------------------------------------------------
# Real sizes (parameters), per family and variant
# -----------------------------------------------------------------------------

def _c(name: str, params: float, blocks: int = 0) -> Component:
    return Component(name, int(params), block_params=int(params / blocks) if blocks else 0)


_VAE = _c("vae", 83.8e6)
_CLIP_L = _c("text_encoder", 123.1e6)
_CLIP_G = _c("text_encoder_2", 694.7e6, 32)
_T5 = _c("text_encoder_t5", 4.762e9, 24)
_QWEN3_4B = _c("text_encoder", 4.022e9, 36)
_QWEN3_8B = _c("text_encoder", 8.19e9, 36)
_QWEN25_VL_7B = _c("text_encoder", 8.29e9, 28)

REAL: Dict[str, Sized] = {s.name: s for s in (
    Sized("SD1.5", "sd15", (_c("unet", 859.5e6, 12), _CLIP_L, _VAE), quantizable=""),
    Sized("SDXL", "sdxl", (_c("unet", 2.567e9, 14), _CLIP_L, _CLIP_G, _VAE), quantizable=""),
    Sized("FLUX.1 [dev]", "flux", (_c("transformer", 11.90e9, 57), _CLIP_L, _T5, _VAE)),
    Sized("SD3.5 Large", "sd3", (_c("transformer", 8.06e9, 38), _CLIP_L, _CLIP_G, _T5, _VAE)),
    Sized("SD3.5 Medium", "sd3", (_c("transformer", 2.47e9, 24), _CLIP_L, _CLIP_G, _T5,
                                  _VAE)),
    Sized("Z-Image Turbo", "zimage", (_c("transformer", 6.15e9, 34), _QWEN3_4B, _VAE)),
    Sized("Qwen-Image", "qwen", (_c("transformer", 20.43e9, 60), _QWEN25_VL_7B,
                                      _c("vae", 126.9e6))),
    Sized("FLUX.2 [klein] 9B", "klein", (_c("transformer", 9.08e9, 32), _QWEN3_8B, _VAE)),
    Sized("FLUX.2 [klein] 4B", "klein", (_c("transformer", 3.88e9, 25), _QWEN3_4B, _VAE)),
)}
# The family's real model the engine plans with when a base's files cannot be read.
FAMILY_REAL: Dict[str, str] = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1 [dev]",
                               "sd3": "SD3.5 Large", "zimage": "Z-Image Turbo",
                               "qwen": "Qwen-Image", "klein": "FLUX.2 [klein] 9B"}


def smaller_variants(model: Sized, dtype: str) -> List[Sized]:
    """The real models of ``model``'s family smaller than it, biggest first, and their GGUF
    transformers (what a refusal may name), in ``dtype``."""
    out: List[Sized] = []
    smaller = [m.with_dtype(dtype) for m in REAL.values()
               if m.family == model.family and m.name != model.name]
    for sibling in sorted((m for m in smaller if m.weights() < model.weights()),
                          key=Sized.weights, reverse=True):
        out.append(sibling)
        out.extend(sibling.quantizations())
    return out


def sized_for(name: str, family: str, path: str, dtype: str) -> Sized:
    """What a base weighs loaded in ``dtype``: from its files' headers, else the family's
    real size (:data:`FAMILY_REAL`); a GGUF transformer file weighs what its header says,
    beside the family's other components at real size."""
    model = sized_gguf(name, family, path) or sized_from_files(name, family, path)
    if model is None:
        real = REAL.get(FAMILY_REAL.get(family, ""))
        if real is None:
            return Sized(name, family, ())
        model = replace(real, name=name)
    return model.with_dtype(dtype)


def plan_base(name: str, family: str, path: str, dtype: str, free: Optional[int],
              ram: Optional[int] = None, quantize: str = "none") -> Plan:
    """:func:`plan` for a base on disk, offering its family's smaller variants;
    ``quantize``: the ``[engine] quantize`` the engine applies (none when inactive)."""
    model = denoiser_in(sized_for(name, family, path, dtype), quantize)
    if not model.components:
        return Plan("gpu", {"gpu": 0, "model": 0, "sequential": 0}, free)
    return plan(model, free, ram, smaller_variants(model, dtype))


def denoiser_in(model: Sized, quantize: str) -> Sized:
    """``model`` with its transformer or UNet stored as ``[engine] quantize`` makes it
    (bitsandbytes nf4 / int8, torchao fp8); as it is for "none" or a GGUF transformer."""
    if quantize in ("", "none"):
        return model
    return replace(model, components=tuple(
        replace(c, dtype=quantize) if c.name in ("transformer", "unet") and
        c.dtype in ("fp32", "fp16", "bf16") else c for c in model.components))


def real_size_table(dtypes: Iterable[str] = ("bf16", "fp8"),
                    quants: Iterable[str] = ("q8_0", "q4_k")) -> Dict[str, Dict[str, Dict]]:
    """``model -> variant -> {weights, gpu, model, sequential}`` in bytes, for people."""
    table: Dict[str, Dict[str, Dict]] = {}
    for name, model in REAL.items():
        rows = {d: model.with_dtype(d) for d in dtypes}
        first = next(iter(dtypes))
        if model.quantizable:
            rows.update({f"{first}+{q}": rows[first].quantized(q) for q in quants})
        table[name] = {k: dict(weights=m.weights(), **m.needs()) for k, m in rows.items()}
    return table


# -----------------------------------------------------------------------------
# Reading sizes from files (headers only)
# -----------------------------------------------------------------------------

def safetensors_params(path: Path) -> Tuple[int, int, str]:
    """(parameters, biggest block's parameters, storage dtype) from a safetensors header.
    A block is the tensors under ``<name>.<number>.`` (``transformer_blocks.3.``)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    total, blocks, dtypes = 0, {}, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        total += count
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
        parts = key.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                block = ".".join(parts[:i + 1])
                blocks[block] = blocks.get(block, 0) + count
                break
    stored = max(dtypes, key=dtypes.get) if dtypes else "F32"
    return total, max(blocks.values(), default=0), _DTYPE_NAMES.get(stored, "fp32")


_DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8",
                "F8_E5M2": "fp8", "I8": "int8", "U8": "int8", "F64": "fp32"}


def folder_components(folder: Path) -> Tuple[Component, ...]:
    """The components of a diffusers folder (one per subfolder holding safetensors)."""
    out = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            continue
        params, block, dtype = 0, 0, "fp32"
        for f in files:
            p, b, dtype = safetensors_params(f)
            params, block = params + p, max(block, b)
        out.append(Component(sub.name, params, dtype, block))
    return tuple(out)


def sized_gguf(name: str, family: str, path: str) -> Optional[Sized]:
    """A GGUF transformer file (its parameters in its dominant quantization, from the
    header) with the rest of its family's pipeline at real size; None for other files."""
    header = gguf_files.read_header(path) if path else None
    real = REAL.get(FAMILY_REAL.get(family, ""))
    if header is None or real is None:
        return None
    dtype = GGUF_TYPES.get(header.quant.upper(), "q8_0")
    transformer = Component("transformer", header.params, dtype, header.block_params)
    rest = tuple(c for c in real.components if c.name != "transformer")
    return Sized(name, family, (transformer, *rest), quantizable="")


def sized_from_files(name: str, family: str, path: str,
                     gguf: Optional[Mapping[str, int]] = None) -> Optional[Sized]:
    """A base's size from its files (a diffusers folder or one safetensors file); None
    when they cannot be read (the caller falls back to the family's real size)."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.is_dir():
            components = folder_components(p)
        elif p.suffix == ".safetensors":
            params, block, dtype = safetensors_params(p)
            components = (Component("checkpoint", params, dtype, block),)
        else:
            return None
    except (OSError, ValueError, KeyError, struct.error):
        return None
    if not components:
        return None
    return Sized(name, family, components)
