"""T2I-Adapter units on the tiny SD1.5 and SDXL stacks (tiny adapters built locally).

The engine gives the UNet the adapter features itself (engines.diffusers.adapters); these
tests check that the pixels equal diffusers' own adapter pipelines where those can run the
request, and what the engine adds: every mode, per-unit windows, a mix with ControlNets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engines import tiny
from backend.engines.catalogue import T2I_ADAPTERS, Catalogue, ModelConfig
from backend.engines.diffusers.samplers import make_scheduler
from backend.engines.families import detect_controlnet_folder
from backend.imaging import from_array, to_array
from shared.errors import Cancelled, Unsupported, UnsupportedCondition, UnsupportedFamily
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import (RecordingContext, lines_image, random_rgba,  # noqa: F401
                           tiny_catalogue, tiny_engine, tiny_root, torch_threads)

W, H = 72, 56


def adapter(tiny_root, family="sd15") -> str:
    return str(tiny.ensure_tiny_adapter(family, tiny_root))


def selection(width=W, height=H):
    array = np.zeros((height, width, 4), np.uint8)
    array[..., 3] = 255
    array[height // 4: 3 * height // 4, width // 3: 2 * width // 3, :3] = 255
    return from_array(array)


def images(width=W, height=H):
    return {0: lines_image(width, height, 1), 1: lines_image(width, height, 2),
            10: random_rgba(width, height, seed=3), 11: selection(width, height)}


def request(family="sd15", **kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("base_model", f"tiny-{family}")
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.8)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def unit(model, slot=0, condition="canny", **kw) -> ControlUnit:
    return ControlUnit(condition=condition, image=slot, model=model, **kw)


def pixels(engine, req, imgs=None, ctx=None) -> np.ndarray:
    out = engine.generate(req, imgs or images(req.width, req.height), ctx or RecordingContext())
    return to_array(out[0].image).astype(int)


def differ(a, b) -> float:
    return float(np.abs(a - b).mean())


# -----------------------------------------------------------------------------
# What a T2I-Adapter is: its config, never its name
# -----------------------------------------------------------------------------

def _config_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    return folder


def test_a_t2i_adapter_is_told_by_its_config_not_its_name(tmp_path):
    xl = _config_folder(tmp_path / "t2iadapter_canny_sd15v2", {
        "_class_name": "T2IAdapter", "adapter_type": "full_adapter_xl",
        "channels": [320, 640, 1280]})
    sd = _config_folder(tmp_path / "t2i-adapter-canny-sdxl-1.0", {
        "_class_name": "T2IAdapter", "adapter_type": "full_adapter",
        "channels": [320, 640, 1280, 1280]})
    found = detect_controlnet_folder(xl), detect_controlnet_folder(sd)
    assert [(f.kind, f.family, f.t2i_adapter) for f in found] == \
        [("adapter", "sdxl", True), ("adapter", "sd15", True)]


def test_the_catalogue_resolves_an_adapter_as_a_units_model(tiny_catalogue, tiny_root):
    base = tiny_catalogue.resolve_base("tiny-sdxl")
    resolved = tiny_catalogue.resolve_controlnet("canny", base, adapter(tiny_root, "sdxl"))
    assert (resolved.adapter, resolved.family, resolved.union) == (True, "sdxl", False)
    assert not tiny_catalogue.resolve_controlnet("canny", base).adapter


def test_other_adapter_kinds_are_still_refused(tiny_catalogue, tmp_path):
    base = tiny_catalogue.resolve_base("tiny-sd15")
    xs = _config_folder(tmp_path / "xs",
                        {"_class_name": "ControlNetXSAdapter"})
    with pytest.raises(UnsupportedFamily, match="ControlNet-XS"):
        tiny_catalogue.resolve_controlnet("canny", base, str(xs))


def test_models_lists_tencentarc_adapters_and_controlnets_stay_the_defaults(tmp_path):
    cat = Catalogue(ModelConfig(cache_dir=str(tmp_path / "empty-cache")))
    listed = {(m.name, m.family): m for m in cat.entries() if m.kind == "controlnet"}
    for family, table in T2I_ADAPTERS.items():
        for condition, name in table.items():
            entry = listed[(name, family)]
            assert condition in entry.condition.split(",") and not entry.present
    assert cat.controlnet_name("canny", "sd15") == "lllyasviel/control_v11p_sd15_canny"
    assert cat.download_target("TencentARC/t2iadapter_canny_sd15v2")[1] == "controlnet"


# -----------------------------------------------------------------------------
# Running
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_adapter_steers_and_weight_zero_is_exactly_no_control(tiny_engine, tiny_root,
                                                                 family):
    model = adapter(tiny_root, family)
    plain = pixels(tiny_engine, request(family))
    one = pixels(tiny_engine, request(family, controls=(unit(model),)))
    other = pixels(tiny_engine, request(family, controls=(unit(model, 1),)))
    zero = pixels(tiny_engine, request(family, controls=(unit(model, weight=0.0),)))
    assert differ(one, plain) > 0.5 and differ(other, one) > 0.3
    assert np.array_equal(zero, plain)


def test_same_seed_same_pixels(tiny_engine, tiny_root):
    req = request("sdxl", controls=(unit(adapter(tiny_root, "sdxl")),), sampler="euler_a")
    assert np.array_equal(pixels(tiny_engine, req), pixels(tiny_engine, req))
    assert not np.array_equal(pixels(tiny_engine, req), pixels(tiny_engine, request(
        "sdxl", controls=req.controls, sampler="euler_a", seed=8)))


def _bare(family: str, folder: Path, adapter_model, scheduler):
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLAdapterPipeline.from_pretrained(
            folder, adapter=adapter_model, local_files_only=True)
    else:
        pipe = StableDiffusionAdapterPipeline.from_pretrained(
            folder, adapter=adapter_model, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler
    return pipe


@pytest.mark.parametrize("family,weights", [("sd15", [0.8]), ("sdxl", [1.0]),
                                            ("sd15", [0.8, 1.3]), ("sdxl", [0.6, 1.2])])
def test_pixels_equal_the_bare_adapter_pipelines(tiny_engine, tiny_root, family, weights):
    """One adapter (T2IAdapter) or two (MultiAdapter): the pixels are those of diffusers'
    StableDiffusion{,XL}AdapterPipeline at the same size, seed, steps and weights."""
    from diffusers import MultiAdapter, T2IAdapter
    from PIL import Image as PILImage

    side, seed, steps = 64, 42, 5
    imgs = images(side, side)
    model = adapter(tiny_root, family)
    controls = tuple(unit(model, i, weight=w) for i, w in enumerate(weights))
    ours = pixels(tiny_engine, request(family, width=side, height=side, seed=seed,
                                       steps=steps, controls=controls), imgs)
    one = T2IAdapter.from_pretrained(model, local_files_only=True)
    net = one if len(weights) == 1 else MultiAdapter([one] * len(weights))
    folder = tiny.tiny_dir(family, tiny_root)
    entry = tiny_engine._bases[f"base:{folder}"]
    bare = _bare(family, folder, net, make_scheduler("dpmpp_2m_karras", entry.scheduler_config))
    grey = [PILImage.fromarray(to_array(imgs[i])[..., :3].copy()).convert("L")
            for i in range(len(weights))]
    out = bare("a red coat", image=grey[0] if len(weights) == 1 else grey,
               adapter_conditioning_scale=weights[0] if len(weights) == 1 else weights,
               num_inference_steps=steps, guidance_scale=7.0, height=side, width=side,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    theirs = (np.clip(out, 0, 1) * 255).round().astype(int)
    if len(weights) == 1:
        assert np.array_equal(ours[..., :3], theirs)
    else:  # the same sum in another float order: at most a value or two rounds apart
        assert np.abs(ours[..., :3] - theirs).max() <= 1
        assert (ours[..., :3] != theirs).sum() <= 4


def test_end_is_the_sdxl_pipelines_conditioning_factor(tiny_engine, tiny_root):
    """``end`` 0.5 = ``adapter_conditioning_factor`` 0.5 (the first half of the steps);
    ``start`` (which the pipeline cannot express) changes the picture too."""
    from diffusers import T2IAdapter
    from PIL import Image as PILImage

    side, seed, steps = 64, 3, 4
    imgs = images(side, side)
    model = adapter(tiny_root, "sdxl")
    run = lambda **kw: pixels(tiny_engine, request(  # noqa: E731
        "sdxl", width=side, height=side, seed=seed, steps=steps,
        controls=(unit(model, **kw),)), imgs)
    half, full, late = run(end=0.5), run(), run(start=0.5)
    plain = pixels(tiny_engine, request("sdxl", width=side, height=side, seed=seed,
                                        steps=steps), imgs)
    folder = tiny.tiny_dir("sdxl", tiny_root)
    entry = tiny_engine._bases[f"base:{folder}"]
    bare = _bare("sdxl", folder, T2IAdapter.from_pretrained(model, local_files_only=True),
                 make_scheduler("dpmpp_2m_karras", entry.scheduler_config))
    out = bare("a red coat", image=PILImage.fromarray(to_array(imgs[0])[..., :3].copy())
               .convert("L"), adapter_conditioning_factor=0.5, num_inference_steps=steps,
               guidance_scale=7.0, height=side, width=side, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.array_equal(half[..., :3], (np.clip(out, 0, 1) * 255).round().astype(int))
    for a, b in ((half, full), (late, full), (late, plain), (late, half)):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_adapters_run_in_img2img_and_inpaint_and_beside_a_controlnet(tiny_engine, tiny_root,
                                                                     mode):
    """diffusers has no adapter img2img/inpaint pipeline nor a ControlNet + adapter one;
    the engine runs both (the adapter features go to the UNet of the request's pipeline)."""
    imgs = images()
    model = adapter(tiny_root, "sd15")
    plain = pixels(tiny_engine, request(mode=mode), imgs)
    with_adapter = pixels(tiny_engine, request(mode=mode, controls=(unit(model),)), imgs)
    controlnet = pixels(tiny_engine, request(mode=mode, controls=(
        unit("", 1, condition="depth"),)), imgs)
    both = pixels(tiny_engine, request(mode=mode, controls=(
        unit(model), unit("", 1, condition="depth"))), imgs)
    assert differ(with_adapter, plain) > 0.3
    assert differ(both, controlnet) > 0.3 and differ(both, with_adapter) > 0.3
    if mode == "inpaint":
        outside = to_array(imgs[11])[..., 0] == 0
        assert np.array_equal(both[outside], to_array(imgs[10])[outside])


def test_progress_previews_and_cancel_as_for_controlnet_units(tiny_engine, tiny_root):
    model = adapter(tiny_root, "sdxl")
    ctx = RecordingContext(preview_every=2)
    pixels(tiny_engine, request("sdxl", controls=(unit(model),)), ctx=ctx)
    assert [e[1] for e in ctx.events if e[0] == "progress"] == [1, 2, 3, 4]
    assert len(ctx.previews) == 2
    cancel = RecordingContext(cancel_at=2)
    with pytest.raises(Cancelled):
        pixels(tiny_engine, request("sdxl", steps=8, controls=(unit(model),)), ctx=cancel)
    assert cancel.steps_done() == 2
    # the hook is gone: the next request without adapters is the plain picture again
    assert np.array_equal(pixels(tiny_engine, request("sdxl", controls=(unit(model, weight=0),))),
                          pixels(tiny_engine, request("sdxl")))


# -----------------------------------------------------------------------------
# What an adapter cannot do: typed errors naming what works
# -----------------------------------------------------------------------------

def test_an_adapter_of_another_family_is_refused_before_loading(tiny_engine, tiny_root):
    with pytest.raises(Unsupported, match="made for Stable Diffusion 1.5.*SDXL"):
        pixels(tiny_engine, request("sdxl", controls=(unit(adapter(tiny_root, "sd15")),)))


@pytest.mark.parametrize("kw,field", [({"control_mode": "prompt"}, "control_mode"),
                                      ({"control_mode": "control"}, "control_mode"),
                                      ({"condition": "inpaint"}, "condition")])
def test_what_an_adapter_cannot_do_is_a_typed_error(tiny_engine, tiny_root, kw, field):
    with pytest.raises(UnsupportedCondition) as err:
        pixels(tiny_engine, request(controls=(unit(adapter(tiny_root), **kw),)))
    assert err.value.field == field


def test_an_adapter_that_does_not_fit_the_unet_is_refused(tiny_engine, tiny_root, tmp_path):
    from diffusers import T2IAdapter

    folder = tmp_path / "wide-adapter"
    T2IAdapter(in_channels=1, channels=[48], num_res_blocks=1, downscale_factor=16,
               adapter_type="full_adapter").save_pretrained(folder)
    with pytest.raises(Unsupported, match="does not fit"):
        pixels(tiny_engine, request(controls=(unit(str(folder)),)))
