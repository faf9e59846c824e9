"""The Krita plug-in's logic against a mock ``krita`` module and a real server.

The server is the real websocket server with the fake engine on 127.0.0.1; the
docker is the real PyQt6 widget under the offscreen platform.  What is asserted is
what an artist would see: layers, their pixels and order, undo steps, messages.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin_krita"))

from tests.krita_support import mock_krita  # noqa: E402

sys.modules["krita"] = mock_krita  # before the plug-in is imported: canvas.py uses it
_loaded = sys.modules.get("controlcanvas")
if _loaded is not None and "plugin_krita" not in str(getattr(_loaded, "__file__", "")):
    del sys.modules["controlcanvas"]  # plugin_gimp/controlcanvas.py has the same name

import controlcanvas  # noqa: E402
from controlcanvas import canvas as cc_canvas  # noqa: E402
from controlcanvas import pixels, plan, pose  # noqa: E402
from controlcanvas.controller import Controller  # noqa: E402
from controlcanvas.proto import Image, doc_history, geometry, naming, pose as openpose  # noqa: E402
from controlcanvas.settings import Settings, UnitSettings  # noqa: E402

from tests.krita_support.engines import RecordingEngine  # noqa: E402
from tests.krita_support.proxy import CuttableProxy  # noqa: E402
from tiny_fixtures import lora_engine, tiny_lora_dir, tiny_root, torch_threads  # noqa: E402,F401

W, H = 48, 32


# -- helpers -------------------------------------------------------------------------------

def bgra(r, g, b, a=255):
    return bytes((b, g, r, a))


def line_art_doc(with_background=True, resolution=72.0):
    """A document like the artist's: white Background (optional) + a line-art layer
    (dark lines on transparency) on top, the line art active."""
    doc = mock_krita.Document(W, H, "lines", resolution=resolution)
    root = doc.rootNode()
    if with_background:
        bg = doc.createNode("Background", "paintlayer")
        bg.setPixelData(bgra(255, 255, 255) * (W * H), 0, 0, W, H)
        root.addChildNode(bg, None)
    lines = doc.createNode("lineart", "paintlayer")
    for y in range(4, H - 4):
        lines.setPixelData(bgra(20, 20, 20), 10, y, 1, 1)  # a vertical stroke
        lines.setPixelData(bgra(20, 20, 20), 30, y, 1, 1)
    lines.setPixelData(bgra(20, 20, 20) * 30, 5, 16, 30, 1)  # a horizontal stroke
    root.addChildNode(lines, None)
    doc.setActiveNode(lines)
    doc._undo.clear()
    doc.unundoable_writes = 0
    return doc, lines


def uid(node):
    return node.uniqueId().toString()


def node_image(node, doc):
    return Image.from_bgra(doc.width(), doc.height(), node.pixelData(0, 0, doc.width(),
                                                                      doc.height()))


def new_layers(doc, before):
    return [n for n in doc.rootNode().childNodes() if n not in before]


@pytest.fixture
def krita_app():
    app = mock_krita.Krita.instance()
    app.reset()
    yield app
    app.reset()


@pytest.fixture
def server(make_server):
    engine = RecordingEngine(step_seconds=0.002)
    srv = make_server(engine)
    srv.recorder = engine
    return srv


@pytest.fixture
def controller_for():
    made = []

    def make(doc, server, **settings):
        c = Controller(lambda: cc_canvas.KritaCanvas(doc) if doc is not None else None,
                       settings=Settings(url=server.url, token=server.token, **settings))
        made.append(c)
        c.connect()
        assert c.wait_online(20), c.status
        return c

    yield make
    for c in made:
        c.shutdown()


def colourise(c, doc, lines, prompt="flat colours, red coat", **extra):
    c.settings = plan.apply_preset(c.settings, "colourise", uid(lines), c.annotators("lineart"))
    c.settings.prompt = prompt
    for key, value in extra.items():
        setattr(c.settings, key, value)
    return c


# -- pixels ------------------------------------------------------------------------------------

def test_bgra_to_rgba_swaps_red_and_blue_once():
    data = bgra(1, 2, 3, 4) + bgra(250, 128, 0, 255)
    image = pixels.image_from_bgra(2, 1, data)  # the swap is shared.images' one
    assert image.data == bytes((1, 2, 3, 4, 250, 128, 0, 255))
    assert image.pixel(1, 0) == (250, 128, 0, 255)
    assert image.to_bgra() == data


def test_short_buffer_is_a_clear_error():
    with pytest.raises(pixels.PixelError, match="8-bit RGBA needs 8"):
        pixels.image_from_bgra(2, 1, b"\x00" * 7)


def test_colour_depths_converted_with_a_note_or_refused():
    assert pixels.depth_note("RGBA", "U8") is None
    assert "16-bit" in pixels.depth_note("RGBA", "U16")
    with pytest.raises(pixels.PixelError, match="Convert Image Color Space"):
        pixels.depth_note("RGBA", "F32")
    with pytest.raises(pixels.PixelError, match="CMYKA"):
        pixels.depth_note("CMYKA", "U8")
    u8 = bytes((0, 1, 128, 255))
    u16 = pixels.from_u8(u8, "U16")
    assert u16 == bytes((0, 0, 1, 1, 128, 128, 255, 255))  # v * 257, little-endian
    assert pixels.to_u8(u16, "U16") == u8


def test_selection_mask_bbox_and_alpha():
    sel = bytearray(6 * 4)
    sel[1 * 6 + 2] = 255
    sel[2 * 6 + 3] = 128
    assert pixels.selection_bbox(6, 4, bytes(sel)) == (2, 1, 2, 2)
    assert pixels.selection_bbox(6, 4, bytes(24)) is None
    mask = pixels.mask_image(6, 4, bytes(sel))
    assert mask.pixel(2, 1) == (255, 255, 255, 255) and mask.pixel(0, 0) == (0, 0, 0, 255)
    assert geometry.context_box((2, 1, 2, 2), 6, 4, margin=3) == (0, 0, 6, 4)
    solid = Image.filled(2, 1, (10, 20, 30, 255))
    assert pixels.apply_mask_alpha(solid, bytes((0, 200))).data == \
        bytes((10, 20, 30, 0, 10, 20, 30, 200))


# -- pose ----------------------------------------------------------------------------------------

def test_pose_svg_roundtrip_through_krita_shapes(krita_app):
    doc = mock_krita.Document(300, 200, resolution=144.0)  # points != pixels
    krita_app.open_with_view(doc)
    skeleton = pose.default_pose(300, 200)
    layer = doc.createVectorLayer(pose.LAYER_NAME)
    doc.rootNode().addChildNode(layer, None)
    layer.addShapesFromSvg(pose.to_svg(skeleton, 300, 200, 144.0))
    names = [s.name() for s in layer.shapes()]
    assert "cc-p0-j03-right_elbow" in names and "cc-p0-l01-02" in names
    back = cc_canvas.KritaCanvas(doc).read_pose(uid(layer))
    for p, q in zip(skeleton[0], back[0]):
        assert abs(p[0] - q[0]) < 0.01 and abs(p[1] - q[1]) < 0.01
    # the artist drags the right wrist 10 px right (5 pt at 144 dpi)
    wrist = next(s for s in layer.shapes() if s.name().startswith("cc-p0-j04"))
    wrist.move_by(5.0, 0.0)
    moved = cc_canvas.KritaCanvas(doc).read_pose(uid(layer))
    assert moved[0][4][0] == pytest.approx(skeleton[0][4][0] + 10.0)
    assert moved[0][3] == pytest.approx(skeleton[0][3])


def test_pose_from_krita_svg_with_transforms():
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="50pt" height="40pt" '
           'viewBox="0 0 50 40"><defs/>'
           '<circle id="cc-p0-j00-nose" transform="translate(10, 4)" cx="2" cy="2" r="2"/>'
           '<g transform="matrix(1 0 0 1 5 5)">'
           '<ellipse id="cc-p0-j01-neck" cx="10" cy="10" rx="2" ry="2"/></g>'
           '<path id="cc-p0-j02-right_shoulder" transform="translate(20, 20)" '
           'd="M0 2C0 0.9 0.9 0 2 0C3.1 0 4 0.9 4 2C4 3.1 3.1 4 2 4C0.9 4 0 3.1 0 2Z"/>'
           '<path id="cc-p0-l01-02" d="M0 0L5 5"/></svg>')
    skeleton = pose.keypoints_from_svg(svg, resolution=144.0)  # 1 pt = 2 px
    person = skeleton[0]
    # (Krita puts a pixel's centre at +0.5; keypoints have it at 0.0)
    assert person[0] == pytest.approx((23.5, 11.5))
    assert person[1] == pytest.approx((29.5, 29.5))
    assert person[2] == pytest.approx((43.5, 43.5))
    assert person[3] is None
    with pytest.raises(pose.PoseError, match="insert a pose skeleton"):
        pose.keypoints_from_svg('<svg xmlns="http://www.w3.org/2000/svg"/>')


# -- settings --------------------------------------------------------------------------------

def test_token_found_where_the_backend_writes_it(tmp_path, monkeypatch):
    from backend.server.config import default_token_file, load_or_create_token
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path / "cfg"))
    c = Controller(lambda: None)
    assert c.resolve_token("ws://127.0.0.1:7351", "").token == ""
    token, created = load_or_create_token(default_token_file())
    assert created
    choice = c.resolve_token("ws://127.0.0.1:7351", "")
    assert choice.token == token
    assert c.token_note == f"Token read from {default_token_file()}."


def test_a_symlinked_token_file_is_not_followed(tmp_path, monkeypatch):
    """Issue 18: shared.paths' rule, so a link's target never becomes the token."""
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "elsewhere").write_text("Zq3-x7Kp9_mW2vR8tY4nx7Kp9_mW2vR8tY4n")
    (tmp_path / "token").symlink_to(tmp_path / "elsewhere")
    c = Controller(lambda: None)
    assert c.resolve_token("ws://127.0.0.1:7351", "").token == ""
    assert "symbolic link" in c.token_note


def test_settings_roundtrip_and_tolerate_junk():
    s = Settings(prompt="knight", seed=7, units=[UnitSettings(layer_id="x", weight=1.5)])
    assert Settings.from_json(s.to_json()) == s
    odd = Settings.from_json('{"prompt": 3, "steps": "many", "mode": "warp", "units": [1, {}]}')
    assert odd.prompt == "" and odd.steps == 20 and odd.mode == "txt2img"
    assert odd.units == [UnitSettings()]
    assert Settings.from_json("not json") == Settings()


# -- planning ------------------------------------------------------------------------------

def test_colourise_plan_reads_line_art_and_places_results_below(krita_app):
    doc, lines = line_art_doc()
    canvas = cc_canvas.KritaCanvas(doc)
    settings = plan.apply_preset(Settings(prompt="red coat"), "colourise", uid(lines),
                                 ["none", "invert"])
    job = plan.build(settings, canvas, seed=42)
    req = job.request
    assert (req.width, req.height, req.seed, req.mode) == (W, H, 42, "txt2img")
    assert [(u.condition, u.preprocessor) for u in req.controls] == [("lineart", "invert")]
    assert job.images[0] == node_image(lines, doc)
    assert job.placement.where == "below" and job.placement.anchor_id == uid(lines)
    assert naming.layer_name("red coat", 42) == "red coat · seed 42"  # the shared format


def test_inpaint_plan_crops_to_selection_with_context(krita_app):
    doc = mock_krita.Document(200, 160)
    sel = mock_krita.Selection(doc)
    sel.select(100, 90, 20, 10, 255)
    doc.setSelection(sel)
    job = plan.build(Settings(mode="inpaint"), cc_canvas.KritaCanvas(doc), seed=1)
    assert job.placement.box == (36, 26, 148, 134)
    assert (job.request.width, job.request.height) == (148, 134)
    mask = job.images[job.request.mask_image]
    assert mask.pixel(100 - 36, 90 - 26) == (255, 255, 255, 255)
    assert mask.pixel(0, 0) == (0, 0, 0, 255)
    doc.setSelection(None)
    with pytest.raises(plan.PlanError, match="select the area"):
        plan.build(Settings(mode="inpaint"), cc_canvas.KritaCanvas(doc))


def test_openpose_unit_on_a_vector_layer_without_a_skeleton_sends_its_pixels(krita_app):
    doc = mock_krita.Document(W, H)
    krita_app.open_with_view(doc)
    vector = doc.createVectorLayer("shapes")
    doc.rootNode().addChildNode(vector, None)
    vector.addShapesFromSvg('<svg xmlns="http://www.w3.org/2000/svg" width="48pt" '
                            'height="32pt" viewBox="0 0 48 32"><rect id="box" x="4" y="4" '
                            'width="10" height="8" fill="#ff0000"/></svg>')
    assert cc_canvas.KritaCanvas(doc).read_pose(uid(vector)) is None
    settings = Settings(units=[UnitSettings(layer_id=uid(vector), condition="openpose")])
    job = plan.build(settings, cc_canvas.KritaCanvas(doc), seed=1)
    (unit,) = job.request.controls
    assert unit.pose is None and unit.image in job.images


def test_plan_sends_resize_mode_annotator_params_hires_and_base_model(krita_app):
    doc, lines = line_art_doc()
    unit = UnitSettings(layer_id=uid(lines), condition="lineart",
                        annotator="lineart_from_drawing", resize_mode="just_resize",
                        params={"threshold": 150, "invert": False, "stale": 1})
    settings = Settings(units=[unit, UnitSettings(layer_id=uid(lines), annotator="none",
                                                  params={"threshold": 9})],
                        hires=True, base_model=" anime-v3 ")
    declared = {"lineart_from_drawing": ("mode", "threshold", "invert")}
    req = plan.build(settings, cc_canvas.KritaCanvas(doc), seed=1, declared=declared).request
    first, second = req.controls
    assert (first.resize_mode, first.params) == ("just_resize",
                                                 {"threshold": 150, "invert": False}), \
        "parameters the annotator does not take are dropped"
    assert second.params == {} and second.resize_mode == "crop_and_resize"
    assert req.hires is True and req.base_model == "anime-v3"
    back = Settings.from_json(settings.to_json())
    assert back.units[0].params == unit.params and back.units[0].resize_mode == "just_resize"
    odd = Settings.from_json('{"units": [{"resize_mode": "zoom", "params": {"a": [1]}}]}')
    assert odd.units[0].resize_mode == "crop_and_resize" and odd.units[0].params == {}


def test_refuses_float_documents_clearly(krita_app):
    doc = mock_krita.Document(8, 8, depth="F32")
    with pytest.raises(pixels.PixelError, match="Convert Image Color Space"):
        plan.build(Settings(), cc_canvas.KritaCanvas(doc))


# -- against the real server -------------------------------------------------------------------

def test_plugin_registers_its_docker_with_krita():
    app = mock_krita.Krita.instance()
    assert controlcanvas.REGISTERED
    assert any(f.ident == cc_canvas.DOCKER_ID for f in app.docker_factories)
    assert any(isinstance(e, cc_canvas.ControlCanvasExtension) for e in app.extensions)


def test_colourise_line_art_adds_one_undoable_layer_below_the_lines(server, controller_for,
                                                                    krita_app):
    doc, lines = line_art_doc()
    before_lines = lines.pixelData(0, 0, W, H)
    c = colourise(controller_for(doc, server), doc, lines, seed=1234, seed_locked=True,
                  preview_every=2)
    seen = []
    c.listeners.append(seen.append)
    assert c.generate()
    assert c.run_until_idle(20), c.message
    assert "preview" in seen and c.preview is not None  # live previews arrived
    assert "progress" in seen and c.progress == (20, 20)
    names = doc.layer_names()
    assert names == ["Background", "flat colours, red coat · seed 1234", "lineart"], names
    result = doc.nodeByName("flat colours, red coat · seed 1234")
    request, images, outputs = server.recorder.calls[-1]
    assert node_image(result, doc) == outputs[0].image  # exactly the engine's pixels
    # the preset picked the server's own line-art annotator (the server runs it)
    assert c.settings.units[0].annotator == "lineart_from_drawing"
    assert request.controls[0].condition == "lineart"
    assert lines.pixelData(0, 0, W, H) == before_lines  # the source is untouched
    assert doc.unundoable_writes == 0 and doc.undo_steps == 1
    doc.undo()
    assert doc.layer_names() == ["Background", "lineart"]
    assert "seed 1234" in c.message and c.history[0].seeds == [1234]


def reopened(doc):
    """What opening the saved .kra gives: a new document carrying the old one's
    annotations (Krita 5.1+ and 6 save them under annotations/<type>)."""
    again, _ = line_art_doc()
    for kind in doc.annotationTypes():
        again.setAnnotation(kind, doc.annotationDescription(kind), doc.annotation(kind))
    return again


def test_history_is_kept_in_the_document_and_shown_when_it_is_reopened(server, controller_for,
                                                                       krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, seed=1234, seed_locked=True,
                  negative_prompt="blurry")
    assert c.generate() and c.run_until_idle(20), c.message
    entries, problem = doc_history.decode(doc.annotation(doc_history.NAME))
    name = "flat colours, red coat · seed 1234"
    assert not problem and len(entries) == 1, problem
    first = entries[0]
    assert (first.prompt, first.negative, first.seeds) == ("flat colours, red coat", "blurry",
                                                           (1234,))
    assert first.layers == ((uid(doc.nodeByName(name)), name),)
    assert first.settings["steps"] == 20 and first.settings["condition"] == "lineart"
    assert "token" not in doc.annotation(doc_history.NAME).decode()  # no secrets in files
    c.settings.seed_locked = False
    assert c.generate() and c.run_until_idle(20)
    assert len(doc_history.decode(doc.annotation(doc_history.NAME))[0]) == 2

    again = reopened(doc)
    fresh = controller_for(again, server)  # Krita restarted: nothing in memory
    assert fresh.bind_document()
    assert [h.seeds for h in fresh.history] == [c.history[0].seeds, [1234]]
    assert fresh.history[1].label() == "flat colours, red coat · seed 1234 (saved)"
    assert fresh.history[1].layer_ids == [first.layers[0][0]]
    assert fresh.reuse_seed(1) == 1234 and fresh.settings.seed_locked  # "same seed" works
    fresh.apply_history(1)  # no pixels are stored: a sentence, not a crash
    assert "Reuse seed" in fresh.message and again.layer_names() == ["Background", "lineart"]


def test_each_open_document_shows_its_own_history(server, controller_for, krita_app):
    doc_a, lines_a = line_art_doc()
    doc_b, _ = line_art_doc()
    doc_b.setAnnotation(doc_history.NAME, "", doc_history.encode(
        [doc_history.Entry(prompt="stored in b", seeds=(77,))]))
    shown = [doc_a]
    c = controller_for(None, server)
    c._canvas = lambda: cc_canvas.KritaCanvas(shown[0])
    colourise(c, doc_a, lines_a, seed=5, seed_locked=True)
    assert c.generate() and c.run_until_idle(20)
    assert [h.seeds for h in c.history] == [[5]] and c.history[0].images
    shown[0] = doc_b  # the artist switches documents
    assert c.bind_document() and [h.prompt for h in c.history] == ["stored in b"]
    shown[0] = doc_a
    assert c.bind_document() and c.history[0].images  # A's, pixels and all, still there
    assert not c.bind_document()  # same document: nothing reloaded


def test_damaged_or_foreign_history_in_a_document_is_ignored_with_a_message(server,
                                                                             controller_for,
                                                                             krita_app):
    doc, lines = line_art_doc()
    doc.setAnnotation(doc_history.NAME, "", b"\x89PNG not ours")
    c = colourise(controller_for(doc, server), doc, lines, seed=9, seed_locked=True)
    assert c.bind_document() and c.history == []
    assert c.level == "warning" and "ignored" in c.message
    assert c.generate() and c.run_until_idle(20), c.message  # still generates
    entries, problem = doc_history.decode(doc.annotation(doc_history.NAME))
    assert not problem and [e.seeds for e in entries] == [(9,)]  # replaced by a good one


def test_line_art_as_lowest_layer_gets_colours_in_multiply_with_a_note(server, controller_for,
                                                                       krita_app):
    doc, lines = line_art_doc(with_background=False)
    c = colourise(controller_for(doc, server), doc, lines)
    c.generate()
    assert c.run_until_idle(20)
    assert doc.layer_names()[0] == "lineart"
    result = doc.rootNode().childNodes()[1]
    assert result.blendingMode() == "multiply" and doc.undo_steps == 1
    assert "Multiply" in c.message and c.level == "warning"
    # dark lines stay dark in the composite
    assert max(doc.pixelData(10, 8, 1, 1)[:3]) <= 20


def test_batch_arrives_as_a_group_in_one_undo_step(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, prompt="girl")
    c.variants(4)
    assert c.run_until_idle(20), c.message
    group = doc.rootNode().childNodes()[1]
    assert group.type() == "grouplayer" and group.name().startswith("girl · seeds ")
    kids = group.childNodes()
    assert len(kids) == 4 and [k.visible() for k in kids] == [False, False, False, True]
    seeds = c.history[0].seeds
    assert kids[-1].name() == f"girl · seed {seeds[0]}"
    assert seeds == [seeds[0] + i for i in range(4)]
    assert doc.undo_steps == 1 and doc.unundoable_writes == 0
    doc.undo()
    assert doc.layer_names() == ["Background", "lineart"]
    c.apply_history(0)  # the history brings it back
    assert doc.layer_names()[1][0].startswith("girl · seeds ")


def test_inpaint_changes_only_the_selected_pixels(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    sel = mock_krita.Selection(doc)
    sel.select(12, 10, 6, 5, 255)
    doc.setSelection(sel)
    before = doc.pixelData(0, 0, W, H)
    c = controller_for(doc, server, mode="inpaint", prompt="sky", strength=1.0)
    c.generate()
    assert c.run_until_idle(20), c.message
    after = doc.pixelData(0, 0, W, H)
    changed = {(i // 4) % W for i in range(0, len(after), 4) if after[i:i + 4] != before[i:i + 4]}
    rows = {(i // 4) // W for i in range(0, len(after), 4) if after[i:i + 4] != before[i:i + 4]}
    assert changed and changed <= set(range(12, 18)) and rows <= set(range(10, 15))


def test_cancel_stops_the_job_and_adds_nothing(make_server, controller_for, krita_app):
    engine = RecordingEngine(step_seconds=0.2)
    srv = make_server(engine)
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, srv), doc, lines, steps=50)
    c.generate()
    assert engine.started.wait(10)
    t0 = time.monotonic()
    c.cancel()
    assert c.run_until_idle(10)
    assert time.monotonic() - t0 < 2.0
    assert c.message == "Cancelled." and not engine.calls
    assert doc.layer_names() == ["Background", "lineart"]


def test_dropped_connection_reconnects_and_the_result_still_arrives(make_server, controller_for,
                                                                    krita_app):
    engine = RecordingEngine(step_seconds=0.05)
    srv = make_server(engine)
    proxy = CuttableProxy(srv.server.port)
    try:
        doc, lines = line_art_doc()
        c = Controller(lambda: cc_canvas.KritaCanvas(doc),
                       settings=Settings(url=proxy.url, token=srv.token))
        c.connect()
        assert c.wait_online(20)
        colourise(c, doc, lines, steps=20, seed=77, seed_locked=True)
        c.generate()
        assert engine.started.wait(10)
        proxy.accepting = False
        assert proxy.cut() == 1
        deadline = time.monotonic() + 10
        while c.status.state == "online" and time.monotonic() < deadline:
            c.poll()
            time.sleep(0.01)
        assert c.status.state == "offline" and "will resume" in c.status.message
        time.sleep(1.2)  # the job finishes on the server meanwhile
        assert engine.calls
        proxy.accepting = True
        assert c.run_until_idle(20), c.status
        assert "resumed 1 job" in c.status.message
        result = doc.nodeByName("flat colours, red coat · seed 77")
        assert result is not None and node_image(result, doc) == engine.calls[-1][2][0].image
    finally:
        c.shutdown()
        proxy.close()


def test_token_comes_from_the_token_file_and_errors_are_sentences(make_server, tmp_path,
                                                                  monkeypatch, krita_app):
    srv = make_server(RecordingEngine())
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "token").write_text(srv.token + "\n")
    c = Controller(lambda: None, settings=Settings(url=srv.url, token=""))
    try:
        c.connect()
        assert c.wait_online(20), c.status
        assert "Token read from" in c.token_note
        c.connect(token="wrong")
        deadline = time.monotonic() + 10
        while c.status.state != "error" and time.monotonic() < deadline:
            c.poll()
            time.sleep(0.01)
        assert c.status.state == "error" and "token" in c.status.message.lower()
        assert "Traceback" not in c.status.message
        c.generate()
        assert c.message  # no document: says so
    finally:
        c.shutdown()
    down = Controller(lambda: None, settings=Settings(url="ws://127.0.0.1:9", token="x"))
    try:
        down.connect()
        deadline = time.monotonic() + 10
        while "controlcanvas serve" not in down.status.message and time.monotonic() < deadline:
            down.poll()
            time.sleep(0.01)
        assert down.status.state == "offline" and "Retrying" in down.status.message
    finally:
        down.shutdown()


class _TokenRecorder:
    """A worker factory that records the (address, token) each connection would use."""

    def __init__(self):
        self.sent = []

    def __call__(self, url, token):
        self.sent.append((url, token))
        return self

    def start(self):
        return self

    def reconnect(self, url, token):
        self.sent.append((url, token))

    def stop(self):
        pass


@pytest.mark.parametrize("url", ["ws://127.attacker.example:7351",
                                 "ws://127.0.0.1.evil.example:7351",
                                 "ws://127.0.0.1@evil.example:7351", "ws://gpu-box:7351"])
def test_a_server_elsewhere_never_gets_the_local_token(url, tmp_path, monkeypatch, krita_app):
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "token").write_text("LOCAL-SECRET\n")
    worker = _TokenRecorder()
    doc, _ = line_art_doc()
    c = Controller(lambda: cc_canvas.KritaCanvas(doc), settings=Settings(url=url, token=""),
                   worker_factory=worker)
    c.connect()
    assert worker.sent == [], "no connection at all: nothing to send but the local token"
    assert c.status.state == "error" and c.token_note == c.status.message
    assert f"The server at {url} is not on this computer" in c.status.message
    assert "Server ▸ Token field" in c.status.message
    assert c.generate() is None and "Server ▸ Token" in c.message  # says it again, sends none
    c.connect(token=" theirs ")  # typed in the docker
    assert worker.sent == [(url, "theirs")] and c.status.state == "connecting"
    c.connect(url="ws://localhost:7351", token="")  # back home: the token file again
    assert worker.sent[-1] == ("ws://localhost:7351", "LOCAL-SECRET")


def test_a_remote_looking_address_gets_only_the_typed_token(make_server, tmp_path,
                                                             monkeypatch, krita_app):
    # A real server reached at 127.1: the OS takes it for 127.0.0.1, the plug-in does not
    # (not a loopback address as written), so it is treated like a server elsewhere.
    srv = make_server(RecordingEngine(), allow_remote=True)
    remote = srv.url.replace("127.0.0.1", "127.1")
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "token").write_text(srv.token + "\n")  # the server would take the file's
    c = Controller(lambda: None, settings=Settings(url=remote, token=""))
    try:
        c.connect()
        assert c.worker is None and c.status.state == "error", "nothing was sent"
        (tmp_path / "token").write_text("LOCAL-SECRET\n")
        c.connect(token=srv.token)  # typed: that one is in the hello, and works
        assert c.wait_online(20), c.status
        assert c.token_note == "Using the token typed in the docker."
    finally:
        c.shutdown()


def test_preview_control_inserts_the_annotated_layer(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines)
    for unit in c.settings.units:
        unit.annotator = "invert"
    c.preview_control(0)
    assert c.run_until_idle(20), c.message
    name = "Control: invert of lineart"
    assert doc.layer_names() == ["Background", "lineart", name]
    message, sent, returned = server.recorder.preprocessed[-1]
    assert message.annotator == "invert" and sent == node_image(lines, doc)
    got = node_image(doc.nodeByName(name), doc)
    assert got == returned  # the server's control image, as a layer
    src = node_image(lines, doc)
    assert got.pixel(10, 8)[:3] == tuple(255 - v for v in src.pixel(10, 8)[:3])


def test_pose_iteration_same_seed_changes_only_the_control(server, controller_for, krita_app):
    doc = mock_krita.Document(64, 64, resolution=144.0)
    krita_app.open_with_view(doc)
    c = controller_for(doc, server, prompt="knight in armour")
    layer_id = c.insert_pose("")
    assert layer_id and doc.layer_names() == [pose.LAYER_NAME]
    c.settings = plan.apply_preset(c.settings, "pose", layer_id, c.annotators("openpose"))
    c.variants(2)
    assert c.run_until_idle(20), c.message
    first_request, first_images, first_out = server.recorder.calls[-1]
    unit = first_request.controls[0]
    skeleton = cc_canvas.KritaCanvas(doc).read_pose(layer_id)
    assert unit.image is None and first_images == {}, "no picture: the keypoints travel"
    assert unit.pose == openpose.to_message(skeleton, 64, 64)
    vector = doc.nodeByName(pose.LAYER_NAME)
    elbow = next(s for s in vector.shapes() if s.name().startswith("cc-p0-j06"))
    elbow.move_by(6.0, -3.0)  # points at 144 dpi: 12 px right, 6 px up
    c.regenerate_same_seed(0)
    assert c.run_until_idle(20), c.message
    request, images, out = server.recorder.calls[-1]
    assert request.seed == c.history[1].seeds[0] and request.batch == 1
    moved = openpose.from_message(request.controls[0].pose)[0]
    assert moved[6] == pytest.approx((skeleton[0][6][0] + 12, skeleton[0][6][1] - 6))
    assert moved[:6] == skeleton[0][:6]
    assert out[0].image != first_out[0].image, "the figure follows the moved elbow"
    newest = doc.nodeByName(f"knight in armour · seed {request.seed}")
    assert node_image(newest, doc) == out[0].image


def test_openpose_unit_on_a_paint_layer_sends_its_pixels(krita_app):
    """An OpenPose picture painted on an ordinary layer is sent as it is."""
    doc = mock_krita.Document(W, H)
    layer = doc.createNode("openpose picture", "paintlayer")
    picture = openpose.render_people((openpose.default_person(W, H),), W, H)
    layer.setPixelData(picture.to_bgra(), 0, 0, W, H)
    doc.rootNode().addChildNode(layer, None)
    settings = Settings(units=[UnitSettings(layer_id=uid(layer), condition="openpose")])
    job = plan.build(settings, cc_canvas.KritaCanvas(doc), seed=1)
    (unit,) = job.request.controls
    assert unit.pose is None and job.images[unit.image] == picture


class NoPoseEngine(RecordingEngine):
    def models(self):
        base = super().models()
        return type(base)(models=base.models, default_base=base.default_base,
                          annotators=tuple(a for a in base.annotators
                                           if a.condition != "openpose"))


def test_pose_detection_missing_on_server_says_so(make_server, controller_for, krita_app):
    doc, lines = line_art_doc()
    c = controller_for(doc, make_server(NoPoseEngine()))
    assert c.insert_pose(uid(lines)) is None
    assert "not available on this server" in c.message


def test_pose_detection_that_finds_nobody_is_a_sentence(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    krita_app.open_with_view(doc)
    c = controller_for(doc, server)
    if not c.pose_detector():
        pytest.skip("this server lists no pose detector")
    assert c.insert_pose(uid(lines))
    assert c.run_until_idle(60), c.message
    assert c.level in ("error", "warning") and c.message and "Traceback" not in c.message
    assert doc.nodeByName(pose.LAYER_NAME) is None


def test_vector_shapes_need_a_view_and_the_message_says_so(server, controller_for, krita_app):
    doc, lines = line_art_doc()  # no view: Krita 5 would crash in addShapesFromSvg
    c = controller_for(doc, server)
    assert c.insert_pose("") is None
    assert "open in a window" in c.message and c.level == "error"


# -- the docker ---------------------------------------------------------------------------------

@pytest.fixture
def qapp():
    from PyQt6 import QtWidgets
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["test"])
    yield app


def pump(qapp, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        qapp.processEvents()
        if until():
            return True
        time.sleep(0.01)
    return until()


def krita_dark_palette():
    """Roughly Krita's default "Krita dark" theme, for a screenshot that looks at home."""
    from PyQt6 import QtGui
    pal = QtGui.QPalette()
    R = QtGui.QPalette.ColorRole
    for role, rgb in ((R.Window, (49, 49, 49)), (R.WindowText, (210, 210, 210)),
                      (R.Base, (35, 35, 35)), (R.AlternateBase, (42, 42, 42)),
                      (R.Text, (210, 210, 210)), (R.Button, (60, 60, 60)),
                      (R.ButtonText, (220, 220, 220)), (R.Highlight, (64, 108, 150)),
                      (R.HighlightedText, (255, 255, 255)), (R.Mid, (120, 120, 120)),
                      (R.PlaceholderText, (120, 120, 120)), (R.ToolTipBase, (60, 60, 60)),
                      (R.ToolTipText, (220, 220, 220))):
        pal.setColor(role, QtGui.QColor(*rgb))
    return pal


