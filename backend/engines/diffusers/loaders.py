"""Reading models from disk, the same way on every supported diffusers release.

* ``dtype`` keyword: diffusers 0.40 renamed ``torch_dtype`` to ``dtype`` (the old name
  warns from then on; before 0.40 the new one is not understood and a ControlNet load
  fails).  :func:`dtype_kwargs` passes the name the installed release reads.
* Folders holding only the fp16 variant of their weights (``*.fp16.safetensors``, as
  some repos ship) load with ``variant="fp16"`` (the catalogue says which).
* Single files: a base is loaded with ``from_single_file`` and its family's small
  diffusers config (from the hub cache when there); a 9-channel inpainting file gets
  ``in_channels`` 9 whatever that config says.  A ControlNet file is lllyasviel's
  original format or diffusers-keyed beside its ``config.json``; a union ControlNet file
  (diffusers-keyed only) needs its ``config.json`` (or xinsir's ``config_promax.json``)
  beside it.
* ``[engine] quantize`` (:mod:`..quantize`): the denoiser of a folder read quantized
  (bitsandbytes NF4 / 8-bit, torchao float8) through ``PipelineQuantizationConfig``.
* A transformer file with the rest of the pipeline elsewhere (:func:`read_transformer_file`):
  a family whose pipeline diffusers cannot read from one file (Qwen-Image: its single
  files, as ComfyUI's, hold the transformer only), and any GGUF transformer (``*.gguf``,
  the ``quant`` extra's ``gguf`` package; the weights stay quantized and are dequantized
  per layer in the engine's dtype): the file is the transformer, the text encoders, VAE
  and scheduler come from the family's default repo, downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import diffusers
from diffusers import ControlNetModel, ControlNetUnionModel

from shared.errors import ModelMissing

from .. import gguf_files
from ..catalogue import DEFAULT_BASES, Catalogue, Resolved
from ..quantize import GGUF_NOTE, Quantize, denoiser
from ..requirements import release

log = logging.getLogger(__name__)


DTYPE_KEYWORD = "dtype" if release(diffusers.__version__) >= (0, 40) else "torch_dtype"


def dtype_kwargs(dtype) -> Dict[str, Any]:
    """``{"dtype": dtype}`` on diffusers >= 0.40, ``{"torch_dtype": dtype}`` before."""
    return {DTYPE_KEYWORD: dtype}


def _local_only() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def read_base(resolved: Resolved, cls, dtype, catalogue: Catalogue,
              quantize: Optional[Quantize] = None, **extra):
    """The ``cls`` pipeline (the family's txt2img pipeline) of a base model; its denoiser
    quantized when ``quantize`` is active and diffusers reads it from a folder."""
    kwargs: Dict[str, Any] = dict(extra, **dtype_kwargs(dtype))
    if resolved.source != "file":
        if resolved.weights_variant:
            kwargs["variant"] = resolved.weights_variant
        if quantize is not None and quantize.active:
            kwargs["quantization_config"] = pipeline_quantization(quantize, cls, dtype)
        return cls.from_pretrained(resolved.path, local_files_only=True, **kwargs)
    if quantize is not None and quantize.active:
        log.info("[engine] quantize = %r does not apply to %s: %s", quantize.setting,
                 resolved.name, GGUF_NOTE if resolved.quant else
                 "diffusers quantizes models it reads from a folder; a single file loads "
                 "as stored")
    # A single file carries weights only; the component configs come from the
    # family's default repo when its configs are cached (downloaded or not), else
    # diffusers fetches just those small files (online) - into, and later from, the
    # configured cache.
    if not hasattr(cls, "from_single_file") or gguf_files.is_gguf(resolved.path):
        return _around_transformer(resolved, cls, catalogue, kwargs)
    config = catalogue.cached_snapshot(DEFAULT_BASES[resolved.family], "base", complete=False)
    if config is not None:
        kwargs["config"] = str(config)
    if resolved.inpaint:
        kwargs["num_in_channels"] = 9  # the UNet's only setting the family config gets wrong
    return cls.from_single_file(resolved.path, cache_dir=catalogue.config.cache_dir,
                                local_files_only=_local_only(), **kwargs)


def _around_transformer(resolved: Resolved, cls, catalogue: Catalogue, kwargs: Dict[str, Any]):
    """The family's pipeline with ``resolved``'s file as its transformer, the rest from the
    default repo (a ModelMissing saying to download it when it is not on this machine)."""
    repo = DEFAULT_BASES[resolved.family]
    folder = catalogue.cached_snapshot(repo, "base")
    if folder is None:
        raise ModelMissing(
            f"{resolved.name!r} holds a transformer only; its text encoder and VAE come from "
            f"{repo}, which is not on this machine: `controlcanvas models download "
            f"{resolved.family}` first.", field="base_model")
    return read_transformer_file(resolved.path, folder, cls, **kwargs)


def read_transformer_file(path: str, rest, cls, **kwargs):
    """The ``cls`` pipeline with its transformer read from the single file ``path`` (a
    ``.safetensors``, or a ``.gguf`` kept quantized: ``GGUFQuantizationConfig`` computing in
    the engine's dtype), the other components from the diffusers folder ``rest``, whose
    model_index names the transformer's class and whose ``transformer/`` its config."""
    index = json.loads((Path(rest) / "model_index.json").read_text(encoding="utf-8"))
    model_cls = getattr(diffusers, index["transformer"][1])
    own = {k: v for k, v in kwargs.items() if k == DTYPE_KEYWORD}
    if gguf_files.is_gguf(path):
        own["quantization_config"] = _gguf_config(path, own.get(DTYPE_KEYWORD))
    transformer = model_cls.from_single_file(path, config=str(rest), subfolder="transformer",
                                             local_files_only=True, **own)
    return cls.from_pretrained(rest, transformer=transformer, local_files_only=True, **kwargs)


def _gguf_config(path: str, dtype):
    """diffusers' GGUF reading (weights dequantized per layer in ``dtype``); ModelMissing
    when the gguf package is missing."""
    from diffusers import GGUFQuantizationConfig

    if not gguf_files.available():
        raise ModelMissing(f"The GGUF file {Path(path).name!r} {gguf_files.MISSING_GGUF}.",
                           field="base_model")
    return GGUFQuantizationConfig(compute_dtype=dtype)


def pipeline_quantization(quantize: Quantize, cls, dtype):
    """diffusers' PipelineQuantizationConfig for ``quantize`` on ``cls``'s denoiser (its
    transformer, else its UNet): bitsandbytes NF4 / 8-bit, or torchao float8 weight-only."""
    from diffusers import PipelineQuantizationConfig

    signature = cls._get_signature_types() if hasattr(cls, "_get_signature_types") else {}
    component = denoiser("transformer" in signature)
    if quantize.setting == "fp8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig

        config = TorchAoConfig(Float8WeightOnlyConfig())
    else:
        from diffusers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=dtype) \
            if quantize.setting == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    return PipelineQuantizationConfig(quant_mapping={component: config})


def pipe_from_pipe(cls, pipe, dtype, **kwargs):
    """``cls.from_pipe(pipe)`` sharing its models.  from_pipe casts the shared modules to
    its dtype (default fp32: ours is passed), which a quantized model (GGUF, torchao)
    refuses: those join the new pipeline after the cast, as they are."""
    quantized = {name: module for name, module in pipe.components.items()
                 if getattr(module, "is_quantized", False) and name not in kwargs}
    out = cls.from_pipe(pipe, **dict.fromkeys(quantized), **kwargs, **dtype_kwargs(dtype))
    if quantized:
        out.register_modules(**quantized)
    return out


def read_controlnet(resolved: Resolved, dtype, catalogue: Catalogue):
    """A ``ControlNetModel`` or ``ControlNetUnionModel`` (``resolved.union``)."""
    cls = ControlNetUnionModel if resolved.union else ControlNetModel
    if resolved.source != "file":
        kwargs = dtype_kwargs(dtype)
        if resolved.weights_variant:
            kwargs["variant"] = resolved.weights_variant
        return cls.from_pretrained(resolved.path, local_files_only=True, **kwargs)
    if resolved.union:
        return _union_from_file(Path(resolved.path), dtype)
    # A diffusers-keyed file may sit beside its config.json; an original
    # (lllyasviel-format) file gets its config inferred by diffusers.
    kwargs = dtype_kwargs(dtype)
    sibling = Path(resolved.path).with_name("config.json")
    if sibling.is_file():
        kwargs["config"] = str(sibling.parent)
    return ControlNetModel.from_single_file(resolved.path, local_files_only=_local_only(),
                                            cache_dir=catalogue.config.cache_dir, **kwargs)


def _union_from_file(path: Path, dtype):
    """A diffusers-keyed union ControlNet file and its config beside it (diffusers has no
    single-file loader for union models)."""
    from safetensors.torch import load_file

    for name in ("config.json", "config_promax.json"):
        config = path.with_name(name)
        if config.is_file():
            break
    else:
        raise ModelMissing(f"The union ControlNet file {str(path)!r} needs its config.json "
                           f"(or config_promax.json) beside it: download both from the "
                           f"model's repo.", field="model")
    model = ControlNetUnionModel.from_config(ControlNetUnionModel.load_config(str(config)))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(dtype=dtype)
