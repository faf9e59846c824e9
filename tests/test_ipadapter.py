"""IP-Adapter reference units: the protocol (``ReferenceUnit``), the adapter catalogue and its
typed refusals, and the engine on the tiny models with a tiny IP-Adapter built locally
(``backend.engines.tiny_ipadapter``: the original ``image_proj`` / ``ip_adapter`` layout
that ``load_ip_adapter`` reads, sized for the tiny UNets, and a tiny CLIP image encoder).

What a user would notice: a reference changes the picture, weight 0 is no reference bit
for bit, a seed gives the same pixels, style and composition differ, the start/end window
is honoured, switching references on and off reloads neither the base nor the adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.engines import references, tiny_ipadapter
from backend.engines.catalogue import Catalogue, ModelConfig
from backend.imaging import to_array
from shared.errors import FieldError, ModelMissing, ReferenceUnsupported
from shared.messages import (CLIENT_MESSAGES, MAX_REFERENCES, ControlUnit, Generate,
                             GenerateRequest, ReferenceUnit, from_json, to_dict, to_json)

from tiny_fixtures import RecordingContext, fake_hub_snapshot, lines_image, random_rgba
from tiny_fixtures import tiny_lora_dir, tiny_root, torch_threads  # noqa: F401 - fixtures
from tests.test_jobs import loop  # noqa: F401 - a fixture

JOB = "0123456789abcdef0123456789abcdef"
W = H = 64
REF, OTHER, LINES, INIT, MASK = 0, 1, 2, 3, 4


def request(*refs, **kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 4)
    kw.setdefault("base_model", "tiny-sd15")
    return GenerateRequest(references=tuple(refs), **kw)


def images():
    mask = np.zeros((H, W, 4), np.uint8)
    mask[16:48, 16:48] = 255
    from shared.images import Image
    return {REF: random_rgba(48, 40, seed=3), OTHER: random_rgba(40, 56, seed=11),
            LINES: lines_image(W, H, seed=2), INIT: random_rgba(W, H, seed=5),
            MASK: Image(W, H, mask.tobytes())}


def pixels(engine, req) -> np.ndarray:
    out = engine.generate(req, images(), RecordingContext())
    return to_array(out[0].image).astype(np.int16)


def differ(a, b) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture
def ref_engine(tiny_root):
    """A DiffusersEngine of its own over the tiny models (the tiny adapters are built next
    to them, in the session's temporary folder)."""
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"))), device="cpu")
    yield engine
    engine.close()


# -----------------------------------------------------------------------------
# The engine
# -----------------------------------------------------------------------------

def test_a_reference_changes_the_picture_and_weight_zero_is_no_reference(ref_engine):
    plain = pixels(ref_engine, request())
    zero = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.0)))
    ref = pixels(ref_engine, request(ReferenceUnit(image=REF)))
    assert np.array_equal(zero, plain)  # bit for bit
    assert differ(ref, plain) > 2.0  # (12.4 measured)
    # Same seed, same pixels; a reference leaves nothing behind once it is not asked for.
    assert np.array_equal(pixels(ref_engine, request(ReferenceUnit(image=REF))), ref)
    assert np.array_equal(pixels(ref_engine, request()), plain)
    assert np.array_equal(pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.0))),
                          plain)
    # another reference image gives another picture; the weight scales the effect
    assert differ(pixels(ref_engine, request(ReferenceUnit(image=OTHER))), ref) > 2.0
    half = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.5)))
    assert 0 < differ(half, plain) < differ(ref, plain)


def test_switching_references_reloads_neither_the_base_nor_the_adapter(ref_engine):
    pixels(ref_engine, request(ReferenceUnit(image=REF)))
    assert ref_engine.stats["loads"] == 1 and ref_engine.stats["ip_adapter_loads"] == 1
    for refs in [(), (ReferenceUnit(image=OTHER, mode="style"),), (),
                 (ReferenceUnit(image=REF, weight=0.3, start=0.5),)]:
        pixels(ref_engine, request(*refs))
    assert ref_engine.stats["loads"] == 1 and ref_engine.stats["ip_adapter_loads"] == 1
    # two references need two slots: the adapter weights once more, still not the base
    pixels(ref_engine, request(ReferenceUnit(image=REF), ReferenceUnit(image=OTHER)))
    assert ref_engine.stats["loads"] == 1 and ref_engine.stats["ip_adapter_loads"] == 2