@pytest.fixture
def docker_on(make_server, qapp, krita_app, tmp_path, monkeypatch):
    """open(engine, steps): the line-art document in a window and the docker Krita's
    factory builds, its settings pointing at a server with ``engine`` (token file)."""
    made = []

    def open_docker(engine, steps):
        srv = make_server(engine)
        monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
        (tmp_path / "token").write_text(srv.token)
        doc, lines = line_art_doc()
        krita_app.open_with_view(doc)
        krita_app.writeSetting(cc_canvas.SETTINGS_GROUP, "settings",
                               Settings(url=srv.url, steps=steps).to_json())
        docker = cc_canvas.ControlCanvasDocker()
        made.append(docker)
        return doc, docker, docker.panel

    yield open_docker
    for docker in made:
        docker.panel.timer.stop()
        docker.panel.controller.shutdown()
        docker.deleteLater()
    qapp.processEvents()


def test_docker_generates_cancels_and_looks_tidy(docker_on, qapp, tmp_path):
    from PyQt6 import QtWidgets
    engine = RecordingEngine(step_seconds=0.01)
    doc, docker, panel = docker_on(engine, 12)
    docker.resize(300, 900)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    assert "Connected" in panel.state_text.text()
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    assert len(panel.units) == 1 and panel.units[0].layer.currentText() == "lineart"
    assert panel.units[0].annotator.currentText() == "lineart_from_drawing"
    panel.prompt.setPlainText("flat colours, girl in a red coat")
    panel.generate_button.click()
    assert pump(qapp, lambda: len(doc.rootNode().childNodes()) == 3)
    result = doc.rootNode().childNodes()[1]
    assert result.name().startswith("flat colours, girl in a red coat · seed ")
    assert node_image(result, doc) == engine.calls[-1][2][0].image
    assert panel.history.count() == 1 and panel.progress.value() == panel.progress.maximum()
    assert result.name().endswith(f" · seed {int(panel.seed.value())}")
    # a long job, cancelled from the button
    panel.steps.setValue(150)
    engine.step_seconds = 0.05
    engine.started.clear()
    panel.generate_button.click()
    assert pump(qapp, lambda: engine.started.is_set() and panel.cancel_button.isEnabled())
    pump(qapp, lambda: panel.progress.value() > 2, 5)
    panel.cancel_button.click()
    assert pump(qapp, lambda: panel.message.text() == "Cancelled.", 10)
    assert len(doc.rootNode().childNodes()) == 3 and not panel.cancel_button.isEnabled()
    # screenshot for the docs, in a state worth showing
    engine.step_seconds = 0.0
    panel.steps.setValue(20)
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 2)
    panel.controller.say("Added 1 layer(s), seed "
                          f"{panel.controller.history[0].seeds[0]}.")
    panel.units[0].options.setChecked(True)  # the line-art annotator's settings, open
    docker.setStyle(QtWidgets.QStyleFactory.create("Fusion"))
    docker.setPalette(krita_dark_palette())
    for child in docker.findChildren(QtWidgets.QWidget):
        child.setPalette(krita_dark_palette())
    docker.resize(270, 1000)
    qapp.processEvents()
    body = panel.findChild(QtWidgets.QScrollArea).widget()
    scrollbar = docker.style().pixelMetric(QtWidgets.QStyle.PixelMetric.PM_ScrollBarExtent)
    assert body.minimumSizeHint().width() <= 262 and \
        body.minimumSizeHint().width() + scrollbar <= 276, \
        "the docker stays narrow: no horizontal scrolling at 270 px (276 px scrolling down)"
    # all of it, no vertical scrolling (the top part stays outside the scroll area)
    bar = panel.scroll.verticalScrollBar()
    for _ in range(20):
        qapp.processEvents()
        if bar.maximum() == 0:
            break
        docker.resize(270, docker.height() + bar.maximum() + 2)
    assert bar.maximum() == 0
    out = tmp_path / "krita-docker.png"
    assert docker.grab().save(str(out))
    assert out.stat().st_size > 5000
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):  # refresh the docs' picture
        shutil.copy(out, ROOT / "docs" / "img" / "krita-docker.png")


