"""LoRAs: the folder and the family read from a file's tensors, the engine on the tiny
models (a LoRA changes the picture, strength 0 is no LoRA bit for bit, LoRAs stay loaded
so switching them reloads nothing), typed refusals, the server and the command line.

The tiny LoRAs are made here with peft on the tiny UNets (``tiny_fixtures.make_tiny_lora``);
real-size LoRAs are too big to build, so their family detection is checked on files
that carry real-size tensor names and shapes (zeros)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from backend.engines import tiny
from backend.engines.catalogue import Catalogue, ModelConfig
from backend.engines.loras import LoraFolder, family_of_tensors, fit_problem, LoraFile
from backend.imaging import to_array
from shared.errors import FieldError, LoraMismatch, ModelMissing
from shared.messages import GenerateRequest, LoraRef

from tiny_fixtures import (FLUX_DIFFUSERS, SD15_KOHYA, SDXL_KOHYA,  # noqa: F401
                           RecordingContext, lora_engine, make_header_lora, random_rgba,
                           tiny_lora_dir, tiny_root, torch_threads)

W = H = 64


def request(*loras, **kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 3)
    kw.setdefault("base_model", "tiny-sd15")
    return GenerateRequest(loras=tuple(LoraRef(name, strength) for name, strength in loras),
                           **kw)


def pixels(engine, req, images=None) -> np.ndarray:
    out = engine.generate(req, images or {}, RecordingContext())
    return to_array(out[0].image).astype(np.int16)


# -----------------------------------------------------------------------------
# The engine
# -----------------------------------------------------------------------------

def test_a_lora_changes_the_picture_and_strength_zero_is_no_lora(lora_engine):
    plain = pixels(lora_engine, request())
    zero = pixels(lora_engine, request(("ink", 0.0)))
    ink = pixels(lora_engine, request(("ink", 1.0)))
    assert np.array_equal(zero, plain)  # bit for bit
    assert np.abs(ink - plain).mean() > 1.0  # (4.8 measured)
    # Same seed, same pixels; and a LoRA leaves nothing behind once it is not asked for.
    assert np.array_equal(pixels(lora_engine, request(("ink", 1.0))), ink)
    assert np.array_equal(pixels(lora_engine, request()), plain)
    assert np.array_equal(pixels(lora_engine, request(("ink", 0.0))), plain)


def test_strength_scales_and_can_be_negative(lora_engine):
    plain = pixels(lora_engine, request())
    full = pixels(lora_engine, request(("ink", 1.0)))
    half = pixels(lora_engine, request(("ink", 0.5)))
    negative = pixels(lora_engine, request(("ink", -1.0)))
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()
    assert np.abs(negative - plain).mean() > 1.0 and np.abs(negative - full).mean() > 1.0


def test_two_loras_at_once_and_a_text_encoder_part(lora_engine):
    plain = pixels(lora_engine, request())
    ink = pixels(lora_engine, request(("ink", 1.0)))
    paper = pixels(lora_engine, request(("paper", 1.0)))  # UNet + text encoder
    both = pixels(lora_engine, request(("ink", 1.0), ("paper", 0.7)))
    for one in (plain, ink, paper):
        assert np.abs(both - one).mean() > 1.0
    # paper's text-encoder part alone counts: its adapters are in the text encoder too
    entry = next(iter(lora_engine._bases.values()))
    assert set(entry.pipe.get_list_adapters()) == {"unet", "text_encoder"}
    # a LoRA at strength 0 beside another is left out: the same as that other one alone
    assert np.array_equal(pixels(lora_engine, request(("ink", 1.0), ("paper", 0.0))), ink)


def test_switching_loras_reloads_neither_the_base_nor_a_lora(lora_engine):
    first = pixels(lora_engine, request(("ink", 1.0)))
    assert lora_engine.stats["loads"] == 1 and lora_engine.stats["lora_loads"] == 1
    pixels(lora_engine, request(("paper", 1.0)))
    pixels(lora_engine, request())
    pixels(lora_engine, request(("paper", 0.5), ("ink", 1.0)))
    again = pixels(lora_engine, request(("ink", 1.0)))
    assert lora_engine.stats["loads"] == 1  # the base was loaded once
    assert lora_engine.stats["lora_loads"] == 2  # each LoRA file once
    assert np.array_equal(again, first)


def test_loras_work_in_every_mode_with_a_controlnet(lora_engine):
    canvas = random_rgba(W, H, seed=3)
    mask = np.zeros((H, W, 4), np.uint8)
    mask[16:48, 16:48] = 255
    mask[..., 3] = 255
    lines = np.zeros((H, W, 4), np.uint8)
    lines[::9, :, :] = 255
    lines[..., 3] = 255
    from backend.imaging import from_array
    from shared.messages import ControlUnit
    images = {0: from_array(lines), 1: canvas, 2: from_array(mask)}
    unit = (ControlUnit(condition="lineart", image=0),)
    for mode, extra in (("txt2img", {}), ("img2img", {"init_image": 1, "strength": 0.8}),
                        ("inpaint", {"init_image": 1, "mask_image": 2, "strength": 0.8})):
        plain = pixels(lora_engine, request(mode=mode, controls=unit, **extra), images)
        ink = pixels(lora_engine, request(("ink", 1.0), mode=mode, controls=unit, **extra),
                     images)
        assert np.abs(ink - plain).mean() > 0.3, mode
        if mode == "inpaint":  # unselected pixels stay the canvas', LoRA or not
            outside = mask[..., 0] == 0
            assert np.array_equal(ink[outside], to_array(canvas)[outside])


def test_an_sdxl_lora_on_the_sdxl_base(lora_engine):
    plain = pixels(lora_engine, request(base_model="tiny-sdxl"))
    xl = pixels(lora_engine, request(("xl_ink", 1.0), base_model="tiny-sdxl"))
    assert np.abs(xl - plain).mean() > 1.0
    assert np.array_equal(pixels(lora_engine, request(("xl_ink", 0.0), base_model="tiny-sdxl")),
                          plain)


def test_kohya_names_load_like_the_diffusers_file(lora_engine):
    assert np.array_equal(pixels(lora_engine, request(("ink_kohya", 1.0))),
                          pixels(lora_engine, request(("ink", 1.0))))


@pytest.mark.parametrize("name, base, says", [
    ("xl_ink", "tiny-sd15", f"{sum(tiny.TEXT_WIDTHS.values())}-wide"),  # tiny SDXL: by width
    ("sdxl_size", "tiny-sd15", "SDXL base models"),
    ("flux_size", "tiny-sd15", "Flux base models"),
    ("ink", "tiny-sdxl", "32-wide"),
    ("sd15_size", "tiny-sdxl", "SD1.5 base models"),
])
def test_a_lora_of_another_family_is_refused_before_loading(lora_engine, name, base, says):
    with pytest.raises(LoraMismatch) as info:
        lora_engine.generate(request(("ink" if base == "tiny-sd15" else "xl_ink", 1.0),
                                     (name, 1.0), base_model=base), {}, RecordingContext())
    err = info.value
    assert err.code == "lora_mismatch" and err.field == "loras[1].name"
    assert says in err.message and repr(name) in err.message and repr(base) in err.message
    assert lora_engine.stats["lora_loads"] == 0  # nothing was loaded, not even the good one
    assert pixels(lora_engine, request(base_model=base)).shape == (H, W, 4)  # still works


def test_a_missing_lora_lists_what_exists(lora_engine, tiny_lora_dir):
    with pytest.raises(ModelMissing) as info:
        pixels(lora_engine, request(("inc", 1.0)))
    assert info.value.field == "loras[0].name"
    for name in ("'inc'", "ink", "paper", "xl_ink"):
        assert name in info.value.message
    assert str(tiny_lora_dir) not in info.value.message  # no server paths to a client


def test_a_pickle_lora_is_not_loaded(tmp_path, tiny_root):
    (tmp_path / "old.ckpt").write_bytes(b"not loaded")
    (tmp_path / "older.pt").write_bytes(b"not loaded")
    folder = LoraFolder(tmp_path)
    assert folder.scan() == []
    with pytest.raises(ModelMissing, match=r"'old' is a .ckpt file.*safetensors") as info:
        folder.find("old")
    assert str(tmp_path) not in info.value.message


def test_a_replaced_file_is_loaded_again(tmp_path, tiny_root, tiny_lora_dir, lora_engine):
    from backend.engines.diffusers.engine import DiffusersEngine

    ink = pixels(lora_engine, request(("ink", 1.0)))
    paper = pixels(lora_engine, request(("paper", 1.0)))
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   lora_dir=str(tmp_path))), device="cpu")
    shutil.copy(tiny_lora_dir / "ink.safetensors", tmp_path / "style.safetensors")
    assert np.array_equal(pixels(engine, request(("style", 1.0))), ink)
    shutil.copy(tiny_lora_dir / "paper.safetensors", tmp_path / "style.safetensors")
    os.utime(tmp_path / "style.safetensors", ns=(1, 1))  # another version, whatever the clock
    assert np.array_equal(pixels(engine, request(("style", 1.0))), paper)
    assert engine.stats["loads"] == 1 and engine.stats["lora_loads"] == 2
    engine.close()


def test_the_loaded_adapters_are_bounded(lora_engine, monkeypatch):
    from backend.engines.diffusers import lora

    monkeypatch.setattr(lora, "MAX_LOADED", 2)
    ink = pixels(lora_engine, request(("ink", 1.0)))
    pixels(lora_engine, request(("paper", 1.0)))
    pixels(lora_engine, request(("ink_kohya", 1.0)))  # ink, the least recently used, goes
    entry = next(iter(lora_engine._bases.values()))
    assert len(entry.loras.loaded) == 2
    assert sorted(entry.pipe.get_list_adapters()["unet"]) == ["lora2", "lora3"]
    assert np.array_equal(pixels(lora_engine, request(("ink", 1.0))), ink)  # loaded again
    assert lora_engine.stats["lora_loads"] == 4
    # more LoRAs in one request than the bound: all of them stay for that request
    both = pixels(lora_engine, request(("ink", 1.0), ("paper", 1.0), ("ink_kohya", 1.0)))
    assert both.shape == (H, W, 4) and len(entry.loras.loaded) == 3


def test_loaded_adapters_count_in_the_memory_budget(lora_engine):
    pixels(lora_engine, request())
    entry = next(iter(lora_engine._bases.values()))
    before = entry.nbytes
    pixels(lora_engine, request(("ink", 1.0)))
    assert entry.nbytes > before and entry.nbytes - before == entry.loras.nbytes > 0


def test_loras_on_the_fast_path_split_the_fused_attention(tiny_root, tiny_lora_dir,
                                                         lora_engine):
    """fuse_qkv merges (and drops) the to_q/to_k/to_v a LoRA adapts: the first LoRA splits
    them back, so the LoRA takes full effect, exactly as on a base that was never fused;
    the UNet runs uncompiled (a graph would specialise on the strengths)."""
    from backend.engines.diffusers.compiled import compiled_forward
    from backend.engines.diffusers.engine import DiffusersEngine

    fast = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                 lora_dir=str(tiny_lora_dir))),
                           device="cpu", fast_options={"fuse_qkv": True, "compile": True})
    unet = None
    try:
        ink = pixels(fast, request(("ink", 1.0), ("paper", 0.5)))
        unet = next(iter(fast._bases.values())).pipe.unet
        assert compiled_forward(unet) is None and fast.stats["compile_s"] == 0
        assert not any(getattr(m, "fused_projections", False) for m in unet.modules())
        assert np.array_equal(ink, pixels(lora_engine, request(("ink", 1.0), ("paper", 0.5))))
        assert np.array_equal(pixels(fast, request()), pixels(lora_engine, request()))
    finally:
        fast.close()


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_loras_in_fp16_with_and_without_offload(tiny_root, tiny_lora_dir, offload):
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   lora_dir=str(tiny_lora_dir))),
                             offload=offload)
    plain = pixels(engine, request())
    ink = pixels(engine, request(("ink", 1.0), ("paper", 0.5)))  # loads while offloaded
    assert np.abs(ink - plain).mean() > 1.0
    assert np.array_equal(pixels(engine, request(("ink", 0.0))), plain)
    assert np.array_equal(pixels(engine, request(("ink", 1.0), ("paper", 0.5))), ink)
    engine.close()


# -----------------------------------------------------------------------------
# The folder and the family (no torch)
# -----------------------------------------------------------------------------

def test_models_lists_the_loras_with_their_family_and_size(lora_engine, tiny_lora_dir):
    listed = {lora.name: lora for lora in lora_engine.models().loras}
    assert sorted(listed) == ["flux_size", "ink", "ink_kohya", "paper", "sd15_size",
                              "sdxl_size", "xl_ink"]
    assert {n: listed[n].family for n in ("sd15_size", "sdxl_size", "flux_size")} == \
        {"sd15_size": "sd15", "sdxl_size": "sdxl", "flux_size": "flux"}
    assert listed["ink"].family == "unknown"  # 32-wide: the tiny model, no real family
    assert listed["ink"].size == (tiny_lora_dir / "ink.safetensors").stat().st_size


def test_the_family_comes_from_the_tensors_never_the_name(tmp_path):
    make_header_lora(tmp_path / "sd15 portrait.safetensors", SDXL_KOHYA)
    make_header_lora(tmp_path / "sdxl_flux.safetensors", SD15_KOHYA)
    families = {lora.name: lora.family for lora in LoraFolder(tmp_path).scan()}
    assert families == {"sd15 portrait": "sdxl", "sdxl_flux": "sd15"}


@pytest.mark.parametrize("shapes, metadata, family", [
    (SD15_KOHYA, None, "sd15"),
    (SDXL_KOHYA, None, "sdxl"),
    (FLUX_DIFFUSERS, None, "flux"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight":
      (8, 2048)}, None, "sdxl"),
    ({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight":
      (8, 768)}, None, "sd15"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
      (8, 1024)}, None, "sd2"),
    ({"lora_unet_single_blocks_0_linear1.lora_down.weight": (16, 3072)}, None, "flux"),
    ({"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": (16, 1536)}, None,
     "sd3"),
    ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (16, 1536)}, None,
     "sd3"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
     None, "sdxl"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
     None, "sd15"),
    ({"lora_unet_something.lora_down.weight": (4, 320)}, {"ss_base_model_version":
                                                          "sdxl_base_v1-0"}, "sdxl"),
    ({"lora_unet_something.lora_down.weight": (4, 320)}, None, "unknown"),
])
def test_family_of_tensors(shapes, metadata, family):
    assert family_of_tensors(shapes, metadata)[0] == family


def test_the_folder_reads_only_its_own_safetensors_files(tmp_path):
    folder = tmp_path / "loras"
    outside = make_header_lora(tmp_path / "elsewhere" / "secret.safetensors", SD15_KOHYA)
    make_header_lora(folder / "good.safetensors", SD15_KOHYA)
    make_header_lora(folder / "Upper.SAFETENSORS", SD15_KOHYA)
    make_header_lora(folder / "sub" / "nested.safetensors", SD15_KOHYA)
    make_header_lora(folder / ".hidden.safetensors", SD15_KOHYA)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (folder / "notes.txt").write_text("hi")
    if sys.platform != "win32":
        os.symlink(folder / "good.safetensors", folder / "alias.safetensors")
        os.symlink(outside, folder / "escape.safetensors")
        os.symlink(folder / "missing", folder / "dangling.safetensors")
    listed = {lora.name: lora.family for lora in LoraFolder(folder).scan()}
    expected = {"good": "sd15", "Upper": "sd15", "broken": "unknown"}
    if sys.platform != "win32":
        expected["alias"] = "sd15"  # a link inside the folder is fine; out of it, not
    assert listed == expected
    with pytest.raises(ModelMissing):
        LoraFolder(folder).find("escape")
    assert LoraFolder(tmp_path / "no such folder").scan() == []


def test_fit_problem_by_width_then_by_family():
    def lora(family, width):
        return LoraFile("x", None, family, width, 1, 1)
    assert fit_problem(lora("unknown", 32), "tiny", "sd15", 32) == ""
    assert "64-wide" in fit_problem(lora("unknown", 64), "tiny", "sd15", 32)
    assert fit_problem(lora("sdxl", 2048), "xl", "sdxl", 2048) == ""
    assert "Flux base models" in fit_problem(lora("flux", 0), "xl", "sdxl", 2048)
    assert fit_problem(lora("flux", 0), "dev", "flux", 0) == ""  # a transformer base
    assert "SDXL base models" in fit_problem(lora("sdxl", 0), "dev", "flux", 0)
    assert fit_problem(lora("unknown", 0), "dev", "flux", 0) == ""  # left to the loader


# -----------------------------------------------------------------------------
# Configuration, the server and the command line
# -----------------------------------------------------------------------------

def test_the_lora_folder_comes_from_config_or_the_data_folder(tmp_path, monkeypatch):
    from backend.engines.loras import default_lora_dir

    monkeypatch.setenv("CONTROLCANVAS_DATA_DIR", str(tmp_path / "data"))
    assert default_lora_dir() == tmp_path / "data" / "models" / "loras"
    assert Catalogue(ModelConfig()).loras.folder == tmp_path / "data" / "models" / "loras"
    config = tmp_path / "config.toml"
    config.write_text('[models]\nlora_dir = "/srv/my loras"\n', encoding="utf-8")
    assert ModelConfig.from_toml(config).lora_dir == "/srv/my loras"
    config.write_text("[models]\nlora_dir = 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lora_dir must be a string"):
        ModelConfig.from_toml(config)


def test_serve_lora_dir_reaches_the_engine(tmp_path, torch_threads):
    from backend.cli.main import _server_overrides, build_parser
    from backend.engines.diffusers.engine import DiffusersEngine
    from backend.engines.factory import create_engine

    args = build_parser().parse_args(["serve", "--lora-dir", str(tmp_path)])
    options = _server_overrides(args)["engine_options"]
    assert options["lora_dir"] == tmp_path
    config = tmp_path / "config.toml"
    config.write_text('[models]\nlora_dir = "/elsewhere"\n', encoding="utf-8")
    engine = DiffusersEngine.from_options({"lora_dir": tmp_path, "device": "cpu"}, config)
    assert engine.catalogue.loras.folder == tmp_path  # the flag wins over the file
    assert create_engine("tiny", device="cpu", lora_dir=tmp_path).catalogue.loras.folder \
        == tmp_path


def test_generate_and_models_through_the_real_server(make_server, lora_engine):
    from shared.client import Client

    server = make_server(lora_engine)
    with Client.connect(server.url, server.token) as client:
        models = client.models()
        assert {(m.name, m.family) for m in models.loras} >= {("ink", "unknown"),
                                                              ("sdxl_size", "sdxl")}
        plain = client.wait(client.submit(request(), {}))
        ink = client.wait(client.submit(request(("ink", 1.0)), {}))
        zero = client.wait(client.submit(request(("ink", 0.0)), {}))
        with pytest.raises(LoraMismatch, match="SDXL"):
            client.wait(client.submit(request(("sdxl_size", 1.0)), {}))
        with pytest.raises(ModelMissing, match="ink"):
            client.wait(client.submit(request(("nope", 1.0)), {}))
    plain, ink, zero = (to_array(r.images[0][1]).astype(int) for r in (plain, ink, zero))
    assert np.array_equal(zero, plain)
    assert np.abs(ink - plain).mean() > 1.0


def test_a_path_as_lora_name_is_refused_by_the_server(make_server):
    """A client that skips its own checks: the server's decoder refuses the name."""
    from websockets.sync.client import connect

    from shared.messages import PROTOCOL_VERSION

    server = make_server()  # the fake engine: the refusal comes before any engine
    with connect(server.url, max_size=None, compression=None) as ws:
        ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                            "token": server.token}))
        json.loads(ws.recv(5))
        for name in ("../../secret", "C:\\loras\\x", "/etc/passwd", "a/../../b"):
            ws.send(json.dumps({"type": "generate", "job_id": "ab" * 16, "request": {
                "width": 32, "height": 32, "loras": [{"name": name, "strength": 1}]}}))
            error = json.loads(ws.recv(5))
            assert error["type"] == "error" and error["code"] == "bad_field"
            assert error["field"] == "request.loras[0].name", error


