"""DiffusersEngine end to end on the tiny models (CPU, offline, a few seconds).

What a user would notice: the picture follows the control image, the same seed
gives the same pixels, unselected pixels never change, sizes come back exact,
cancel stops at once, running out of memory is survivable.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.diffusers.geometry import denoise_steps, fit_image, work_size
from backend.engines.diffusers.samplers import make_scheduler
from backend.engines.diffusers.units import ControlUnits, soft_injection_scales
from backend.imaging import from_array, to_array
from shared.errors import Cancelled, OutOfMemory, Unsupported
from shared.images import Image
from shared.messages import SAMPLERS, ControlUnit, GenerateRequest, Preprocess

from tiny_fixtures import (RecordingContext, lines_image, random_rgba, tiny_catalogue,  # noqa: F401
                           tiny_engine, tiny_root, fresh_engine,
                           torch_threads)

W, H = 80, 56


def make_request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("base_model", "tiny-sd15")
    mode = kw.get("mode", "txt2img")
    if mode != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.8)
    if mode == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def unit(condition="lineart", slot=0, **kw) -> ControlUnit:
    return ControlUnit(condition=condition, image=slot, **kw)




def selection(width=W, height=H) -> Image:
    """A soft-edged ellipse selection (anti-aliased rim)."""
    yy, xx = np.mgrid[0:height, 0:width]
    d = ((xx - width * 0.55) / (width * 0.22)) ** 2 + ((yy - height * 0.5) / (height * 0.3)) ** 2
    value = np.clip((1.15 - d) / 0.3, 0, 1)
    array = np.zeros((height, width, 4), np.uint8)
    array[..., :3] = (value * 255).round().astype(np.uint8)[..., None]
    array[..., 3] = 255
    return from_array(array)


def images(width=W, height=H):
    canvas = random_rgba(width, height, seed=3, opaque=False)  # some transparent pixels too
    return {0: lines_image(width, height, 1), 1: lines_image(width, height, 2),
            10: canvas, 11: selection(width, height)}


def run(engine, request, imgs=None, ctx=None):
    ctx = ctx or RecordingContext()
    out = engine.generate(request, imgs or images(request.width, request.height), ctx)
    return out


def pixels(result) -> np.ndarray:
    return to_array(result.image).copy()


# -----------------------------------------------------------------------------
# Each mode x single and multi ControlNet, SD1.5 and SDXL
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_each_mode_single_and_multi_controlnet(tiny_engine, base, mode):
    imgs = images()
    plain = pixels(run(tiny_engine, make_request(mode=mode, base_model=base), imgs)[0])
    one = pixels(run(tiny_engine, make_request(mode=mode, base_model=base,
                                               controls=(unit("lineart", 0),)), imgs)[0])
    two = pixels(run(tiny_engine, make_request(
        mode=mode, base_model=base,
        controls=(unit("lineart", 0), unit("depth", 1, weight=1.5))), imgs)[0])
    other = pixels(run(tiny_engine, make_request(mode=mode, base_model=base,
                                                 controls=(unit("lineart", 1),)), imgs)[0])
    for array in (plain, one, two, other):
        assert array.shape == (H, W, 4)
    # The picture follows the control image, and a second unit adds to it.
    assert np.abs(one.astype(int) - plain).mean() > 0.5
    assert np.abs(other.astype(int) - one).mean() > 0.1  # (0.27 .. 1.1 measured)
    assert np.abs(two.astype(int) - one).mean() > 0.5
    if mode == "inpaint":
        canvas = to_array(imgs[10])
        outside = to_array(imgs[11])[..., 0] == 0
        for array in (plain, one, two):
            assert np.array_equal(array[outside], canvas[outside])
            assert not np.array_equal(array[~outside], canvas[~outside])
    else:
        assert (plain[..., 3] == 255).all()


def test_pipelines_are_shared_between_modes(tiny_engine):
    first = run(tiny_engine, make_request(controls=(unit(),)))[0].image.data
    run(tiny_engine, make_request(mode="img2img", controls=(unit(),)))
    entry = next(e for e in tiny_engine._bases.values() if e.family == "sd15"
                 and e.resolved.name == "tiny-sd15")
    for pipe in entry.pipes.values():
        assert pipe.unet is entry.pipe.unet and pipe.vae is entry.pipe.vae
    loads = tiny_engine.stats["loads"]
    run(tiny_engine, make_request(mode="inpaint", controls=(unit(),)))
    assert tiny_engine.stats["loads"] == loads  # nothing reloaded for another mode
    # shared pipelines and schedulers carry no state from one job to the next
    assert run(tiny_engine, make_request(controls=(unit(),)))[0].image.data == first


# -----------------------------------------------------------------------------
# Determinism
# -----------------------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_different(tiny_engine):
    request = make_request(controls=(unit(),), sampler="euler_a")  # a stochastic sampler
    a = run(tiny_engine, request)[0]
    b = run(tiny_engine, request)[0]
    c = run(tiny_engine, make_request(controls=(unit(),), sampler="euler_a", seed=8))[0]
    assert a.image.data == b.image.data
    assert a.image.data != c.image.data
    assert (a.seed, c.seed) == (7, 8)


def test_batch_image_equals_single_run_with_its_seed(tiny_engine):
    batch = run(tiny_engine, make_request(controls=(unit(),), batch=2, seed=100))
    assert [g.seed for g in batch] == [100, 101]
    single = run(tiny_engine, make_request(controls=(unit(),), seed=101))[0]
    assert batch[1].image.data == single.image.data
    assert batch[0].image.data != batch[1].image.data


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_and_they_differ(tiny_engine, sampler):
    out = run(tiny_engine, make_request(sampler=sampler, steps=3))[0]
    ref = run(tiny_engine, make_request(sampler="ddim" if sampler != "ddim" else "euler",
                                        steps=3))[0]
    assert out.image.size == (W, H)
    assert out.image.data != ref.image.data


def test_sampler_mapping_ignores_model_scheduler_quirks():
    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "use_karras_sigmas": True,
            "algorithm_type": "sde-dpmsolver++"}
    karras = make_scheduler("dpmpp_2m_karras", base)
    plain = make_scheduler("dpmpp_2m", base)
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    assert plain.config.algorithm_type == "dpmsolver++"
    assert not make_scheduler("euler", base).config.use_karras_sigmas
    with pytest.raises(Unsupported):
        make_scheduler("heun", base)


# -----------------------------------------------------------------------------
# ControlNet semantics
# -----------------------------------------------------------------------------

def _tiny_unet(tiny_root):
    from diffusers import UNet2DConditionModel

    from backend.engines import tiny
    return UNet2DConditionModel.from_pretrained(tiny.tiny_dir("sd15", tiny_root) / "unet")


def test_zero_convolution_leaves_unet_output_bit_identical(tiny_root):
    from diffusers import ControlNetModel

    unet = _tiny_unet(tiny_root)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 10, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    cond = torch.rand(2, 3, 64, 80, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        base = unet(sample, t, encoder_hidden_states=text).sample
        down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=cond,
                        return_dict=False)
        with_fresh = unet(sample, t, encoder_hidden_states=text,
                          down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        assert torch.equal(base, with_fresh)
        net.controlnet_down_blocks[0].weight[0, 0, 0, 0] = 0.05  # perturb one zero conv
        down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=cond,
                        return_dict=False)
        with_perturbed = unet(sample, t, encoder_hidden_states=text,
                              down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
    assert not torch.equal(base, with_perturbed)


def test_fresh_controlnet_from_a_folder_changes_nothing_end_to_end(tiny_engine, tiny_root,
                                                                   tmp_path):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(_tiny_unet(tiny_root),
                                    conditioning_embedding_out_channels=(8, 8, 16, 16))
    net.save_pretrained(tmp_path / "fresh")
    with torch.no_grad():
        net.controlnet_mid_block.weight.fill_(0.02)
    net.save_pretrained(tmp_path / "perturbed")
    plain = run(tiny_engine, make_request())[0]
    fresh = run(tiny_engine, make_request(controls=(unit(model=str(tmp_path / "fresh")),)))[0]
    bent = run(tiny_engine, make_request(controls=(unit(model=str(tmp_path / "perturbed")),)))[0]
    assert fresh.image.data == plain.image.data
    assert bent.image.data != plain.image.data


def test_weight_zero_is_exactly_no_control(tiny_engine):
    plain = run(tiny_engine, make_request())[0]
    zero = run(tiny_engine, make_request(controls=(unit(weight=0.0),)))[0]
    full = run(tiny_engine, make_request(controls=(unit(weight=1.0),)))[0]
    assert zero.image.data == plain.image.data
    assert full.image.data != plain.image.data


def test_start_and_end_are_honoured_per_unit(fresh_engine):
    steps = 10
    ctx = RecordingContext()
    base = fresh_engine.catalogue.resolve_base("tiny-sd15")
    # The tiny lineart and depth units use two different networks ("lines", "maps").
    nets = {cond: fresh_engine._load_net(fresh_engine.catalogue.resolve_controlnet(cond, base),
                                         keep=[]) for cond in ("lineart", "depth")}
    assert nets["lineart"] is not nets["depth"]
    step_of = {"lineart": [], "depth": []}  # the step index each ControlNet call ran at
    handles = [net.register_forward_pre_hook(
        lambda m, a, cond=cond: step_of[cond].append(ctx.steps_done()))
        for cond, net in nets.items()]
    try:
        out = run(fresh_engine, make_request(steps=steps, controls=(
            unit("lineart", 0, start=0.2, end=0.6), unit("depth", 1, start=0.5, end=1.0))),
            ctx=ctx)
    finally:
        for handle in handles:
            handle.remove()
    # diffusers keeps step i when i/N >= start and (i+1)/N <= end.
    assert step_of["lineart"] == [2, 3, 4, 5]
    assert step_of["depth"] == [5, 6, 7, 8, 9]
    assert out[0].image.size == (W, H)
    never = run(fresh_engine, make_request(steps=steps))[0]
    late = run(fresh_engine, make_request(steps=steps, controls=(unit(start=0.5),)))[0]
    early = run(fresh_engine, make_request(steps=steps, controls=(unit(end=0.5),)))[0]
    assert len({never.image.data, late.image.data, early.image.data}) == 3


def _units_inputs(engine, conditions=("lineart",)):
    base = engine.catalogue.resolve_base("tiny-sd15")
    nets = [engine._load_net(engine.catalogue.resolve_controlnet(c, base), keep=[])
            for c in conditions]
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, 32, generator=g)
    cond = torch.rand(1, 3, 64, 64, generator=g).repeat(2, 1, 1, 1)
    return nets, sample, text, cond


def test_control_modes_per_unit(tiny_engine):
    nets, sample, text, cond = _units_inputs(tiny_engine)
    t = torch.tensor(400)

    def residuals(mode, cfg=True):
        units = ControlUnits(nets, [mode], cfg=cfg)
        with torch.no_grad():
            return units(sample, t, text, [cond], [0.8])

    bal_d, bal_m = residuals("balanced")
    pro_d, pro_m = residuals("prompt")
    con_d, con_m = residuals("control")
    n = len(bal_d) + 1
    # prompt: residual k scaled by 0.825 ** (n - 1 - k); the middle block keeps full strength.
    for k, (b, p) in enumerate(zip(bal_d, pro_d)):
        torch.testing.assert_close(p, b * 0.825 ** (n - 1 - k))
    torch.testing.assert_close(pro_m, bal_m)
    assert soft_injection_scales(13)[0] == pytest.approx(0.825 ** 12)
    # control: the unconditional half of the CFG batch gets no control at all ...
    for r in [*con_d, con_m]:
        assert torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0
    # ... and the conditional half is diffusers' guess-mode scaling (0.1 .. 1 over depth).
    scales = torch.logspace(-1, 0, n)
    torch.testing.assert_close(con_d[0][1], bal_d[0][1] * scales[0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(con_m[1], bal_m[1], rtol=1e-3, atol=1e-5)
    # Without CFG there is no unconditional half to leave out.
    nocfg_d, _ = residuals("control", cfg=False)
    assert torch.count_nonzero(nocfg_d[0][0]) > 0


def test_control_modes_change_the_picture(tiny_engine):
    results = {m: run(tiny_engine, make_request(controls=(unit(control_mode=m),)))[0].image.data
               for m in ("balanced", "prompt", "control")}
    assert len(set(results.values())) == 3


# -----------------------------------------------------------------------------
# Geometry
# -----------------------------------------------------------------------------

def _halves(width, height):
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, :width // 2, 0] = 255
    array[:, width // 2:, 2] = 255
    return array


def test_resize_modes_documented_geometry():
    src = _halves(100, 50)  # 2:1 into a square frame
    just = fit_image(src, 60, 60, "just_resize")
    assert just.shape == (60, 60, 3)
    assert (just[:, :29, 0] == 255).all() and (just[:, 31:, 2] == 255).all()
    # crop_and_resize: scale 1.2 -> 120x60, centre 60 columns kept (x 30..90 of the scaled)
    crop = fit_image(src, 60, 60, "crop_and_resize")
    assert crop.shape == (60, 60, 3)
    assert (crop[:, :29, 0] == 255).all() and (crop[:, 31:, 2] == 255).all()
    assert not (crop[..., 1] > 0).any()  # no bars
    # resize_and_fill: scale 0.6 -> 60x30 centred at rows 15..45, black bars above/below
    fill = fit_image(src, 60, 60, "resize_and_fill")
    assert fill.shape == (60, 60, 3)
    assert (fill[:15] == 0).all() and (fill[45:] == 0).all()
    assert (fill[15:45, :29, 0] == 255).all() and (fill[15:45, 31:, 2] == 255).all()
    # crop from a tall image keeps the middle rows
    tall = np.zeros((200, 50, 3), np.uint8)
    tall[90:110] = 255
    crop = fit_image(tall, 50, 50, "crop_and_resize")
    assert (crop[20:30] == 255).all() and (crop[:15] == 0).all() and (crop[35:] == 0).all()


def test_engine_applies_the_units_resize_mode(tiny_engine):
    square = from_array(np.pad(np.full((40, 40, 3), 255, np.uint8), ((0, 0), (0, 0), (0, 1)),
                               constant_values=255))
    imgs = images()
    imgs[0] = square
    run(tiny_engine, make_request(controls=(unit(resize_mode="resize_and_fill"),)), imgs)
    control = tiny_engine.last_plan.first.controls[0]
    w, h = tiny_engine.last_plan.work
    assert control.shape == (h, w, 3) and w > h
    # a square control in a wide frame: white centre, black bars left and right
    assert (control[:, w // 2] == 255).all()
    assert (control[:, :(w - h) // 2 - 1] == 0).all() and (control[:, -((w - h) // 2 - 1):] == 0).all()


@pytest.mark.parametrize("size", [(512, 512), (3000, 2001), (8, 4000), (33, 17), (777, 1333),
                                  (2048, 1024), (100, 100)])
@pytest.mark.parametrize("native", [64, 512, 1024])
def test_work_size_keeps_aspect_at_native_scale(size, native):
    w, h = work_size(*size, native)
    assert w % 8 == 0 and h % 8 == 0
    side = (w * h) ** 0.5
    least = max(8, native // 8)
    if min(w, h) > least:  # not clamped by the smallest side
        assert native * 0.9 <= side <= native * 1.5 * 1.1
        assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.2


def test_huge_odd_canvas_generates_at_native_scale_and_returns_exact_size(tiny_engine):
    width, height = 3000, 2001
    control = lines_image(width, height, 5)
    out = run(tiny_engine, make_request(width=width, height=height, steps=2,
                                        controls=(unit(),)), {0: control})
    plan = tiny_engine.last_plan
    assert out[0].image.size == (width, height)
    assert len(out[0].image.data) == width * height * 4
    assert plan.work == work_size(width, height, plan.native)
    assert plan.native == 64  # from the tiny model's config: sample_size 8 x VAE factor 8
    assert max(plan.work) <= 1.6 * 64 * 1.5


def test_hires_pass_runs_at_larger_size_with_vae_tiling(tiny_engine):
    ctx = RecordingContext()
    out = run(tiny_engine, make_request(width=400, height=300, hires=True, steps=4,
                                        controls=(unit(),)),
              {0: lines_image(400, 300)}, ctx)
    plan = tiny_engine.last_plan
    assert out[0].image.size == (400, 300)
    assert plan.hires is not None and plan.hires[0] > plan.work[0]
    assert plan.hires[0] * plan.hires[1] > 64 * 64 * 1.5 ** 2  # tiling threshold
    assert ctx.events[-1][1:3] == (plan.steps_per_image, plan.steps_per_image)
    assert plan.steps_per_image == 4 + denoise_steps(4, tiny_engine.hires_strength)[1]


# -----------------------------------------------------------------------------
# Inpaint
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(101, 77), (W, H)])
def test_inpaint_changes_only_selected_pixels(tiny_engine, size):
    width, height = size
    imgs = images(width, height)
    # a small selection far from the centre, on a canvas with transparent pixels
    mask = np.zeros((height, width, 4), np.uint8)
    mask[5:20, 60:75, :3] = 255
    mask[5:20, 59, :3] = 100  # an anti-aliased rim
    mask[..., 3] = 255
    imgs[11] = from_array(mask)
    out = run(tiny_engine, make_request(width=width, height=height, mode="inpaint",
                                        strength=1.0, controls=(unit(),)), imgs)
    canvas = to_array(imgs[10])
    result = pixels(out[0])
    outside = mask[..., 0] == 0
    assert np.array_equal(result[outside], canvas[outside])
    assert not np.array_equal(result[5:20, 62:73], canvas[5:20, 62:73])
    plan = tiny_engine.last_plan
    x0, y0, x1, y1 = plan.region
    assert x0 <= 59 and x1 >= 75 and y0 <= 5 and y1 >= 20
    assert (x1 - x0, y1 - y0) != (width, height) or width < 100  # cropped to the selection


def test_inpaint_with_empty_selection_or_zero_strength_returns_the_canvas(tiny_engine):
    imgs = images()
    imgs[11] = Image.filled(W, H, (0, 0, 0, 255))
    out = run(tiny_engine, make_request(mode="inpaint"), imgs)
    assert out[0].image.data == imgs[10].data
    out = run(tiny_engine, make_request(mode="img2img", strength=0.0), images())
    assert out[0].image.data == images()[10].data


# -----------------------------------------------------------------------------
# Progress, previews, cancel
# -----------------------------------------------------------------------------

def test_progress_every_step_and_cheap_previews(tiny_engine):
    ctx = RecordingContext(preview_every=2)
    run(tiny_engine, make_request(steps=6, batch=2, controls=(unit(),)), ctx=ctx)
    progress = [e for e in ctx.events if e[0] == "progress"]
    assert [e[1] for e in progress] == list(range(1, 13))
    assert all(e[2] == 12 for e in progress)
    assert len(ctx.previews) == 6
    w, h = tiny_engine.last_plan.work
    assert ctx.previews[0].size == (w // 8, h // 8)  # latent resolution, no VAE decode


def test_cancel_stops_within_one_step_and_next_job_runs(fresh_engine):
    request = make_request(steps=10, controls=(unit(),))
    expected = run(fresh_engine, request)[0].image.data
    unet = fresh_engine._bases[next(iter(fresh_engine._bases))].pipe.unet
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        ctx = RecordingContext(cancel_at=3)
        with pytest.raises(Cancelled):
            run(fresh_engine, request, ctx=ctx)
        assert len(calls) == 3  # three steps ran (one UNet call each, CFG batched), no more
    finally:
        handle.remove()
    assert run(fresh_engine, request)[0].image.data == expected


class _FlagContext(RecordingContext):
    """Cancelled as soon as ``flag`` is set (by a test hook), not only at a step's end."""

    def __init__(self) -> None:
        super().__init__()
        self.flag = False

    def check_cancelled(self) -> None:
        if self.flag:
            raise Cancelled(job_id=self.job_id)

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        super().progress(step, total, stage)
        self.check_cancelled()


