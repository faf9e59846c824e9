"""Z-Image on its tiny stack (tiny ZImageTransformer2DModel, tiny Qwen3 text encoder, the
union ControlNet), through DiffusersEngine.generate (backend/engines/diffusers/dit_zimage.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backend.engines import tiny
from backend.engines.catalogue import LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import _detect_keys, detect, detect_file
from backend.imaging import to_array
from shared.errors import Cancelled, Unsupported, UnsupportedCondition
from shared.messages import GenerateRequest

from test_family_flux import images, selection, unit
from tiny_fixtures import RecordingContext, torch_threads  # noqa: F401

W = H = 64


@pytest.fixture(scope="module")
def z_root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-zimage")
    tiny.ensure_tiny("zimage", root)
    return root


def _engine(root) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                 cache_dir=str(root / "empty-hf-cache"),
                                                 roots=(str(root),))),
                           device="cpu")


@pytest.fixture(scope="module")
def engine(z_root):
    engine = _engine(z_root)
    yield engine
    engine.close()


def request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("cfg", 1.0)
    kw.setdefault("base_model", "tiny-zimage")
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.75)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def pixels(engine, req, ctx=None) -> np.ndarray:
    out = engine.generate(req, images(req.width, req.height), ctx or RecordingContext())
    return to_array(out[0].image).copy()


@pytest.mark.parametrize("mode, controls", [
    ("txt2img", False), ("img2img", False), ("inpaint", False),
    ("txt2img", True), ("inpaint", True)])
def test_every_mode_with_and_without_the_union_controlnet(engine, mode, controls):
    ctx = RecordingContext(preview_every=1)
    req = request(mode=mode, controls=(unit("canny"),) if controls else ())
    out = pixels(engine, req, ctx)
    assert out.shape == (H, W, 4) and out[..., 3].min() == 255
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert steps and steps[-1][1] == steps[-1][2] == len(steps)  # every step, once
    assert len(ctx.previews) == len(steps)
    if mode == "inpaint":  # outside the selection: the input, bit for bit
        init = to_array(images()[10])
        outside = to_array(selection())[..., 0] == 0
        assert np.array_equal(out[outside][:, :3], init[outside][:, :3])
    assert out[..., :3].std() > 0
    assert pixels(engine, req).tobytes() == out.tobytes()  # same seed, same pixels


def test_a_long_prompt(engine):
    """The caption's tokens take RoPE positions (one per byte in the tiny tokenizer): a
    prompt of over 64 tokens generates (the first tiny stack had the real model's 1024 text
    positions cut to 64, and the real GIMP tier's prompt, in its chat template, broke it)."""
    prompt = "a girl in a red coat walking through the snow at dusk, watercolour, soft light"
    assert len(prompt.encode()) > 64
    out = pixels(engine, request(prompt=prompt, controls=(unit("lineart"),), steps=1))
    assert out.shape == (H, W, 4) and out[..., :3].std() > 0


def test_img2img_with_a_unit_is_a_typed_error_saying_what_works(engine):
    with pytest.raises(Unsupported) as err:
        pixels(engine, request(mode="img2img", controls=(unit("depth"),)))
    assert "txt2img and inpaint" in err.value.message


@pytest.mark.parametrize("mode", ["txt2img", "inpaint"])
def test_the_controlnet_changes_the_picture_and_weight_zero_is_none(engine, mode):
    plain = pixels(engine, request(mode=mode))
    assert not np.array_equal(plain, pixels(engine, request(mode=mode,
                                                           controls=(unit("depth"),))))
    off = pixels(engine, request(mode=mode, controls=(unit("depth", weight=0.0),)))
    assert np.array_equal(plain, off)


def test_another_seed_other_pixels_and_cfg_runs_guidance_with_the_negative(engine):
    plain = pixels(engine, request())
    assert not np.array_equal(plain, pixels(engine, request(seed=8)))
    # cfg <= 1 runs no guidance batch: the negative prompt cannot matter
    assert np.array_equal(plain, pixels(engine, request(negative_prompt="blurry")))
    guided = pixels(engine, request(cfg=3.0))
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, pixels(engine, request(cfg=3.0, negative_prompt="fog")))


def test_several_units_are_a_typed_error_naming_what_combines_them(engine):
    with pytest.raises(UnsupportedCondition) as err:
        pixels(engine, request(controls=(unit("canny"), unit("depth", 1))))
    assert "one control image" in err.value.message and "Flux.1 or SDXL" in err.value.message
    # a second unit at weight 0 is off: it runs
    pixels(engine, request(controls=(unit("canny"), unit("depth", 1, weight=0.0))))