def test_models_command_lists_the_lora_folder(tmp_path, capsys, tiny_lora_dir):
    from backend.cli.main import main

    config = tmp_path / "config.toml"
    config.write_text(f"[models]\nlora_dir = {json.dumps(str(tiny_lora_dir))}\n",
                      encoding="utf-8")
    assert main(["models", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"LoRAs in {tiny_lora_dir}:" in out
    line = next(line for line in out.splitlines() if line.endswith(" sdxl_size"))
    size = (tiny_lora_dir / "sdxl_size.safetensors").stat().st_size
    assert line.split() == ["✓", "sdxl", "lora", f"{size / 1e3:.1f}", "KB", "sdxl_size"]
    empty = tmp_path / "none"
    config.write_text(f"[models]\nlora_dir = {json.dumps(str(empty))}\n", encoding="utf-8")
    assert main(["models", "--config", str(config)]) == 0
    assert "no such folder yet" in capsys.readouterr().out


def test_generate_lora_option(tmp_path):
    from backend.cli.main import _parse_lora

    assert _parse_lora("ink") == ("ink", 1.0)
    assert _parse_lora("ink:0.5") == ("ink", 0.5)
    assert _parse_lora("ink:-1") == ("ink", -1.0)
    with pytest.raises(ValueError, match="NAME\\[:STRENGTH\\]"):
        _parse_lora("ink:lots")
    with pytest.raises(FieldError):
        LoraRef("../ink")


def test_doctor_reports_the_lora_folder(tmp_path, monkeypatch):
    from backend.cli.doctor import check_loras

    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "config.toml").write_text(
        f"[models]\nlora_dir = {json.dumps(str(tmp_path / 'loras'))}\n", encoding="utf-8")
    check = check_loras()
    assert check.status == "ok" and "none" in check.detail
    make_header_lora(tmp_path / "loras" / "a.safetensors", SD15_KOHYA)
    make_header_lora(tmp_path / "loras" / "b.safetensors", SDXL_KOHYA)
    make_header_lora(tmp_path / "loras" / "c.safetensors", SDXL_KOHYA)
    check = check_loras()
    assert check.detail.endswith("(1 sd15, 2 sdxl)") and str(tmp_path / "loras") in check.detail


def test_a_file_diffusers_cannot_read_is_a_typed_error(tmp_path, tiny_root, torch_threads,
                                                       caplog):
    from backend.engines.diffusers.engine import DiffusersEngine
    from shared.errors import Unsupported

    make_header_lora(tmp_path / "odd.safetensors",
                     {"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": (32, 4),
                      "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b": (4, 32)})
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                                   lora_dir=str(tmp_path))), device="cpu")
    try:
        plain = pixels(engine, request())
        with pytest.raises(Unsupported) as info:
            pixels(engine, request(("odd", 1.0)))
        assert "'odd'" in info.value.message and str(tmp_path) not in info.value.message
        assert str(tmp_path) in caplog.text  # the details are in the server's log
        assert np.array_equal(pixels(engine, request()), plain)  # nothing left behind
    finally:
        engine.close()