def test_cancel_lands_inside_a_step_not_at_its_end(fresh_engine):
    """A cancel that arrives while the UNet runs stops before the UNet's next block:
    the rest of that step (its up blocks) never runs, and the hooks are gone after."""
    request = make_request(steps=10, controls=(unit(),))
    run(fresh_engine, request)
    unet = fresh_engine._bases[next(iter(fresh_engine._bases))].pipe.unet
    hooks_before = {id(m): len(m._forward_pre_hooks) for m in unet.modules()}
    ctx = _FlagContext()
    down_calls, up_calls = [], []

    def after_first_down_block(module, args, output):
        down_calls.append(1)
        if len(down_calls) == 2:  # step 2, in the middle of the UNet
            ctx.flag = True

    handles = [unet.down_blocks[0].register_forward_hook(after_first_down_block),
               unet.up_blocks[-1].register_forward_pre_hook(lambda m, a: up_calls.append(1))]
    try:
        with pytest.raises(Cancelled):
            run(fresh_engine, request, ctx=ctx)
    finally:
        for handle in handles:
            handle.remove()
    assert len(down_calls) == 2 and len(up_calls) == 1  # step 2 stopped mid-UNet
    assert ctx.steps_done() == 1
    assert {id(m): len(m._forward_pre_hooks) for m in unet.modules()} == hooks_before
    assert run(fresh_engine, request)[0].image.data  # the next job runs


