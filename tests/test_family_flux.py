"""The transformer families on their tiny stacks: Flux.1 (classic and union ControlNets) and
SD3.5, through DiffusersEngine.generate (backend/engines/diffusers/dit.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backend.engines import tiny
from backend.engines.catalogue import LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import detect, detect_file
from backend.imaging import to_array
from shared.errors import Cancelled, Unsupported, UnsupportedCondition
from shared.images import Image
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import RecordingContext, lines_image, random_rgba, torch_threads  # noqa: F401

W = H = 64


@pytest.fixture(scope="module")
def dit_root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-dit")
    for family in ("flux", "sd3"):
        tiny.ensure_tiny(family, root)
    return root


def _engine(root) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                 cache_dir=str(root / "empty-hf-cache"),
                                                 roots=(str(root),))),
                           device="cpu")


@pytest.fixture(scope="module")
def engine(dit_root):
    engine = _engine(dit_root)
    yield engine
    engine.close()


@pytest.fixture
def fresh(dit_root):
    engine = _engine(dit_root)
    yield engine
    engine.close()


def selection(width=W, height=H) -> Image:
    array = np.zeros((height, width, 4), np.uint8)
    array[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return Image(width, height, array.tobytes())


def images(width=W, height=H):
    return {0: lines_image(width, height, 1), 1: lines_image(width, height, 2),
            10: random_rgba(width, height, seed=3), 11: selection(width, height)}


def request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("base_model", "tiny-flux")
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.75)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def unit(condition="lineart", slot=0, **kw):
    return ControlUnit(condition=condition, image=slot, **kw)


def pixels(engine, req, imgs=None, ctx=None) -> np.ndarray:
    w, h = req.width, req.height
    out = engine.generate(req, imgs or images(w, h), ctx or RecordingContext())
    return to_array(out[0].image).copy()


def classic(root, family="flux", name="lines") -> str:
    return str(tiny.tiny_dir(family, root) / "controlnets" / name)


# -----------------------------------------------------------------------------
# Flux.1
# -----------------------------------------------------------------------------

UNITS = {"none": lambda root: (),
         "classic": lambda root: (unit(model=classic(root)),),
         "union": lambda root: (unit("lineart"), unit("depth", 1, weight=0.6))}


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("units", sorted(UNITS))
def test_flux_every_mode_with_and_without_controlnets(engine, dit_root, mode, units):
    ctx = RecordingContext(preview_every=1)
    req = request(mode=mode, controls=UNITS[units](dit_root))
    out = pixels(engine, req, ctx=ctx)
    assert out.shape == (H, W, 4) and out[..., 3].min() == 255
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert steps and steps[-1][1] == steps[-1][2] == len(steps)  # every step, once
    assert len(ctx.previews) == len(steps)  # a preview of the unpacked latents each
    if mode == "inpaint":  # outside the selection: the input, bit for bit
        init = to_array(images()[10])
        outside = to_array(selection())[..., 0] == 0
        assert np.array_equal(out[outside][:, :3], init[outside][:, :3])
    assert out[..., :3].std() > 0  # a picture, not a flat fill


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_hires_and_batches_count_every_step_once(engine, family):
    """The DiT img2img pipelines run ceil(steps x strength) steps; the engine asks for the
    strength that runs the steps it counts, so progress ends exactly at its total (SD3's
    hires pass refines without its units: it has no ControlNet img2img pipeline)."""
    ctx = RecordingContext()
    req = request(base_model=f"tiny-{family}", width=160, height=160, hires=True, batch=2,
                  controls=(unit(),), steps=5)
    out = engine.generate(req, images(160, 160), ctx)
    assert len(out) == 2 and engine.last_plan.hires
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert len(steps) == steps[-1][2] == steps[-1][1]
    ctx = RecordingContext()
    engine.generate(request(base_model=f"tiny-{family}", mode="img2img", strength=0.6,
                            steps=5), images(), ctx)
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert len(steps) == steps[-1][2] == 3


def test_flux_same_seed_same_pixels_and_another_seed_others(engine, dit_root):
    req = request(controls=(unit(), unit("depth", 1)))
    first = pixels(engine, req)
    assert np.array_equal(first, pixels(engine, req))
    assert not np.array_equal(first, pixels(engine, request(controls=req.controls, seed=8)))


def test_flux_a_controlnet_changes_the_picture_and_weight_zero_is_none(engine, dit_root):
    plain = pixels(engine, request())
    for units in ((unit(model=classic(dit_root)),), (unit(),)):
        assert not np.array_equal(plain, pixels(engine, request(controls=units)))
        off = tuple(dataclasses.replace(u, weight=0.0) for u in units)
        assert np.array_equal(plain, pixels(engine, request(controls=off)))


def test_flux_union_modes_follow_the_condition(engine):
    """The same image as lineart (canny mode), depth and openpose (pose mode): three
    pictures; softedge shares lineart's canny mode, so the same picture."""
    got = {c: pixels(engine, request(controls=(unit(c),)))
           for c in ("lineart", "depth", "openpose", "softedge")}
    assert not np.array_equal(got["lineart"], got["depth"])
    assert not np.array_equal(got["depth"], got["openpose"])
    assert np.array_equal(got["lineart"], got["softedge"])


