"""Original-format (LDM / CompVis / SGM) single-file checkpoints made from a diffusers
SD1.5 or SDXL folder.

Real ``.safetensors`` / ``.ckpt`` checkpoints from model sites keep the original
Stable Diffusion layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE) and ``cond_stage_model.transformer.text_model.*`` (CLIP).  SDXL files (SDXL itself,
Pony, Illustrious, NoobAI) keep Stability's SGM layout: the same UNet and VAE names plus
``label_emb.*`` (SDXL's added embedding), and two text encoders under
``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP-G: fused q/k/v, ``resblocks``,
``text_projection`` transposed).  No such file exists offline at test size, so
:func:`write_checkpoint` makes one from the tiny diffusers stack
(``backend.engines.tiny.build(folder, family)``).

The mapping is the inverse of diffusers' ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint``
(diffusers/loaders/single_file_utils.py), in the direction of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, but driven by the
component configs so it works for any number of blocks and layers (the tiny UNet
has 2 blocks of 1 layer, SD1.5 has 4 of 2).
"""

from __future__ import annotations

import json
from pathlib import Path

_RESNET_UNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def _rename(key: str, prefix_from: str, prefix_to: str, parts=()) -> str:
    rest = key[len(prefix_from):]
    for old, new in parts:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return prefix_to + rest


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` keys."""
    layers = int(config["layers_per_block"])
    prefixes = {"time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "conv_in.": "input_blocks.0.0.",
                "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for i in range(len(config["down_block_types"])):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n}.0.", _RESNET_UNET)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        down = (i + 1) * (layers + 1)  # the layer after the block's resnets
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{down}.0.op."
    if config.get("addition_embed_type") == "text_time":  # SDXL
        prefixes["add_embedding.linear_1."] = "label_emb.0.0."
        prefixes["add_embedding.linear_2."] = "label_emb.0.2."
    prefixes["mid_block.resnets.0."] = ("middle_block.0.", _RESNET_UNET)
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.1."] = ("middle_block.2.", _RESNET_UNET)
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{n}.0.", _RESNET_UNET)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        last = i * (layers + 1) + layers
        slot = 2 if "CrossAttn" in kind else 1  # after the attention, when there is one
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{last}.{slot}.conv."
    return _map(state, prefixes, "model.diffusion_model.")


def vae_to_ldm(state: dict, config: dict) -> dict:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` keys (attention linears as 1x1
    convs, as in the original checkpoints)."""
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.",
                "decoder.conv_norm_out.": "decoder.norm_out."}
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                 "quant_conv.", "post_quant_conv."):
        prefixes[same] = same
    shortcut = (("conv_shortcut", "nin_shortcut"),)
    blocks = len(config["down_block_types"])
    for i in range(blocks):
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = \
            f"encoder.down.{i}.downsample.conv."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = \
            f"decoder.up.{blocks - 1 - i}.upsample.conv."
        for j in range(int(config["layers_per_block"]) + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.",
                                                                 shortcut)
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (
                f"decoder.up.{blocks - 1 - i}.block.{j}.", shortcut)
    for part in ("encoder", "decoder"):
        for k in (0, 1):
            prefixes[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", shortcut)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    out = _map(state, prefixes, "first_stage_model.")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None].contiguous()
    return out


def clip_to_ldm(state: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers CLIPTextModel keys (flattened or ``text_model.``) ->
    ``<prefix>text_model.*``, with the ``position_ids`` buffer that original checkpoints
    carry."""
    import torch

    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        out[prefix + "text_model." + key] = value
    positions = out[prefix + "text_model.embeddings.position_embedding.weight"]
    out[prefix + "text_model.embeddings.position_ids"] = \
        torch.arange(positions.shape[0], dtype=torch.int64)[None]
    return out


_OPEN_CLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                    ("self_attn.out_proj.", "attn.out_proj."))


def open_clip_to_sgm(state: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP's, as SDXL files hold its
    second text encoder (the inverse of diffusers' ``convert_open_clip_checkpoint``)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        here, there = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{there}attn.in_proj_{part}"] = torch.cat(
                [state.pop(f"{here}self_attn.{qkv}_proj.{part}") for qkv in "qkv"])
        for key in [k for k in state if k.startswith(here)]:
            rest = _rename(key, here, "", _OPEN_CLIP_LAYER)
            out[there + rest] = state.pop(key)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out


def _map(state: dict, prefixes: dict, root: str) -> dict:
    # longest prefix first, so "down_blocks.1.resnets.1." is not taken for "...resnets.10."
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, value in state.items():
        for old, new in ordered:
            if key.startswith(old):
                new, parts = new if isinstance(new, tuple) else (new, ())
                out[root + _rename(key, old, new, parts)] = value
                break
        else:
            raise KeyError(f"no original-format name for {key!r}")
    return out


def ldm_state_dict(folder: Path) -> dict:
    """The whole SD1.5- or SDXL-shaped diffusers stack in ``folder`` as one original-format
    dict (SDXL: with ``text_encoder_2``, in SGM's layout)."""
    from safetensors.torch import load_file

    folder = Path(folder)

    def config(sub: str) -> dict:
        return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))

    state = {}
    weights = "diffusion_pytorch_model.safetensors"
    state.update(unet_to_ldm(load_file(str(folder / "unet" / weights)), config("unet")))
    state.update(vae_to_ldm(load_file(str(folder / "vae" / weights)), config("vae")))
    clip = load_file(str(folder / "text_encoder" / "model.safetensors"))
    if (folder / "text_encoder_2").is_dir():
        state.update(clip_to_ldm(clip, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_sgm(load_file(str(folder / "text_encoder_2" /
                                                    "model.safetensors"))))
    else:
        state.update(clip_to_ldm(clip))
    return state


def write_checkpoint(folder: Path, path: Path) -> Path:
    """Write ``folder``'s weights as one original-format file: ``.safetensors``, or a
    ``.ckpt`` holding ``{"state_dict": ..., "global_step": ...}`` like a training run's."""
    import torch

    state = {k: v.contiguous() for k, v in ldm_state_dict(folder).items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state, "global_step": 1, "epoch": 0}, str(path))
    return path
