"""IP-Adapter references beyond the plain SD adapter: the "plus" and "plus-face" adapters
(IP-Adapter Plus's Resampler image projection, face mode) on the tiny SD1.5 / SDXL models,
and references on Flux.1 (XLabs-AI/flux-ip-adapter's layout, read by diffusers'
``FluxIPAdapterMixin``) on the tiny Flux stack.  The adapters are tiny ones built locally
(``backend.engines.tiny_ipadapter``) in the layouts the real files have.

What a user would notice: face references run (and say how to download the face adapter
when it is missing); a Flux reference changes the picture, weight 0 is no reference bit for
bit, a seed gives the same pixels, toggling reloads nothing, the window is honoured, it
works beside a Flux ControlNet unit, and the modes Flux cannot serve are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from backend.engines import references, tiny_ipadapter
from backend.engines.catalogue import Catalogue, ModelConfig
from shared.errors import ModelMissing, ReferenceUnsupported, Unsupported
from shared.messages import ControlUnit, ReferenceUnit

from tiny_fixtures import fake_hub_snapshot, tiny_root, torch_threads  # noqa: F401
from tests.test_ipadapter import REF, OTHER, LINES, INIT, MASK, differ, pixels, request

FLUX = "tiny-flux"


@pytest.fixture
def ref_engine(tiny_root):  # noqa: F811 - tiny_root is a fixture
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"))), device="cpu")
    yield engine
    engine.close()


def flux(*refs, **kw):
    kw.setdefault("base_model", FLUX)
    return request(*refs, **kw)


# -----------------------------------------------------------------------------
# plus and plus-face (SD1.5 / SDXL)
# -----------------------------------------------------------------------------

def test_the_tiny_plus_file_is_the_layout_diffusers_converts(tiny_root):  # noqa: F811
    """The tiny plus adapter's ``image_proj.*`` keys are IP-Adapter Plus's originals:
    diffusers' converter builds an IPAdapterPlusImageProjection from them, every weight
    placed (a strict load)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import load_file

    from backend.engines import tiny

    folder = tiny_ipadapter.ensure_tiny_adapter("sd15", tiny_root)
    unet = UNet2DConditionModel.from_pretrained(tiny.ensure_tiny("sd15", tiny_root) / "unet")
    for name in (tiny_ipadapter.PLUS_NAME, tiny_ipadapter.FACE_NAME):
        tensors = load_file(str(folder / name))
        proj = {k[len("image_proj."):]: v for k, v in tensors.items()
                if k.startswith("image_proj.")}
        assert "latents" in proj and "layers.3.0.to_kv.weight" in proj
        module = unet._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False)
        assert isinstance(module, IPAdapterPlusImageProjection)
        assert module.latents.shape[1] == tiny_ipadapter.PLUS_TOKENS


def test_face_and_plus_references_run_on_the_tiny_models(ref_engine):
    plain = pixels(ref_engine, request())
    whole = pixels(ref_engine, request(ReferenceUnit(image=REF)))
    face = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="face")))
    plus = pixels(ref_engine, request(ReferenceUnit(image=REF, model="tiny-plus")))
    assert differ(face, plain) > 2.0 and differ(plus, plain) > 2.0  # (8.8, 10.2 measured)
    assert differ(face, plus) > 1.0 and differ(face, whole) > 1.0
    # switching between plain and plus adapters (their projections differ) and off again
    assert np.array_equal(pixels(ref_engine, request()), plain)
    assert np.array_equal(pixels(ref_engine, request(ReferenceUnit(image=REF, mode="face"))),
                          face)
    assert np.array_equal(pixels(ref_engine, request(ReferenceUnit(image=REF))), whole)
    zero = pixels(ref_engine, request(ReferenceUnit(image=REF, mode="face", weight=0.0)))
    assert np.array_equal(zero, plain)
    assert ref_engine.stats["loads"] == 1
    # a plus reference and a face reference at once (two Resamplers)
    both = pixels(ref_engine, request(ReferenceUnit(image=OTHER, model="tiny-plus"),
                                      ReferenceUnit(image=REF, mode="face")))
    assert differ(both, face) > 1.0
    sdxl = dict(base_model="tiny-sdxl")
    assert differ(pixels(ref_engine, request(ReferenceUnit(image=REF, mode="face"), **sdxl)),
                  pixels(ref_engine, request(**sdxl))) > 2.0


