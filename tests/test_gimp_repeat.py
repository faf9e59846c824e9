"""GIMP's Filters ▸ ControlNet ▸ Repeat last: the image's last ControlNet filter again, with
the settings and seed kept in the image (the controlcanvas.history parasite), on the
selected layer as it is now, with no dialog (a keyboard shortcut's procedure).  Against the
in-memory host and a real server with the fake engine, like test_gimp_plugin."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_gimp_plugin import (  # noqa: F401 (fixtures)
    FakeHost, FakeLayer, actions, expect, generation, line_art, openpose, pose, procedures,
    reopened, resize_nearest, server, spec, token_dir, host, values)
from shared import doc_history


def repeat(server, host):
    return actions.run(spec("repeat-last"), host, {"server-url": server.url})


def same_request(a, b):
    return dataclasses.replace(a, seed=0) == dataclasses.replace(b, seed=0) and \
        a.seed == b.seed


def test_repeat_last_has_no_dialog_and_sits_under_filters_controlnet():
    s = spec("repeat-last")
    assert s.label == "Repeat last" and s.dialog_args == () and s.needs_drawable
    assert s.returns == ("seed", "layer") and s in procedures.PROCEDURES


def test_repeat_last_runs_the_same_filter_with_every_setting_and_the_seed(server, host):
    first = actions.run(spec("generate"), host, values(
        server, seed=-1, steps=9, cfg=5.5, sampler="euler_a", batch=2, annotate=False,
        **{"negative-prompt": "blurry", "control-weight": 0.8, "control-start": 0.1,
           "control-end": 0.9, "control-mode": "prompt", "condition": "scribble"}))
    record = host.parasites[doc_history.NAME].decode()
    assert "token" not in record and server.url not in record
    again = reopened(host)  # saved as .xcf and opened again: nothing in memory
    second = repeat(server, again)
    assert same_request(second.request, first.request), (second.request, first.request)
    assert second.seeds == first.seeds
    assert again.layers[0].children[0].image == host.layers[0].children[0].image
    entries, _ = doc_history.decode(again.parasites[doc_history.NAME])
    assert [e.settings["procedure"] for e in entries] == [spec("generate").name] * 2
    assert again.undo_groups == 1  # one undo step, like the filter itself


def test_repeat_last_reads_the_layer_as_it_is_now(server, host):
    first = actions.run(spec("colourise"), host, values(server, seed=5))
    host.selected.image = line_art(60, 48)  # the artist redrew the lines
    second = repeat(server, host)
    assert second.seed == 5 and second.request.controls[0].preprocessor == \
        first.request.controls[0].preprocessor
    assert host.names()[:3] == ["lines", "girl in a red coat · seed 5",
                                "girl in a red coat · seed 5"], "below the lines again"
    made = expect.generated(second.request, {0: line_art(60, 48)})[0]
    assert host.layers[1].image == resize_nearest(made, 60, 48)  # the new lines steered it


def test_repeat_last_follows_a_moved_joint_of_the_skeleton(server, host):
    layer = host.selected
    first = actions.run(spec("figure-from-pose"), host, values(server, seed=7))
    (path,) = host.paths
    wrist = openpose.LIMBS.index((3, 4))
    path.strokes[wrist][6:12] = [layer.x + 2.5, layer.y + 3.5] * 3
    second = repeat(server, host)
    assert second.request.seed == first.request.seed == 7
    assert second.request.controls[0].pose != first.request.controls[0].pose
    assert host.layers[1].image == expect.generated(second.request, {})[0]


def test_repeat_last_of_a_regenerated_selection_uses_the_selection_now(server, host):
    host.select_rectangle(20, 15, 8, 8)
    first = actions.run(spec("inpaint"), host, values(server, seed=3, strength=0.6))
    host.selection = None
    host.select_rectangle(30, 20, 6, 6)
    second = repeat(server, host)
    assert second.request.strength == 0.6 and second.seed == 3
    assert second.request.mode == first.request.mode == "inpaint"
    newest, older = second.layer, first.layer
    assert newest.mask != older.mask  # the new selection is what changes
    assert newest.mask == host.read_selection(
        host.active_layer(), (0, 0, newest.width, newest.height))


def test_nothing_to_repeat_is_a_sentence(server, host):
    with pytest.raises(actions.Failed) as err:
        repeat(server, host)
    assert "Nothing to repeat" in err.value.message and "Generate from layer" in \
        err.value.message
    assert host.added() == [] and host.undo_groups == 0


def test_a_record_from_before_the_arguments_were_kept_still_repeats(server, host):
    entry = doc_history.Entry("knight", "", (42,), {
        "procedure": spec("generate").name, "condition": "lineart", "steps": 4, "cfg": 6.0,
        "sampler": "ddim", "batch": 1, "base_model": "", "control_weight": 1.0,
        "size": "layer"}, (("", "knight · seed 42"),), 0.0)
    host.parasites[doc_history.NAME] = doc_history.encode([entry])
    outcome = repeat(server, host)
    request = outcome.request
    assert (request.prompt, request.seed, request.steps, request.cfg, request.sampler) == \
        ("knight", 42, 4, 6.0, "ddim")


def test_a_damaged_kept_setting_is_named(server, host):
    entry = doc_history.Entry("knight", "", (42,), {
        "procedure": spec("generate").name, "arg.steps": 9999}, (), 0.0)
    host.parasites[doc_history.NAME] = doc_history.encode([entry])
    with pytest.raises(actions.Failed, match="'steps'"):
        repeat(server, host)
