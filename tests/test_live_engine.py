"""Live painting in the diffusers engine, on the tiny models: the few-step presets (one
data file; LoRA + scheduler + step and CFG range, the download command when the LoRA is
missing), ControlNet and img2img at 1-8 steps, the caches that make same-shape frames
cheap (prompt embeddings, control images: counted hits, the same pixels as without
them), no reload between frames, and a live job run between two steps of another
client's job without changing a pixel of either."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from backend.engines.catalogue import Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.diffusers.reuse import control_window
from backend.engines.presets import (SCHEDULERS, apply_preset, load_presets)
from backend.imaging import to_array
from backend.server.jobs import DONE, JobManager
from shared.errors import ConfigError, ModelMissing, Unsupported
from shared.images import Image
from shared.messages import ControlUnit, Generate, GenerateRequest, LoraRef, new_job_id

from tests.test_jobs import loop, on_loop  # noqa: F401 (loop is a fixture)
from tests.test_live import Owner, wait_for
from tiny_fixtures import (RecordingContext, make_tiny_lora, random_rgba,  # noqa: F401
                           tiny_lora_dir, tiny_root, torch_threads)

W = H = 64
SD15_PRESET_LORAS = {"lcm-sd15": "lcm-lora-sdv1-5", "hyper-sd15": "Hyper-SD15-4steps-lora",
                     "hyper-sd15-1step": "Hyper-SD15-1step-lora", "tcd-sd15": "tcd-sd15-lora"}


def strokes(seed=0) -> Image:
    """White strokes on black: a scribble-like control image."""
    rng = np.random.default_rng(seed)
    array = np.zeros((H, W, 4), np.uint8)
    array[..., 3] = 255
    for _ in range(6):
        y, x = rng.integers(4, H - 4), rng.integers(4, W - 20)
        array[y:y + 2, x:x + 16, :3] = 255
    return Image(W, H, array.tobytes())


@pytest.fixture(scope="module")
def preset_loras(tiny_root, tiny_lora_dir, tmp_path_factory):
    """A LoRA folder holding tiny LoRAs under the names the presets ask for."""
    folder = tmp_path_factory.mktemp("preset-loras")
    for name in SD15_PRESET_LORAS.values():
        shutil.copyfile(tiny_lora_dir / "ink.safetensors", folder / f"{name}.safetensors")
    shutil.copyfile(tiny_lora_dir / "paper.safetensors", folder / "paper.safetensors")
    for name in ("lcm-lora-sdxl", "sdxl_lightning_4step_lora"):
        shutil.copyfile(tiny_lora_dir / "xl_ink.safetensors", folder / f"{name}.safetensors")
    return folder


def engine_for(tiny_root, lora_dir, **options) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"),
        lora_dir=str(lora_dir))), device="cpu", **options)


@pytest.fixture
def engine(tiny_root, preset_loras):
    made = engine_for(tiny_root, preset_loras)
    yield made
    made.close()


def live_request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 11)
    kw.setdefault("steps", 4)
    kw.setdefault("cfg", 1.0)
    kw.setdefault("base_model", "tiny-sd15")
    kw.setdefault("controls", (ControlUnit(condition="scribble", image=0),))
    return GenerateRequest(**kw)


def run(engine, request, images=None, ctx=None):
    ctx = ctx or RecordingContext()
    out = engine.generate(request, images if images is not None else {0: strokes()}, ctx)
    return to_array(out[0].image), ctx


# -- the presets file ---------------------------------------------------------------------------

def test_every_preset_is_complete_and_non_commercial_ones_are_marked():
    presets = load_presets()
    assert {"lcm-sd15", "lcm-sdxl", "hyper-sd15", "sdxl-lightning-4step", "tcd-sd15",
            "sd-turbo", "sdxl-turbo", "dmd2-sdxl"} <= set(presets)
    for preset in presets.values():
        assert preset.scheduler in SCHEDULERS
        assert preset.min_steps <= preset.steps <= preset.max_steps <= 8
        assert preset.licence and preset.label
        assert bool(preset.lora) != bool(preset.base)
    assert not presets["dmd2-sdxl"].commercial and "CC BY-NC" in presets["dmd2-sdxl"].licence
    assert not presets["sd-turbo"].commercial and not presets["sdxl-turbo"].commercial
    assert presets["lcm-sd15"].commercial


def test_a_broken_presets_file_names_the_entry(tmp_path):
    bad = tmp_path / "live.toml"
    bad.write_text('[odd]\nlabel = "x"\nfamily = "sd15"\nscheduler = "magic"\nsteps = 4\n'
                   'min_steps = 1\nmax_steps = 8\ncfg = 1.0\nmax_cfg = 2.0\nlicence = "MIT"\n'
                   'commercial = true\nlora = "a"\nhub = "o/r"\nfile = "f.safetensors"\n')
    with pytest.raises(ConfigError, match=r"\[odd\].*scheduler"):
        load_presets(bad)


def test_models_download_knows_every_preset(tmp_path):
    catalogue = Catalogue(ModelConfig(lora_dir=str(tmp_path)))
    assert catalogue.download_target("lcm-sd15") == ("latent-consistency/lcm-lora-sdv1-5",
                                                     "lora")
    assert catalogue.download_target("sd-turbo") == ("stabilityai/sd-turbo", "base")
    assert "sdxl-lightning-4step" in catalogue.download_names()
    with pytest.raises(ModelMissing, match="offline"):  # the tests run with HF_HUB_OFFLINE
        catalogue.download("tcd-sd15")


def test_models_download_copies_a_presets_lora_into_the_folder_under_its_name(tmp_path,
                                                                             monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    fetched = tmp_path / "hub" / "pytorch_lora_weights.safetensors"
    fetched.parent.mkdir()
    fetched.write_bytes(b"lora bytes")
    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, cache_dir=None: calls.append((repo, name))
                        or str(fetched))
    catalogue = Catalogue(ModelConfig(lora_dir=str(tmp_path / "loras")))
    path = catalogue.download("lcm-sd15")
    assert calls == [("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors")]
    assert path == tmp_path / "loras" / "lcm-lora-sdv1-5.safetensors"
    assert path.read_bytes() == b"lora bytes"
    assert [p.name for p in (tmp_path / "loras").iterdir()] == [path.name]  # no leftovers
    info = {p.name: p for p in catalogue.models_message().presets}
    assert info["lcm-sd15"].present and not info["tcd-sd15"].present
    assert info["tcd-sd15"].download == "controlcanvas models download tcd-sd15"


# -- a preset on the engine -------------------------------------------------------------------

def test_a_preset_is_its_lora_scheduler_and_ranges_nothing_more(engine):
    # 20 steps and CFG 7 asked: LCM-LoRA works at 2-8 steps and CFG up to 2
    with_preset, ctx = run(engine, live_request(preset="lcm-sd15", steps=20, cfg=7.0))
    by_hand, _ = run(engine, live_request(steps=8, cfg=2.0, sampler="lcm",
                                          loras=(LoraRef(name="lcm-lora-sdv1-5"),)))
    assert np.array_equal(with_preset, by_hand)
    assert ctx.steps_done() == 8
    plain, _ = run(engine, live_request(steps=8, cfg=2.0, sampler="lcm"))
    assert np.abs(plain.astype(int) - with_preset).mean() > 1.0  # the LoRA is on


def test_a_missing_preset_lora_says_the_download_command(tiny_root, tmp_path):
    engine = engine_for(tiny_root, tmp_path)  # an empty LoRA folder
    with pytest.raises(ModelMissing) as err:
        run(engine, live_request(preset="tcd-sd15"))
    assert err.value.field == "preset"
    assert "`controlcanvas models download tcd-sd15`" in err.value.message
    with pytest.raises(Unsupported, match="lcm-sd15"):
        run(engine, live_request(preset="no-such-preset"))
    engine.close()


def test_a_preset_of_another_family_is_refused_with_the_ones_that_fit(engine):
    with pytest.raises(Unsupported) as err:
        run(engine, live_request(preset="lcm-sdxl"))
    assert "lcm-sd15" in err.value.message and err.value.field == "preset"


def test_a_base_preset_that_is_not_downloaded_says_how_to_fetch_it(engine):
    with pytest.raises(ModelMissing, match="controlcanvas models download stabilityai/sd-turbo"):
        run(engine, live_request(preset="sd-turbo", base_model=""))
    with pytest.raises(Unsupported, match="leave the base model empty"):
        run(engine, live_request(preset="sd-turbo", base_model="tiny-sd15"))


@pytest.mark.parametrize("preset", sorted(SD15_PRESET_LORAS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_controlnet_and_img2img_strength_are_honoured_at_1_to_8_steps(engine, preset, steps):
    p = load_presets()[preset]
    runs = min(max(steps, p.min_steps), p.max_steps)
    image, ctx = run(engine, live_request(preset=preset, steps=steps))
    assert ctx.steps_done() == runs
    off, _ = run(engine, live_request(preset=preset, steps=steps, controls=(
        ControlUnit(condition="scribble", image=0, weight=0.0),)))
    assert np.abs(image.astype(int) - off).mean() > 0.5  # the control steered it
    canvas = random_rgba(W, H, seed=3)
    for strength in (0.1, 0.5, 1.0):
        request = live_request(preset=preset, steps=steps, mode="img2img", init_image=1,
                               strength=strength)
        out, ctx = run(engine, request, {0: strokes(), 1: canvas})
        assert ctx.steps_done() == max(1, int(runs * strength))  # never 0 steps
        assert out.shape == (H, W, 4)


def test_a_control_window_between_two_steps_still_gets_a_step(engine):
    assert control_window(0.0, 0.4, 2) == (0.0, 0.5)
    assert control_window(0.0, 0.4, 20) == (0.0, 0.4)  # covers steps: left as it is
    assert control_window(0.3, 0.6, 1) == (0.0, 1.0)
    window = live_request(steps=2, sampler="lcm", controls=(
        ControlUnit(condition="scribble", image=0, end=0.4),))
    none = live_request(steps=2, sampler="lcm", controls=(
        ControlUnit(condition="scribble", image=0, weight=0.0),))
    assert np.abs(run(engine, window)[0].astype(int) - run(engine, none)[0]).mean() > 0.5


# -- reuse between frames ---------------------------------------------------------------------

def test_frames_reuse_prompt_embeddings_and_control_images_with_the_same_pixels(tiny_root,
                                                                                preset_loras):
    cached = engine_for(tiny_root, preset_loras)
    bare = engine_for(tiny_root, preset_loras, prompt_cache=0, control_cache=0)
    frames = [live_request(preset="lcm-sd15", controls=(
        ControlUnit(condition="lineart", image=0, preprocessor="invert"),), prompt=prompt)
        for prompt in ("a red coat", "a red coat", "a blue coat", "a red coat")]
    sources = [strokes(0), strokes(0), strokes(0), strokes(1)]
    loads = None
    for request, source in zip(frames, sources):
        ours, _ = run(cached, request, {0: source})
        reference, _ = run(bare, request, {0: source})
        assert np.array_equal(ours, reference)
        loads = loads or dict(cached.stats)
    assert cached.stats["prompt_cache_hits"] == 2 and cached.stats["prompt_cache_misses"] == 2
    assert (cached.controls_cache.hits, cached.controls_cache.misses) == (2, 2)
    assert bare.stats["prompt_cache_hits"] == 0 and bare.controls_cache.hits == 0
    # no model reload and no LoRA reload between frames
    assert cached.stats["loads"] == loads["loads"]
    assert cached.stats["lora_loads"] == 1
    cached.close()
    bare.close()


def test_the_prompt_cache_follows_the_text_encoders_loras(tiny_root, preset_loras):
    cached = engine_for(tiny_root, preset_loras)
    bare = engine_for(tiny_root, preset_loras, prompt_cache=0)
    for loras in ((), (LoraRef(name="paper"),), (LoraRef(name="paper", strength=0.5),), ()):
        request = live_request(loras=loras, cfg=3.0)
        assert np.array_equal(run(cached, request)[0], run(bare, request)[0])
    assert cached.stats["prompt_cache_misses"] == 3 and cached.stats["prompt_cache_hits"] == 1
    cached.close()
    bare.close()


def test_the_prompt_cache_follows_the_clip_skip_the_units_need(tiny_root, preset_loras):
    """SD1.5's lineart_anime needs clip skip 2 (a quirk of that ControlNet, none for a union
    model): the same prompt with it and without it are two entries, each the pixels of an
    engine without the cache."""
    cached = engine_for(tiny_root, preset_loras)
    bare = engine_for(tiny_root, preset_loras, prompt_cache=0)
    frames = [live_request(cfg=3.0, controls=(ControlUnit(condition=condition, image=0),))
              for condition in ("lineart", "lineart_anime", "lineart_anime")]
    pictures = [run(cached, request)[0] for request in frames]
    for picture, request in zip(pictures, frames):
        assert np.array_equal(picture, run(bare, request)[0])
    assert not np.array_equal(pictures[0], pictures[1])
    assert cached.stats["prompt_cache_misses"] == 2 and cached.stats["prompt_cache_hits"] == 1
    cached.close()
    bare.close()


def test_sdxl_frames_reuse_their_pooled_embeddings_too(tiny_root, preset_loras):
    cached = engine_for(tiny_root, preset_loras)
    bare = engine_for(tiny_root, preset_loras, prompt_cache=0)
    request = live_request(base_model="tiny-sdxl", preset="sdxl-lightning-4step",
                           negative_prompt="blurry", controls=())
    for _ in range(2):
        assert np.array_equal(run(cached, request, {})[0], run(bare, request, {})[0])
    assert cached.stats["prompt_cache_hits"] == 1
    cached.close()
    bare.close()


# -- a live job in another job's pause ---------------------------------------------------------

XL_UNION = (ControlUnit(condition="lineart", image=0),
            ControlUnit(condition="depth", image=0, weight=0.7))


@pytest.mark.parametrize("batch_kw, live", [
    ({}, live_request(preset="lcm-sd15", steps=4, seed=9, prompt="a green hat")),  # LoRA + LCM
    ({}, live_request(sampler="dpmpp_2m_karras", steps=4, seed=9, cfg=2.0)),  # same sampler
    # union ControlNets (two conditions in one call) on both sides
    ({"base_model": "tiny-sdxl", "controls": XL_UNION},
     live_request(base_model="tiny-sdxl", preset="lcm-sdxl", seed=9, controls=XL_UNION[:1])),
    # the batch's unit needs clip skip 2 (lineart_anime), the frame's none: the shortened
    # text encoder must not reach the frame, nor its embeddings the prompt cache's entry
    ({"controls": (ControlUnit(condition="lineart_anime", image=0),)},
     live_request(steps=4, seed=9, cfg=2.0, prompt="a green hat",
                  controls=(ControlUnit(condition="lineart", image=0),)))],
    ids=["preset", "same-sampler", "sdxl-union", "clip-skip"])
def test_a_live_job_runs_in_a_pause_of_another_clients_job_and_neither_changes(
        loop, engine, batch_kw, live, tiny_root, preset_loras):
    batch_request = live_request(steps=30, cfg=6.0, sampler="dpmpp_2m_karras", seed=5,
                                 **batch_kw)
    manager = JobManager(engine, loop)
    assert manager.preemption
    a, b = Owner("a"), Owner("b")
    progress = []
    b.job_progress = lambda job, step, total, stage: progress.append(step)
    batch = on_loop(loop, manager.submit, Generate(job_id=new_job_id(), request=batch_request),
                    {0: strokes()}, b)
    wait_for(lambda: len(progress) >= 3, timeout=60)
    frame = on_loop(loop, manager.submit, Generate(job_id=new_job_id(), request=live, live=True),
                    {0: strokes()}, a)
    wait_for(lambda: a.outcome(frame.job_id) is not None, timeout=60)
    assert batch.state == "running"  # the live frame came during the batch
    wait_for(lambda: b.outcome(batch.job_id) is not None, timeout=120)
    manager.close()
    assert manager.live_stats["nested"] == 1
    (_, live_image), = a.outcome(frame.job_id)[2]
    (_, batch_image), = b.outcome(batch.job_id)[2]
    assert b.outcome(batch.job_id)[0] == DONE
    # the same pixels as each alone (on an engine with no prompt cache: nothing the two
    # jobs left in it counts): the batch's LoRAs, scheduler and pipeline were its own
    alone = engine_for(tiny_root, preset_loras, prompt_cache=0)
    assert np.array_equal(to_array(batch_image), run(alone, batch_request)[0])
    assert np.array_equal(to_array(live_image), run(alone, live)[0])
    alone.close()