def test_flux_a_condition_the_union_has_no_mode_for_is_a_typed_error(fresh, dit_root):
    union = classic(dit_root, name="union")
    with pytest.raises(UnsupportedCondition, match="no mode for 'normal'") as info:
        fresh.generate(request(controls=(unit("normal", model=union),)), images(),
                       RecordingContext())
    assert "[controlnets.flux] normal" in info.value.message
    assert info.value.field == "condition"
    assert not fresh._bases  # refused before anything loaded


def test_flux_control_modes_other_than_balanced_are_a_typed_error(engine):
    with pytest.raises(UnsupportedCondition, match="balanced") as info:
        engine.generate(request(controls=(unit(control_mode="prompt"),)), images(),
                        RecordingContext())
    assert info.value.field == "control_mode"


def test_a_flux_controlnet_on_an_sdxl_base_is_refused(fresh, dit_root, sdxl_root):
    with pytest.raises(Unsupported, match="another model family"):
        fresh.generate(request(base_model="tiny-sdxl", controls=(unit(model=classic(dit_root)),)),
                       images(), RecordingContext())


@pytest.fixture(scope="module")
def sdxl_root(dit_root):
    """The SDXL tiny stack beside the DiT ones (for the cross-family test)."""
    tiny.ensure_tiny("sdxl", dit_root)
    return dit_root


def test_flux_cancel_lands_inside_a_step(fresh):
    """Cancel is checked before every transformer block: a cancel at the third check (the
    engine's own before the picture, then the first step's blocks) stops before the first
    step ends."""
    class CancelAtCall(RecordingContext):
        calls = 0

        def check_cancelled(self):
            self.calls += 1
            if self.calls >= 3:
                raise Cancelled(job_id=self.job_id)

    ctx = CancelAtCall()
    with pytest.raises(Cancelled):
        fresh.generate(request(controls=(unit(),)), images(), ctx)
    assert ctx.steps_done() == 0


def test_flux_cancel_between_steps(engine):
    ctx = RecordingContext(cancel_at=2)
    with pytest.raises(Cancelled):
        engine.generate(request(steps=6), images(), ctx)
    assert ctx.steps_done() == 2