def test_docker_lists_the_history_stored_in_each_document_it_binds_to(docker_on, qapp,
                                                                     krita_app):
    doc, docker, panel = docker_on(RecordingEngine(), 4)
    assert panel.history.count() == 0
    stored, _ = line_art_doc()  # a .kra with two results, opened in another window
    stored.setAnnotation(doc_history.NAME, doc_history.DESCRIPTION, doc_history.encode(
        [doc_history.Entry(prompt="knight in armour", seeds=(8,)),
         doc_history.Entry(prompt="knight in armour", seeds=(7,))]))
    krita_app.open_with_view(stored)
    docker.canvasChanged(None)  # Krita tells the docker the document changed
    assert [panel.history.item(i).text() for i in range(panel.history.count())] == [
        "knight in armour · seed 8 (saved)", "knight in armour · seed 7 (saved)"]
    krita_app.open_with_view(doc)
    docker.canvasChanged(None)
    assert panel.history.count() == 0


def test_docker_shows_what_the_protocol_offers(docker_on, qapp, krita_app):
    """Base model (free text, the server's list as suggestions), hi-res pass, each unit's
    fit (resize mode) and its annotator's settings, built from the server's description."""
    from PyQt6 import QtWidgets
    engine = RecordingEngine()
    doc, docker, panel = docker_on(engine, 4)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    assert [panel.base_model.itemText(i) for i in range(panel.base_model.count())] == \
        ["", "fake"]
    assert panel.base_model.lineEdit().placeholderText() == "server default (fake)"
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    unit = panel.units[0]
    assert unit.options.isEnabled() and unit.form is not None
    form = unit.form.widgets
    assert set(form) == {"mode", "threshold", "block", "offset", "thickness", "invert"}
    assert isinstance(form["mode"], QtWidgets.QComboBox) and \
        isinstance(form["invert"], QtWidgets.QCheckBox)
    assert (form["threshold"].minimum(), form["threshold"].maximum(),
            form["threshold"].value()) == (1, 255, 192)
    unit.options.setChecked(True)
    form["threshold"].setValue(150)
    form["invert"].setChecked(False)
    unit.resize.setCurrentIndex(unit.resize.findData("resize_and_fill"))
    panel.hires.setChecked(True)
    panel.base_model.setEditText("fake")
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    request = engine.calls[-1][0]
    (sent,) = request.controls
    assert sent.params == {"threshold": 150, "invert": False}
    assert sent.resize_mode == "resize_and_fill"
    assert request.hires and request.base_model == "fake"
    # another annotator starts from its own defaults; coming back keeps what was set
    unit.annotator.setCurrentText("invert")
    assert unit.form is None and not unit.options.isEnabled()
    assert panel.collect().units[0].params == {}
    unit.annotator.setCurrentText("lineart_from_drawing")
    assert unit.form.widgets["threshold"].value() == 150
    saved = Settings.from_json(krita_app.readSetting(cc_canvas.SETTINGS_GROUP,
                                                     "settings", ""))
    assert saved.hires and saved.units[0].params == {"threshold": 150, "invert": False}