# -----------------------------------------------------------------------------
# Out of memory
# -----------------------------------------------------------------------------

class _OomOnce:
    """Test double: the UNet raises CUDA's out-of-memory error the first ``times`` calls."""

    def __init__(self, times=1):
        self.times = times

    def __call__(self, module, args):
        if self.times > 0:
            self.times -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_once_retries_with_tiling(fresh_engine):
    request = make_request(controls=(unit(),))
    run(fresh_engine, request)
    unet = next(iter(fresh_engine._bases.values())).pipe.unet
    handle = unet.register_forward_pre_hook(_OomOnce(1))
    try:
        out = run(fresh_engine, request)
    finally:
        handle.remove()
    assert out[0].image.size == (W, H)
    assert fresh_engine.stats["oom_retries"] == 1
    assert fresh_engine.last_plan.first.vae_tiling  # the retry ran in low-memory mode


def test_out_of_memory_twice_is_a_typed_error_and_the_engine_survives(fresh_engine):
    request = make_request(controls=(unit(),))
    expected = run(fresh_engine, request)[0].image.data
    unet = next(iter(fresh_engine._bases.values())).pipe.unet
    handle = unet.register_forward_pre_hook(_OomOnce(2))
    try:
        with pytest.raises(OutOfMemory) as info:
            run(fresh_engine, request)
    finally:
        handle.remove()
    assert info.value.code == "out_of_memory"
    assert "Lower the size" in info.value.message
    assert run(fresh_engine, request)[0].image.data == expected