def test_style_and_composition_reach_different_layers(ref_engine):
    plain = pixels(ref_engine, request())
    whole = pixels(ref_engine, request(ReferenceUnit(image=REF)))
    style = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="style")))
    layout = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="composition")))
    for one, other in [(style, plain), (layout, plain), (style, layout), (style, whole),
                       (layout, whole)]:
        assert differ(one, other) > 1.0
    # both at once, from two pictures: InstantStyle's style + layout
    both = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="style"),
                                      ReferenceUnit(image=OTHER, mode="composition")))
    assert differ(both, style) > 1.0 and differ(both, layout) > 1.0


def test_modes_name_instantstyles_blocks(ref_engine, tiny_root):
    """style = the middle attention of the lowest-resolution up block with attentions,
    composition = the last attention of the lowest-resolution down block with attentions:
    on SDXL's layout that is InstantStyle's up_blocks.0.attentions.1 and
    down_blocks.2.attentions.1; on SD1.5's up_blocks.1.attentions.1 and
    down_blocks.2.attentions.1."""
    from diffusers import UNet2DConditionModel

    from backend.engines.diffusers.ipadapter import mode_layers

    def layout(**kw):
        kw.setdefault("block_out_channels", (32, 32, 32, 32))
        return UNet2DConditionModel(norm_num_groups=8, cross_attention_dim=8,
                                    attention_head_dim=2, sample_size=8, **kw)

    sd15 = layout()  # the default blocks are SD1.5's
    sdxl = layout(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(32, 32, 32), layers_per_block=2)
    assert mode_layers(sd15, "style") == ("up_blocks.1.attentions.1.",)
    assert mode_layers(sd15, "composition") == ("down_blocks.2.attentions.1.",)
    assert mode_layers(sdxl, "style") == ("up_blocks.0.attentions.1.",)
    assert mode_layers(sdxl, "composition") == ("down_blocks.2.attentions.1.",)
    assert mode_layers(sd15, "reference") is None and mode_layers(sd15, "face") is None


def test_the_start_end_window_is_honoured(ref_engine, monkeypatch):
    from backend.engines.diffusers import ipadapter

    seen = []
    original = ipadapter.ReferenceAdapters.set_scales

    def record(self, scales):
        seen.append(tuple(scale for _, scale in scales))
        original(self, scales)

    monkeypatch.setattr(ipadapter.ReferenceAdapters, "set_scales", record)
    plain = pixels(ref_engine, request())
    whole = pixels(ref_engine, request(ReferenceUnit(image=REF)))
    seen.clear()
    late = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.8, start=0.5)))
    # 4 steps: off for steps 0 and 1, on for 2 and 3 (then the callback after the last)
    assert seen[:4] == [(0.0,), (0.0,), (0.8,), (0.8,)]
    seen.clear()
    early = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.8, end=0.5)))
    assert seen[:4] == [(0.8,), (0.8,), (0.0,), (0.0,)]
    # the last steps of a karras schedule change little (0.03 measured), the first most
    assert not np.array_equal(late, plain)
    for one, other in [(early, plain), (late, whole), (early, late)]:
        assert differ(one, other) > 0.5


def test_references_with_controlnets_img2img_and_inpaint(ref_engine):
    unit = ControlUnit(condition="lineart", image=LINES)
    modes = [dict(controls=(unit,)),
             dict(mode="img2img", init_image=INIT, strength=0.8),
             dict(mode="inpaint", init_image=INIT, mask_image=MASK, strength=1.0,
                  controls=(unit,))]
    for kw in modes:
        plain = pixels(ref_engine, request(**kw))
        ref = pixels(ref_engine, request(ReferenceUnit(image=REF), **kw))
        assert differ(ref, plain) > 0.5, kw
        zero = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.0), **kw))
        assert np.array_equal(zero, plain), kw
    # inpaint: outside the selection nothing changes, reference or not
    ref = pixels(ref_engine, request(ReferenceUnit(image=REF), **modes[2]))
    init = to_array(images()[INIT]).astype(np.int16)
    assert np.array_equal(ref[:8], init[:8])