def test_module_boundaries():
    """Only qt.py imports PyQt, only canvas.py imports krita."""
    pkg = ROOT / "plugin_krita" / "controlcanvas"
    for path in pkg.glob("*.py"):
        text = path.read_text()
        if path.name != "qt.py":
            assert "PyQt5" not in text.replace("PyQt5/", "") or path.name == "qt.py", path
            assert "import PyQt" not in text and "from PyQt" not in text, path
        if path.name != "canvas.py":
            assert "import krita" not in text and "from krita" not in text, path
    assert os.path.exists(pkg.parent / "controlcanvas.desktop")


def test_sixteen_bit_document_is_converted_both_ways(server, controller_for, krita_app):
    doc = mock_krita.Document(W, H, depth="U16")
    lines = doc.createNode("lineart", "paintlayer")
    lines.setPixelData(bytes((20, 20, 20, 20, 20, 20, 255, 255)) * W, 0, 16, W, 1)  # a line
    doc.rootNode().addChildNode(lines, None)
    doc.setActiveNode(lines)
    c = colourise(controller_for(doc, server), doc, lines, seed=5, seed_locked=True)
    c.generate()
    assert "16-bit" in c.message and c.level == "warning"  # said before the result lands
    assert c.run_until_idle(20), c.message
    request, images, outputs = server.recorder.calls[-1]
    sent = plan.build(c.settings, cc_canvas.KritaCanvas(doc), seed=5).images[0]
    assert sent.pixel(0, 16) == (20, 20, 20, 255)  # the high bytes of each channel
    assert sent.pixel(0, 0) == (0, 0, 0, 0)
    result = doc.nodeByName("flat colours, red coat · seed 5")
    assert bytes(result.pixelData(0, 0, W, H)) == pixels.from_u8(outputs[0].image.to_bgra(),
                                                                 "U16")