def test_face_on_a_tiny_base_wants_a_face_model(ref_engine):
    with pytest.raises(ReferenceUnsupported) as info:
        pixels(ref_engine, request(ReferenceUnit(image=REF, mode="face", model="tiny-plus")))
    assert info.value.field == "references[0].model" and "tiny-plus-face" in info.value.message


def _hub(tmp_path, tiny_root, name, weight_file, family="sd15"):  # noqa: F811
    """Adapter ``name`` laid out in a hub cache (the tiny files under the real names; the
    encoder folder without a preprocessor config, as h94's and openai's)."""
    folder = tiny_ipadapter.ensure_tiny_adapter(family, tiny_root)
    spec = references.ADAPTERS[name]
    encoder = {f"{spec.encoder}/{f}" if spec.encoder else f:
               (folder / tiny_ipadapter.ENCODER / f).read_bytes()
               for f in references.ENCODER_FILES}
    weight = {spec.weight: (folder / weight_file).read_bytes()}
    cache = tmp_path / "hub"
    if spec.encoder_repo:
        fake_hub_snapshot(cache, spec.repo, weight)
        fake_hub_snapshot(cache, spec.encoder_repo, encoder)
    else:
        fake_hub_snapshot(cache, spec.repo, dict(weight, **encoder))
    return cache


def test_a_hub_face_adapter_runs_when_downloaded_and_names_its_download_when_not(
        ref_engine, tiny_root, tmp_path):  # noqa: F811
    from backend.engines.diffusers.engine import DiffusersEngine

    face = ReferenceUnit(image=REF, mode="face", model="ip-adapter-plus-face-sd15")
    with pytest.raises(ModelMissing) as info:
        pixels(ref_engine, request(face))
    assert "controlcanvas models download ip-adapter-plus-face-sd15" in info.value.message
    assert "face IP-Adapter" in info.value.message
    cache = _hub(tmp_path, tiny_root, "ip-adapter-plus-face-sd15", tiny_ipadapter.FACE_NAME)
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   cache_dir=str(cache))), device="cpu")
    try:
        plain = pixels(engine, request())
        hub_face = pixels(engine, request(face))
        assert differ(hub_face, plain) > 2.0
        # the same bytes as the built-in tiny face adapter: the same pixels
        assert np.array_equal(hub_face, pixels(engine, request(ReferenceUnit(
            image=REF, mode="face"))))
    finally:
        engine.close()


# -----------------------------------------------------------------------------
# Flux.1
# -----------------------------------------------------------------------------

