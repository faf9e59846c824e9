"""The engine on every model family it runs, on tiny models built locally (CPU, offline):
the SDXL union ControlNet (one model, several conditions, one call), 9-channel
inpainting bases, SDXL-family single files, fp16-only folders, per-condition quirks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engines import tiny
from backend.engines.catalogue import DEFAULT_BASES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.diffusers.pipelines import control_image
from backend.engines.diffusers.samplers import make_scheduler
from backend.imaging import from_array, to_array
from shared.errors import UnsupportedCondition, UnsupportedFamily
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import (RecordingContext, config_repo, fresh_engine,  # noqa: F401
                           inpaint_folder, lines_image, lora_engine, random_rgba, tiny_catalogue,
                           tiny_engine, tiny_inpaint_folder, tiny_lora_dir, tiny_root,
                           torch_threads)

W, H = 72, 56




def selection(width=W, height=H):
    array = np.zeros((height, width, 4), np.uint8)
    array[..., 3] = 255
    array[height // 4: 3 * height // 4, width // 3: 2 * width // 3, :3] = 255
    return from_array(array)


def images(width=W, height=H):
    return {0: lines_image(width, height, 1), 1: lines_image(width, height, 2),
            10: random_rgba(width, height, seed=3), 11: selection(width, height)}


def request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("base_model", "tiny-sdxl")
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.8)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def unit(condition="lineart", slot=0, **kw):
    return ControlUnit(condition=condition, image=slot, **kw)


def pixels(engine, req, imgs=None) -> np.ndarray:
    out = engine.generate(req, imgs or images(req.width, req.height), RecordingContext())
    return to_array(out[0].image).copy()


class CountCalls:
    """Counts forward calls of a module (and which control types each call had)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(tuple(kwargs.get("control_type_idx") or ()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def union_net(engine):
    return next(e.model for k, e in engine._nets.items() if k.endswith("union"))


# -----------------------------------------------------------------------------
# SDXL with the union ControlNet
# -----------------------------------------------------------------------------

def test_the_tiny_sdxl_catalogue_uses_the_union_for_what_it_serves(tiny_catalogue):
    base = tiny_catalogue.resolve_base("tiny-sdxl")
    for condition in ("canny", "depth", "openpose", "lineart", "scribble", "softedge", "tile",
                      "normal", "seg", "inpaint"):
        net = tiny_catalogue.resolve_controlnet(condition, base)
        assert net.union and net.control_types == 8 and net.path.endswith("union"), condition
    assert not tiny_catalogue.resolve_controlnet("shuffle", base).union


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_union_in_every_mode_two_conditions_in_one_call(tiny_engine, mode):
    imgs = images()
    plain = pixels(tiny_engine, request(mode=mode), imgs)
    one = pixels(tiny_engine, request(mode=mode, controls=(unit("lineart", 0),)), imgs)
    other = pixels(tiny_engine, request(mode=mode, controls=(unit("lineart", 1),)), imgs)
    as_depth = pixels(tiny_engine, request(mode=mode, controls=(unit("depth", 0),)), imgs)
    with CountCalls(union_net(tiny_engine)) as counter:
        two = pixels(tiny_engine, request(mode=mode, controls=(
            unit("lineart", 0), unit("depth", 1, weight=1.3))), imgs)
    runs = tiny_engine.last_plan.first.runs
    assert counter.calls == [(3, 1)] * runs  # one union call per step, both conditions
    for array in (plain, one, two):
        assert array.shape == (H, W, 4)
    assert np.abs(one.astype(int) - plain).mean() > 0.5     # the control image steers
    assert np.abs(other.astype(int) - one).mean() > 0.1     # ... and which image matters
    assert np.abs(as_depth.astype(int) - one).mean() > 0.1  # ... and the control type
    assert np.abs(two.astype(int) - one).mean() > 0.5       # the second condition adds
    if mode == "inpaint":
        outside = to_array(imgs[11])[..., 0] == 0
        canvas = to_array(imgs[10])
        assert np.array_equal(two[outside], canvas[outside])


def test_union_same_seed_same_pixels(tiny_engine):
    req = request(controls=(unit("canny", 0), unit("openpose", 1)), sampler="euler_a")
    assert np.array_equal(pixels(tiny_engine, req), pixels(tiny_engine, req))
    assert not np.array_equal(pixels(tiny_engine, req),
                              pixels(tiny_engine, request(controls=req.controls, seed=8,
                                                          sampler="euler_a")))


def _bare_union(folder: Path, cls, engine_scheduler):
    from diffusers import ControlNetUnionModel

    net = ControlNetUnionModel.from_pretrained(folder / "controlnets" / "union",
                                               local_files_only=True)
    pipe = cls.from_pretrained(folder, controlnet=net, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = engine_scheduler
    return pipe


@pytest.mark.parametrize("units", [[("lineart", 1.0)], [("lineart", 0.8), ("depth", 1.3)]])
def test_union_pixels_equal_the_bare_union_pipelines(tiny_engine, tiny_root, units):
    """The engine runs union models in the ControlNet pipelines with its own units; the
    pixels equal diffusers' StableDiffusionXLControlNetUnion{,Img2Img}Pipeline's, with one
    condition and with two (each weight scales its condition inside the union model)."""
    from diffusers import (StableDiffusionXLControlNetUnionImg2ImgPipeline,
                           StableDiffusionXLControlNetUnionPipeline)
    from PIL import Image as PILImage

    side, seed, steps = 64, 42, 5  # the tiny model's native size: no resizing either way
    imgs = images(side, side)
    controls = tuple(unit(c, i, weight=w) for i, (c, w) in enumerate(units))
    modes = [{"lineart": 3, "depth": 1}[c] for c, _ in units]
    control = [PILImage.fromarray(to_array(imgs[i])[..., :3].copy()) for i in range(len(units))]
    folder = tiny.tiny_dir("sdxl", tiny_root)
    for mode, cls in (("txt2img", StableDiffusionXLControlNetUnionPipeline),
                      ("img2img", StableDiffusionXLControlNetUnionImg2ImgPipeline)):
        ours = pixels(tiny_engine, request(width=side, height=side, seed=seed, steps=steps,
                                           mode=mode, controls=controls, strength=0.7), imgs)
        entry = tiny_engine._bases[f"base:{folder}"]
        bare = _bare_union(folder, cls, make_scheduler("dpmpp_2m_karras", entry.scheduler_config))
        kwargs = dict(control_image=control, control_mode=modes, num_inference_steps=steps,
                      controlnet_conditioning_scale=[w for _, w in units], guidance_scale=7.0,
                      generator=torch.Generator().manual_seed(seed), height=side, width=side,
                      output_type="np")
        if mode == "img2img":
            init = to_array(imgs[10])[..., :3].copy()  # opaque: compositing changes nothing
            kwargs.update(image=PILImage.fromarray(init), strength=0.7)
        out = bare("a red coat", **kwargs).images[0]
        theirs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        assert np.array_equal(ours[..., :3], theirs), mode


def test_union_weight_zero_is_exactly_no_control(tiny_engine):
    plain = pixels(tiny_engine, request())
    assert np.array_equal(pixels(tiny_engine, request(controls=(unit(weight=0.0),))), plain)
    alone = pixels(tiny_engine, request(controls=(unit("lineart", 0),)))
    with_zero = pixels(tiny_engine, request(controls=(unit("lineart", 0),
                                                      unit("depth", 1, weight=0.0))))
    assert np.array_equal(alone, with_zero)  # a weight-0 unit is left out of the union call


def test_union_units_with_different_control_modes_each_get_their_mode(tiny_engine):
    imgs = images()
    balanced = pixels(tiny_engine, request(controls=(unit("lineart", 0), unit("depth", 1))),
                      imgs)
    with CountCalls(union_net(tiny_engine)) as counter:
        mixed = pixels(tiny_engine, request(controls=(
            unit("lineart", 0), unit("depth", 1, control_mode="control"))), imgs)
    assert sorted(set(counter.calls)) == [(1,), (3,)]  # one call per control mode
    prompt = pixels(tiny_engine, request(controls=(unit("lineart", 0, control_mode="prompt"),)),
                    imgs)
    assert np.abs(mixed.astype(int) - balanced).mean() > 0.1
    assert prompt.shape == (H, W, 4)


def test_union_and_a_classic_sdxl_controlnet_in_one_request(tiny_engine, tiny_root):
    classic = str(tiny.tiny_dir("sdxl", tiny_root) / "controlnets" / "maps")
    out = pixels(tiny_engine, request(controls=(unit("lineart", 0),
                                                unit("depth", 1, model=classic))))
    assert out.shape == (H, W, 4)


def test_union_inpaint_condition_is_the_picture_with_the_selection_black(tiny_engine):
    out = pixels(tiny_engine, request(mode="inpaint", controls=(unit("inpaint", 10),)))
    plan = tiny_engine.last_plan.first
    condition = control_image(plan.controls[0], union=True)
    mask = plan.mask > 127
    assert (condition[0, :, mask] == 0).all() and (condition[0, :, ~mask] >= 0).all()
    assert torch.equal(condition[0, :, ~mask], plan.controls[0][0, :, ~mask])
    assert out.shape == (H, W, 4)


def test_a_condition_the_union_cannot_serve_is_a_typed_error(tiny_engine, tiny_root, tmp_path):
    union = tiny.tiny_dir("sdxl", tiny_root) / "controlnets" / "union"
    with pytest.raises(UnsupportedCondition, match="shuffle"):
        tiny_engine.generate(request(controls=(unit("shuffle", 0, model=str(union)),)),
                             images(), RecordingContext())
    # a first-release union model (6 control types) has no tile: the message names ProMax
    first = tmp_path / "union-v1"
    shutil.copytree(union, first)
    config = (first / "config.json").read_text().replace('"num_control_type": 8',
                                                         '"num_control_type": 6')
    (first / "config.json").write_text(config)
    with pytest.raises(UnsupportedCondition, match="ProMax"):
        tiny_engine.generate(request(controls=(unit("tile", 0, model=str(first)),)),
                             images(), RecordingContext())


def test_a_union_single_file_beside_its_config_loads(tiny_engine, tiny_root, tmp_path):
    """xinsir's repo holds the ProMax weights as a diffusers-keyed file with
    config_promax.json beside it."""
    union = tiny.tiny_dir("sdxl", tiny_root) / "controlnets" / "union"
    single = tmp_path / "diffusion_pytorch_model_promax.safetensors"
    shutil.copy(union / "diffusion_pytorch_model.safetensors", single)
    shutil.copy(union / "config.json", tmp_path / "config_promax.json")
    controls = (unit("lineart", 0, model=str(single)),)
    assert np.array_equal(pixels(tiny_engine, request(controls=controls)),
                          pixels(tiny_engine, request(controls=(unit("lineart", 0),))))


def test_an_sdxl_lora_with_the_union_controlnet(lora_engine):
    """SDXL + a LoRA + the union ControlNet with two conditions: the LoRA changes the
    picture, strength 0 is no LoRA, the same seed gives the same pixels."""
    from shared.messages import LoraRef

    controls = (unit("lineart", 0), unit("depth", 1))
    imgs = images()

    def run(strength=None):
        loras = () if strength is None else (LoraRef("xl_ink", strength),)
        return pixels(lora_engine, request(controls=controls, loras=loras), imgs)

    plain, styled = run(), run(1.0)
    assert np.abs(styled.astype(int) - plain).mean() > 0.2  # (0.46 measured)
    assert np.array_equal(run(0.0), plain) and np.array_equal(run(1.0), styled)


# -----------------------------------------------------------------------------
# Families the engine does not run, ControlNets of another family
# -----------------------------------------------------------------------------

def test_a_controlnet_of_another_family_is_refused_before_loading(fresh_engine, tiny_root):
    from shared.errors import Unsupported

    sd15_net = str(tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines")
    with pytest.raises(Unsupported, match="another model family"):
        fresh_engine.generate(request(controls=(unit(model=sd15_net),)), images(),
                              RecordingContext())
    assert not fresh_engine._bases and not fresh_engine._nets  # nothing was loaded


def test_an_sd2_request_is_a_typed_error_not_a_crash(tiny_engine, tmp_path):
    from test_families import FILES, write_header

    sd2 = write_header(tmp_path / "sd21.safetensors", FILES["sd21.safetensors"][0])
    with pytest.raises(UnsupportedFamily, match="Stable Diffusion 2"):
        tiny_engine.generate(request(base_model=str(sd2)), images(), RecordingContext())


# -----------------------------------------------------------------------------
# 9-channel inpainting bases
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_a_nine_channel_base_runs_every_mode(tiny_engine, tiny_root, family, mode):
    """txt2img and img2img run as inpainting of the whole picture (a 9-channel UNet in
    the plain pipelines is a raw channel-mismatch RuntimeError), with ControlNets too
    (SDXL: the union ControlNet)."""
    base = str(inpaint_folder(tiny_root, family))
    resolved = tiny_engine.catalogue.resolve_base(base)
    assert (resolved.family, resolved.inpaint) == (family, True)
    net = str(tiny.tiny_dir(family, tiny_root) / "controlnets" /
              ("union" if family == "sdxl" else "lines"))
    imgs = images()
    plain = pixels(tiny_engine, request(base_model=base, mode=mode), imgs)
    controlled = pixels(tiny_engine, request(base_model=base, mode=mode,
                                             controls=(unit("lineart", 0, model=net),)), imgs)
    assert plain.shape == controlled.shape == (H, W, 4)
    assert np.abs(controlled.astype(int) - plain).mean() > 0.5
    again = pixels(tiny_engine, request(base_model=base, mode=mode), imgs)
    assert np.array_equal(plain, again)


def test_a_nine_channel_single_file_loads_with_its_channels(tmp_path, tiny_root,
                                                            tiny_inpaint_folder):
    """An SD1.5 inpainting checkpoint (9 channels) loads although the SD1.5 config says 4,
    and gives the pixels of the same weights in a diffusers folder."""
    from single_file_support import write_checkpoint

    single = write_checkpoint(tiny_inpaint_folder, tmp_path / "sd15-inpainting.safetensors")
    cache = tmp_path / "hf"
    config_repo(cache, DEFAULT_BASES["sd15"], tiny.tiny_dir("sd15", tiny_root))  # 4 channels
    engine = DiffusersEngine(Catalogue(ModelConfig(
        cache_dir=str(cache), tiny_root=str(tiny_root),
        roots=(str(tmp_path.parent), str(tiny_root.parent)))), device="cpu")
    resolved = engine.catalogue.resolve_base(str(single))
    assert (resolved.family, resolved.inpaint) == ("sd15", True)
    imgs = images()
    for mode in ("inpaint", "txt2img"):
        from_file = pixels(engine, request(base_model=str(single), mode=mode), imgs)
        from_folder = pixels(engine, request(base_model=str(tiny_inpaint_folder), mode=mode),
                             imgs)
        assert np.array_equal(from_file, from_folder), mode
    engine.close()


# -----------------------------------------------------------------------------
# SDXL-family single files (Illustrious, Pony, NoobAI)
# -----------------------------------------------------------------------------

def test_an_sdxl_single_file_loads_with_the_sdxl_config(tmp_path, tiny_root):
    """An SGM-layout SDXL checkpoint (what Illustrious/Pony/NoobAI files are), named like
    anything, is detected as SDXL from its tensors, loaded with the SDXL config from the
    hub cache, and gives the pixels of the same weights in a diffusers folder - with the
    union ControlNet too."""
    from single_file_support import write_checkpoint

    folder = tiny.tiny_dir("sdxl", tiny_root)
    single = write_checkpoint(folder, tmp_path / "waiIllustrious_v14.safetensors")
    cache = tmp_path / "hf"
    config_repo(cache, DEFAULT_BASES["sdxl"], folder)
    engine = DiffusersEngine(Catalogue(ModelConfig(
        cache_dir=str(cache), tiny_root=str(tiny_root),
        roots=(str(tmp_path.parent), str(tiny_root.parent)))), device="cpu")
    resolved = engine.catalogue.resolve_base(str(single))
    assert (resolved.source, resolved.family, resolved.native_size) == ("file", "sdxl", 1024)
    union = str(folder / "controlnets" / "union")
    imgs = images()
    for kw in ({}, {"controls": (unit("lineart", 0, model=union),)},
               {"mode": "img2img"}):
        from_file = pixels(engine, request(base_model=str(single), **kw), imgs)
        from_folder = pixels(engine, request(base_model=str(folder), **kw), imgs)
        assert np.array_equal(from_file, from_folder), kw
    engine.close()


# -----------------------------------------------------------------------------
# Folders holding only fp16 weights
# -----------------------------------------------------------------------------

def _as_fp16_only(source: Path, target: Path) -> Path:
    """``source`` with every weight file renamed to its fp16-variant name (what repos that
    ship only fp16 weights hold)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("controlnets"))
    for path in list(target.rglob("*.safetensors")):
        path.rename(path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
    return target


def test_fp16_only_folders_load_as_the_fp16_variant(tiny_engine, tiny_root, tmp_path):
    folder = tiny.tiny_dir("sdxl", tiny_root)
    base = _as_fp16_only(folder, tmp_path / "base")
    net = _as_fp16_only(folder / "controlnets" / "union", tmp_path / "union")
    catalogue = tiny_engine.catalogue
    assert catalogue.resolve_base(str(base)).weights_variant == "fp16"
    assert catalogue._resolve(str(net), str(net), "controlnet", "sdxl").weights_variant == "fp16"
    ours = pixels(tiny_engine, request(base_model=str(base),
                                       controls=(unit("lineart", 0, model=str(net)),)))
    reference = pixels(tiny_engine, request(base_model=str(folder), controls=(
        unit("lineart", 0, model=str(folder / "controlnets" / "union")),)))
    assert np.array_equal(ours, reference)


# -----------------------------------------------------------------------------
# Per-condition quirks, devices, diffusers keywords
# -----------------------------------------------------------------------------

def test_lineart_anime_on_sd15_uses_clip_skip_2(tiny_engine):
    """The tiny SD1.5 stack serves lineart and lineart_anime with the same ControlNet, so
    only the anime model's clip skip 2 can tell the pictures apart; on SDXL the union
    model serves both with one control type and no clip skip: the same pixels."""
    def run(base, condition):
        return pixels(tiny_engine, request(base_model=base, controls=(unit(condition, 0),)))

    assert not np.array_equal(run("tiny-sd15", "lineart_anime"), run("tiny-sd15", "lineart"))
    assert np.array_equal(run("tiny-sdxl", "lineart_anime"), run("tiny-sdxl", "lineart"))


def test_lineart_anime_in_guess_mode_is_refused_before_anything_runs(fresh_engine):
    ctx = RecordingContext()
    with pytest.raises(UnsupportedCondition, match="guess mode"):
        fresh_engine.generate(request(base_model="tiny-sd15", controls=(
            unit("lineart_anime", 0, control_mode="control"),)), images(), ctx)
    assert ctx.steps_done() == 0 and not fresh_engine._bases


def test_the_seed_generator_lives_on_the_engines_own_device(tiny_catalogue):
    """On a second GPU the generator must be made on cuda:1, not on "cuda" (cuda:0)."""
    engine = DiffusersEngine(tiny_catalogue, device="cuda:1", memory_budget=1 << 30)
    assert engine._generator_device() == torch.device("cuda:1")
    assert DiffusersEngine(tiny_catalogue, device="cpu")._generator_device() == \
        torch.device("cpu")


def test_the_dtype_keyword_is_the_one_the_installed_diffusers_reads():
    import diffusers

    from backend.engines.diffusers import loaders
    from backend.engines.requirements import release

    assert release("0.39.1") < (0, 40) <= release("0.40.0.dev0")
    assert release("2.6.0+cu124") == (2, 6) and release("3") == (3, 0)
    expected = "dtype" if release(diffusers.__version__) >= (0, 40) else "torch_dtype"
    assert loaders.dtype_kwargs(torch.float16) == {expected: torch.float16}


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(tiny_engine):
    """What A1111's "clip skip 2" (and diffusers' clip_skip=1) computes, done by ending
    the text encoder one layer early; the encoder is whole again afterwards."""
    from backend.engines.diffusers.pipelines import clip_skip

    pixels(tiny_engine, request(base_model="tiny-sd15"))
    pipe = next(e.pipe for e in tiny_engine._bases.values() if e.resolved.name == "tiny-sd15")
    encoder = pipe.text_encoder
    ids = pipe.tokenizer("a red coat", padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        manual = getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-2])
        with clip_skip(pipe, 2):
            skipped = pipe.encode_prompt("a red coat", "cpu", 1, False)[0]
        full = pipe.encode_prompt("a red coat", "cpu", 1, False)[0]
    assert torch.allclose(skipped, manual, atol=1e-6)
    assert not torch.allclose(full, manual, atol=1e-3)


def test_bench_engine_runs_the_sdxl_union_stack_on_the_bare_union_pipeline(tiny_root):
    from backend.bench.engine import bench_engine

    figures = bench_engine(repeats=1, steps=2, tiny_root=str(tiny_root), stacks=("sdxl-union",))
    union = figures["stacks"]["sdxl-union"]
    assert union["bare"] == "StableDiffusionXLControlNetUnionPipeline"
    assert union["same_pixels"] and figures["worst_ratio"] == union["ratio"] > 0
