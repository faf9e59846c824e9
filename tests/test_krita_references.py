"""The Krita plug-in's Reference section (IP-Adapter): settings, the plan (a layer sent whole,
at most 512 px), the docker's rows under the offscreen platform, and a real server with the
tiny diffusers engine (a reference layer changes the picture, weight 0 is none).

Same set-up as test_krita_plugin.py (the mock ``krita`` module, a real websocket server on
127.0.0.1, the real PyQt6 docker)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.test_krita_plugin import (KRITA_DOCKED, ROOT, bgra, colourise, controller_for,  # noqa: F401
                                     docker_on, krita_app, krita_dark_palette, line_art_doc,
                                     mock_krita, open_docked, pump, qapp, uid, use_palette)
from tests.krita_support.engines import RecordingEngine

from controlcanvas import canvas as cc_canvas, plan  # noqa: E402
from controlcanvas.settings import ReferenceSettings, Settings  # noqa: E402
from tiny_fixtures import tiny_root, torch_threads  # noqa: F401

W, H = 48, 32


def photo_layer(doc, name="photo", colour=(200, 60, 30), box=(0, 0, W, H)):
    """A layer with a filled rectangle (a pasted reference picture)."""
    node = doc.createNode(name, "paintlayer")
    x, y, w, h = box
    node.setPixelData(bgra(*colour) * (w * h), x, y, w, h)
    doc.rootNode().addChildNode(node, None)
    return node


def test_reference_settings_roundtrip_and_tolerate_junk():
    s = Settings(references=[ReferenceSettings("abc", 0.6, "style", 0.2, 0.9)])
    assert Settings.from_json(s.to_json()) == s
    odd = Settings.from_json('{"references": [{"layer_id": 5}, {"weight": 7, "mode": "warp", '
                             '"start": 0.9, "end": 0.1}, 3]}')
    assert odd.references == [ReferenceSettings()]  # bad values fall back, junk rows go
    assert Settings.from_json('{"references": 5}').references == []


def test_the_plan_sends_each_reference_layer_whole_in_its_own_slot(krita_app):
    doc, lines = line_art_doc()
    photo = photo_layer(doc, box=(4, 4, 20, 10))
    settings = Settings(references=[ReferenceSettings(uid(photo), 0.7, "composition", 0.1, 0.8),
                                    ReferenceSettings(uid(lines), 0.0)])  # weight 0: left out
    settings = plan.apply_preset(settings, "colourise", uid(lines), ["none"])
    job = plan.build(settings, cc_canvas.KritaCanvas(doc), seed=3)
    (ref,) = job.request.references
    assert (ref.weight, ref.mode, ref.start, ref.end) == (0.7, "composition", 0.1, 0.8)
    assert ref.image not in [u.image for u in job.request.controls]
    image = job.images[ref.image]
    assert image.size == (W, H) and image.pixel(5, 5) == (200, 60, 30, 255)
    assert image.pixel(30, 20)[3] == 0  # the rest of the layer: transparent, as it is


def test_a_big_reference_layer_is_sent_at_most_512_px_and_inpaint_does_not_crop_it(krita_app):
    doc = mock_krita.Document(1200, 600)
    photo = photo_layer(doc, colour=(10, 200, 10), box=(0, 0, 1200, 600))
    sel = mock_krita.Selection(doc)
    sel.select(100, 90, 20, 10, 255)
    doc.setSelection(sel)
    settings = Settings(mode="inpaint", references=[ReferenceSettings(uid(photo))])
    job = plan.build(settings, cc_canvas.KritaCanvas(doc), seed=1)
    (ref,) = job.request.references
    assert job.images[ref.image].size == (512, 256)
    assert job.request.width < 1200  # the generated region is cropped, the reference is not


def test_a_reference_on_an_empty_or_missing_layer_is_a_sentence(krita_app):
    doc, lines = line_art_doc()
    empty = doc.createNode("empty", "paintlayer")
    doc.rootNode().addChildNode(empty, None)
    canvas = cc_canvas.KritaCanvas(doc)
    with pytest.raises(plan.PlanError, match="Reference 1: the layer 'empty' is empty"):
        plan.build(Settings(references=[ReferenceSettings(uid(empty))]), canvas)
    with pytest.raises(plan.PlanError, match="Reference 2: pick the layer"):
        plan.build(Settings(references=[ReferenceSettings(uid(lines)),
                                        ReferenceSettings("gone")]), canvas)


def test_docker_reference_rows_are_sent_and_saved(docker_on, qapp, krita_app, tmp_path):
    engine = RecordingEngine()
    doc, docker, panel = open_docked(docker_on, qapp, engine)
    photo = photo_layer(doc)
    doc.setActiveNode(photo)
    panel.refresh_layers()
    assert set(panel.sections) >= {"LoRA", "Reference"}
    refs = panel.reference_panel
    assert refs.note.isVisibleTo(panel) and "+ Reference" in refs.note.text()
    refs.add_button.click()
    row = refs.rows[0]
    assert row.layer.currentData() == uid(photo), "a new row takes the active layer"
    assert [row.mode.itemData(i) for i in range(row.mode.count())] == [
        "reference", "style", "composition", "face"]
    row.mode.setCurrentIndex(row.mode.findData("style"))
    row.slider.setValue(12)  # 0.6
    assert row.weight_label.text() == "0.60"
    row.end.setValue(0.75)
    docker.resize(*KRITA_DOCKED)
    pump(qapp, lambda: False, 0.2)
    assert not panel.scroll.horizontalScrollBar().isVisible(), "no sideways scrolling"
    use_palette(docker, krita_dark_palette())
    docker.resize(KRITA_DOCKED[0], 900)
    panel.scroll.ensureWidgetVisible(row)
    pump(qapp, lambda: False, 0.2)
    out = tmp_path / "krita-docker-reference.png"
    assert docker.grab().save(str(out))
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):  # the docs' picture
        shutil.copy(out, ROOT / "docs" / "img" / "krita-docker-reference.png")
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    request, images, _ = engine.calls[-1]
    (ref,) = request.references
    assert (ref.mode, ref.weight, ref.start, ref.end) == ("style", 0.6, 0.0, 0.75)
    assert images[ref.image].pixel(0, 0) == (200, 60, 30, 255)
    saved = Settings.from_json(krita_app.readSetting(cc_canvas.SETTINGS_GROUP, "settings", ""))
    assert saved.references == [ReferenceSettings(uid(photo), 0.6, "style", 0.0, 0.75)]
    refs.remove(row)
    assert refs.rows == [] and panel.collect().references == []


def test_a_reference_layer_with_the_tiny_engine(make_server, tiny_root, controller_for,
                                                krita_app):
    """A real server (the tiny diffusers engine and its tiny IP-Adapter): a reference layer
    changes the picture, weight 0 gives the picture without it."""
    from backend.engines.catalogue import Catalogue, ModelConfig
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"))), device="cpu")
    try:
        srv = make_server(engine)
        doc, lines = line_art_doc()
        photo = photo_layer(doc, box=(0, 0, 24, 32))
        c = colourise(controller_for(doc, srv), doc, lines, base_model="tiny-sd15", steps=3,
                      seed=3, seed_locked=True)

        def picture(*refs):
            c.settings.references = list(refs)
            assert c.generate() is not None, c.message
            assert c.run_until_idle(120), c.message
            assert c.level == "info", c.message
            return c.history[0].images[0][0]

        plain = picture()
        ref = picture(ReferenceSettings(uid(photo), 1.0))
        zero = picture(ReferenceSettings(uid(photo), 0.0))
        assert ref != plain and zero == plain
        face = picture(ReferenceSettings(uid(photo), 1.0, "face"))  # the tiny face adapter
        assert face not in (plain, ref)
        c.settings.base_model = "tiny-flux"  # Flux.1 references run in mode reference only
        c.settings.references = [ReferenceSettings(uid(photo), 1.0, "face")]
        assert c.generate() is not None
        assert c.run_until_idle(60)
        assert c.level == "error" and "run in mode 'reference' only" in c.message, c.message
    finally:
        engine.close()