def test_the_tiny_flux_file_is_xlabs_layout_as_diffusers_reads_it(tiny_root):  # noqa: F811
    """diffusers' own reader of an XLabs file (``load_ip_adapter`` given the folder) and
    the engine's (the file's keys converted here, given as a state dict) load the same
    weights into the same processors."""
    import torch
    from diffusers import FluxPipeline

    from backend.engines import tiny
    from backend.engines.diffusers.ipadapter import _flux_key

    folder = tiny_ipadapter.ensure_tiny_adapter("flux", tiny_root)
    pipe = FluxPipeline.from_pretrained(tiny.ensure_tiny("flux", tiny_root),
                                        local_files_only=True)
    pipe.load_ip_adapter(str(folder), weight_name=tiny_ipadapter.FLUX_WEIGHT_NAME,
                         image_encoder_pretrained_model_name_or_path=None,
                         local_files_only=True)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / tiny_ipadapter.FLUX_WEIGHT_NAME))
    assert any(k.startswith("double_blocks.0.processor.ip_adapter_double_stream_k_proj")
               for k in tensors)
    ours = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, name = _flux_key(key)
        ours[part][name] = value
    procs = [p for p in pipe.transformer.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(procs) == 1  # one double-stream block in the tiny stack
    assert torch.equal(procs[0].to_k_ip[0].weight, ours["ip_adapter"]["0.to_k_ip.weight"])
    assert torch.equal(procs[0].to_v_ip[0].bias, ours["ip_adapter"]["0.to_v_ip.bias"])
    proj = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(proj.image_embeds.weight, ours["image_proj"]["proj.weight"])


def test_a_flux_reference_changes_the_picture_and_weight_zero_is_none(ref_engine):
    plain = pixels(ref_engine, flux())
    zero = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.0)))
    ref = pixels(ref_engine, flux(ReferenceUnit(image=REF)))
    assert np.array_equal(zero, plain)  # bit for bit
    assert differ(ref, plain) > 2.0  # (16.2 measured)
    assert np.array_equal(pixels(ref_engine, flux(ReferenceUnit(image=REF))), ref)
    assert np.array_equal(pixels(ref_engine, flux()), plain)
    assert differ(pixels(ref_engine, flux(ReferenceUnit(image=OTHER))), ref) > 2.0
    half = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.5)))
    assert 0 < differ(half, plain) < differ(ref, plain)
    # toggling reloaded neither the base nor the adapter
    assert ref_engine.stats["loads"] == 1 and ref_engine.stats["ip_adapter_loads"] == 1
    # two references: two slots, the adapter weights once more, still not the base
    two = pixels(ref_engine, flux(ReferenceUnit(image=REF), ReferenceUnit(image=OTHER)))
    assert differ(two, ref) > 1.0
    assert ref_engine.stats["loads"] == 1 and ref_engine.stats["ip_adapter_loads"] == 2


def test_the_flux_window_is_honoured(ref_engine, monkeypatch):
    from backend.engines.diffusers import ipadapter

    seen = []
    original = ipadapter.ReferenceAdapters.set_scales

    def record(self, scales):
        seen.append(tuple(scale for _, scale in scales))
        original(self, scales)

    monkeypatch.setattr(ipadapter.ReferenceAdapters, "set_scales", record)
    whole = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.8)))
    seen.clear()
    late = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.8, start=0.5)))
    assert seen[:4] == [(0.0,), (0.0,), (0.8,), (0.8,)]
    seen.clear()
    early = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.8, end=0.5)))
    assert seen[:4] == [(0.8,), (0.8,), (0.0,), (0.0,)]
    for one, other in [(late, whole), (early, whole), (early, late)]:
        assert differ(one, other) > 0.5


def test_a_flux_reference_with_a_controlnet_unit_img2img_and_inpaint(ref_engine):
    unit = ControlUnit(condition="lineart", image=LINES)
    for kw in [dict(controls=(unit,)), dict(mode="img2img", init_image=INIT, strength=0.8),
               dict(mode="inpaint", init_image=INIT, mask_image=MASK, strength=1.0)]:
        plain = pixels(ref_engine, flux(**kw))
        ref = pixels(ref_engine, flux(ReferenceUnit(image=REF), **kw))
        assert differ(ref, plain) > 0.5, kw
        zero = pixels(ref_engine, flux(ReferenceUnit(image=REF, weight=0.0), **kw))
        assert np.array_equal(zero, plain), kw
    # the base and the ControlNet once each, the adapter once
    assert ref_engine.stats["loads"] == 2 and ref_engine.stats["ip_adapter_loads"] == 1


def test_flux_refuses_what_it_cannot_serve_by_name(ref_engine, tmp_path):
    for mode in ("style", "composition", "face"):
        with pytest.raises(ReferenceUnsupported) as info:
            pixels(ref_engine, flux(ReferenceUnit(image=REF, mode=mode)))
        assert info.value.field == "references[0].mode"
        assert "'reference'" in info.value.message and mode in info.value.message
    # an SD adapter on Flux names Flux's
    with pytest.raises(ReferenceUnsupported) as info:
        pixels(ref_engine, flux(ReferenceUnit(image=REF, model="ip-adapter-sd15")))
    assert "ip-adapter-flux" in info.value.message
    # diffusers' Flux ControlNet img2img pipeline takes no IP-Adapter
    unit = ControlUnit(condition="lineart", image=LINES)
    with pytest.raises(Unsupported) as info:
        pixels(ref_engine, flux(ReferenceUnit(image=REF), controls=(unit,), mode="img2img",
                                init_image=INIT, strength=0.8))
    assert info.value.field == "references" and "txt2img" in info.value.message
    # not downloaded: the command; a family without adapters is still refused
    with pytest.raises(ModelMissing) as info:
        pixels(ref_engine, flux(ReferenceUnit(image=REF, model="ip-adapter-flux")))
    assert "controlcanvas models download ip-adapter-flux" in info.value.message
    with pytest.raises(ReferenceUnsupported) as info:
        references.resolve("", "reference", "sd3", "sd35", cache_dir=str(tmp_path))
    assert "SD15, SDXL and FLUX" in info.value.message
    # the engine keeps serving
    assert pixels(ref_engine, flux()).shape[2] == 4


