"""Edit mode on Qwen-Image-Edit (issue 23): the tiny Qwen-Image-Edit-Plus stack
(``tiny-qwen-edit``: its Qwen2.5-VL encoder reads the pictures through the processor),
the layer with 0 / 1 / 3 references, a selection, and the one-picture Qwen-Image-Edit
pipeline (backend/engines/diffusers/qwen_edit.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import (QwenImageEditInpaintPipeline, QwenImageEditPipeline,
                       QwenImageEditPlusPipeline)

from backend.engines import catalogue, tiny_qwen_edit
from backend.engines.catalogue import EDIT_BASES, LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers import qwen_edit
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import detect
from backend.imaging import to_array
from shared.errors import EditModelNeeded, Unsupported
from shared.images import Image
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import RecordingContext, lines_image, random_rgba, torch_threads  # noqa: F401

W = H = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-qwen-edit")
    tiny_qwen_edit.ensure_edit(root)
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
          3: lines_image(W, H, 5), 4: random_rgba(W, H, seed=6)}


def edit(**kw) -> GenerateRequest:
    kw = dict(dict(width=W, height=H, mode="edit", prompt="make the jacket red", seed=7,
                   steps=3, cfg=2.5, base_model=tiny_qwen_edit.NAME, init_image=0), **kw)
    return GenerateRequest(**kw)


def run(engine, req, images=IMAGES, ctx=None) -> np.ndarray:
    out = engine.generate(req, images, ctx or RecordingContext())
    assert len(out) == 1
    return to_array(out[0].image)


# -- the edit base ----------------------------------------------------------------------

def test_qwen_edit_is_detected_from_model_index_not_name(root, tmp_path):
    folder = tiny_qwen_edit.edit_dir(root)
    found = detect(folder, "base")
    assert found.family == "qwen" and found.edit
    renamed = tmp_path / "just-a-folder"
    renamed.mkdir()
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for cls, edit_base in (("QwenImageEditPipeline", True), ("QwenImageEditPlusPipeline", True),
                           ("QwenImageEditInpaintPipeline", True), ("QwenImagePipeline", False)):
        (renamed / "model_index.json").write_text(json.dumps(dict(index, _class_name=cls)),
                                                  encoding="utf-8")
        found = detect(renamed, "base")  # "QwenImage" also starts "QwenImageEdit...": edit first
        assert (found.family, found.edit) == ("qwen", edit_base), cls


def test_catalogue_lists_qwen_edit_plus_with_its_licence():
    hub = EDIT_BASES["qwen"]
    assert hub == "Qwen/Qwen-Image-Edit-2509"
    assert LICENCES[hub] == "Apache-2.0"


def test_non_edit_qwen_base_is_a_typed_error_naming_the_edit_models(engine):
    with pytest.raises(EditModelNeeded) as err:
        run(engine, edit(base_model="tiny-qwen"))
    assert "Qwen/Qwen-Image-Edit-2509" in err.value.message
    assert tiny_qwen_edit.NAME in err.value.message


def test_qwen_edit_with_control_units_is_unsupported(engine):
    with pytest.raises(Unsupported):
        run(engine, edit(controls=(ControlUnit(condition="lineart", image=3),)))


# -- generation ---------------------------------------------------------------------------

def test_edit_without_references_same_seed_same_pixels(engine):
    ctx = RecordingContext(preview_every=1)
    first = run(engine, edit(), ctx=ctx)
    assert [e[1:] for e in ctx.events if e[0] == "progress"] == [(1, 3, "denoise"),
                                                                  (2, 3, "denoise"),
                                                                  (3, 3, "denoise")]
    assert len(ctx.previews) == 3  # from latents of the planned size
    assert first.shape == (H, W, 4) and first[..., 3].min() == 255
    assert engine.last_plan.first.kind == "edit"
    assert np.array_equal(first, run(engine, edit()))
    assert not np.array_equal(first, run(engine, edit(seed=8)))
    other_layer = {**IMAGES, 0: random_rgba(W, H, seed=9)}
    assert not np.array_equal(first, run(engine, edit(), other_layer))


def test_edit_plus_reads_one_and_three_references(engine, monkeypatch):
    seen = []
    call = QwenImageEditPlusPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append([im.size for im in kwargs["image"]])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageEditPlusPipeline, "__call__", spy)
    base = run(engine, edit())
    one = run(engine, edit(edit_references=(2,)))
    assert one.shape == (H, W, 4) and not np.array_equal(base, one)
    assert np.array_equal(one, run(engine, edit(edit_references=(2,))))
    three = run(engine, edit(edit_references=(2, 3, 4)))
    assert three.shape == (H, W, 4) and not np.array_equal(one, three)
    # the layer, then each reference at its own size: several pictures, nothing stitched
    assert seen[0] == [(W, H)] and seen[1] == [(W, H), (48, 32)]
    assert seen[-1] == [(W, H), (48, 32), (W, H), (W, H)]


def test_masked_edit_keeps_unselected_pixels_bit_identical(engine, monkeypatch):
    ran = []
    for cls in (QwenImageEditInpaintPipeline, QwenImageEditPlusPipeline):
        monkeypatch.setattr(cls, "__call__", _recording(cls, ran))
    layer = to_array(IMAGES[0])
    inside = to_array(IMAGES[1])[..., 0] > 0
    for refs, pipeline in (((), QwenImageEditInpaintPipeline),
                           ((2,), QwenImageEditPlusPipeline)):
        out = run(engine, edit(mask_image=1, edit_references=refs))
        assert engine.last_plan.first.kind == "edit_inpaint" and ran[-1] is pipeline
        assert np.array_equal(out[~inside], layer[~inside])
        assert not np.array_equal(out[inside], layer[inside])
        assert np.array_equal(out, run(engine, edit(mask_image=1, edit_references=refs)))


def _recording(cls, ran):
    call = cls.__call__

    def recorded(self, *args, **kwargs):
        ran.append(cls)
        return call(self, *args, **kwargs)

    return recorded


def test_one_picture_qwen_image_edit_stitches_references(root, tmp_path, monkeypatch):
    """A Qwen-Image-Edit (not Plus) base reads one picture: the layer and the references
    side by side, as for Kontext."""
    folder = tmp_path / "qwen-image-edit"
    shutil.copytree(tiny_qwen_edit.edit_dir(root), folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    (folder / "model_index.json").write_text(
        json.dumps(dict(index, _class_name="QwenImageEditPipeline")), encoding="utf-8")
    seen = []
    call = QwenImageEditPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["image"].size)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageEditPipeline, "__call__", spy)
    name = "tiny-qwen-image-edit"  # a built-in name: the tiny stacks' native size
    monkeypatch.setitem(catalogue.TINY_BASES, name, "qwen")
    monkeypatch.setitem(catalogue.TINY_EDIT, name, lambda _root: folder)
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                   cache_dir=str(tmp_path / "hf"))),
                             device="cpu")
    try:
        out = run(engine, edit(base_model=name, edit_references=(2,)))
        assert out.shape == (H, W, 4)
        assert seen == [(W + 96, H)]  # the 48 x 32 reference at the layer's height: 96 wide
        assert np.array_equal(out, run(engine, edit(base_model=name, edit_references=(2,))))
    finally:
        engine.close()


def test_work_area_is_restored_after_the_call():
    modules = qwen_edit._MODULES
    before = [m.calculate_dimensions for m in modules]
    with pytest.raises(RuntimeError):
        with qwen_edit.work_area((64, 48)):
            dims = modules[2].calculate_dimensions
            assert dims(1024 * 1024, 64 / 48) == (64, 48)  # the layer: the work size
            assert dims(384 * 384, 1.0) == before[2](384 * 384, 1.0)  # the encoder's: as is
            raise RuntimeError("the pipeline failed")
    assert [m.calculate_dimensions for m in modules] == before
