"""The Krita plug-in's Edit section (issue 23): an instruction applied to the selected layer
(or the selected part of it) by the server's edit model, with up to three reference layers;
the result a new layer above it in one undo step, nothing changed outside a selection.

Same set-up as test_krita_plugin.py (the mock ``krita`` module, a real websocket server on
127.0.0.1, the real PyQt6 docker), then a real server with the tiny FLUX.1 Kontext stack."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.test_krita_plugin import (KRITA_DOCKED, ROOT, bgra, controller_for,  # noqa: F401
                                     docker_on, krita_app, krita_dark_palette, line_art_doc,
                                     mock_krita, node_image, open_docked, pump, qapp, uid,
                                     use_palette)
from tests.test_krita_references import photo_layer
from tests.krita_support.engines import RecordingEngine

from controlcanvas import canvas as cc_canvas, plan  # noqa: E402
from controlcanvas.settings import EditSettings, Settings  # noqa: E402
from tiny_fixtures import torch_threads  # noqa: F401

W, H = 48, 32


def select(doc, x, y, w, h):
    sel = mock_krita.Selection(doc)
    sel.select(x, y, w, h, 255)
    doc.setSelection(sel)


def painted_doc():
    """The line-art document with a photo layer (selected) and a second picture layer."""
    doc, lines = line_art_doc()
    photo = photo_layer(doc, colour=(200, 60, 30))
    other = photo_layer(doc, "jacket", colour=(10, 20, 220), box=(0, 0, 16, 16))
    doc.setActiveNode(photo)
    return doc, lines, photo, other


def test_edit_settings_roundtrip_and_tolerate_junk():
    s = Settings(edit=EditSettings("make it red", "tiny-flux-kontext", 12, 3.5, ["a", "", "c"]))
    assert Settings.from_json(s.to_json()) == s
    odd = Settings.from_json('{"edit": {"instruction": 3, "steps": 900, "cfg": "x", '
                             '"references": ["a", 5, "b", "c", "d"]}}')
    assert odd.edit == EditSettings(references=["a", "b", "c"])  # at most 3, junk dropped
    assert Settings.from_json('{"edit": 5}').edit == EditSettings()


def test_the_edit_plan_sends_the_layer_its_references_and_no_mask(krita_app):
    doc, lines, photo, other = painted_doc()
    settings = Settings(batch=2, edit=EditSettings(" make the jacket red ", "tiny-flux-kontext",
                                                   9, 2.0, ["", uid(other), uid(lines)]))
    job = plan.build_edit(settings, cc_canvas.KritaCanvas(doc), seed=5)
    req = job.request
    assert (req.mode, req.prompt, req.base_model, req.steps, req.cfg, req.batch, req.seed) == (
        "edit", "make the jacket red", "tiny-flux-kontext", 9, 2.0, 2, 5)
    assert (req.width, req.height, req.init_image, req.mask_image) == (W, H, 0, None)
    assert job.images[0].pixel(3, 3) == (200, 60, 30, 255)  # the layer's own pixels
    assert req.edit_references == (1, 2)
    assert job.images[1].pixel(3, 3) == (10, 20, 220, 255) and job.images[1].pixel(30, 3)[3] == 0
    assert job.images[2].pixel(10, 5) == (20, 20, 20, 255)  # the line art, whole
    assert job.placement == plan.Placement("above", uid(photo), (0, 0, W, H), None)
    assert job.kind == "edit" and not req.controls and not req.references


def test_the_edit_plan_with_a_selection_sends_its_region_and_mask(krita_app):
    doc, lines, photo, other = painted_doc()
    select(doc, 20, 10, 6, 5)
    job = plan.build_edit(Settings(edit=EditSettings("blue")), cc_canvas.KritaCanvas(doc), seed=1)
    req, box = job.request, job.placement.box
    assert req.mask_image == 1 and job.placement.mask is not None
    assert (req.width, req.height) == box[2:]  # the context box (here: the whole document)
    assert box[0] <= 20 and box[1] <= 10 and box[0] + box[2] >= 26 and box[1] + box[3] >= 15
    mask = job.images[1]
    assert mask.pixel(20 - box[0], 10 - box[1])[0] == 255 and mask.pixel(0, 0)[0] == 0


def test_edit_mistakes_are_sentences(krita_app):
    doc, lines, photo, other = painted_doc()
    canvas = cc_canvas.KritaCanvas(doc)
    with pytest.raises(plan.PlanError, match="Type the instruction first"):
        plan.build_edit(Settings(edit=EditSettings("  ")), canvas)
    with pytest.raises(plan.PlanError, match="Edit reference 1: pick the layer"):
        plan.build_edit(Settings(edit=EditSettings("red", references=["gone"])), canvas)
    empty = doc.createNode("empty", "paintlayer")
    doc.rootNode().addChildNode(empty, None)
    with pytest.raises(plan.PlanError, match="Edit reference 2: the layer 'empty' is empty"):
        plan.build_edit(Settings(edit=EditSettings("red", references=[uid(other), uid(empty)])),
                        canvas)
    doc.setActiveNode(empty)
    with pytest.raises(plan.PlanError, match="The layer 'empty' is empty"):
        plan.build_edit(Settings(edit=EditSettings("red")), canvas)


def test_a_masked_edit_adds_one_undoable_layer_above_and_nothing_changes_outside(
        make_server, controller_for, krita_app):
    engine = RecordingEngine()
    srv = make_server(engine)
    doc, lines, photo, other = painted_doc()
    select(doc, 20, 10, 6, 5)
    before, steps = doc.pixelData(0, 0, W, H), doc.undo_steps
    c = controller_for(doc, srv, prompt="not the instruction", seed=77, seed_locked=True,
                       edit=EditSettings("make it blue", references=[uid(other)]))
    assert c.edit() is not None, c.message
    assert c.run_until_idle(20), c.message
    request, images, _ = engine.calls[-1]
    assert request.mode == "edit" and request.prompt == "make it blue"
    assert images[request.edit_references[0]].pixel(0, 0) == (10, 20, 220, 255)
    names = doc.layer_names()
    assert names.index("make it blue · seed 77") == names.index("photo") + 1, names
    after = doc.pixelData(0, 0, W, H)
    changed = {((i // 4) % W, (i // 4) // W) for i in range(0, len(after), 4)
               if after[i:i + 4] != before[i:i + 4]}
    assert changed and changed <= {(x, y) for x in range(20, 26) for y in range(10, 15)}
    assert doc.unundoable_writes == 0 and doc.undo_steps == steps + 1
    doc.undo()
    assert "make it blue · seed 77" not in doc.layer_names()
    assert c.history[0].prompt == "make it blue"


def test_docker_edit_section_sends_saves_and_looks_tidy(docker_on, qapp, krita_app, tmp_path):
    engine = RecordingEngine()
    doc, docker, panel = open_docked(docker_on, qapp, engine)
    photo = photo_layer(doc)
    jacket = photo_layer(doc, "jacket", colour=(10, 20, 220), box=(0, 0, 16, 16))
    doc.setActiveNode(photo)
    panel.refresh_layers()
    edit = panel.edit_panel
    assert "Edit" in panel.sections
    assert [edit.pickers[0].itemText(i).strip() for i in range(edit.pickers[0].count())] == [
        "(none)"] + [info.name for info in cc_canvas.KritaCanvas(doc).info().layers]
    assert "fake" in [edit.model.itemText(i) for i in range(edit.model.count())]
    edit.instruction.setPlainText("make the jacket red")
    edit.model.setEditText("fake")
    edit.pickers[1].setCurrentIndex(edit.pickers[1].findData(uid(jacket)))
    docker.resize(*KRITA_DOCKED)
    pump(qapp, lambda: False, 0.2)
    assert not panel.scroll.horizontalScrollBar().isVisible(), "no sideways scrolling"
    use_palette(docker, krita_dark_palette())
    docker.resize(KRITA_DOCKED[0], 900)
    panel.scroll.ensureWidgetVisible(edit.edit_button)
    pump(qapp, lambda: False, 0.2)
    out = tmp_path / "krita-docker-edit.png"
    assert docker.grab().save(str(out))
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):  # the docs' picture
        shutil.copy(out, ROOT / "docs" / "img" / "krita-docker-edit.png")
    edit.edit_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    request, images, _ = engine.calls[-1]
    assert (request.mode, request.prompt, request.base_model) == ("edit", "make the jacket red",
                                                                  "fake")
    assert images[request.edit_references[0]].pixel(0, 0) == (10, 20, 220, 255)
    assert "make the jacket red" in doc.layer_names()[doc.layer_names().index("photo") + 1]
    saved = Settings.from_json(krita_app.readSetting(cc_canvas.SETTINGS_GROUP, "settings", ""))
    assert saved.edit == EditSettings("make the jacket red", "fake", 28, 2.5,
                                      ["", uid(jacket), ""])
    jacket.remove()
    panel.refresh_layers()
    assert edit.pickers[1].currentText() == "(layer gone: pick one)"


@pytest.fixture(scope="module")
def kontext_root(tmp_path_factory, torch_threads):  # noqa: F811
    from backend.engines import tiny_kontext
    root = tmp_path_factory.mktemp("tiny-kontext")
    tiny_kontext.ensure_kontext(root)
    return root


def test_an_edit_with_the_tiny_kontext_engine(make_server, kontext_root, controller_for,
                                              krita_app):
    """A real server (the tiny FLUX.1 Kontext stack): a masked edit with a reference layer
    comes back as a layer and the picture outside the selection is unchanged; a base that
    cannot edit is the server's typed error, shown as a sentence."""
    from backend.engines import tiny_kontext
    from backend.engines.catalogue import Catalogue, ModelConfig
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(kontext_root), cache_dir=str(kontext_root / "empty-hf-cache"),
        roots=(str(kontext_root),))), device="cpu")
    try:
        srv = make_server(engine)
        doc, lines, photo, other = painted_doc()
        select(doc, 8, 8, 16, 16)
        before = doc.pixelData(0, 0, W, H)
        c = controller_for(doc, srv, seed=3, seed_locked=True,
                           edit=EditSettings("make it green", tiny_kontext.NAME, 2, 2.5,
                                             [uid(other)]))
        assert c.edit() is not None, c.message
        assert c.run_until_idle(120), c.message
        assert c.level == "info", c.message
        (layer_id,) = c.history[0].layer_ids
        after = doc.pixelData(0, 0, W, H)
        changed = {((i // 4) % W, (i // 4) // W) for i in range(0, len(after), 4)
                   if after[i:i + 4] != before[i:i + 4]}
        assert changed and changed <= {(x, y) for x in range(8, 24) for y in range(8, 24)}
        c.settings.edit.base_model = "tiny-flux"
        assert c.edit() is not None
        assert c.run_until_idle(60)
        assert c.level == "error" and "edit model" in c.message.lower(), c.message
    finally:
        engine.close()