def test_a_reference_on_the_tiny_sdxl(ref_engine):
    plain = pixels(ref_engine, request(base_model="tiny-sdxl"))
    ref = pixels(ref_engine, request(ReferenceUnit(image=REF), base_model="tiny-sdxl"))
    zero = pixels(ref_engine, request(ReferenceUnit(image=REF, weight=0.0),
                                      base_model="tiny-sdxl"))
    style = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="style"),
                                       base_model="tiny-sdxl"))
    assert differ(ref, plain) > 2.0 and differ(style, ref) > 1.0
    assert np.array_equal(zero, plain)


def test_a_hub_adapter_resolves_from_the_cache_and_runs(tiny_root, tmp_path):
    """``ip-adapter-sd15`` as h94/IP-Adapter lays it out in the hub cache (here: the tiny
    adapter's files under the real names; the encoder folder without a preprocessor
    config, as h94's)."""
    from backend.engines.diffusers.engine import DiffusersEngine

    folder = tiny_ipadapter.ensure_tiny_adapter("sd15", tiny_root)
    spec = references.ADAPTERS["ip-adapter-sd15"]
    cache = tmp_path / "hub"
    fake_hub_snapshot(cache, references.HUB_REPO, {
        spec.weight: (folder / tiny_ipadapter.WEIGHT_NAME).read_bytes(),
        f"{spec.encoder}/config.json": (folder / "image_encoder/config.json").read_bytes(),
        f"{spec.encoder}/model.safetensors":
            (folder / "image_encoder/model.safetensors").read_bytes()})
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   cache_dir=str(cache))), device="cpu")
    try:
        plain = pixels(engine, request())
        ref = pixels(engine, request(ReferenceUnit(image=REF, model="ip-adapter-sd15")))
        assert differ(ref, plain) > 2.0
    finally:
        engine.close()


def test_typed_refusals(ref_engine, tmp_path):
    # (face on the tiny models runs with the tiny plus-face adapter: test_ipadapter_flux)
    # an adapter of another family
    with pytest.raises(ReferenceUnsupported) as info:
        pixels(ref_engine, request(ReferenceUnit(image=REF, model="ip-adapter-sdxl-vit-h")))
    assert info.value.code == "reference_unsupported"
    assert info.value.field == "references[0].model" and "ip-adapter-sd15" in info.value.message
    # an unknown adapter: the known ones are named
    with pytest.raises(ModelMissing) as info:
        pixels(ref_engine, request(ReferenceUnit(image=REF, model="my-adapter")))
    assert "ip-adapter-plus-face-sd15" in info.value.message
    # not downloaded: the message gives the command
    with pytest.raises(ModelMissing) as info:
        pixels(ref_engine, request(ReferenceUnit(image=REF, model="ip-adapter-sd15")))
    assert "controlcanvas models download ip-adapter-sd15" in info.value.message
    with pytest.raises(ModelMissing) as info:
        references.resolve("", "face", "sdxl", "juggernaut", cache_dir=str(tmp_path))
    assert "models download ip-adapter-plus-face-sdxl-vit-h" in info.value.message
    # a face model for a plain reference is fine, a plain model for a face is not
    with pytest.raises(ReferenceUnsupported):
        references.resolve("ip-adapter-sd15", "face", "sd15", "sd", cache_dir=str(tmp_path))
    # a family without IP-Adapter: the message names the ones that have it
    with pytest.raises(ReferenceUnsupported) as info:
        references.resolve("", "reference", "sd3", "sd35", cache_dir=str(tmp_path))
    assert "SD15, SDXL and FLUX" in info.value.message and info.value.field == "references"
    # the engine keeps serving
    assert pixels(ref_engine, request()).shape == (H, W, 4)


def test_a_missing_reference_image_is_named(ref_engine):
    from shared.errors import EngineError

    req = request(ReferenceUnit(image=9))
    with pytest.raises(EngineError) as info:
        ref_engine.generate(req, images(), RecordingContext())
    assert info.value.field == "references[0].image"


# -----------------------------------------------------------------------------
# The protocol
# -----------------------------------------------------------------------------

def generate_dict(**request):
    req = {"width": 64, "height": 48, "prompt": "a fox"}
    req.update(request)
    return {"type": "generate", "job_id": JOB, "request": req}