@pytest.mark.parametrize("kw, field", [
    ({"condition": "normal"}, "condition"), ({"condition": "tile"}, "condition"),
    ({"control_mode": "prompt"}, "control_mode"), ({"start": 0.2}, "start")])
def test_what_the_union_controlnet_cannot_do_is_a_typed_error(engine, z_root, kw, field):
    union = str(tiny.tiny_dir("zimage", z_root) / "controlnets" / "union")
    with pytest.raises(UnsupportedCondition) as err:
        pixels(engine, request(controls=(dataclasses.replace(unit("canny", model=union),
                                                             **kw),)))
    assert err.value.field == field
    if field == "condition":  # it says what it serves
        assert "canny" in err.value.message and "depth" in err.value.message


def test_cancel_lands_inside_a_step(z_root):
    class CancelAtCall(RecordingContext):
        calls = 0

        def check_cancelled(self):
            self.calls += 1
            if self.calls >= 3:
                raise Cancelled(job_id=self.job_id)

    engine = _engine(z_root)
    try:
        ctx = CancelAtCall()
        with pytest.raises(Cancelled):
            engine.generate(request(controls=(unit("canny"),)), images(), ctx)
        assert ctx.steps_done() == 0
    finally:
        engine.close()


def test_cancel_between_steps(engine):
    ctx = RecordingContext(cancel_at=2)
    with pytest.raises(Cancelled):
        engine.generate(request(steps=6), images(), ctx)
    assert ctx.steps_done() == 2


def test_the_tiny_zimage_files_are_detected(z_root):
    folder = tiny.tiny_dir("zimage", z_root)
    assert detect(folder, "base").name == "zimage"
    net = folder / "controlnets" / "union"
    found = detect(net, "controlnet")
    assert (found.family, found.union, found.inpaint) == ("zimage", True, True)
    single = detect_file(net / "diffusion_pytorch_model.safetensors")
    assert (single.kind, single.family, single.inpaint) == ("controlnet", "zimage", True)
    base = detect_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert (base.kind, base.family) == ("base", "zimage")


def test_original_zimage_single_file_keys_are_detected():
    """The keys of Tongyi's and alibaba-pai's own files (diffusers' single-file loader's
    rules): the transformer, the Union 1.0 ControlNet (16 control channels), 2.x (33)."""
    base = ("model.diffusion_model.layers.0.adaLN_modulation.0.weight",
            "model.diffusion_model.context_refiner.0.attention.qkv.weight")
    assert _detect_keys(base, lambda k: ()).name == "zimage"
    shapes = {16: (3840, 64), 33: (3840, 132)}
    for dim, inpaint in ((16, False), (33, True)):
        found = _detect_keys(("control_all_x_embedder.2-1.weight", "control_layers.0.x"),
                             lambda k, dim=dim: shapes[dim])
        assert (found.kind, found.family, found.inpaint) == ("controlnet", "zimage", inpaint)
    # Lumina 2 shares the layout's names but not Z-Image's refiner pair
    assert _detect_keys(("layers.0.adaLN_modulation.1.weight",), lambda k: ()) is None


def test_the_catalogue_offers_zimage_turbo_and_its_union_controlnet(z_root):
    cat = Catalogue(ModelConfig(tiny_root=str(z_root), cache_dir=str(z_root / "hf")))
    listed = {m.name: m for m in cat.entries() if m.kind == "base"}
    turbo = listed["Tongyi-MAI/Z-Image-Turbo"]
    assert turbo.family == "zimage" and {"canny", "depth", "openpose"} <= set(turbo.conditions)
    assert "normal" not in turbo.conditions
    assert set(listed["tiny-zimage"].conditions) == set(turbo.conditions)
    assert LICENCES["Tongyi-MAI/Z-Image-Turbo"] == "Apache-2.0"


def test_bench_engine_runs_the_zimage_stack_on_its_bare_pipeline(z_root):
    from backend.bench.engine import bench_engine

    figures = bench_engine(repeats=1, steps=2, tiny_root=str(z_root), stacks=("zimage",))
    zimage = figures["stacks"]["zimage"]
    assert zimage["same_pixels"] and zimage["bare"] == "ZImageControlNetPipeline"
