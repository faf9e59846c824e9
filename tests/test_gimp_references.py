"""The GIMP plug-in's 'Reference layer' arguments (IP-Adapter): the procedures take a layer
name, a weight and a mode; the named layer is sent whole (at most 512 px) as the request's
reference; mistakes are sentences before anything is sent; with the tiny diffusers engine
a reference layer changes the picture and weight 0 gives the picture without it.

Same set-up as test_gimp_plugin.py: the in-memory host, a real server on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.test_gimp_plugin import (TOKEN, assert_unchanged, host, line_art, options,  # noqa: F401
                                    spec, token_dir, values)
from backend.server.config import ServerConfig
from backend.server.local import ServerThread
from controlcanvas_gimp import actions, generation, problems, procedures
from gimp_support.fake_host import FakeLayer
from shared.images import Image
from shared.messages import ReferenceUnit
from tests.krita_support.engines import RecordingEngine
from tiny_fixtures import tiny_root, torch_threads  # noqa: F401

GENERATING = ("generate", "colourise", "figure-from-pose", "inpaint")


@pytest.fixture(scope="module")
def recording():
    engine = RecordingEngine()
    with ServerThread(engine, ServerConfig(port=0), token=TOKEN) as running:
        running.recorder = engine
        yield running


def with_photo(host, size=(40, 30), name="photo"):
    photo = FakeLayer(name, Image.filled(*size, (200, 60, 30, 255)), x=2, y=3)
    host.layers.insert(1, photo)
    return photo


def test_every_generating_procedure_takes_a_reference_layer():
    for name in GENERATING:
        args = {a.name: a for a in spec(name).args}
        assert args["reference-layer"].default == "" and args["reference-layer"].in_dialog
        assert args["reference-weight"].default == 0.8
        assert [nick for nick, _ in args["reference-mode"].choices] == [
            "reference", "style", "composition", "face"]
    assert "reference-layer" not in {a.name for a in spec("settings").args}


def test_build_request_maps_the_reference_arguments():
    opts = options(annotate=False, **{"reference-layer": " photo ", "reference-weight": 0.5,
                                      "reference-mode": "style"})
    assert opts.reference_layer == "photo"
    request = generation.build_request(opts, 64, 48, seed=1, reference_slot=1)
    assert request.references == (ReferenceUnit(image=1, weight=0.5, mode="style"),)
    assert generation.build_request(options(annotate=False), 64, 48, seed=1).references == ()


def test_generate_sends_the_reference_layer_whole_in_its_own_slot(recording, host):
    with_photo(host)
    outcome = actions.run(spec("generate"), host, values(recording, **{
        "reference-layer": "photo", "reference-mode": "composition"}))
    request, images, _ = recording.recorder.calls[-1]
    (ref,) = outcome.request.references
    assert request.references == outcome.request.references
    assert (ref.mode, ref.weight) == ("composition", 0.8)
    assert ref.image == 1 and images[0] == line_art()  # the control layer keeps slot 0
    assert images[1].size == (40, 30) and images[1].pixel(0, 0) == (200, 60, 30, 255)
    # inpaint: init and mask first, the reference after them
    host.select_rectangle(20, 10, 8, 8)
    outcome = actions.run(spec("inpaint"), host, values(recording, **{
        "reference-layer": "photo"}))
    assert outcome.request.references[0].image == 2
    # weight 0: no reference at all
    outcome = actions.run(spec("generate"), host, values(recording, **{
        "reference-layer": "photo", "reference-weight": 0.0}))
    assert outcome.request.references == ()


def test_a_big_reference_layer_is_sent_at_most_512_px(recording, host):
    with_photo(host, size=(1200, 300))
    actions.run(spec("generate"), host, values(recording, **{"reference-layer": "photo"}))
    request, images, _ = recording.recorder.calls[-1]
    assert images[request.references[0].image].size == (512, 128)


@pytest.mark.parametrize("name, says", [
    ("nope", "There is no layer called 'nope' in this image for 'Reference layer'"),
    ("empty", "The reference layer 'empty' is empty"),
])
def test_a_missing_or_empty_reference_layer_is_a_sentence_before_connecting(host, name, says):
    host.layers.append(FakeLayer("empty", Image(8, 8, bytes(8 * 8 * 4))))

    def never(conn, client):
        raise AssertionError("no connection for a wrong argument")
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {"reference-layer": name}, connect=never)
    assert says in info.value.message
    assert isinstance(info.value.cause, problems.UsageError)
    assert info.value.cause.field == "reference-layer"
    assert_unchanged(host)


def test_a_reference_layer_with_the_tiny_engine(tiny_root, host):
    """A real server (the tiny diffusers engine with its tiny IP-Adapter)."""
    from backend.engines.catalogue import Catalogue, ModelConfig
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"))), device="cpu")
    with_photo(host)
    try:
        with ServerThread(engine, ServerConfig(port=0), token=TOKEN) as tiny:
            def picture(base="tiny-sd15", **kw):
                outcome = actions.run(spec("generate"), host, values(
                    tiny, steps=3, seed=3, **{"base-model": base}, **kw))
                return outcome.layer.image

            plain = picture()
            ref = picture(**{"reference-layer": "photo", "reference-weight": 1.0})
            zero = picture(**{"reference-layer": "photo", "reference-weight": 0.0})
            assert ref != plain and zero == plain
            # face mode: the tiny face adapter (another adapter: another picture)
            face = picture(**{"reference-layer": "photo", "reference-mode": "face"})
            assert face not in (plain, ref)
            with pytest.raises(actions.Failed) as info:  # Flux.1 references: mode reference
                picture("tiny-flux", **{"reference-layer": "photo", "reference-mode": "face"})
            assert "run in mode 'reference' only" in info.value.message
    finally:
        engine.close()
