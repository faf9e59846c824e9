"""Edit mode (issue 23): an instruction applied to a layer or a selection, with up to three
further reference pictures, on the tiny FLUX.1 Kontext stack (backend/engines/diffusers/edit.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.engines import tiny_kontext
from backend.engines.catalogue import EDIT_BASES, LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import detect
from backend.imaging import to_array
from shared.errors import EditModelNeeded, FieldError, ModelMissing, Unsupported
from shared.images import Image
from shared.messages import (MAX_EDIT_REFERENCES, ControlUnit, Generate, GenerateRequest,
                             Models, from_json, to_json)

from tiny_fixtures import RecordingContext, lines_image, random_rgba, torch_threads  # noqa: F401

W = H = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-kontext")
    tiny_kontext.ensure_kontext(root)
    return root


@pytest.fixture(scope="module")
def engine(root):
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                   cache_dir=str(root / "empty-hf-cache"),
                                                   roots=(str(root),))), device="cpu")
    yield engine
    engine.close()


def selection(width=W, height=H) -> Image:
    array = np.zeros((height, width, 4), np.uint8)
    array[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return Image(width, height, array.tobytes())


IMAGES = {0: random_rgba(W, H, seed=3), 1: selection(), 2: random_rgba(48, 32, seed=4),
          3: lines_image(W, H, 5), 4: random_rgba(W, H, seed=6), 5: random_rgba(W, H, seed=7)}


def edit(**kw) -> GenerateRequest:
    kw = dict(dict(width=W, height=H, mode="edit", prompt="make the jacket red", seed=7,
                   steps=3, cfg=2.5, base_model=tiny_kontext.NAME, init_image=0), **kw)
    return GenerateRequest(**kw)


def run(engine, req, images=IMAGES, ctx=None) -> np.ndarray:
    out = engine.generate(req, images, ctx or RecordingContext())
    assert len(out) == 1
    return to_array(out[0].image)


# -- protocol -------------------------------------------------------------------------

def test_edit_request_round_trips_and_old_requests_are_unchanged():
    req = edit(edit_references=(2, 3), mask_image=1)
    message = Generate(job_id="a" * 32, request=req)
    again = from_json(to_json(message), {"generate": Generate})
    assert again.request == req and req.slots() == (0, 1, 2, 3)
    plain = json.loads(to_json(Generate(job_id="a" * 32, request=GenerateRequest())))
    assert "edit_references" not in plain["request"]  # old servers see the same JSON


@pytest.mark.parametrize("kw, field", [
    (dict(init_image=None), "init_image"),
    (dict(edit_references=(2, 3, 4, 5)), "edit_references"),
    (dict(mode="img2img", edit_references=(2,)), "edit_references"),
    (dict(edit_references=(-1,)), "edit_references[0]"),
])
def test_edit_request_validation(kw, field):
    with pytest.raises(FieldError) as err:
        edit(**kw)
    assert err.value.field == field
    assert MAX_EDIT_REFERENCES == 3


# -- the edit base ----------------------------------------------------------------------

def test_kontext_is_detected_from_model_index_not_name(root, tmp_path):
    folder = tiny_kontext.kontext_dir(root)
    found = detect(folder, "base")
    assert found.family == "flux" and found.edit and found.name == "flux-edit"
    renamed = tmp_path / "just-a-folder"
    renamed.mkdir()
    (renamed / "model_index.json").write_text(
        (folder / "model_index.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert detect(renamed, "base").edit  # the files say it, not the name
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    (renamed / "model_index.json").write_text(
        json.dumps(dict(index, _class_name="FluxPipeline")), encoding="utf-8")
    assert not detect(renamed, "base").edit


def test_catalogue_lists_kontext_with_its_licence():
    hub = EDIT_BASES["flux"]
    assert hub == "black-forest-labs/FLUX.1-Kontext-dev"
    assert "Non-Commercial" in LICENCES[hub]


def test_non_edit_base_is_a_typed_error_naming_the_edit_models(engine):
    with pytest.raises(EditModelNeeded) as err:
        run(engine, edit(base_model="tiny-flux"))
    assert err.value.code == "edit_model_needed"
    assert "FLUX.1-Kontext-dev" in err.value.message and tiny_kontext.NAME in err.value.message


def test_a_blank_edit_model_is_the_servers_edit_model(root, engine):
    """An artist need not know the edit model's name: with no base named, a server whose
    default base is built in edits with the built-in edit model, one with a real default
    names the edit model to download; the models list marks the edit bases."""
    tiny_default = DiffusersEngine(Catalogue(ModelConfig(base="tiny-sd15", tiny_root=str(root),
                                                         cache_dir=str(root / "empty-hf-cache"),
                                                         roots=(str(root),))), device="cpu")
    try:
        assert tiny_default.catalogue.edit_base("") == tiny_kontext.NAME
        # ... and says so to the plug-ins (GIMP sizes a blank-model edit for it)
        assert tiny_default.catalogue.models_message().default_edit_base == tiny_kontext.NAME
        assert np.array_equal(run(tiny_default, edit(base_model="")), run(engine, edit()))
    finally:
        tiny_default.close()
    assert engine.catalogue.edit_base("") == EDIT_BASES["flux"]  # not downloaded here
    with pytest.raises(ModelMissing, match="FLUX.1-Kontext-dev"):
        run(engine, edit(base_model=""))
    assert engine.catalogue.edit_base("tiny-flux") == "tiny-flux"  # a named base is kept
    listed = {m.name: m for m in engine.catalogue.entries()}
    assert listed[tiny_kontext.NAME].edit and listed[EDIT_BASES["flux"]].edit
    assert not listed["tiny-sd15"].edit and not listed["tiny-flux"].edit
    assert '"edit"' not in to_json(Models(models=(listed["tiny-sd15"],), annotators=()))


def test_edit_with_control_units_is_unsupported(engine):
    with pytest.raises(Unsupported):
        run(engine, edit(controls=(ControlUnit(condition="lineart", image=3),)))


# -- generation ---------------------------------------------------------------------------

def test_edit_without_references_same_seed_same_pixels(engine):
    ctx = RecordingContext(preview_every=1)
    first = run(engine, edit(), ctx=ctx)
    # generated at the work size (not Kontext's default 1024 x 1024 area): a preview per
    # step, from latents of the planned size
    assert [e[1:] for e in ctx.events if e[0] == "progress"] == [(1, 3, "denoise"),
                                                                  (2, 3, "denoise"),
                                                                  (3, 3, "denoise")]
    assert len(ctx.previews) == 3
    assert first.shape == (H, W, 4) and first[..., 3].min() == 255
    assert np.array_equal(first, run(engine, edit()))
    assert not np.array_equal(first, run(engine, edit(seed=8)))
    assert engine.last_plan.first.kind == "edit"


def test_the_layer_and_references_are_the_context(engine):
    """The picture is Kontext's context: another layer, or a reference, changes the result."""
    base = run(engine, edit())
    other_layer = {**IMAGES, 0: random_rgba(W, H, seed=9)}
    assert not np.array_equal(base, run(engine, edit(), other_layer))
    one = run(engine, edit(edit_references=(2,)))
    assert one.shape == (H, W, 4) and not np.array_equal(base, one)
    assert np.array_equal(one, run(engine, edit(edit_references=(2,))))
    three = run(engine, edit(edit_references=(2, 3, 4)))
    assert three.shape == (H, W, 4) and not np.array_equal(one, three)


def test_masked_edit_keeps_unselected_pixels_bit_identical(engine):
    layer = to_array(IMAGES[0])
    for refs in ((), (2,)):
        out = run(engine, edit(mask_image=1, edit_references=refs))
        inside = to_array(IMAGES[1])[..., 0] > 0
        assert engine.last_plan.first.kind == "edit_inpaint"
        assert np.array_equal(out[~inside], layer[~inside])
        assert not np.array_equal(out[inside], layer[inside])