def test_the_hub_flux_adapter_runs_from_two_repos(tiny_root, tmp_path):  # noqa: F811
    """``ip-adapter-flux`` as XLabs-AI/flux-ip-adapter + openai/clip-vit-large-patch14 lay it
    out in the hub cache (the tiny files under the real names)."""
    from backend.engines.diffusers.engine import DiffusersEngine

    cache = _hub(tmp_path, tiny_root, "ip-adapter-flux", tiny_ipadapter.FLUX_WEIGHT_NAME,
                 family="flux")
    found = references.resolve("", "reference", "flux", "flux-dev", cache_dir=str(cache))
    assert "XLabs-AI--flux-ip-adapter" in found.weight
    assert "openai--clip-vit-large-patch14" in found.encoder
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   cache_dir=str(cache))), device="cpu")
    try:
        plain = pixels(engine, flux())
        hub = pixels(engine, flux(ReferenceUnit(image=REF, model="ip-adapter-flux")))
        assert differ(hub, plain) > 2.0
    finally:
        engine.close()


def test_models_download_fetches_the_flux_adapter_and_its_encoder(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    from test_downloads import FakeHub

    hub = FakeHub({references.FLUX_REPO: {"ip_adapter.safetensors": 982_000_000,
                                          "README.md": 3000},
                   references.CLIP_L: {"config.json": 4500, "model.safetensors": 1_710_000_000,
                                       "pytorch_model.bin": 1_710_000_000}})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    catalogue = Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf")))
    assert "ip-adapter-flux" in catalogue.download_names()
    assert catalogue.download_target("ip-adapter-flux") == (references.FLUX_REPO, "ipadapter")
    said = []
    weight = catalogue.download("ip-adapter-flux", progress=False, on_plan=said.append)
    assert [p.repo_id for p in said] == [references.FLUX_REPO, references.CLIP_L]
    assert weight.name == "ip_adapter.safetensors"
    assert [(repo, sorted(patterns)) for repo, patterns, _ in hub.fetched] == [
        (references.FLUX_REPO, ["ip_adapter.safetensors"]),
        (references.CLIP_L, ["config.json", "model.safetensors"])]
    found = references.resolve("", "reference", "flux", "flux-dev",
                               cache_dir=str(tmp_path / "hf"))
    assert found.weight == str(weight)
    catalogue.download("ip-adapter-flux", progress=False)
    assert len(hub.fetched) == 2  # nothing more
    listed = {row[0]: row for row in references.listing(str(tmp_path / "hf"))}
    assert listed["ip-adapter-flux"][2] and "Non-Commercial" in listed["ip-adapter-flux"][3]


def test_a_kontext_edit_takes_a_flux_reference(ref_engine):
    """The tiny Flux stack as a FLUX.1 Kontext edit base: FluxKontextPipeline takes the
    reference as FluxPipeline does (weight 0: the edit without it, bit for bit)."""
    from backend.engines import tiny_kontext

    def edit(*refs):
        return pixels(ref_engine, request(*refs, mode="edit", prompt="make it red", cfg=2.5,
                                          steps=3, base_model=tiny_kontext.NAME,
                                          init_image=INIT))

    plain = edit()
    assert differ(edit(ReferenceUnit(image=REF)), plain) > 2.0  # (16.1 measured)
    assert np.array_equal(edit(ReferenceUnit(image=REF, weight=0.0)), plain)