def decode(obj):
    return from_json(json.dumps(obj), CLIENT_MESSAGES)


def test_references_round_trip_and_are_left_out_when_empty():
    msg = Generate(job_id=JOB, request=GenerateRequest(references=(
        ReferenceUnit(image=2, weight=0.7, start=0.1, end=0.9, mode="style"),
        ReferenceUnit(image=3, mode="face", model="ip-adapter-plus-face-sd15"))))
    back = from_json(to_json(msg), CLIENT_MESSAGES)
    assert back == msg
    assert back.slots() == (2, 3)  # the reference images travel as image slots
    # a request without references looks exactly as before (an older server takes it)
    assert "references" not in to_dict(Generate(job_id=JOB, request=GenerateRequest()))["request"]
    assert decode(generate_dict()).request.references == ()
    assert ReferenceUnit(image=0) == ReferenceUnit(image=0, weight=1.0, start=0.0, end=1.0,
                                                   mode="reference", model="")


@pytest.mark.parametrize("refs, field", [
    ([{"weight": 1.0}], "request.references[0].image"),
    ([{"image": -1}], "request.references[0].image"),
    ([{"image": 0, "weight": 2.5}], "request.references[0].weight"),
    ([{"image": 0, "weight": -0.1}], "request.references[0].weight"),
    ([{"image": 0, "start": 0.6, "end": 0.5}], "request.references[0].start"),
    ([{"image": 0, "end": 1.5}], "request.references[0].end"),
    ([{"image": 0, "mode": "faceid"}], "request.references[0].mode"),
    ([{"image": 0, "model": "../ip-adapter"}], "request.references[0].model"),
    ([{"image": 0, "model": "C:/x.safetensors"}], "request.references[0].model"),
    ([{"image": 0, "model": "Big"}], "request.references[0].model"),
    ([{"image": 0, "strength": 1}], "request.references[0].strength"),
    ([{"image": i} for i in range(MAX_REFERENCES + 1)], "request.references"),
    ({"image": 0}, "request.references"),
])
def test_bad_references_are_named(refs, field):
    with pytest.raises(FieldError) as info:
        decode(generate_dict(references=refs))
    assert info.value.field == field
    assert field in info.value.message


def test_the_most_references_fit():
    message = decode(generate_dict(references=[{"image": i} for i in range(MAX_REFERENCES)]))
    assert len(message.request.references) == MAX_REFERENCES


# -----------------------------------------------------------------------------
# The catalogue: `controlcanvas models` and `models download NAME`
# -----------------------------------------------------------------------------

# h94/IP-Adapter as the hub lists it (the files one adapter needs, and others; sizes rounded)
H94 = {"models/ip-adapter_sd15.safetensors": 44_600_000,
       "models/ip-adapter-plus-face_sd15.safetensors": 98_200_000,
       "models/image_encoder/config.json": 560,
       "models/image_encoder/model.safetensors": 2_530_000_000,
       "models/image_encoder/pytorch_model.bin": 2_530_000_000,
       "sdxl_models/ip-adapter_sdxl_vit-h.safetensors": 698_000_000,
       "sdxl_models/image_encoder/model.safetensors": 3_690_000_000}


