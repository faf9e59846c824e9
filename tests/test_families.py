"""Model families read from the files (configs, safetensors headers), never from names;
families the engine does not run are typed errors, not crashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.engines import downloads
from backend.engines.catalogue import Catalogue, ModelConfig
from backend.engines.families import (UNION_CONTROL_TYPES, check_unit, detect,
                                      detect_file, union_control_type)
from shared.errors import ModelMissing, Unsupported, UnsupportedCondition, UnsupportedFamily


def write_header(path: Path, shapes: dict) -> Path:
    """A .safetensors file with these tensor names and shapes (zeros; tiny)."""
    from safetensors.numpy import save_file

    save_file({k: np.zeros(v, np.float16) for k, v in shapes.items()}, str(path))
    return path


def write_folder(folder: Path, files: dict) -> Path:
    for name, value in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value), encoding="utf-8")
    return folder


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD15 = {CONV_IN: (2, 4, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (2,)}
SDXL = {CONV_IN: (2, 4, 1, 1), "model.diffusion_model.label_emb.0.0.weight": (2, 2),
        "conditioner.embedders.1.model.ln_final.weight": (2,)}

FILES = {  # name the file might have -> (tensor shapes, what it is)
    "anything-v5.safetensors": (SD15, "sd15"),
    "juggernaut-xl.safetensors": (SD15, "sd15"),  # "xl" in the name, SD1.5 inside
    "sd15-inpainting.safetensors": ({**SD15, CONV_IN: (2, 9, 1, 1)}, "sd15-inpaint"),
    "illustrious-v2.safetensors": (SDXL, "sdxl"),
    "ponyDiffusionV6.safetensors": (SDXL, "sdxl"),
    "noobai-inpaint.safetensors": ({**SDXL, CONV_IN: (2, 9, 1, 1)}, "sdxl-inpaint"),
    "sd21.safetensors": ({CONV_IN: (2, 4, 1, 1),
                          "cond_stage_model.model.token_embedding.weight": (2, 2)}, "sd2"),
    "flux1-dev.safetensors": ({"double_blocks.0.img_attn.norm.key_norm.scale": (2,)}, "flux"),
    "flux-comfy.safetensors": ({"model.diffusion_model.double_blocks.0.img_mod.lin.weight":
                                (2, 2)}, "flux"),
    "flux-diffusers.safetensors": ({"x_embedder.weight": (2, 2),
                                    "single_transformer_blocks.0.norm.linear.weight": (2, 2),
                                    "transformer_blocks.0.norm1.linear.weight": (2, 2)},
                                   "flux"),
    "sd3.5_large.safetensors": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight":
                                 (2, 2)}, "sd3"),
    "model.safetensors": (SDXL, "sdxl"),  # an SDXL file with a meaningless name
}
NET_FILES = {
    "control_v11p_sd15_canny.safetensors": ({"control_model.input_hint_block.0.weight":
                                             (2, 3, 1, 1)}, "sd15"),
    "controlnet-canny-sdxl.safetensors": ({"controlnet_cond_embedding.conv_in.weight":
                                           (2, 3, 1, 1), "add_embedding.linear_1.weight":
                                           (2, 2)}, "sdxl"),
    "diffusion_pytorch_model_promax.safetensors": ({"task_embedding": (8, 4),
                                                    "control_add_embedding.linear_1.weight":
                                                    (2, 2)}, "sdxl-union"),
    "instantx-flux-union.safetensors": ({"controlnet_x_embedder.weight": (2, 2),
                                         "transformer_blocks.0.attn.to_q.weight": (2, 2)},
                                        "flux"),
    "sd35-canny.safetensors": ({"controlnet_blocks.0.weight": (2, 2),
                                "transformer_blocks.0.attn.to_q.weight": (2, 2),
                                "pos_embed.proj.weight": (2, 2, 1, 1)}, "sd3"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_base_single_files_are_what_their_tensors_say(tmp_path, name):
    shapes, expected = FILES[name]
    found = detect_file(write_header(tmp_path / name, shapes))
    assert found is not None and found.kind == "base" and found.name == expected


@pytest.mark.parametrize("name", sorted(NET_FILES))
def test_controlnet_single_files_are_what_their_tensors_say(tmp_path, name):
    shapes, expected = NET_FILES[name]
    found = detect_file(write_header(tmp_path / name, shapes))
    assert found is not None and found.kind == "controlnet" and found.name == expected


def test_a_union_file_says_how_many_control_types_it_has(tmp_path):
    promax = detect_file(write_header(tmp_path / "a.safetensors", {"task_embedding": (8, 4)}))
    first = detect_file(write_header(tmp_path / "b.safetensors", {"task_embedding": (6, 4)}))
    assert (promax.control_types, first.control_types) == (8, 6)


def test_unknown_or_unreadable_files_are_unknown(tmp_path):
    assert detect_file(write_header(tmp_path / "x.safetensors", {"something.weight": (2,)})) \
        is None
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert detect_file(broken) is None
    assert detect_file(tmp_path / "old.ckpt") is None  # a pickle: not read for detection


UNET_SD15 = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 768}
UNET_SDXL = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 2048,
             "addition_embed_type": "text_time"}
FOLDERS = {
    "sd15": {"model_index.json": {"_class_name": "StableDiffusionPipeline",
                                  "unet": ["diffusers", "UNet2DConditionModel"]},
             "unet/config.json": UNET_SD15},
    "sd15-inpaint": {"model_index.json": {"_class_name": "StableDiffusionInpaintPipeline"},
                     "unet/config.json": {**UNET_SD15, "in_channels": 9}},
    "sdxl": {"model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
             "unet/config.json": UNET_SDXL},
    "sdxl-inpaint": {"model_index.json": {"_class_name": "StableDiffusionXLInpaintPipeline"},
                     "unet/config.json": {**UNET_SDXL, "in_channels": 9}},
    "sd2": {"model_index.json": {"_class_name": "StableDiffusionPipeline"},
            "unet/config.json": {**UNET_SD15, "cross_attention_dim": 1024}},
    "flux": {"model_index.json": {"_class_name": "FluxPipeline",
                                  "transformer": ["diffusers", "FluxTransformer2DModel"]}},
    "sd3": {"model_index.json": {"_class_name": "StableDiffusion3Pipeline",
                                 "text_encoder_3": ["transformers", "T5EncoderModel"]}},
}
NET_FOLDERS = {
    "sd15": {"_class_name": "ControlNetModel", "cross_attention_dim": 768},
    "sdxl": {"_class_name": "ControlNetModel", "cross_attention_dim": 2048,
             "addition_embed_type": "text_time"},
    "sdxl-union": {"_class_name": "ControlNetUnionModel", "num_control_type": 8,
                   "addition_embed_type": "text_time"},
    "flux": {"_class_name": "FluxControlNetModel"},
    "sd3": {"_class_name": "SD3ControlNetModel"},
}


@pytest.mark.parametrize("expected", sorted(FOLDERS))
def test_base_folders_are_what_their_configs_say(tmp_path, expected):
    folder = write_folder(tmp_path / "some-model", FOLDERS[expected])
    assert detect(folder, "base").name == expected


@pytest.mark.parametrize("expected", sorted(NET_FOLDERS))
def test_controlnet_folders_are_what_their_configs_say(tmp_path, expected):
    folder = write_folder(tmp_path / "net", {"config.json": NET_FOLDERS[expected]})
    found = detect(folder, "controlnet")
    assert found.kind == "controlnet" and found.name == expected
    if expected == "sdxl-union":
        assert found.control_types == 8


# -----------------------------------------------------------------------------
# Resolution: what runs, and typed errors for what does not
# -----------------------------------------------------------------------------

def catalogue(tmp_path, **config) -> Catalogue:
    """No hub models; a request may name models in the session's temporary folders."""
    config.setdefault("roots", (str(tmp_path.parent),))
    return Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf"), **config))