# -----------------------------------------------------------------------------
# Preprocess and models
# -----------------------------------------------------------------------------

def test_preprocess_uses_the_annotator_registry(tiny_engine):
    image = random_rgba(20, 10)
    ctx = RecordingContext()
    msg = Preprocess(job_id="0" * 32, annotator="invert", image=0)
    inverted = to_array(tiny_engine.preprocess(msg, image, ctx).image)
    assert np.array_equal(inverted[..., :3], 255 - to_array(image)[..., :3])
    msg = Preprocess(job_id="0" * 32, annotator="none", image=0, width=40, height=30)
    assert tiny_engine.preprocess(msg, image, ctx).image.size == (40, 30)
    with pytest.raises(Unsupported):
        tiny_engine.preprocess(Preprocess(job_id="0" * 32, annotator="no-such-annotator",
                                          image=0), image, ctx)


def test_units_with_annotators_and_poses_are_prepared_at_work_scale(tiny_engine):
    from shared.pose import default_pose

    width, height = 640, 448
    drawing = np.full((height, width, 4), 255, np.uint8)
    drawing[100:110, 50:600, :3] = 0  # a dark stroke on white paper
    imgs = {0: from_array(drawing)}
    pose = default_pose(width, height).to_message()
    raw = run(tiny_engine, make_request(width=width, height=height, controls=(
        unit("lineart", 0), ControlUnit(condition="openpose", pose=pose))), imgs)[0]
    annotated = run(tiny_engine, make_request(width=width, height=height, controls=(
        unit("lineart", 0, preprocessor="invert"),
        ControlUnit(condition="openpose", pose=pose))), imgs)[0]
    assert annotated.image.size == raw.image.size == (width, height)
    assert annotated.image.data != raw.image.data
    plan = tiny_engine.last_plan
    lines, skeleton = plan.first.controls
    w, h = plan.work
    # inverted: a white stroke on black, at the stroke's place in the work frame
    row = int(round(105 * h / height))
    assert lines[row, w // 2].min() > 128 and lines[h - 2, w // 2].max() < 64
    assert skeleton.shape == (h, w, 3) and skeleton.max() > 128


def test_models_message_lists_tiny_as_present(tiny_engine):
    models = tiny_engine.models()
    tiny_models = {m.name: m for m in models.models if m.name.startswith("tiny-")}
    assert tiny_models["tiny-sd15"].present and tiny_models["tiny-sdxl"].family == "sdxl"
    assert {"none", "invert", "canny"} <= {a.name for a in models.annotators}


# -----------------------------------------------------------------------------
# GPU-only paths (skip cleanly without CUDA)
# -----------------------------------------------------------------------------

def cuda(test):
    """CUDA only: skipped without a GPU, selected by ``pytest -m gpu`` (the device check)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")(test))


@cuda
def test_cuda_fp16_generation_is_deterministic(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue)
    assert engine.device.type == "cuda" and engine.dtype == torch.float16
    request = make_request(controls=(unit(),))
    a, b = run(engine, request)[0], run(engine, request)[0]
    assert a.image.data == b.image.data
    engine.close()


@cuda
def test_cuda_model_cpu_offload_runs_every_mode(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue, offload=True)
    for mode in ("txt2img", "img2img", "inpaint"):
        out = run(engine, make_request(mode=mode, controls=(unit(), unit("depth", 1))))
        assert out[0].image.size == (W, H)
    engine.close()


@cuda
def test_cuda_out_of_memory_retry_turns_on_offload(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue)
    request = make_request(controls=(unit(),))
    run(engine, request)
    unet = next(iter(engine._bases.values())).pipe.unet
    handle = unet.register_forward_pre_hook(_OomOnce(1))
    try:
        out = run(engine, request)
    finally:
        handle.remove()
    assert out[0].image.size == (W, H) and engine.offload
    engine.close()


# -----------------------------------------------------------------------------
# Special ControlNets
# -----------------------------------------------------------------------------

def test_pooled_controlnet_is_conditional_only_and_keeps_others_balanced(tiny_engine, tiny_root,
                                                                         tmp_path):
    """A shuffle-style net (global_pool_conditions) puts diffusers' whole pipeline in guess
    mode when it is the first net; the engine orders units so it only affects itself."""
    from diffusers import ControlNetModel

    from backend.engines import tiny
    net = ControlNetModel.from_pretrained(tiny.tiny_dir("sd15", tiny_root) / "controlnets" /
                                          "maps")
    net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(tmp_path / "pooled")
    pooled = ControlNetModel.from_pretrained(tmp_path / "pooled")
    _, sample, text, cond = _units_inputs(tiny_engine)
    with torch.no_grad():
        down, mid = ControlUnits([pooled], ["balanced"], cfg=True)(
            sample, torch.tensor(300), text, [cond], [1.0])
    assert torch.count_nonzero(mid[0]) == 0 and torch.count_nonzero(mid[1]) > 0
    assert down[0].shape[-2:] == (1, 1)  # globally pooled
    request = make_request(controls=(unit("shuffle", 0, model=str(tmp_path / "pooled")),
                                      unit("lineart", 1)))
    out = run(tiny_engine, request)
    assert out[0].image.size == (W, H)
    entry = next(e for e in tiny_engine._bases.values() if e.resolved.name == "tiny-sd15")
    from diffusers import StableDiffusionControlNetPipeline
    nets = entry.pipes[StableDiffusionControlNetPipeline].controlnet.nets
    assert not nets[0].config.global_pool_conditions and nets[1].config.global_pool_conditions


def test_controlnet_of_another_family_is_refused_with_a_clear_error(tiny_engine, tiny_root):
    from backend.engines import tiny
    sdxl_net = tiny.tiny_dir("sdxl", tiny_root) / "controlnets" / "lines"
    with pytest.raises(Unsupported, match="another model family"):
        run(tiny_engine, make_request(controls=(unit(model=str(sdxl_net)),)))


def test_embedded_engine_uses_the_tiny_model_by_default(tiny_root):
    engine = DiffusersEngine.embedded(device="cpu", tiny_root=str(tiny_root))
    out = run(engine, make_request(base_model="", controls=(unit(),)))
    assert out[0].image.size == (W, H) and engine.last_plan.native == 64
    engine.close()


def test_inpaint_condition_marks_the_selection_with_minus_one(tiny_engine):
    out = run(tiny_engine, make_request(mode="inpaint", controls=(unit("inpaint", 10),)))
    control = tiny_engine.last_plan.first.controls[0]
    mask = tiny_engine.last_plan.first.mask > 127
    assert torch.is_tensor(control) and control.shape[-2:] == mask.shape
    assert (control[0, :, mask] == -1).all() and (control[0, :, ~mask] >= 0).all()
    assert out[0].image.size == (W, H)


def test_hires_inpaint_keeps_unselected_pixels(tiny_engine):
    width, height = 200, 140
    imgs = images(width, height)
    out = run(tiny_engine, make_request(width=width, height=height, mode="inpaint", hires=True,
                                        controls=(unit(),)), imgs)
    assert tiny_engine.last_plan.hires is not None
    outside = to_array(imgs[11])[..., 0] == 0
    assert np.array_equal(pixels(out[0])[outside], to_array(imgs[10])[outside])


# -----------------------------------------------------------------------------
# Model cache
# -----------------------------------------------------------------------------

def test_loaded_models_are_evicted_by_the_memory_budget(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue, device="cpu")
    run(engine, make_request(controls=(unit(),)))
    assert [e.resolved.name for e in engine._bases.values()] == ["tiny-sd15"]
    used = sum(e.nbytes for e in engine._bases.values()) + \
        sum(n.nbytes for n in engine._nets.values())
    engine.memory_budget = used + (1 << 20)  # room for the loaded stack, not a second one
    run(engine, make_request(base_model="tiny-sdxl", controls=(unit(),)))
    names = [e.resolved.name for e in engine._bases.values()]
    assert names == ["tiny-sdxl"]  # the SD1.5 stack made room
    assert all(key.startswith("controlnet:") and "sdxl" in key for key in engine._nets)
    engine.close()


def test_engine_from_options_reads_models_from_the_config_file(tmp_path, tiny_root):
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\nbase = "tiny-sdxl"\ntiny_root = "{tiny_root.as_posix()}"\n')
    engine = DiffusersEngine.from_options({"device": "cpu", "memory_budget_gb": 1},
                                          config_file=config)
    assert engine.memory_budget == 1 << 30 and engine.dtype == torch.float32
    out = run(engine, make_request(base_model="", controls=(unit(),)))
    assert out[0].image.size == (W, H) and engine.last_plan.family == "sdxl"
    engine.close()


# -----------------------------------------------------------------------------
# The demo engine (trained on 64² squares) on non-square canvases
# -----------------------------------------------------------------------------

def _demo_case(width, height, colour, cx, cy, r):
    """(request, images, drawn disc mask): a 3-px circle outline centred at (cx, cy)."""
    import cv2

    condition = np.zeros((height, width, 4), np.uint8)
    condition[..., 3] = 255
    cv2.circle(condition, (cx, cy), r, (255, 255, 255, 255), 3)
    drawn = np.zeros((height, width), np.uint8)
    cv2.circle(drawn, (cx, cy), r, 1, -1)
    request = GenerateRequest(width=width, height=height, seed=3, steps=20, cfg=3.0,
                              sampler="ddim", base_model="shapes-demo",
                              prompt=f"{colour} circle on a white background",
                              controls=(unit(),))
    return request, {0: from_array(condition)}, drawn.astype(bool)


@pytest.mark.parametrize("size", [(512, 288), (288, 512)], ids=["16:9", "9:16"])
def test_demo_engine_draws_where_drawn_on_wide_and_tall_canvases(torch_threads, size):
    from backend.bench.canvas_fidelity import stray_share
    from backend.training.shapes import iou, segment

    width, height = size
    engine = DiffusersEngine.demo(device="cpu")
    short = min(width, height)
    # off-centre: near one end of the long side, a little off the middle of the short one
    cases = [("red", int(0.78 * width) if width > height else int(0.55 * width),
              int(0.45 * height) if width > height else int(0.8 * height), short // 7),
             ("blue", int(0.2 * width) if width > height else int(0.4 * width),
              int(0.55 * height) if width > height else int(0.18 * height), short // 5)]
    for colour, cx, cy, r in cases:
        request, imgs, drawn = _demo_case(width, height, colour, cx, cy, r)
        out = engine.generate(request, imgs, RecordingContext())[0]
        picture = pixels(out)[..., :3]
        assert picture.shape[:2] == (height, width)
        found = segment(picture)
        # chance for a disc of this size is a few per cent. Measured 0.77 to 0.88 here; before
        # the square placement 0.15 (wide, red) and 0.61 (tall, red), with stray blobs of
        # 18 % (wide, red) and 0.24 % (tall, blue) of the canvas
        assert iou(found, drawn) > 0.65, (colour, iou(found, drawn))
        assert stray_share(found, drawn) < 0.002  # nothing large away from the drawing
        again = engine.generate(request, imgs, RecordingContext())[0]
        assert np.array_equal(pixels(again), pixels(out))  # seed -> same pixels
    engine.close()


def test_demo_engine_square_canvases_are_generated_as_before(torch_threads):
    """A square canvas takes the old path (whole canvas, no square region)."""
    engine = DiffusersEngine.demo(device="cpu")
    request, imgs, _ = _demo_case(128, 128, "green", 40, 80, 20)
    engine.generate(dataclasses.replace(request, steps=2), imgs, RecordingContext())
    plan = engine.last_plan
    assert plan.region == (0, 0, 128, 128) and not plan.square and plan.work == (64, 64)
    engine.close()


def test_square_region_around_the_drawing_clamped_or_letterboxed():
    from backend.engines.diffusers.geometry import crop_padded, square_region

    assert square_region(None, 160, 90) == (35, 0, 125, 90)  # no drawing: centred square
    strokes = np.zeros((90, 160), bool)
    strokes[40:60, 130:150] = True  # 20 px near the right edge
    assert square_region(strokes, 160, 90) == (110, 25, 160, 75)  # 20 / 0.4, kept inside
    strokes[:] = False
    strokes[5:85, 10:150] = True  # wider than the canvas is tall: past the canvas
    x0, y0, x1, y1 = square_region(strokes, 160, 90)
    assert x1 - x0 == y1 - y0 == 234 and y0 < 0 and y1 > 90
    grey = np.full((90, 160), 7, np.uint8)
    crop = crop_padded(grey, (x0, y0, x1, y1))
    assert crop.shape == (234, 234) and crop[0, 0] == 0 and crop[117, 117] == 7


def test_demo_engine_without_drawing_on_a_wide_canvas_keeps_the_sides_plain(torch_threads):
    engine = DiffusersEngine.demo(device="cpu")
    request = GenerateRequest(width=320, height=180, seed=5, steps=4, cfg=3.0, sampler="ddim",
                              base_model="shapes-demo", prompt="green square on a white "
                              "background")
    out = pixels(engine.generate(request, {}, RecordingContext())[0])
    assert engine.last_plan.region == (70, 0, 250, 180) and engine.last_plan.work == (64, 64)
    sides = np.concatenate([out[:, :70], out[:, 250:]], axis=1)
    assert (sides == sides[0, 0]).all() and sides[0, 0, :3].min() > 230  # one near-white
    engine.close()
