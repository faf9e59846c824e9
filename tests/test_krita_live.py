"""Live painting in the Krita plug-in (plugin_krita/controlcanvas/live.py), against the
mock ``krita`` module and a real server with the fake engine, like test_krita_plugin:
what is asserted is what the artist sees - the live layer's pixels replaced in place
without an undo step per frame, Keep as one undo step, the seed locked, no frame sent
while nothing changed (nor fed back into the next one), a clean stop when the document
closes or the server goes away."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.test_krita_plugin import (  # noqa: F401 (fixtures)
    ROOT, RecordingEngine, Settings, bgra, cc_canvas, colourise, controller_for, docker_on,
    krita_app, line_art_doc, mock_krita, node_image, poll_until, pump, qapp, server, uid)

from controlcanvas import live as live_mod  # noqa: E402  (the mock krita is in place)
from controlcanvas.proto import messages  # noqa: E402
from shared.errors import ModelMissing


def stroke(node, x, y, length=8, colour=(20, 20, 20)):
    """The artist draws a short horizontal line on ``node``."""
    node.setPixelData(bgra(*colour) * length, x, y, length, 1)


def live_layer(doc):
    return doc.nodeByName(live_mod.LIVE_LAYER)


def frames_of(c, count, timeout=10.0):
    return poll_until(c, lambda: c.live.frames >= count, timeout)


def settle(c, seconds=0.5):
    poll_until(c, lambda: False, seconds)


def test_strokes_update_the_live_layer_in_place_and_keep_is_one_undo_step(server,
                                                                          controller_for,
                                                                          krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, steps=4, seed=77, seed_locked=False)
    assert c.live.start()
    assert c.settings.seed_locked
    seed = c.settings.seed
    assert frames_of(c, 1), c.message
    layer = live_layer(doc)
    assert layer is not None and doc.layer_names() == ["Background", "ControlCanvas live",
                                                       "lineart"]  # under the lines
    request, _, answer = server.recorder.calls[-1]
    assert request.seed == seed and request.batch == 1
    assert node_image(layer, doc) == answer[0].image
    undo_steps, writes = doc.undo_steps, doc.unundoable_writes
    calls = len(server.recorder.calls)
    settle(c)
    assert len(server.recorder.calls) == calls, "nothing changed: no frame sent"
    stroke(lines, 12, 25)  # a new stroke: a new frame, in the same layer
    assert frames_of(c, 2), c.message
    assert len(doc.rootNode().childNodes()) == 3 and live_layer(doc) is layer
    assert doc.undo_steps == undo_steps, "a frame is not an undo step"
    assert doc.unundoable_writes > writes
    request, _, answer = server.recorder.calls[-1]
    assert request.seed == seed, "the seed stays locked"
    assert node_image(layer, doc) == answer[0].image
    # Keep: the frame as a normal layer, one undo step, in the history
    kept = c.live.keep()
    assert kept and doc.undo_steps == undo_steps + 1
    new = cc_canvas.KritaCanvas(doc).node(kept)
    assert new.name() == f"flat colours, red coat · seed {seed}"
    assert node_image(new, doc) == answer[0].image
    assert c.history[0].seeds == [seed]
    doc.undo()
    assert cc_canvas.KritaCanvas(doc).node(kept) is None and live_layer(doc) is layer
    c.live.stop()
    assert live_layer(doc) is None and not c.settings.seed_locked
    assert c.settings.seed == 77


def test_over_the_lowest_layer_the_live_layer_multiplies_like_results(server, controller_for,
                                                                       krita_app):
    doc, lines = line_art_doc(with_background=False)  # the line art is the lowest layer
    c = colourise(controller_for(doc, server), doc, lines, steps=2)
    assert c.live.start() and frames_of(c, 1), c.message
    layer = live_layer(doc)
    assert doc.layer_names() == ["lineart", "ControlCanvas live"]
    assert layer.blendingMode() == "multiply"  # the lines stay visible through the frame
    c.live.stop()


def test_the_visible_image_is_read_without_the_live_layer(server, controller_for, krita_app):
    """A unit bound to the visible image (and img2img) would see the last frame: the live
    layer is hidden while the canvas is read, so a frame never causes the next one."""
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, steps=2)
    c.settings.units[0].layer_id = ""  # the visible image
    c.settings.mode = "img2img"
    assert c.live.start()
    assert frames_of(c, 1), c.message
    calls = len(server.recorder.calls)
    settle(c, 0.8)
    assert len(server.recorder.calls) == calls and c.live.frames == 1
    assert live_layer(doc).visible()
    sent = server.recorder.calls[-1][1]
    # what was sent is the document without the live layer
    live_layer(doc).setVisible(False)
    expected = cc_canvas.KritaCanvas(doc).read_projection((0, 0, doc.width(), doc.height()))
    live_layer(doc).setVisible(True)
    assert sent[0] == expected
    c.live.stop()


def test_changing_the_prompt_sends_a_frame_and_a_preset_is_named(server, controller_for,
                                                                 krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, steps=20, cfg=7.0)
    c.models = messages.Models(presets=(messages.PresetInfo(
        name="lcm-sd15", family="sd15", steps=4, cfg=1.0, present=True),))
    c.live.preset = "lcm-sd15"
    assert c.live.start() and frames_of(c, 1)
    c.settings.prompt = "flat colours, blue coat"
    assert frames_of(c, 2)
    request = server.recorder.calls[-1][0]
    assert request.prompt == "flat colours, blue coat"
    assert (request.preset, request.steps, request.cfg) == ("lcm-sd15", 4, 1.0)
    c.live.stop()


class NoLoraEngine(RecordingEngine):
    def generate(self, request, images, ctx):
        if request.preset:
            raise ModelMissing("The preset 'tcd-sd15' needs the LoRA 'tcd-sd15-lora'. Fetch "
                               "it once with: `controlcanvas models download tcd-sd15`",
                               field="preset")
        return super().generate(request, images, ctx)


def test_a_failing_frame_stops_live_with_the_servers_sentence(make_server, controller_for,
                                                               krita_app):
    srv = make_server(NoLoraEngine())
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, srv), doc, lines, steps=2)
    c.models = messages.Models(presets=(messages.PresetInfo(name="tcd-sd15", steps=4),))
    c.live.preset = "tcd-sd15"
    assert c.live.start()
    assert poll_until(c, lambda: not c.live.active, 10)
    assert c.level == "error" and "controlcanvas models download tcd-sd15" in c.message
    assert live_layer(doc) is None


def test_live_stops_cleanly_when_the_document_closes(server, controller_for, krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, steps=2)
    assert c.live.start() and frames_of(c, 1)
    doc.close()
    assert poll_until(c, lambda: not c.live.active, 5)
    assert "document was closed" in c.message
    settle(c, 0.3)  # nothing touches the closed document afterwards


def test_live_stops_cleanly_when_the_server_goes_away(make_server, controller_for, krita_app):
    srv = make_server(RecordingEngine(step_seconds=0.002))
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, srv), doc, lines, steps=2)
    assert c.live.start() and frames_of(c, 1)
    srv.stop()
    assert poll_until(c, lambda: not c.live.active, 10)
    assert c.level == "error" and "server went away" in c.message
    assert live_layer(doc) is None and not c.settings.seed_locked
    assert not [j for j in (c.worker.unfinished() if c.worker else [])], \
        "no live frame waits to be resent"


class StubWorker:
    def __init__(self):
        self.sent = []

    def submit(self, request, images, *, preview_every=0, live=False):
        assert live
        self.sent.append(request)
        return messages.new_job_id()

    def cancel(self, job_id):
        pass


def test_changes_are_debounced_but_a_long_stroke_still_gets_frames(server, controller_for,
                                                                   krita_app):
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines)
    now = [0.0]
    session = live_mod.LiveSession(c, clock=lambda: now[0])
    worker = c.worker
    c.worker = StubWorker()
    try:
        assert session.start()
        session.tick()  # the first look
        now[0] = 0.2
        session.tick()
        assert len(c.worker.sent) == 1  # still for 0.2 s: sent
        for step in range(1, 8):  # a stroke: a change every 0.1 s for 0.7 s
            stroke(lines, 2 * step, 20)
            now[0] = 0.2 + 0.1 * step
            session.tick()
            assert len(c.worker.sent) == (1 if step < 7 else 2), step  # 0.6 s after step 1
        stroke(lines, 30, 28)
        now[0] += 0.1
        session.tick()
        now[0] += 0.16
        session.tick()  # still for 0.16 s after the stroke
        assert len(c.worker.sent) == 3
    finally:
        session.stop()
        c.worker = worker


# -- the docker ---------------------------------------------------------------------------------

def test_docker_live_toggle_keep_and_off(docker_on, qapp, tmp_path):
    engine = RecordingEngine()
    doc, docker, panel = docker_on(engine, 4)
    panel.on_connect()
    assert pump(qapp, lambda: panel.controller.online), panel.controller.status
    panel.preset.setCurrentIndex(panel.preset.findData("colourise"))
    panel.on_preset()
    panel.live_button.click()
    assert panel.live_button.isChecked() and panel.controller.live.active
    assert panel.generate_button.text() == "Keep frame" and not panel.seed.isEnabled()
    assert pump(qapp, lambda: live_layer(doc) is not None and panel.controller.live.frames)
    assert "1 frame" in panel.live_status.text()
    panel.prompt.setPlainText("flat colours, green coat")  # typed while live
    assert pump(qapp, lambda: engine.calls[-1][0].prompt == "flat colours, green coat")
    shot = tmp_path / "krita-docker-live.png"
    docker.resize(270, 330)
    docker.show()
    pump(qapp, lambda: False, 0.2)
    bar = panel.scroll.verticalScrollBar()
    bar.setValue(panel.sections["Live"].mapTo(panel.scroll.widget(),
                                              panel.sections["Live"].rect().topLeft()).y())
    pump(qapp, lambda: False, 0.2)
    assert docker.grab().save(str(shot))
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS"):  # the docs' picture
        shutil.copy(shot, ROOT / "docs" / "img" / "krita-docker-live.png")
    steps = doc.undo_steps
    panel.generate_button.click()  # Keep frame
    assert doc.undo_steps == steps + 1 and panel.history.count() == 1
    panel.live_button.click()
    assert not panel.controller.live.active and live_layer(doc) is None
    assert panel.generate_button.text() == "Generate" and panel.seed.isEnabled()


def test_a_change_krita_does_not_flag_as_modified_still_gets_a_frame(server, controller_for,
                                                                    krita_app):
    """Real Krita does not mark the document modified for every change (a script's
    setPixelData, as the real-Krita tier found): such a change still reaches the live
    layer, read at the latest after REREAD."""
    doc, lines = line_art_doc()
    c = colourise(controller_for(doc, server), doc, lines, steps=4, seed=78, seed_locked=False)
    assert c.live.start()
    assert frames_of(c, 1), c.message
    doc.setModified(False)
    stroke(lines, 14, 30)
    doc.setModified(False)  # as real Krita leaves it after a scripted write
    assert frames_of(c, 2, timeout=5 + live_mod.REREAD), c.message
    c.live.stop()