class PoseDetectingEngine(RecordingEngine):
    """A server that detects a pose: it answers with a rendered skeleton and, like
    backend.annotators.builtin's pose_from_photo, the keypoints as OpenPose JSON in the result's
    info (or, ``with_keypoints=False``, an older server: the picture only)."""

    def __init__(self, people, with_keypoints=True):
        super().__init__()
        self.people = people
        self.with_keypoints = with_keypoints

    def models(self):
        from shared.messages import AnnotatorInfo
        base = super().models()
        return type(base)(models=base.models, default_base=base.default_base,
                          annotators=base.annotators + (AnnotatorInfo(
                              name="pose_from_photo", condition="openpose"),))

    def preprocess(self, message, image, ctx):
        from shared import pose as backend_pose
        from backend.annotators.registry import Annotated
        if message.annotator != "pose_from_photo":
            return super().preprocess(message, image, ctx)
        size = (message.width, message.height)
        scaled = [openpose.resized(p, image.size, size) for p in self.people]
        info = {}
        if self.with_keypoints:
            found = backend_pose.Pose(*size, tuple(backend_pose.Person(tuple(
                backend_pose.MISSING if p is None else (p[0], p[1], 0.9) for p in person))
                for person in scaled))
            info = {"keypoints": found.to_json()}
        return Annotated(openpose.render_people(scaled, *size), info)


@pytest.mark.parametrize("with_keypoints,tolerance", [(True, 0.01), (False, 3.0)],
                         ids=["keypoints", "picture-only"])
def test_pose_from_a_photo_layer_becomes_an_editable_skeleton(make_server, controller_for,
                                                              krita_app, with_keypoints,
                                                              tolerance):
    doc = mock_krita.Document(800, 600, resolution=144.0)
    photo = doc.createNode("photo", "paintlayer")
    photo.setPixelData(bgra(120, 100, 90) * (800 * 600), 0, 0, 800, 600)
    doc.rootNode().addChildNode(photo, None)
    krita_app.open_with_view(doc)
    truth = (openpose.default_person(800, 600),
             openpose.transformed(openpose.default_person(800, 600), 0.5, dx=300))
    if not with_keypoints:  # a picture is read as one person
        truth = truth[:1]
    srv = make_server(PoseDetectingEngine(truth, with_keypoints))
    c = controller_for(doc, srv)
    assert c.pose_detector() == "pose_from_photo"
    c.insert_pose(uid(photo))
    assert c.run_until_idle(20), c.message
    layer = doc.nodeByName(pose.LAYER_NAME)
    assert layer is not None and layer.type() == "vectorlayer", doc.layer_names()
    found = cc_canvas.KritaCanvas(doc).read_pose(uid(layer))
    assert len(found) == len(truth)  # detected at 512 px, scaled back to 800
    for want, got in zip(truth, found):
        for p, q in zip(want, got):
            assert abs(p[0] - q[0]) <= tolerance and abs(p[1] - q[1]) <= tolerance


# -- the docker at Krita's default docked size (262 x 241 px) ----------------------------------

KRITA_DOCKED = (262, 241)
ALWAYS_THERE = ("state_dot", "state_text", "server_toggle", "preset", "prompt",
                "generate_button", "cancel_button", "progress")


def use_palette(docker, palette):
    from PyQt6 import QtWidgets
    docker.setStyle(QtWidgets.QStyleFactory.create("Fusion"))
    docker.setPalette(palette)
    for child in docker.findChildren(QtWidgets.QWidget):
        child.setPalette(palette)


def light_palette():
    from PyQt6 import QtWidgets
    return QtWidgets.QStyleFactory.create("Fusion").standardPalette()


def luminance(rgb):
    def channel(v):
        v /= 255.0
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b):
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def heading_contrast(image, rect):
    """WCAG contrast of a heading's ink against its background, from rendered pixels: the
    background is the commonest colour in the heading's box, the ink the pixel that stands
    out most from it."""
    from collections import Counter
    colours = Counter()
    for y in range(rect.top(), rect.bottom() + 1):
        for x in range(rect.left(), rect.right() + 1):
            c = image.pixelColor(x, y)
            colours[(c.red(), c.green(), c.blue())] += 1
    background = colours.most_common(1)[0][0]
    return max(contrast(background, c) for c in colours), background


def open_docked(docker_on, qapp, engine=None):
    doc, docker, panel = docker_on(engine or RecordingEngine(), 4)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    docker.resize(*KRITA_DOCKED)
    docker.show()
    pump(qapp, lambda: False, 0.2)
    return doc, docker, panel


def test_docker_says_a_server_elsewhere_needs_its_own_token(docker_on, qapp, tmp_path):
    from PyQt6 import QtWidgets
    doc, docker, panel = docker_on(RecordingEngine(), 4)  # its token file is on this computer
    panel.server_toggle.setChecked(True)
    assert "token file" in panel.token.placeholderText()
    assert "never sent there" in panel.token.toolTip()
    panel.url.setText("ws://gpu-box:7351")
    panel.url.textEdited.emit(panel.url.text())  # as typed: the note answers before Connect
    assert "ws://gpu-box:7351 is not on this computer" in panel.token_note.text()
    panel.connect_button.click()
    assert panel.controller.worker is None, "no connection: the local token goes nowhere"
    assert "Server ▸ Token field" in panel.state_text.text()
    docker.setStyle(QtWidgets.QStyleFactory.create("Fusion"))
    docker.resize(270, 520)
    docker.show()
    pump(qapp, lambda: False, 0.2)
    assert panel.server_box.isVisible() and panel.token_note.isVisible()
    assert docker.grab().save(str(tmp_path / "krita-docker-remote-token.png"))
    panel.token.setText("theirs")
    panel.token.textEdited.emit("theirs")
    assert panel.token_note.text() == "Using the token typed in the docker."