def test_flux_previews_come_from_the_unpacked_latents(engine):
    ctx = RecordingContext(preview_every=1)
    engine.generate(request(controls=(unit(),)), images(), ctx)
    sizes = {(e[2], e[3]) for e in ctx.events if e[0] == "preview"}
    assert len(ctx.previews) == 4 and sizes == {(W // 8, H // 8)}


def test_flux_sizes_are_multiples_of_16_and_the_output_the_canvas(engine):
    req = request(width=88, height=56)
    out = engine.generate(req, images(88, 56), RecordingContext())
    assert (out[0].image.width, out[0].image.height) == (88, 56)
    w, h = engine.last_plan.first.size
    assert w % 16 == 0 and h % 16 == 0


def test_flux_ignores_the_negative_prompt_and_reads_cfg_as_guidance(engine):
    plain = pixels(engine, request(cfg=3.5))
    assert np.array_equal(plain, pixels(engine, request(cfg=3.5, negative_prompt="blurry")))
    assert not np.array_equal(plain, pixels(engine, request(cfg=7.0)))


def test_the_tiny_flux_files_are_detected(dit_root):
    folder = tiny.tiny_dir("flux", dit_root)
    assert detect(folder, "base").name == "flux"
    union = detect(folder / "controlnets" / "union", "controlnet")
    assert (union.family, union.union, union.control_types) == ("flux", True, 10)
    assert detect(folder / "controlnets" / "lines", "controlnet").name == "flux"
    single = detect_file(folder / "controlnets" / "union" /
                         "diffusion_pytorch_model.safetensors")
    assert (single.family, single.union, single.control_types) == ("flux", True, 10)
    sd3 = tiny.tiny_dir("sd3", dit_root)
    assert detect(sd3, "base").name == "sd3"
    assert detect(sd3 / "controlnets" / "lines", "controlnet").name == "sd3"


def test_the_catalogue_offers_what_flux_and_sd3_serve(dit_root):
    cat = Catalogue(ModelConfig(tiny_root=str(dit_root), cache_dir=str(dit_root / "hf")))
    listed = {m.name: m for m in cat.entries() if m.kind == "base"}
    flux = listed["black-forest-labs/FLUX.1-dev"]
    assert flux.family == "flux" and "depth" in flux.conditions and \
        "normal" not in flux.conditions
    assert "tile" in listed["stabilityai/stable-diffusion-3.5-large"].conditions
    assert set(listed["tiny-flux"].conditions) == set(flux.conditions)
    assert "Non-Commercial" in LICENCES["black-forest-labs/FLUX.1-dev"]
    assert "Community" in LICENCES["stabilityai/stable-diffusion-3.5-large"]


# -----------------------------------------------------------------------------
# SD3.5
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, units", [
    ("txt2img", ()), ("img2img", ()), ("inpaint", ()),
    ("txt2img", (unit(),)), ("txt2img", (unit(), unit("depth", 1, weight=0.5))),
    ("inpaint", (unit("inpaint", 10),))])
def test_sd3_modes_and_controlnets(engine, mode, units):
    ctx = RecordingContext()
    req = request(base_model="tiny-sd3", mode=mode, controls=units)
    out = pixels(engine, req, ctx=ctx)
    assert out.shape == (H, W, 4) and ctx.steps_done() > 0
    if units:
        plain = pixels(engine, request(base_model="tiny-sd3", mode=mode))
        assert not np.array_equal(out, plain)
        assert np.array_equal(out, pixels(engine, req))  # same seed, same pixels


def test_sd3_controlnet_img2img_is_a_typed_error_saying_what_works(engine):
    with pytest.raises(Unsupported, match="txt2img") as info:
        engine.generate(request(base_model="tiny-sd3", mode="img2img", controls=(unit(),)),
                        images(), RecordingContext())
    assert info.value.field == "mode"


def test_sd3_uses_the_negative_prompt(engine):
    plain = pixels(engine, request(base_model="tiny-sd3", cfg=5.0))
    assert not np.array_equal(plain, pixels(engine, request(base_model="tiny-sd3", cfg=5.0,
                                                            negative_prompt="blurry")))


def test_sd3_cancel_lands_inside_a_step(fresh):
    class CancelAtCall(RecordingContext):
        calls = 0

        def check_cancelled(self):
            self.calls += 1
            if self.calls >= 3:  # the engine's check, then the first step's blocks
                raise Cancelled(job_id=self.job_id)

    ctx = CancelAtCall()
    with pytest.raises(Cancelled):
        fresh.generate(request(base_model="tiny-sd3"), images(), ctx)
    assert ctx.steps_done() == 0


# -----------------------------------------------------------------------------
# bench engine
# -----------------------------------------------------------------------------

def test_bench_engine_runs_the_flux_and_sd3_stacks_on_their_bare_pipelines(dit_root):
    from backend.bench.engine import bench_engine

    figures = bench_engine(repeats=1, steps=2, tiny_root=str(dit_root),
                           stacks=("flux-union", "sd3"))
    flux, sd3 = figures["stacks"]["flux-union"], figures["stacks"]["sd3"]
    assert (flux["bare"], sd3["bare"]) == ("FluxControlNetPipeline",
                                           "StableDiffusion3ControlNetPipeline")
    assert flux["same_pixels"] and sd3["same_pixels"] and figures["worst_ratio"] > 0