def test_an_sd2_base_is_a_typed_not_supported_yet_error(tmp_path):
    path = write_header(tmp_path / "sd21.safetensors", FILES["sd21.safetensors"][0])
    with pytest.raises(UnsupportedFamily, match="Stable Diffusion 2") as info:
        catalogue(tmp_path).resolve_base(str(path))
    assert "SDXL" in info.value.message and info.value.field == "base_model"
    assert isinstance(info.value, Unsupported)  # older clients see the parent code's meaning


@pytest.mark.parametrize("name", ["flux1-dev.safetensors", "sd3.5_large.safetensors"])
def test_flux_and_sd3_files_resolve_with_their_family(tmp_path, name):
    path = write_header(tmp_path / name, FILES[name][0])
    resolved = catalogue(tmp_path).resolve_base(str(path))
    assert (resolved.family, resolved.native_size) == (FILES[name][1], 1024)


def test_a_flux_folder_and_a_flux_controlnet_resolve_as_flux(tmp_path):
    """The catalogue says what they are; the engine refuses a Flux ControlNet on an SDXL
    base (tests/test_family_flux.py)."""
    flux = write_folder(tmp_path / "FLUX.1-dev", FOLDERS["flux"])
    (flux / "transformer").mkdir()
    (flux / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert catalogue(tmp_path).resolve_base(str(flux)).family == "flux"
    sdxl = write_folder(tmp_path / "base", FOLDERS["sdxl"])
    (sdxl / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    net = write_folder(tmp_path / "flux-net", {"config.json": NET_FOLDERS["flux"]})
    (net / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    cat = catalogue(tmp_path)
    assert cat.resolve_controlnet("canny", cat.resolve_base(str(sdxl)), str(net)).family == \
        "flux"


def test_a_controlnet_picked_as_base_says_so(tmp_path):
    path = write_header(tmp_path / "my-model.safetensors",
                        NET_FILES["control_v11p_sd15_canny.safetensors"][0])
    with pytest.raises(UnsupportedFamily, match="is a controlnet, not a base model"):
        catalogue(tmp_path).resolve_base(str(path))


def test_a_controlnet_xs_adapter_picked_as_controlnet_says_what_it_is(tmp_path):
    """(A T2I-Adapter runs: tests/test_t2i_adapter.py.)"""
    net = write_folder(tmp_path / "xs", {"config.json": {"_class_name": "ControlNetXSAdapter"}})
    (net / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    base = write_folder(tmp_path / "base", FOLDERS["sd15"])
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    cat = catalogue(tmp_path)
    with pytest.raises(UnsupportedFamily, match="ControlNet-XS"):
        cat.resolve_controlnet("canny", cat.resolve_base(str(base)), str(net))


def test_the_files_decide_the_family_not_the_name(tmp_path):
    """An SDXL checkpoint called "sd15-something" and an SD1.5 one called "...xl..." are
    what their tensors say; a hub id that is not downloaded has no family to guess."""
    xl = write_header(tmp_path / "sd15-lookalike.safetensors", SDXL)
    sd = write_header(tmp_path / "realistic-xl.safetensors", SD15)
    cat = catalogue(tmp_path)
    assert (cat.resolve_base(str(xl)).family, cat.resolve_base(str(sd)).family) == \
        ("sdxl", "sd15")
    inpaint = cat.resolve_base(str(write_header(tmp_path / "x.safetensors",
                                                FILES["noobai-inpaint.safetensors"][0])))
    assert (inpaint.family, inpaint.inpaint) == ("sdxl", True)
    listed = {m.name: m for m in catalogue(tmp_path, bases={"xl": ("someone/cool-xl", "")})
              .entries()}
    assert listed["xl"].family == "" and not listed["xl"].present


def test_models_listing_survives_an_unsupported_configured_base(tmp_path):
    sd2 = write_header(tmp_path / "sd2.safetensors", FILES["sd21.safetensors"][0])
    listed = {m.name: m for m in catalogue(tmp_path, bases={"f": (str(sd2), "")}).entries()}
    assert not listed["f"].present and "Stable Diffusion 2" in listed["f"].source


# -----------------------------------------------------------------------------
# Union control types and per-condition rules
# -----------------------------------------------------------------------------

def test_union_control_types_follow_xinsirs_promax_order():
    assert [UNION_CONTROL_TYPES[c] for c in ("openpose", "depth", "scribble", "canny", "normal",
                                             "seg", "tile", "inpaint")] == list(range(8))
    assert union_control_type("lineart", 8, "u") == union_control_type("mlsd", 8, "u") == 3


def test_a_condition_the_union_cannot_serve_names_what_would():
    with pytest.raises(UnsupportedCondition) as info:
        union_control_type("shuffle", 8, "my-union")
    message = info.value.message
    assert "my-union" in message and "SD1.5" in message and "[controlnets.sdxl] shuffle" in \
        message and info.value.field == "condition"
    with pytest.raises(UnsupportedCondition, match="ProMax.*models download sdxl:tile"):
        union_control_type("tile", 6, "xinsir/controlnet-union-sdxl-1.0")


def test_lineart_anime_refuses_guess_mode_on_sd15_only():
    with pytest.raises(UnsupportedCondition, match="guess mode") as info:
        check_unit("sd15", "lineart_anime", "control")
    assert info.value.field == "control_mode"
    check_unit("sd15", "lineart_anime", "balanced")
    check_unit("sd15", "lineart", "control")
    check_unit("sdxl", "lineart_anime", "control", union=True)


# -----------------------------------------------------------------------------
# fp16-only folders
# -----------------------------------------------------------------------------

def test_downloads_take_the_fp16_file_of_an_fp16_only_repo():
    def chosen(*names):
        plan = downloads.choose("owner/repo", [downloads.HubFile(n, 1) for n in names])
        return [f.path for f in plan.files], plan.variant

    assert chosen("config.json", "diffusion_pytorch_model.fp16.safetensors") == \
        (["config.json", "diffusion_pytorch_model.fp16.safetensors"], "fp16")
    # with both, the fp16 variant too: half the download (tests/test_downloads.py)
    assert chosen("config.json", "diffusion_pytorch_model.safetensors",
                  "diffusion_pytorch_model.fp16.safetensors") == \
        (["config.json", "diffusion_pytorch_model.fp16.safetensors"], "fp16")
    files, variant = chosen("model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                            "vae/diffusion_pytorch_model.safetensors")
    assert {"unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors"} <= set(files) and variant == "fp16"


def test_a_folder_without_weights_is_incomplete_not_fp16(tmp_path):
    net = write_folder(tmp_path / "net", {"config.json": NET_FOLDERS["sd15"]})
    with pytest.raises(ModelMissing, match="incomplete"):
        catalogue(tmp_path)._resolve(str(net), str(net), "controlnet", "sd15")