def test_models_download_fetches_one_adapter_and_its_encoder(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    from backend.cli.main import main
    from test_downloads import FakeHub

    hub = FakeHub({references.HUB_REPO: H94})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    catalogue = Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf")))
    assert "ip-adapter-plus-face-sd15" in catalogue.download_names()
    plan = catalogue.download_plan("ip-adapter-sd15")
    assert {f.path for f in plan.files} == {"models/ip-adapter_sd15.safetensors",
                                           "models/image_encoder/config.json",
                                           "models/image_encoder/model.safetensors"}
    assert plan.describe().startswith("h94/IP-Adapter (IP-Adapter): models/ip-adapter_sd15")
    assert "2.57 GB" in plan.describe()
    said = []
    weight = catalogue.download("ip-adapter-sd15", progress=False, on_plan=said.append)
    assert said == [plan] and weight.name == "ip-adapter_sd15.safetensors"
    assert [sorted(patterns) for _, patterns, _ in hub.fetched] == [sorted(
        f.path for f in plan.files)]
    # now resolved from the cache, and a second download fetches nothing
    found = references.resolve("", "reference", "sd15", "sd", cache_dir=str(tmp_path / "hf"))
    assert found.weight == str(weight) and found.encoder.endswith("models/image_encoder")
    catalogue.download("ip-adapter-sd15", progress=False)
    assert len(hub.fetched) == 1
    # `controlcanvas models` lists it as ready, the others with their command
    (tmp_path / "config.toml").write_text(
        f'[models]\ncache_dir = "{(tmp_path / "hf").as_posix()}"\n', encoding="utf-8")
    assert main(["models", "--config", str(tmp_path / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["✓", "sd15", "ip-adapter"] for line in out.splitlines())
    assert "ip-adapter-sd15  (ready" in out
    assert "missing: controlcanvas models download ip-adapter-plus-face-sd15" in out


# -----------------------------------------------------------------------------
# A live frame in a pause of another job (live painting's preemption)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("batch_refs, live_refs", [
    ((ReferenceUnit(image=1, mode="style"),), ()),
    ((), (ReferenceUnit(image=1),)),
    ((ReferenceUnit(image=1, end=0.6),), (ReferenceUnit(image=1), ReferenceUnit(image=0))),
], ids=["batch-has-one", "frame-has-one", "other-adapters"])
def test_a_live_frame_in_a_pause_leaves_the_batchs_references_as_they_were(
        loop, tiny_root, batch_refs, live_refs):  # noqa: F811 - loop is a fixture
    from backend.engines.diffusers.engine import DiffusersEngine
    from backend.server.jobs import DONE, JobManager
    from shared.messages import new_job_id
    from tests.test_jobs import on_loop
    from tests.test_live import Owner, wait_for

    def engine():
        return DiffusersEngine(Catalogue(ModelConfig(
            tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"))),
            device="cpu")

    pictures = {0: lines_image(W, H, seed=4), 1: random_rgba(40, 40, seed=8)}
    batch_request = request(*batch_refs, steps=30, seed=5)
    live = request(*live_refs, steps=4, seed=9, cfg=1.0)
    shared_engine = engine()
    manager = JobManager(shared_engine, loop)
    a, b = Owner("a"), Owner("b")
    progress = []
    b.job_progress = lambda job, step, total, stage: progress.append(step)
    batch = on_loop(loop, manager.submit, Generate(job_id=new_job_id(), request=batch_request),
                    pictures, b)
    wait_for(lambda: len(progress) >= 3, timeout=60)
    frame = on_loop(loop, manager.submit, Generate(job_id=new_job_id(), request=live,
                                                   live=True), pictures, a)
    wait_for(lambda: a.outcome(frame.job_id) is not None, timeout=60)
    assert batch.state == "running"  # the live frame came during the batch
    wait_for(lambda: b.outcome(batch.job_id) is not None, timeout=120)
    manager.close()
    assert manager.live_stats["nested"] == 1 and b.outcome(batch.job_id)[0] == DONE
    (_, live_image), = a.outcome(frame.job_id)[2]
    (_, batch_image), = b.outcome(batch.job_id)[2]
    alone = engine()
    for req, image in ((batch_request, batch_image), (live, live_image)):
        out = alone.generate(req, pictures, RecordingContext())
        assert np.array_equal(to_array(image), to_array(out[0].image))
    alone.close()
    shared_engine.close()


def test_a_reference_and_a_lora_together(tiny_root, tiny_lora_dir):  # noqa: F811
    from backend.engines.diffusers.engine import DiffusersEngine
    from shared.messages import LoraRef

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"),
        lora_dir=str(tiny_lora_dir))), device="cpu")
    try:
        ink = (LoraRef("ink", 1.0),)
        ref = pixels(engine, request(ReferenceUnit(image=REF)))
        lora = pixels(engine, request(loras=ink))
        both = pixels(engine, request(ReferenceUnit(image=REF), loras=ink))
        assert differ(both, ref) > 1.0 and differ(both, lora) > 1.0
        assert np.array_equal(pixels(engine, request(ReferenceUnit(image=REF))), ref)
        assert np.array_equal(pixels(engine, request(loras=ink)), lora)
        assert engine.stats["loads"] == 1
    finally:
        engine.close()
