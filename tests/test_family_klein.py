"""Flux.2 Klein on its tiny stack (tiny Flux2Transformer2DModel, tiny Qwen3 text encoder,
tiny AutoencoderKLFlux2), through DiffusersEngine.generate
(backend/engines/diffusers/dit_klein.py): every mode, edit with references, control units
emulated as references, detection, the catalogue."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from backend.engines import tiny, tiny_klein
from backend.engines.catalogue import EDIT_BASES, LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import _detect_keys, detect, detect_file
from backend.imaging import to_array
from shared.errors import Cancelled, EditModelNeeded, FieldError, UnsupportedCondition
from shared.messages import ControlUnit, GenerateRequest, ModelInfo, Models
from shared.offers import Offers

from test_edit_mode import IMAGES, selection
from tiny_fixtures import RecordingContext, torch_threads  # noqa: F401

W = H = 64
KLEIN = tiny_klein.NAME


@pytest.fixture(scope="module")
def root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-klein")
    tiny.ensure_tiny("klein", root)
    return root


def _engine(root) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                 cache_dir=str(root / "empty-hf-cache"),
                                                 roots=(str(root),))), device="cpu")


@pytest.fixture(scope="module")
def engine(root):
    engine = _engine(root)
    yield engine
    engine.close()


def request(**kw) -> GenerateRequest:
    kw = dict(dict(width=W, height=H, prompt="a red coat", seed=7, steps=3, cfg=1.0,
                   base_model=KLEIN), **kw)
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 0)
    if kw.get("mode") in ("img2img", "inpaint"):
        kw.setdefault("strength", 0.75)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 1)
    return GenerateRequest(**kw)


def unit(condition="openpose", slot=3, **kw) -> ControlUnit:
    return ControlUnit(condition=condition, image=slot, **kw)


def pixels(engine, req, ctx=None) -> np.ndarray:
    out = engine.generate(req, IMAGES, ctx or RecordingContext())
    assert len(out) == 1
    return to_array(out[0].image).copy()


def outside(array) -> np.ndarray:
    return array[to_array(selection())[..., 0] == 0][:, :3]


# -- every mode -------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(mode="img2img"), dict(mode="inpaint"), dict(mode="edit"),
    dict(mode="edit", mask_image=1), dict(mode="edit", edit_references=(2,)),
    dict(mode="edit", edit_references=(2, 3, 4)), dict(controls=(unit(),)),
    dict(mode="inpaint", controls=(unit("depth"), unit("canny", 4)))],
    ids=["txt2img", "img2img", "inpaint", "edit", "masked-edit", "edit-1-ref",
         "edit-3-refs", "txt2img-unit", "inpaint-2-units"])
def test_every_mode_runs_each_step_once_and_same_seed_same_pixels(engine, kw):
    ctx = RecordingContext(preview_every=1)
    req = request(**kw)
    out = pixels(engine, req, ctx)
    assert out.shape == (H, W, 4) and out[..., 3].min() == 255 and out[..., :3].std() > 0
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert steps and steps[-1][1] == steps[-1][2] == len(steps)
    assert len(ctx.previews) == len(steps)
    if req.mask_image is not None:  # outside the selection: the layer, bit for bit
        assert np.array_equal(outside(out), outside(to_array(IMAGES[0])))
    assert pixels(engine, req).tobytes() == out.tobytes()


def test_img2img_starts_from_the_picture_and_strength_matters(engine):
    plain = pixels(engine, request())
    low = pixels(engine, request(mode="img2img", strength=0.3))
    high = pixels(engine, request(mode="img2img", strength=0.9))
    layer = to_array(IMAGES[0])[..., :3].astype(int)
    assert not np.array_equal(low, plain)
    # less strength keeps more of the picture
    assert np.abs(low[..., :3] - layer).mean() < np.abs(high[..., :3] - layer).mean()


def test_another_seed_other_pixels_and_cfg_uses_the_negative_prompt(engine):
    plain = pixels(engine, request())
    assert not np.array_equal(plain, pixels(engine, request(seed=8)))
    assert np.array_equal(plain, pixels(engine, request(negative_prompt="fog")))  # no cfg
    guided = pixels(engine, request(cfg=3.0))
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, pixels(engine, request(cfg=3.0, negative_prompt="fog")))


def test_a_distilled_klein_ignores_cfg_and_the_negative_prompt(root, tmp_path):
    folder = tmp_path / "distilled"
    shutil.copytree(tiny.tiny_dir("klein", root), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, is_distilled=True)))
    engine = DiffusersEngine(Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf"),
                                                   roots=(str(tmp_path),))), device="cpu")
    try:
        plain = pixels(engine, request(base_model=str(folder)))
        misses = engine.stats.get("prompt_cache_misses", 0)
        guided = pixels(engine, request(base_model=str(folder), cfg=3.0, negative_prompt="x"))
        assert np.array_equal(plain, guided)
        assert engine.stats["prompt_cache_misses"] == misses  # the same prompt, no negative
    finally:
        engine.close()


# -- edit -------------------------------------------------------------------------------

def test_edit_references_are_read_in_order(engine):
    none = pixels(engine, request(mode="edit"))
    one = pixels(engine, request(mode="edit", edit_references=(2,)))
    three = pixels(engine, request(mode="edit", edit_references=(2, 3, 4)))
    swapped = pixels(engine, request(mode="edit", edit_references=(4, 3, 2)))
    assert len({none.tobytes(), one.tobytes(), three.tobytes(), swapped.tobytes()}) == 4


def test_masked_edit_with_references_keeps_unselected_pixels_bit_identical(engine):
    out = pixels(engine, request(mode="edit", mask_image=1, edit_references=(2, 3, 4)))
    assert np.array_equal(outside(out), outside(to_array(IMAGES[0])))
    inside = to_array(selection())[..., 0] > 0
    assert not np.array_equal(out[inside][:, :3], to_array(IMAGES[0])[inside][:, :3])


def test_a_fourth_reference_is_a_field_error_before_anything_runs():
    with pytest.raises(FieldError) as err:
        request(mode="edit", edit_references=(2, 3, 4, 5))
    assert err.value.field == "edit_references"


def test_edit_on_a_base_that_is_not_an_edit_model_names_klein(engine, root):
    with pytest.raises(EditModelNeeded) as err:
        pixels(engine, request(mode="edit", base_model="tiny-zimage"))
    assert EDIT_BASES["klein"] in err.value.message and KLEIN in err.value.message


# -- control units as references ----------------------------------------------------------

def test_a_control_unit_becomes_a_reference_with_an_instruction(engine, caplog):
    plain = pixels(engine, request())
    loads = engine.stats["loads"]
    with caplog.at_level(logging.INFO, logger="backend.engines.diffusers.dit_klein"):
        posed = pixels(engine, request(controls=(unit("openpose"),)))
    assert not np.array_equal(plain, posed)
    assert engine.stats["loads"] == loads  # no ControlNet was resolved nor loaded
    said = caplog.text
    assert "no ControlNet" in said and "pose skeleton in image 1" in said
    # the instruction is part of the prompt: the same image under another condition differs
    assert not np.array_equal(posed, pixels(engine, request(controls=(unit("depth"),))))
    # weight 0 is no unit at all
    assert np.array_equal(plain, pixels(engine, request(controls=(unit(weight=0.0),))))


def test_in_edit_mode_units_are_numbered_after_the_references(engine, caplog):
    with caplog.at_level(logging.INFO, logger="backend.engines.diffusers.dit_klein"):
        pixels(engine, request(mode="edit", edit_references=(2, 4), controls=(unit("canny"),)))
    assert "edges in image 4" in caplog.text  # the layer 1, references 2 and 3


def test_a_condition_no_instruction_serves_is_a_typed_error(engine):
    with pytest.raises(UnsupportedCondition) as err:
        pixels(engine, request(mode="inpaint", controls=(unit("inpaint"),)))
    assert err.value.field == "condition" and "openpose" in err.value.message


def test_the_models_list_and_offers_say_control_is_emulated(root):
    cat = Catalogue(ModelConfig(tiny_root=str(root), cache_dir=str(root / "hf")))
    listed = {m.name: m for m in cat.entries() if m.kind == "base"}
    four, nine = listed["black-forest-labs/FLUX.2-klein-4B"], \
        listed["black-forest-labs/FLUX.2-klein-9B"]
    assert four.family == nine.family == listed[KLEIN].family == "klein"
    assert {"openpose", "depth", "canny", "lineart"} <= set(listed[KLEIN].conditions)
    assert "inpaint" not in listed[KLEIN].conditions
    assert set(four.conditions) == set(listed[KLEIN].conditions)
    assert LICENCES[four.name] == "Apache-2.0" and "Non-Commercial" in LICENCES[nine.name]
    offers = Offers(Models(models=(four, listed["tiny-zimage"]), default_base=four.name))
    assert "reference image" in offers.control_note() and "Flux.2 Klein" in \
        offers.control_note()
    assert offers.control_note("tiny-zimage") == "" and Offers(None).control_note() == ""
    assert Offers(Models(models=(ModelInfo(name="x", kind="base"),))).control_note("x") == ""


# -- cancel -------------------------------------------------------------------------------

def test_cancel_lands_inside_a_step(root):
    class CancelAtCall(RecordingContext):
        calls = 0

        def check_cancelled(self):
            self.calls += 1
            if self.calls >= 3:
                raise Cancelled(job_id=self.job_id)

    engine = _engine(root)
    try:
        ctx = CancelAtCall()
        with pytest.raises(Cancelled):
            engine.generate(request(mode="edit", edit_references=(2,)), IMAGES, ctx)
        assert ctx.steps_done() == 0
    finally:
        engine.close()


def test_cancel_between_steps(engine):
    ctx = RecordingContext(cancel_at=2)
    with pytest.raises(Cancelled):
        engine.generate(request(steps=5), IMAGES, ctx)
    assert ctx.steps_done() == 2


# -- detection ----------------------------------------------------------------------------

def test_the_tiny_klein_files_are_detected_from_their_contents(root, tmp_path):
    folder = tiny.tiny_dir("klein", root)
    found = detect(folder, "base")
    assert (found.family, found.edit, found.control) == ("klein", True, False)
    single = detect_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert (single.kind, single.family) == ("base", "klein")
    # renamed, and its model_index naming another class: the transformer's config tells
    other = tmp_path / "my-model"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "SomePipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    assert detect(other, "base").family == "klein"


def test_original_flux2_single_file_keys_tell_klein_from_flux2_dev_and_flux1():
    klein = ("model.diffusion_model.single_stream_modulation.lin.weight",
             "model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
    assert _detect_keys(klein, lambda k: ()).name == "klein-edit"
    dev = klein + ("model.diffusion_model.guidance_in.in_layer.weight",)
    assert _detect_keys(dev, lambda k: ()).family != "klein"
    flux1 = ("model.diffusion_model.double_blocks.0.img_mod.lin.weight",)
    assert _detect_keys(flux1, lambda k: ()).family == "flux"

