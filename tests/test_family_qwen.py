"""Qwen-Image on its tiny stack (backend/engines/tiny_qwen.py), through
DiffusersEngine.generate (backend/engines/diffusers/dit_qwen.py): every mode with and
without ControlNets (InstantX's union and inpainting ControlNets), seeds, weight 0, cancel,
previews, progress, typed errors, detection and the catalogue."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from backend.engines import tiny
from backend.engines.catalogue import LICENCES, Catalogue, ModelConfig
from backend.engines.diffusers.engine import DiffusersEngine
from backend.engines.families import QWEN_UNION_TYPES, detect, detect_file
from backend.imaging import to_array
from shared.errors import Cancelled, Unsupported, UnsupportedCondition
from shared.images import Image
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import RecordingContext, lines_image, random_rgba, torch_threads  # noqa: F401

W = H = 64
BASE = "tiny-qwen"


@pytest.fixture(scope="module")
def qwen_root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-qwen")
    tiny.ensure_tiny("qwen", root)
    return root


def _engine(root) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                 cache_dir=str(root / "empty-hf-cache"),
                                                 roots=(str(root),))),
                           device="cpu")


@pytest.fixture(scope="module")
def engine(qwen_root):
    engine = _engine(qwen_root)
    yield engine
    engine.close()


@pytest.fixture
def fresh(qwen_root):
    engine = _engine(qwen_root)
    yield engine
    engine.close()


def selection(width=W, height=H) -> Image:
    array = np.zeros((height, width, 4), np.uint8)
    array[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return Image(width, height, array.tobytes())


def images(width=W, height=H):
    return {0: lines_image(width, height, 1), 1: lines_image(width, height, 2),
            10: random_rgba(width, height, seed=3), 11: selection(width, height)}


def request(**kw) -> GenerateRequest:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 3)
    kw.setdefault("cfg", 1.0)
    kw.setdefault("base_model", BASE)
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 10)
        kw.setdefault("strength", 0.75)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 11)
    return GenerateRequest(**kw)


def unit(condition="lineart", slot=0, **kw):
    return ControlUnit(condition=condition, image=slot, **kw)


def pixels(engine, req, imgs=None, ctx=None) -> np.ndarray:
    out = engine.generate(req, imgs or images(req.width, req.height), ctx or RecordingContext())
    return to_array(out[0].image).copy()


def net(root, name) -> str:
    return str(tiny.tiny_dir("qwen", root) / "controlnets" / name)


# every mode, with and without ControlNets: diffusers has Qwen-Image ControlNet pipelines
# for txt2img (the union model, several units at once) and inpaint (the inpainting one)
CASES = [("txt2img", ()), ("img2img", ()), ("inpaint", ()),
         ("txt2img", (unit(),)), ("txt2img", (unit(), unit("depth", 1, weight=0.6))),
         ("inpaint", (unit("inpaint", 10),))]


@pytest.mark.parametrize("mode, units", CASES)
def test_every_mode_with_and_without_controlnets(engine, mode, units):
    ctx = RecordingContext(preview_every=1)
    req = request(mode=mode, controls=units)
    out = pixels(engine, req, ctx=ctx)
    assert out.shape == (H, W, 4) and out[..., 3].min() == 255
    steps = [e for e in ctx.events if e[0] == "progress"]
    assert steps and steps[-1][1] == steps[-1][2] == len(steps)  # every step, once
    assert len(ctx.previews) == len(steps)  # a preview of the unpacked latents each
    assert {(e[2], e[3]) for e in ctx.events if e[0] == "preview"} == {(W // 8, H // 8)}
    if mode == "inpaint":  # outside the selection: the input, bit for bit
        init = to_array(images()[10])
        outside = to_array(selection())[..., 0] == 0
        assert np.array_equal(out[outside][:, :3], init[outside][:, :3])
    assert out[..., :3].std() > 0  # a picture, not a flat fill
    assert np.array_equal(out, pixels(engine, req))  # same seed, same pixels
    if units:  # the ControlNet changes the picture
        assert not np.array_equal(out, pixels(engine, request(mode=mode)))


def test_another_seed_gives_other_pixels(engine):
    req = request(controls=(unit(),))
    assert not np.array_equal(pixels(engine, req),
                              pixels(engine, dataclasses.replace(req, seed=8)))


def test_weight_zero_is_no_controlnet(engine):
    plain = pixels(engine, request())
    off = (unit(weight=0.0), unit("depth", 1, weight=0.0))
    assert np.array_equal(plain, pixels(engine, request(controls=off)))
    one_off = pixels(engine, request(controls=(unit(), unit("depth", 1, weight=0.0))))
    assert np.array_equal(one_off, pixels(engine, request(controls=(unit(),))))


def test_cfg_is_true_guidance_with_the_negative_prompt(engine):
    """cfg > 1 guides (with a blank negative prompt when none is given: Qwen-Image's
    pipelines guide only with one); the negative prompt then changes the picture."""
    plain = pixels(engine, request(cfg=1.0))
    guided = pixels(engine, request(cfg=4.0))
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, pixels(engine, request(cfg=4.0, negative_prompt="blurry")))
    assert np.array_equal(guided, pixels(engine, request(cfg=4.0)))  # cached embeddings


def test_union_serves_its_four_kinds_and_refuses_the_rest_naming_what_serves(fresh, qwen_root):
    union = unit("normal", model=net(qwen_root, "union"))
    with pytest.raises(UnsupportedCondition, match="no mode for 'normal'") as info:
        fresh.generate(request(controls=(union,)), images(), RecordingContext())
    message = info.value.message
    assert info.value.field == "condition"
    assert "canny" in message and "depth" in message and "openpose" in message
    assert "[controlnets.qwen] normal" in message
    assert not fresh._bases  # refused before anything loaded


def test_control_modes_other_than_balanced_are_a_typed_error(engine):
    with pytest.raises(UnsupportedCondition, match="balanced") as info:
        engine.generate(request(controls=(unit(control_mode="control"),)), images(),
                        RecordingContext())
    assert info.value.field == "control_mode"


@pytest.mark.parametrize("mode, units", [("img2img", (unit(),)),
                                         ("inpaint", (unit(),)),
                                         ("inpaint", (unit("inpaint", 10), unit()))])
def test_controlnet_img2img_and_inpaint_without_the_inpaint_unit_are_typed_errors(
        engine, mode, units):
    with pytest.raises(Unsupported, match="txt2img") as info:
        engine.generate(request(mode=mode, controls=units), images(), RecordingContext())
    assert info.value.field == "mode" and "Qwen-Image" in info.value.message


def test_cancel_lands_inside_a_step(fresh):
    class CancelAtCall(RecordingContext):
        calls = 0

        def check_cancelled(self):
            self.calls += 1
            if self.calls >= 3:  # the engine's check, then the first step's blocks
                raise Cancelled(job_id=self.job_id)

    ctx = CancelAtCall()
    with pytest.raises(Cancelled):
        fresh.generate(request(controls=(unit(),)), images(), ctx)
    assert ctx.steps_done() == 0


def test_cancel_between_steps(engine):
    ctx = RecordingContext(cancel_at=2)
    with pytest.raises(Cancelled):
        engine.generate(request(steps=5), images(), ctx)
    assert ctx.steps_done() == 2


def test_sizes_are_multiples_of_16_and_the_output_the_canvas(engine):
    out = engine.generate(request(width=88, height=56), images(88, 56), RecordingContext())
    assert (out[0].image.width, out[0].image.height) == (88, 56)
    w, h = engine.last_plan.first.size
    assert w % 16 == 0 and h % 16 == 0


# -----------------------------------------------------------------------------
# detection, catalogue
# -----------------------------------------------------------------------------

def test_the_tiny_qwen_files_are_detected(qwen_root):
    folder = tiny.tiny_dir("qwen", qwen_root)
    assert detect(folder, "base").name == "qwen"
    union = detect(folder / "controlnets" / "union", "controlnet")
    assert (union.family, union.union, union.control_types) == ("qwen", True, QWEN_UNION_TYPES)
    assert detect(folder / "controlnets" / "inpaint", "controlnet").name == "qwen"
    weights = "diffusion_pytorch_model.safetensors"
    single = detect_file(folder / "controlnets" / "union" / weights)
    assert (single.kind, single.family, single.union) == ("controlnet", "qwen", True)
    single = detect_file(folder / "controlnets" / "inpaint" / weights)
    assert (single.kind, single.family, single.union) == ("controlnet", "qwen", False)
    single = detect_file(folder / "transformer" / weights)
    assert (single.kind, single.family) == ("base", "qwen")


def test_detection_reads_the_config_not_the_name(qwen_root, tmp_path):
    """A folder named like Flux whose files are Qwen-Image's is Qwen-Image."""
    import shutil

    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny.tiny_dir("qwen", qwen_root) / "controlnets" / "union", folder)
    assert detect(folder, "controlnet").family == "qwen"
    index = json.loads((tiny.tiny_dir("qwen", qwen_root) / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"


def test_a_comfyui_prefixed_single_file_is_qwen(tmp_path):
    import torch
    from safetensors.torch import save_file

    keys = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")
    path = tmp_path / "qwen_image_fp8.safetensors"
    save_file({f"model.diffusion_model.{k}": torch.zeros(2, 2) for k in keys}, str(path))
    assert (detect_file(path).kind, detect_file(path).family) == ("base", "qwen")


def test_the_catalogue_offers_qwen_image_and_its_controlnets(qwen_root):
    cat = Catalogue(ModelConfig(tiny_root=str(qwen_root), cache_dir=str(qwen_root / "hf")))
    listed = {m.name: m for m in cat.entries() if m.kind == "base"}
    qwen = listed["Qwen/Qwen-Image"]
    assert qwen.family == "qwen"
    assert {"canny", "depth", "openpose", "softedge", "inpaint"} <= set(qwen.conditions)
    assert "normal" not in qwen.conditions
    assert set(listed["tiny-qwen"].conditions) == set(qwen.conditions)
    for name in ("Qwen/Qwen-Image", "InstantX/Qwen-Image-ControlNet-Union",
                 "InstantX/Qwen-Image-ControlNet-Inpainting"):
        assert LICENCES[name] == "Apache-2.0"


def test_units_on_different_controlnets_are_a_typed_error(engine, qwen_root):
    """diffusers' Qwen-Image multi-ControlNet runs one model with several images."""
    units = (unit(), unit("depth", 1, model=net(qwen_root, "inpaint")))
    with pytest.raises(Unsupported, match="one ControlNet only") as info:
        engine.generate(request(controls=units), images(), RecordingContext())
    assert info.value.field == "controls"


def test_a_condition_without_a_default_qwen_controlnet_says_how_to_add_one(qwen_root):
    from shared.errors import ModelMissing

    cat = Catalogue(ModelConfig(tiny_root=str(qwen_root), cache_dir=str(qwen_root / "hf")))
    assert cat.controlnet_name("depth", "qwen") == "InstantX/Qwen-Image-ControlNet-Union"
    assert cat.controlnet_name("inpaint", "qwen") == "InstantX/Qwen-Image-ControlNet-Inpainting"
    with pytest.raises(ModelMissing, match=r"\[controlnets.qwen\] normal"):
        cat.controlnet_name("normal", "qwen")


def test_bench_engine_runs_the_qwen_stack_on_its_bare_pipeline(qwen_root):
    from backend.bench.engine import bench_engine

    figures = bench_engine(repeats=1, steps=2, tiny_root=str(qwen_root), stacks=("qwen-union",))
    qwen = figures["stacks"]["qwen-union"]
    assert qwen["bare"] == "QwenImageControlNetPipeline" and qwen["same_pixels"]


# -----------------------------------------------------------------------------
# a single file: the transformer, the rest from the default repo
# -----------------------------------------------------------------------------

def _hub_cache(root, stack):
    """A Hugging Face cache holding ``stack`` as Qwen/Qwen-Image (as a download leaves it)."""
    import shutil

    repo = root / "models--Qwen--Qwen-Image"
    shutil.copytree(stack, repo / "snapshots" / "0123abcd",
                    ignore=shutil.ignore_patterns("controlnets"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return root


def test_a_single_transformer_file_runs_with_the_default_repos_other_parts(
        qwen_root, tmp_path, monkeypatch):
    import shutil

    from backend.engines.catalogue import NATIVE_SIZE

    monkeypatch.setitem(NATIVE_SIZE, "qwen", tiny.NATIVE_SIZE)  # the tiny stack's 64²
    stack = tiny.tiny_dir("qwen", qwen_root)
    models = tmp_path / "models"
    models.mkdir()
    single = models / "qwen_image_bf16.safetensors"
    shutil.copy(stack / "transformer" / "diffusion_pytorch_model.safetensors", single)
    cache = _hub_cache(tmp_path / "hf", stack)
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(qwen_root), cache_dir=str(cache),
                                                   roots=(str(models),))), device="cpu")
    try:
        got = pixels(engine, request(base_model=str(single)))
    finally:
        engine.close()
    with_builtin = _engine(qwen_root)
    try:
        assert np.array_equal(got, pixels(with_builtin, request()))  # the same model
    finally:
        with_builtin.close()


def test_a_single_transformer_file_without_the_default_repo_says_to_download_it(
        qwen_root, tmp_path):
    import shutil

    from shared.errors import ModelMissing

    models = tmp_path / "models"
    models.mkdir()
    single = models / "qwen_image_bf16.safetensors"
    shutil.copy(tiny.tiny_dir("qwen", qwen_root) / "transformer" /
                "diffusion_pytorch_model.safetensors", single)
    engine = DiffusersEngine(Catalogue(ModelConfig(cache_dir=str(tmp_path / "empty"),
                                                   roots=(str(models),))), device="cpu")
    try:
        with pytest.raises(ModelMissing, match="models download qwen") as info:
            engine.generate(request(base_model=str(single)), images(), RecordingContext())
    finally:
        engine.close()
    assert "transformer only" in info.value.message and "Qwen/Qwen-Image" in info.value.message
    assert info.value.field == "base_model"


# -----------------------------------------------------------------------------
# LoRAs (diffusers' Qwen-Image LoRA loader, on the transformer)
# -----------------------------------------------------------------------------

def make_qwen_lora(path, folder):
    """A rank-4 LoRA on the tiny transformer's attention and image MLP (as Qwen-Image's
    LoRAs are), random non-zero up matrices, saved with the pipeline's own saver."""
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2"]
        model = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, target_modules=targets),
            QwenImageTransformer2DModel.from_pretrained(folder / "transformer"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    QwenImagePipeline.save_lora_weights(str(path.parent), weight_name=path.name,
                                        transformer_lora_layers=get_peft_model_state_dict(model))
    return path


def test_a_lora_is_qwen_by_its_tensors_changes_the_picture_and_strength_zero_is_none(
        qwen_root, tmp_path):
    from backend.engines.loras import LoraFolder
    from shared.messages import LoraRef

    make_qwen_lora(tmp_path / "loras" / "ink.safetensors", tiny.tiny_dir("qwen", qwen_root))
    assert [i.family for i in LoraFolder(tmp_path / "loras").infos()] == ["qwen"]
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(qwen_root),
                                                   lora_dir=str(tmp_path / "loras"))),
                             device="cpu")
    try:
        plain = pixels(engine, request())
        inked = pixels(engine, request(loras=(LoraRef(name="ink"),)))
        off = pixels(engine, request(loras=(LoraRef(name="ink", strength=0.0),)))
    finally:
        engine.close()
    assert not np.array_equal(plain, inked)
    assert np.array_equal(plain, off)