def test_docker_at_krita_default_size_keeps_the_essentials_in_view(docker_on, qapp, tmp_path):
    from PyQt6 import QtCore
    doc, docker, panel = open_docked(docker_on, qapp)
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    panel.controller.say("No server at ws://127.0.0.1:7351 (waited 20 s): 1 job(s) dropped. "
                         "Run `controlcanvas serve` or fix the address, then Generate again.",
                         "error")
    pump(qapp, lambda: False, 0.2)
    assert docker.grab().save(str(tmp_path / "krita-docker-docked-error.png"))
    assert "Generate again" in panel.message.toolTip()
    message = panel.message
    assert message.height() >= min(message.maximumHeight(),
                                   message.heightForWidth(message.width())), \
        "the message shows all its lines (up to three)"
    assert (docker.width(), docker.height()) == KRITA_DOCKED
    shown = docker.rect()
    for name in ALWAYS_THERE + ("message",):
        widget = getattr(panel, name)
        assert widget.isVisible(), name
        box = QtCore.QRect(widget.mapTo(docker, QtCore.QPoint(0, 0)), widget.size())
        assert shown.contains(box), (name, box, shown)
        hint = widget.minimumSizeHint()  # unless a minimum is set on purpose (the prompt)
        least = (widget.minimumWidth() or hint.width(), widget.minimumHeight() or hint.height())
        assert widget.width() >= least[0] and widget.height() >= least[1], \
            (name, widget.size(), least)
    assert panel.prompt.height() >= 3 * panel.prompt.fontMetrics().lineSpacing() - 4
    # the rest scrolls below them, and can be reached
    bar = panel.scroll.verticalScrollBar()
    assert panel.scroll.isVisible() and panel.scroll.viewport().height() > 20
    assert bar.maximum() > 0
    assert not panel.scroll.horizontalScrollBar().isVisible(), "no sideways scrolling"
    panel.scroll.ensureWidgetVisible(panel.history)
    pump(qapp, lambda: False, 0.1)
    assert bar.value() > 0
    # sections fold away
    sampling = panel.sections["Sampling"]
    sampling.toggle.click()
    assert not panel.steps.isVisible() and sampling.toggle.isVisible()
    sampling.toggle.click()
    assert panel.steps.isVisibleTo(panel)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_docker_headings_read_on_dark_and_light_themes(docker_on, qapp, tmp_path, theme):
    from PyQt6 import QtCore, QtGui
    palette = krita_dark_palette() if theme == "dark" else light_palette()
    doc, docker, panel = open_docked(docker_on, qapp)
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    panel.prompt.setPlainText("flat colours, girl in a red coat")
    use_palette(docker, palette)
    pump(qapp, lambda: False, 0.2)
    out = tmp_path / f"krita-docker-{theme}.png"
    assert docker.grab().save(str(out))
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):
        shutil.copy(out, ROOT / "docs" / "img" / f"krita-docker-{theme}.png")
    shot = QtGui.QImage(str(out))
    assert (shot.width(), shot.height()) == KRITA_DOCKED
    body = panel.scroll.widget()
    whole = body.grab().toImage()  # every section, also those scrolled out of view
    assert set(panel.sections) == {"Prompt", "Control", "Sampling", "LoRA", "Reference", "Edit",
                                   "Live", "History"}
    for title, section in panel.sections.items():
        toggle = section.toggle
        box = QtCore.QRect(toggle.mapTo(body, QtCore.QPoint(0, 0)), toggle.size())
        ratio, background = heading_contrast(whole, box)
        assert ratio >= 4.5, (theme, title, round(ratio, 2), background)
        window = palette.color(QtGui.QPalette.ColorRole.Window)
        assert contrast(background, (window.red(), window.green(), window.blue())) < 1.2, \
            "the heading sits on the docker's own background"


# -- presets: which layer, and once the server's lists arrive ----------------------------------

def add_layer(doc, name, pixel, below=None):
    """A paint layer filled with ``pixel`` (BGRA bytes) over the whole document."""
    node = doc.createNode(name, "paintlayer")
    if pixel:
        node.setPixelData(pixel * (W * H), 0, 0, W, H)
    doc.rootNode().addChildNode(node, below)
    return node


def test_line_art_is_told_from_filled_empty_and_pale_layers(krita_app):
    doc, lines = line_art_doc()
    canvas = cc_canvas.KritaCanvas(doc)
    pale = doc.createNode("pale", "paintlayer")
    for y in range(4, H - 4):
        pale.setPixelData(bgra(240, 230, 90), 10, y, 1, 1)  # light strokes
    doc.rootNode().addChildNode(pale, None)
    empty = add_layer(doc, "empty", b"")
    verdict = {node.name(): plan.looks_like_line_art(canvas.sample_layer(uid(node)))
               for node in doc.rootNode().childNodes()}
    assert verdict == {"Background": False, "lineart": True, "pale": False, "empty": False}
    sample = canvas.sample_layer(uid(lines))
    assert 0 < len(sample) < W * H * 4, "a sample, not the whole layer"
    assert canvas.sample_layer("gone") == b""


def test_colourise_after_undo_binds_the_line_art_not_background(server, controller_for,
                                                               krita_app):
    doc, lines = line_art_doc()
    background = doc.nodeByName("Background")
    add_layer(doc, "colours", bgra(200, 40, 40))  # a filled layer on top: not line art
    c = controller_for(doc, server)
    c.apply_preset("colourise")
    assert c.settings.units[0].layer_id == uid(lines)
    assert "bound to layer 'lineart'" in c.message, c.message
    doc.setActiveNode(background)  # what Krita does after an Undo
    c.apply_preset("colourise")
    assert c.settings.units[0].layer_id == uid(lines), "the layer the unit used before"
    assert "bound to layer 'lineart'" in c.message
    # a fresh docker (no unit yet), Background selected: the topmost layer with line art
    fresh = controller_for(doc, server)
    fresh.apply_preset("colourise")
    assert fresh.settings.units[0].layer_id == uid(lines)
    assert fresh.message.startswith("Colourise line art: control bound to layer 'lineart'.")
    assert fresh.settings.units[0].annotator == "lineart_from_drawing"
    # the layer the unit used is gone: found again among what is left
    second = doc.createNode("inks", "paintlayer")
    second.setPixelData(bgra(10, 10, 10) * 20, 2, 20, 20, 1)
    doc.rootNode().addChildNode(second, None)
    lines.remove()
    c.apply_preset("colourise")
    assert c.settings.units[0].layer_id == uid(second) and "'inks'" in c.message


def test_docker_preset_says_which_layer_it_bound(docker_on, qapp):
    doc, docker, panel = docker_on(RecordingEngine(), 4)
    doc.setActiveNode(doc.nodeByName("Background"))
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    assert panel.units[0].layer.currentText() == "lineart"
    assert "bound to layer 'lineart'" in panel.message.text()


def test_preset_chosen_before_connecting_resolves_when_the_lists_arrive(server, krita_app):
    doc, lines = line_art_doc()
    c = Controller(lambda: cc_canvas.KritaCanvas(doc),
                   settings=Settings(url=server.url, token=server.token))
    try:
        c.apply_preset("colourise")  # nothing listed yet
        assert c.settings.units[0].annotator == "none"
        c.connect()
        assert c.wait_online(20), c.status
        assert c.settings.units[0].annotator == "lineart_from_drawing"
        c.settings.seed, c.settings.seed_locked = 3, True
        assert c.generate()
        assert c.run_until_idle(20), c.message
        request = server.recorder.calls[-1][0]
        assert request.controls[0].preprocessor == "lineart_from_drawing", \
            "the line art is read through the line-art annotator, not ignored"
    finally:
        c.shutdown()


def test_docker_preset_chosen_before_connecting_shows_the_resolved_annotator(docker_on, qapp):
    doc, docker, panel = docker_on(RecordingEngine(), 4)
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    assert panel.units[0].annotator.currentText() == "none"
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    assert pump(qapp, lambda: panel.units[0].annotator.currentText() ==
                "lineart_from_drawing", 5), panel.units[0].annotator.currentText()
    assert panel.collect().units[0].annotator == "lineart_from_drawing"


class NamedEngine(RecordingEngine):
    """A fake engine that calls itself what the server was started with."""

    def __init__(self, name):
        super().__init__()
        self.name = name


@pytest.mark.parametrize("engine,shown", [("demo", "(demo engine)"), ("", "")])
def test_docker_shows_the_engine_the_server_reports(docker_on, qapp, engine, shown):
    doc, docker, panel = docker_on(NamedEngine(engine), 4)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    text = panel.state_text.text()
    assert text.startswith("Connected to ") and "diffusers" not in text, text
    if shown:
        assert shown in text, text
    else:
        assert "engine" not in text and "()" not in text, text


# -- no server, a server that goes away ---------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll_until(c, until, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.poll()
        if until():
            return True
        time.sleep(0.01)
    return until()


def test_generate_without_a_server_gives_up_and_says_what_to_do(krita_app):
    doc, lines = line_art_doc()
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    c = Controller(lambda: cc_canvas.KritaCanvas(doc), settings=Settings(url=url, token="x"))
    c.server_wait = 1.0
    try:
        colourise(c, doc, lines)
        t0 = time.monotonic()
        assert c.generate()
        assert c.busy and "waiting for the server" in c.message
        assert poll_until(c, lambda: not c.busy, 10), c.message
        assert 0.9 <= time.monotonic() - t0 < 5
        assert c.level == "error" and "controlcanvas serve" in c.message and url in c.message
        assert "Generate again" in c.message and c.progress == (0, 0)
        assert c.worker.unfinished() == [], "the dropped job is not sent later"
        assert doc.layer_names() == ["Background", "lineart"]
    finally:
        c.shutdown()