# -----------------------------------------------------------------------------
# LoRAs (diffusers' Flux / SD3 LoRA loaders, on the transformer)
# -----------------------------------------------------------------------------

def make_transformer_lora(path, folder, family: str):
    """A rank-4 LoRA on the tiny ``family`` transformer's attention, random non-zero up
    matrices, saved with the family pipeline's ``save_lora_weights``."""
    import torch
    from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model_cls, pipe_cls = (FluxTransformer2DModel, FluxPipeline) if family == "flux" else \
        (SD3Transformer2DModel, StableDiffusion3Pipeline)
    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            model_cls.from_pretrained(folder / "transformer"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    pipe_cls.save_lora_weights(str(path.parent), weight_name=path.name,
                               transformer_lora_layers=get_peft_model_state_dict(model))
    return path


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_lora_on_the_transformer_changes_the_picture_and_strength_zero_is_none(
        dit_root, tmp_path, family):
    from shared.messages import LoraRef

    make_transformer_lora(tmp_path / "loras" / "ink.safetensors",
                          tiny.tiny_dir(family, dit_root), family)
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(dit_root),
                                                   lora_dir=str(tmp_path / "loras"))),
                             device="cpu")
    base = dict(base_model=f"tiny-{family}")
    plain = pixels(engine, request(**base))
    inked = pixels(engine, request(**base, loras=(LoraRef(name="ink"),)))
    off = pixels(engine, request(**base, loras=(LoraRef(name="ink", strength=0.0),)))
    engine.close()
    assert not np.array_equal(plain, inked)
    assert np.array_equal(plain, off)


# -----------------------------------------------------------------------------
# FLUX.1 Tools: a control base (its transformer reads 128 channels)
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_base(dit_root):
    """The tiny Flux stack with a 128-channel transformer, as FLUX.1 Canny / Depth [dev]."""
    import shutil

    import torch
    from diffusers import FluxTransformer2DModel

    source = tiny.tiny_dir("flux", dit_root)
    folder = dit_root / "tiny-flux-tools"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("controlnets", ".complete"))
    plain = FluxTransformer2DModel.from_pretrained(source / "transformer")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        wide = FluxTransformer2DModel.from_config({**plain.config, "in_channels": 128,
                                                   "out_channels": 64})
    shutil.rmtree(folder / "transformer")
    wide.save_pretrained(folder / "transformer")
    return folder


def test_a_flux_tools_base_is_detected_from_its_transformer(tools_base, engine):
    found = detect(tools_base, "base")
    assert (found.family, found.control, found.name) == ("flux", True, "flux-control")
    assert engine.catalogue.resolve_base(str(tools_base)).control


@pytest.fixture
def tiny_native(monkeypatch):
    """A Flux folder generates at 1024² (its family's native size): the tiny one at 64²."""
    from backend.engines.catalogue import NATIVE_SIZE

    monkeypatch.setitem(NATIVE_SIZE, "flux", tiny.NATIVE_SIZE)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_a_flux_tools_base_takes_the_units_image_itself(engine, tools_base, tiny_native, mode):
    base = str(tools_base)
    # "normal" has no Flux ControlNet: none is looked up for a control base
    first = pixels(engine, request(base_model=base, mode=mode, controls=(unit("normal", 0),)))
    other = pixels(engine, request(base_model=base, mode=mode, controls=(unit("normal", 1),)))
    assert not np.array_equal(first, other)
    assert np.array_equal(first, pixels(engine, request(base_model=base, mode=mode,
                                                        controls=(unit("normal", 0),))))


def test_a_flux_tools_base_needs_exactly_one_unit(engine, tools_base, tiny_native):
    for units in ((), (unit(), unit("depth", 1))):
        with pytest.raises(Unsupported, match="exactly one control unit") as info:
            engine.generate(request(base_model=str(tools_base), controls=units), images(),
                            RecordingContext())
        assert info.value.field == "controls"