def test_server_stopped_mid_job_shows_the_real_state(make_server, controller_for, krita_app):
    engine = RecordingEngine(step_seconds=0.05)
    srv = make_server(engine)
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, srv), doc, lines, steps=60)
    c.server_wait = 1.5
    seen = []
    c.listeners.append(seen.append)
    assert c.generate()
    assert poll_until(c, lambda: c.progress[0] >= 2, 10), c.progress
    srv.stop()
    assert poll_until(c, lambda: c.status.state != "online", 10), c.status
    assert c.progress == (0, 0) and "progress" in seen, "no stale progress"
    assert "reconnecting" in c.message and "1 job(s) will resume" in c.message, c.message
    assert c.busy  # it may still come back
    assert poll_until(c, lambda: not c.busy, 10), c.message
    assert c.level == "error" and "controlcanvas serve" in c.message, c.message
    assert doc.layer_names() == ["Background", "lineart"]


def test_docker_resets_progress_when_the_link_drops(docker_on, qapp):
    engine = RecordingEngine(step_seconds=0.05)
    doc, docker, panel = docker_on(engine, 60)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.progress.value() >= 2, 10)
    panel.controller.worker.reconnect(f"ws://127.0.0.1:{free_port()}")  # the link drops
    assert pump(qapp, lambda: not panel.controller.online, 10)
    assert pump(qapp, lambda: panel.progress.value() == 0, 5), panel.progress.value()
    assert "reconnecting" in panel.message.text(), panel.message.text()


# -- structure ---------------------------------------------------------------------------------

PLUGIN = ROOT / "plugin_krita" / "controlcanvas"


def test_no_plugin_function_is_longer_than_80_lines():
    import ast
    long = []
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_private_names_used_across_plugin_modules():
    """``module._name`` or ``controller._name`` from another module: give it a public name."""
    import ast
    modules = {p.stem for p in PLUGIN.glob("*.py")} | {"controller", "canvas", "worker"}
    found = []
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    if base.attr in modules:
                        break
                    base = base.value
                name = base.attr if isinstance(base, ast.Attribute) else \
                    getattr(base, "id", "")
                if name in modules and name != path.stem:
                    found.append(f"{path.name}:{node.lineno} {name}.{node.attr}")
    assert not found, found


# -- what the worker and the controller must keep doing (planted bugs went unnoticed) -----------

def test_worker_acks_each_result_so_the_server_forgets_it(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines)
    job_id = c.generate()
    assert c.run_until_idle(20), c.message
    assert len(doc.layer_names()) == 3  # the result arrived
    jobs = server.server.manager.jobs
    deadline = time.monotonic() + 5
    while job_id in jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job_id not in jobs, "the result was not acknowledged: the server keeps it"


class IgnoresTheMaskEngine(RecordingEngine):
    """Paints the whole box, as a model may: the plug-in must keep to the selection."""

    def generate(self, request, images, ctx):
        from dataclasses import replace as dc_replace
        out = super().generate(request, images, ctx)
        return [dc_replace(o, image=Image.filled(o.image.width, o.image.height,
                                                 (0, 200, 0, 255))) for o in out]


def test_inpaint_sends_the_selection_mask_and_keeps_the_result_inside_it(make_server,
                                                                         controller_for,
                                                                         krita_app):
    engine = IgnoresTheMaskEngine()
    doc, lines = line_art_doc()
    sel = mock_krita.Selection(doc)
    sel.select(12, 10, 6, 5, 255)
    doc.setSelection(sel)
    c = controller_for(doc, make_server(engine), mode="inpaint", prompt="sky", strength=1.0)
    assert c.generate()
    assert c.run_until_idle(20), c.message
    request, images, outputs = engine.calls[-1]
    assert request.mask_image is not None, "the selection mask was not sent"
    mask = images[request.mask_image]
    assert mask.pixel(12, 10) == (255, 255, 255, 255) and mask.pixel(11, 10)[:3] == (0, 0, 0)
    assert mask.pixel(17, 14)[0] == 255 and mask.pixel(18, 14)[0] == 0
    result = node_image(doc.nodeByName(f"sky · seed {c.history[0].seeds[0]}"), doc)
    assert result.pixel(14, 12) == (0, 200, 0, 255)
    outside = [result.pixel(x, y)[3] for y in range(H) for x in range(W)
               if not (12 <= x < 18 and 10 <= y < 15)]
    assert max(outside) == 0, "the result covers pixels outside the selection"


def test_reconnect_resends_a_job_the_server_never_got_and_only_that_one(make_server, krita_app):
    engine = RecordingEngine(step_seconds=0.03)
    srv = make_server(engine)
    proxy = CuttableProxy(srv.server.port)
    doc, lines = line_art_doc()
    c = Controller(lambda: cc_canvas.KritaCanvas(doc),
                   settings=Settings(url=proxy.url, token=srv.token))
    try:
        c.connect()
        assert c.wait_online(20)
        colourise(c, doc, lines, steps=20, seed=11, seed_locked=True)
        kept = c.generate()  # the server has this one
        assert engine.started.wait(10)
        proxy.swallow = True  # the next upload leaves but never arrives
        c.settings.seed = 22
        lost = c.generate()
        time.sleep(0.5)
        assert lost in c.worker.unfinished()
        proxy.cut()
        proxy.swallow = False
        assert c.run_until_idle(30), (c.status, c.message)
        seeds = sorted(call[0].seed for call in engine.calls)
        assert seeds == [11, 22], f"each job ran once on the server: {seeds}"
        assert kept != lost and {s for item in c.history for s in item.seeds} == {11, 22}
        assert doc.nodeByName("flat colours, red coat · seed 22") is not None
        assert doc.nodeByName("flat colours, red coat · seed 11") is not None
    finally:
        c.shutdown()
        proxy.close()


# -- per-base conditions and LoRAs (the server's lists) ---------------------------------------

def condition_states(unit):
    """{condition: (enabled, tooltip)} of a unit's condition list."""
    box = unit.condition
    return {box.itemData(i): (box.model().item(i).isEnabled(), box.model().item(i).toolTip())
            for i in range(box.count())}


def lora_names(row):
    """[(name, enabled)] a LoRA row offers."""
    box = row.name
    return [(box.itemData(i), box.model().item(i).isEnabled()) for i in range(box.count())]


def test_docker_offers_the_conditions_and_loras_of_the_chosen_base(docker_on, qapp, krita_app,
                                                                   tmp_path):
    from PyQt6 import QtWidgets
    from tests.offers_support import OfferingEngine
    engine = OfferingEngine()
    doc, docker, panel = open_docked(docker_on, qapp, engine)
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    unit = panel.units[0]
    assert all(enabled for enabled, _ in condition_states(unit).values())
    # an SDXL base whose server has ControlNets for five conditions only
    panel.base_model.setEditText("anime-xl")
    states = condition_states(unit)
    assert {c for c, (enabled, _) in states.items() if enabled} == set(engine.XL_CONDITIONS)
    enabled, tip = states["lineart"]
    assert "'anime-xl' (SDXL) has no ControlNet for line art" in tip
    assert "bases that serve it: fake" in tip
    assert "anime-xl" in unit.condition.toolTip(), "the unit's own condition says why"
    unit.condition.setCurrentIndex(unit.condition.findData("canny"))
    assert "anime-xl" not in unit.condition.toolTip()
    unit.condition.setCurrentIndex(unit.condition.findData("lineart"))
    panel.base_model.setEditText("")  # the server's default (fake, SD1.5)
    assert all(enabled for enabled, _ in condition_states(unit).values())
    # LoRAs: the ones for SD1.5 (and the unknown one) can be picked, the SDXL one says why not
    assert "3 of 4 LoRA(s) on the server fit this base model (SD1.5)" in \
        panel.lora_panel.note.text()
    panel.lora_panel.add_button.click()
    row = panel.lora_panel.rows[0]
    assert lora_names(row) == [("homemade", True), ("ink", True), ("watercolour", True),
                               ("xl_ink", False)]
    assert "made for SDXL base models, and 'fake' is SD1.5" in \
        row.name.model().item(3).toolTip()
    assert row.value().name == "homemade" and row.value().strength == 1.0
    row.name.setCurrentIndex(row.name.findData("ink"))
    row.slider.setValue(16)  # 0.8
    assert row.strength_label.text() == "0.80"
    panel.lora_panel.add_button.click()
    second = panel.lora_panel.rows[1]
    assert second.value().name == "homemade", "a new row takes a LoRA not in use yet"
    second.name.setCurrentIndex(second.name.findData("watercolour"))
    second.slider.setValue(-10)
    docker.resize(*KRITA_DOCKED)
    pump(qapp, lambda: False, 0.2)
    assert not panel.scroll.horizontalScrollBar().isVisible(), "no sideways scrolling"
    panel.scroll.ensureWidgetVisible(second)
    pump(qapp, lambda: False, 0.1)
    assert docker.grab().save(str(tmp_path / "krita-docker-loras-docked.png"))
    body = panel.findChild(QtWidgets.QScrollArea).widget()
    assert body.minimumSizeHint().width() <= KRITA_DOCKED[0]
    use_palette(docker, krita_dark_palette())  # every section, in Krita's dark theme
    docker.resize(KRITA_DOCKED[0], 900)
    pump(qapp, lambda: False, 0.2)
    out = tmp_path / "krita-docker-loras.png"
    assert docker.grab().save(str(out))
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):  # the docs' picture
        shutil.copy(out, ROOT / "docs" / "img" / "krita-docker-loras.png")
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    request = engine.calls[-1][0]
    assert [(l.name, l.strength) for l in request.loras] == [("ink", 0.8),
                                                             ("watercolour", -0.5)]
    saved = Settings.from_json(krita_app.readSetting(cc_canvas.SETTINGS_GROUP,
                                                     "settings", ""))
    assert [(l.name, l.strength) for l in saved.loras] == [("ink", 0.8), ("watercolour", -0.5)]
    # the SDXL base: its LoRA list follows, and Generate says what does not fit
    panel.base_model.setEditText("anime-xl")
    assert lora_names(row) == [("homemade", True), ("xl_ink", True), ("ink", False),
                               ("watercolour", False)]
    assert row.value().name == "ink", "the artist's choice stays, greyed out"
    panel.units[0].condition.setCurrentIndex(panel.units[0].condition.findData("canny"))
    panel.generate_button.click()
    assert "'ink' was made for SD1.5 base models, and 'anime-xl' is SDXL" in \
        panel.message.text()
    assert "homemade, xl_ink (SDXL)" in panel.message.text() and len(engine.calls) == 1
    panel.lora_panel.remove(second)
    row.name.setCurrentIndex(row.name.findData("xl_ink"))
    panel.units[0].condition.setCurrentIndex(panel.units[0].condition.findData("lineart"))
    panel.generate_button.click()
    assert panel.message.text().startswith(
        "Control unit 1: The base model 'anime-xl' (SDXL) has no ControlNet for line art")
    assert len(engine.calls) == 1, "nothing was sent"


def test_docker_keeps_a_saved_lora_the_server_lost_and_says_which_it_has(docker_on, qapp,
                                                                         krita_app):
    from tests.offers_support import OfferingEngine
    from controlcanvas.settings import LoraSettings
    engine = OfferingEngine()
    doc, docker, panel = docker_on(engine, 4)
    panel.lora_panel.load([LoraSettings("old_style", 1.5)])
    row = panel.lora_panel.rows[0]
    assert lora_names(row) == [("old_style", True)]
    assert "not listed yet" in row.name.currentText()
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    assert row.name.currentText() == "old_style (not on the server)"
    assert row.value().name == "old_style" and row.strength == 1.5
    panel.generate_button.click()
    assert panel.message.text() == ("The server has no LoRA named 'old_style'. LoRAs for this "
                                    "base model: homemade, ink (SD1.5), watercolour (SD1.5).")
    assert engine.calls == []


def test_docker_with_a_server_that_predates_per_base_lists(docker_on, qapp, krita_app):
    """An older server (no conditions per base, no LoRAs in its models message): every
    condition is offered, the LoRA section says there are none, and Generate works."""
    engine = RecordingEngine()
    doc, docker, panel = docker_on(engine, 4)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    assert panel.controller.models.loras == () and \
        all(not m.conditions for m in panel.controller.models.models)
    panel.on_add_unit()
    panel.base_model.setEditText("fake")
    states = condition_states(panel.units[0])
    assert len(states) == 12 and all(enabled for enabled, _ in states.values())
    assert "lists no LoRAs" in panel.lora_panel.note.text()
    assert not panel.lora_panel.add_button.isEnabled()
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    assert engine.calls[-1][0].loras == ()


def test_docker_says_when_the_base_emulates_its_control_units(docker_on, qapp, tmp_path):
    """A Flux.2 Klein base has no ControlNet: the Control section says that each control
    layer goes to the model as a reference picture, under the units, for that base only;
    its units still offer the conditions the server emulates, and Generate sends them."""
    from tests.offers_support import KleinOfferingEngine
    engine = KleinOfferingEngine()
    doc, docker, panel = open_docked(docker_on, qapp, engine)
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    note = panel.control_note
    assert not note.isVisible() and note.text() == "", "no note for the default SD1.5 base"
    panel.base_model.setEditText("klein-4b")
    pump(qapp, lambda: False, 0.1)
    assert note.isVisible()
    assert note.text().startswith("Flux.2 Klein has no ControlNet: each control layer is "
                                  "given to the model as a reference image")
    assert note.toolTip() == note.text(), "the whole sentence, should the label cut it"
    unit = panel.units[0]
    assert note.parentWidget() is unit.parentWidget() and \
        note.geometry().top() > unit.geometry().bottom(), "the note sits under the units"
    assert all(enabled for enabled, _ in condition_states(unit).values())
    docker.resize(KRITA_DOCKED[0], 700)
    pump(qapp, lambda: False, 0.2)
    assert docker.grab().save(str(tmp_path / "krita-docker-klein-control.png"))
    panel.generate_button.click()
    assert pump(qapp, lambda: panel.history.count() == 1), panel.message.text()
    request = engine.calls[-1][0]
    assert request.base_model == "klein-4b" and request.controls[0].condition == "lineart"
    panel.base_model.setEditText("anime-xl")  # a base with ControlNets: the note goes
    assert not note.isVisible() and note.text() == ""
    panel.base_model.setEditText("klein-4b")
    assert note.isVisible()
    panel.base_model.setEditText("")
    assert not note.isVisible()


def test_plan_sends_loras_and_refuses_what_the_server_lacks(krita_app):
    from controlcanvas.proto import offers
    from controlcanvas.settings import LoraSettings
    from shared.errors import LoraMismatch, ModelMissing
    from tests.offers_support import OfferingEngine
    doc, lines = line_art_doc()
    s = Settings(loras=[LoraSettings("ink", 0.5), LoraSettings("", 1.0),
                        LoraSettings("xl_ink", -2.0)])
    canvas = cc_canvas.KritaCanvas(doc)
    request = plan.build(s, canvas, seed=1).request  # before the server answered: sent as is
    assert [(l.name, l.strength) for l in request.loras] == [("ink", 0.5), ("xl_ink", -2.0)]
    offer = offers.Offers(OfferingEngine().models())
    with pytest.raises(LoraMismatch, match="'xl_ink' was made for SDXL"):
        plan.build(s, canvas, seed=1, offer=offer)
    s.base_model = "anime-xl"
    with pytest.raises(LoraMismatch, match="'ink' was made for SD1.5"):
        plan.build(s, canvas, seed=1, offer=offer)
    s.loras = [LoraSettings("xl_ink", 1.0), LoraSettings("xl_ink", 0.5)]
    with pytest.raises(plan.PlanError, match="twice"):
        plan.build(s, canvas, seed=1, offer=offer)
    s.loras = [LoraSettings("nope")]
    with pytest.raises(ModelMissing, match="no LoRA named 'nope'. LoRAs for this base model: "
                                           "homemade, xl_ink"):
        plan.build(s, canvas, seed=1, offer=offer)
    s.base_model = "mystery-base"  # not a family the server knows: every LoRA may fit
    s.loras = [LoraSettings("ink"), LoraSettings("xl_ink")]
    assert len(plan.build(s, canvas, seed=1, offer=offer).request.loras) == 2


def test_lora_rows_are_saved_and_junk_is_dropped():
    from controlcanvas.settings import LoraSettings
    s = Settings(loras=[LoraSettings("ink", 0.8), LoraSettings("paper", -2.0)])
    assert Settings.from_json(s.to_json()).loras == s.loras
    junk = ('{"loras": [{"name": "ink", "strength": 9}, {"name": 3}, "x", '
            '{"name": "a", "strength": "1"}, {"strength": 0.5}]}')
    assert Settings.from_json(junk).loras == [LoraSettings("ink", 1.0), LoraSettings("a", 1.0),
                                              LoraSettings("", 0.5)]
    assert Settings.from_json('{"loras": 5}').loras == []


def test_loras_and_conditions_with_the_tiny_engine(make_server, lora_engine, controller_for,
                                                   krita_app):
    """A real server (the tiny diffusers engine, a LoRA folder): the plug-in offers the
    catalogue's conditions per base, and a LoRA row changes the picture (strength 0 = none)."""
    from controlcanvas.settings import LoraSettings
    srv = make_server(lora_engine)
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, srv), doc, lines, base_model="tiny-sd15", steps=2,
                  seed=3, seed_locked=True)
    offer = c.offers()
    assert offer.conditions("shapes-demo") == ("canny", "softedge", "scribble", "lineart")
    assert "lineart" in offer.conditions("tiny-sd15")
    fits = [info.name for info, problem in offer.lora_choices("tiny-sd15") if not problem]
    assert {"ink", "paper", "sd15_size"} <= set(fits) and "sdxl_size" not in fits

    def picture(*loras):
        c.settings.loras = [LoraSettings(name, strength) for name, strength in loras]
        assert c.generate() is not None, c.message
        assert c.run_until_idle(120), c.message
        assert c.level == "info", c.message
        return c.history[0].images[0][0]

    plain, inked, zero = picture(), picture(("ink", 1.0)), picture(("ink", 0.0))
    assert inked != plain and zero == plain
    c.settings.loras = [LoraSettings("nope")]
    assert c.generate() is None
    assert c.message.startswith("The server has no LoRA named 'nope'. LoRAs for this base "
                                "model: ") and "ink" in c.message
    c.settings.loras, c.settings.base_model = [], "shapes-demo"
    c.settings.units[0].condition = "depth"
    assert c.generate() is None
    assert c.message.startswith("Control unit 1: The base model 'shapes-demo' (SD1.5) has no "
                                "ControlNet for depth (depth); bases that serve it: ")
