"""ControlNet training on tiny models: frozen base, zero convolution, prompt drop,
resume, cancel, dataset errors, and the committed shapes demo model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backend.training.dataset import PairImages, find_pairs  # noqa: E402
from backend.training.errors import DatasetError  # noqa: E402
from backend.training import shapes  # noqa: E402
from tiny_fixtures import torch_threads  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "backend" / "assets" / "shapes-demo"


# -----------------------------------------------------------------------------
# Fixtures
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, torch_threads):  # noqa: F811
    """The random-weight tiny SD1.5 stack of backend.engines.tiny (4-block VAE, 8x8 latents)."""
    from backend.engines import tiny

    return tiny.build(tmp_path_factory.mktemp("base") / "tiny-sd15", "sd15")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    return shapes.write_dataset(tmp_path_factory.mktemp("shapes") / "data", 24, seed=5)


def config(data, base, out, **kw):
    from backend.training.controlnet import TrainConfig

    kw.setdefault("steps", 4)
    kw.setdefault("batch", 2)
    kw.setdefault("lr", 1e-3)
    kw.setdefault("checkpoint_every", 0)
    return TrainConfig(data=str(data), base=str(base), out=str(out), resolution=64,
                       conditioning_channels=(8, 8, 16, 16), **kw)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -----------------------------------------------------------------------------
# Datasets
# -----------------------------------------------------------------------------

def _png(path: Path, size=(16, 16), colour=(0, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", size, colour).save(path)


def test_fill50k_layout_reads_pairs_in_order(shapes_data):
    pairs = find_pairs(shapes_data)
    assert len(pairs) == 24
    assert pairs[0].source.name == "000000.png" and pairs[0].prompt.endswith("white background")
    cond, target, prompts = PairImages(pairs, 64).batch([0, 1])
    assert cond.shape == target.shape == (2, 64, 64, 3) and cond.dtype == np.uint8
    sample = shapes.make_sample(5, 1)
    assert np.array_equal(target[1], sample.target) and prompts[1] == sample.prompt


def test_bad_pairs_are_all_reported_by_name(tmp_path):
    root = tmp_path / "data"
    _png(root / "source/a.png"), _png(root / "target/a.png")            # fine
    _png(root / "source/b.png")                                          # target missing
    _png(root / "source/c.png", (16, 16)), _png(root / "target/c.png", (20, 16))  # sizes
    _png(root / "source/d.png")
    (root / "target/d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    lines = [{"source": f"source/{n}.png", "target": f"target/{n}.png", "prompt": n}
             for n in "abcd"]
    (root / "prompt.json").write_text("\n".join(json.dumps(x) for x in lines)
                                      + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        find_pairs(root)
    err = info.value
    assert err.code == "bad_dataset"
    by_name = {p.name: p.reason for p in err.problems}
    assert set(by_name) == {"target/b.png", "source/c.png", "target/d.png",
                            "prompt.json line 5"}
    assert "missing" in by_name["target/b.png"]
    assert "16x16" in by_name["source/c.png"] and "20x16" in by_name["source/c.png"] \
        and "target/c.png" in by_name["source/c.png"]
    assert "cannot be read" in by_name["target/d.png"]
    for name in by_name:
        assert name in err.message


def test_pairs_by_file_name(tmp_path):
    root = tmp_path / "data"
    _png(root / "source/one.png"), _png(root / "target/one.jpg")
    (root / "target/one.txt").write_text("a cat\n", encoding="utf-8")
    _png(root / "source/two.png"), _png(root / "target/two.png")
    pairs = find_pairs(root)
    assert [(p.source.name, p.target.name, p.prompt) for p in pairs] == [
        ("one.png", "one.jpg", "a cat"), ("two.png", "two.png", "")]
    _png(root / "source/lonely.png")
    _png(root / "target/orphan.webp")
    with pytest.raises(DatasetError) as info:
        find_pairs(root)
    assert info.value.names == ["source/lonely.png", "target/orphan.webp"]


def test_missing_folders_are_named(tmp_path):
    (tmp_path / "source").mkdir()
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path)
    assert info.value.names == ["target/"]


# -----------------------------------------------------------------------------
# Shapes
# -----------------------------------------------------------------------------

def test_shapes_are_deterministic_and_outlined():
    a, b = shapes.make_sample(7, 3), shapes.make_sample(7, 3)
    assert np.array_equal(a.target, b.target) and a.prompt == b.prompt
    assert not np.array_equal(a.target, shapes.make_sample(8, 3).target)
    assert a.prompt == f"{a.colour} {a.shape} on a white background"
    edge = a.condition[..., 0] > 0
    assert np.array_equal(edge, shapes.outline(a.mask)) and (edge <= a.mask).all()
    assert shapes.iou(shapes.segment(a.target), a.mask) == 1.0
    assert shapes.colour_of(a.target, a.mask) == a.colour


def test_vae_crops_on_the_shape_hold_its_centre():
    """The tiny base's VAE trains on 32-pixel crops; with small shapes, random crops are
    mostly background and the VAE never learns the colours (recon colour accuracy 0.48
    vs 1.0 with crops on the shape), so crops are drawn among those that hold it."""
    import torch

    from backend.training.tiny_base import _crops, _foreground

    samples = [shapes.make_sample(11, i) for i in range(64)]
    batch = np.stack([s.target for s in samples])
    assert np.array_equal(_foreground(batch), np.stack([s.mask for s in samples]))
    crops = _crops(batch, 32, torch.Generator().manual_seed(0), on_shape=True)
    assert crops.shape == (64, 32, 32, 3)
    for sample, crop in zip(samples, crops):
        ys, xs = np.nonzero(sample.mask)
        cy, cx = int(ys.mean()), int(xs.mean())
        # the crop is a window of the picture that contains the shape's centre pixel
        found = [(y, x) for y in range(33) for x in range(33)
                 if np.array_equal(sample.target[y:y + 32, x:x + 32], crop)
                 and y <= cy < y + 32 and x <= cx < x + 32]
        assert found
    # the same generator state gives the same crops; plain random crops differ
    again = _crops(batch, 32, torch.Generator().manual_seed(0), on_shape=True)
    assert np.array_equal(crops, again)
    plain = _crops(batch, 32, torch.Generator().manual_seed(0))
    assert np.mean([_foreground(c[None]).any() for c in plain]) < \
        np.mean([_foreground(c[None]).any() for c in crops]) == 1.0


# -----------------------------------------------------------------------------
# The trainer
# -----------------------------------------------------------------------------

def test_prompt_drop_rate_matches_the_setting():
    import torch

    from backend.training.controlnet import drop_prompts

    g = torch.Generator().manual_seed(0)
    for rate in (0.5, 0.2):
        kept, dropped = drop_prompts(["p"] * 20000, rate, g)
        assert dropped == kept.count("")
        assert abs(dropped / 20000 - rate) < 0.015  # ~4.5 standard deviations


def test_zero_convolutions_leave_the_base_unchanged_at_step_0(tiny_base):
    import torch

    from backend.training.common import load_base
    from backend.training.controlnet import make_controlnet

    base = load_base(str(tiny_base))
    net = make_controlnet(base, (8, 8, 16, 16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    cond = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        down, mid = net(x, t, hidden, controlnet_cond=cond, return_dict=False)
        plain = base.unet(x, t, hidden).sample
        with_net = base.unet(x, t, hidden, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
        assert all(not r.any() for r in down) and not mid.any()
        assert torch.equal(plain, with_net)
        net.controlnet_down_blocks[0].weight[0, 0] = 0.5
        down, mid = net(x, t, hidden, controlnet_cond=cond, return_dict=False)
        assert not torch.equal(plain, base.unet(x, t, hidden,
                                                down_block_additional_residuals=down,
                                                mid_block_additional_residual=mid).sample)


def test_training_changes_only_the_controlnet(tiny_base, shapes_data, tmp_path):
    from diffusers import ControlNetModel

    from backend.training.common import load_base
    from backend.training.controlnet import _Run, make_controlnet

    seen = []
    run = _Run(config(shapes_data, tiny_base, tmp_path / "out", steps=3, validation_every=3,
                      validation_count=2, validation_steps=2), progress=seen.append,
               evaluate=lambda step, pipe: {"called_at": step})
    out = run.run()
    fresh = load_base(str(tiny_base))
    for name in ("unet", "vae", "text_encoder"):
        before, after = state(getattr(fresh, name)), getattr(run.base, name).state_dict()
        assert before.keys() == after.keys()
        assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before), name
        assert not any(p.requires_grad for p in getattr(run.base, name).parameters())
    initial = state(make_controlnet(fresh, (8, 8, 16, 16)))
    trained = ControlNetModel.from_pretrained(out, local_files_only=True)
    changed = [k for k, v in trained.state_dict().items() if not np.array_equal(
        v.numpy(), initial[k].numpy())]
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert "controlnet_mid_block.weight" in changed
    # progress: every step with a finite loss, then done; validation image and hook
    steps = [p.step for p in seen if p.stage == "train"]
    assert steps == [1, 2, 3] and all(np.isfinite(p.loss) for p in seen if p.stage == "train")
    assert seen[-1].stage == "done"
    log = json.loads((out / "training_log.json").read_text())
    assert log["validation"][0]["metrics"] == {"called_at": 3}
    assert (out / log["validation"][0]["image"]).is_file()
    assert log["samples_seen"] == 6


def test_resume_continues_the_same_loss_trajectory(tiny_base, shapes_data, tmp_path):
    """Bit-identical: every random draw comes from the generator saved in the checkpoint."""
    from backend.training.controlnet import train_controlnet

    straight = train_controlnet(config(shapes_data, tiny_base, tmp_path / "a", steps=6,
                                       checkpoint_every=3))
    train_controlnet(config(shapes_data, tiny_base, tmp_path / "b", steps=3))
    resumed = train_controlnet(config(shapes_data, tiny_base, tmp_path / "b", steps=6,
                                      resume="latest"))
    a = json.loads((straight / "training_log.json").read_text())["losses"]
    b = json.loads((resumed / "training_log.json").read_text())["losses"]
    assert len(a) == len(b) == 6 and a == b
    wa = (straight / "diffusion_pytorch_model.safetensors").read_bytes()
    wb = (resumed / "diffusion_pytorch_model.safetensors").read_bytes()
    assert wa == wb


def test_cancel_from_progress_keeps_a_checkpoint_to_resume(tiny_base, shapes_data, tmp_path):
    from shared.errors import Cancelled

    from backend.training.controlnet import train_controlnet

    def cancel_at_2(p):
        if p.stage == "train" and p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "c", steps=5),
                         progress=cancel_at_2)
    assert (tmp_path / "c/checkpoints/step-000002/state.pt").is_file()
    assert not (tmp_path / "c/config.json").exists()
    out = train_controlnet(config(shapes_data, tiny_base, tmp_path / "c", steps=5,
                                  resume="latest"))
    assert len(json.loads((out / "training_log.json").read_text())["losses"]) == 5


def test_resume_refuses_other_settings_and_bad_options(tiny_base, shapes_data, tmp_path):
    from backend.training.controlnet import train_controlnet
    from backend.training.errors import TrainingError

    train_controlnet(config(shapes_data, tiny_base, tmp_path / "d", steps=2))
    with pytest.raises(TrainingError, match="lr was 0.001, now 0.01"):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "d", steps=4, lr=1e-2,
                                resume="latest"))
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "e", mixed_precision="fp16",
                                device="cpu"))
    with pytest.raises(TrainingError, match="prompt_drop"):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "e", prompt_drop=1.5))
    with pytest.raises(TrainingError, match="Nothing to resume"):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "f", resume="latest"))


def test_output_must_be_new_empty_or_a_run_this_trainer_made(tiny_base, shapes_data, tmp_path):
    """Issue 18: training into an existing folder overwrote its files and deleted an old
    checkpoint. A folder the trainer did not make is refused untouched; its own run is
    refused without --resume (which continues it)."""
    from backend.training.controlnet import train_controlnet
    from backend.training.errors import TrainingError

    theirs = tmp_path / "theirs"
    (theirs / "checkpoints" / "step-000001").mkdir(parents=True)
    (theirs / "config.json").write_text("precious")
    before = sorted(p.relative_to(theirs) for p in theirs.rglob("*"))
    for resume in (None, "latest"):
        with pytest.raises(TrainingError, match="not empty") as info:
            train_controlnet(config(shapes_data, tiny_base, theirs, steps=1, resume=resume))
        assert info.value.field == "out"
    assert sorted(p.relative_to(theirs) for p in theirs.rglob("*")) == before
    assert (theirs / "config.json").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    out = train_controlnet(config(shapes_data, tiny_base, tmp_path / "empty", steps=1))
    from backend.training.folders import MANIFEST
    assert (out / MANIFEST).is_file() and (out / "config.json").is_file()
    with pytest.raises(TrainingError, match="earlier training run"):
        train_controlnet(config(shapes_data, tiny_base, out, steps=2))
    again = train_controlnet(config(shapes_data, tiny_base, out, steps=2, resume="latest"))
    assert len(json.loads((again / "training_log.json").read_text())["losses"]) == 2
    with pytest.raises(TrainingError, match="is a file"):
        train_controlnet(config(shapes_data, tiny_base, theirs / "config.json", steps=1))


def test_loader_text_stays_in_the_log(tmp_path, caplog):
    """A damaged base names the model; the loader's own words go to the log only."""
    from backend.training.common import load_base
    from backend.training.errors import TrainingError

    base = tmp_path / "base"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).mkdir(parents=True)
        (base / sub / "config.json").write_text("{ not json")
    (base / "model_index.json").write_text("{}")
    with pytest.raises(TrainingError) as info:
        load_base(str(base))
    assert "server log" in info.value.message
    assert "json" not in info.value.message.lower() and "Error" not in info.value.message
    assert any("could not load the base model" in r.getMessage() for r in caplog.records)


def test_lr_schedules_warm_up_then_stay_or_decay_to_zero():
    from backend.training.controlnet import TrainConfig, lr_factor
    from backend.training.errors import TrainingError

    flat = lr_factor(TrainConfig(data="d", base="b", out="o", steps=100, lr_warmup_steps=10))
    assert [flat(s) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = lr_factor(TrainConfig(data="d", base="b", out="o", steps=110, lr_warmup_steps=10,
                                lr_schedule="cosine"))
    assert cos(4) == 0.5 and cos(10) == 1.0
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 110))
    with pytest.raises(TrainingError, match="lr_schedule must be one of constant, cosine"):
        TrainConfig(data="d", base="b", out="o", lr_schedule="linear").check()


def test_cosine_resume_keeps_the_trajectory_and_refuses_new_steps(tiny_base, shapes_data,
                                                                  tmp_path):
    from backend.training.controlnet import train_controlnet
    from backend.training.errors import TrainingError

    cos = dict(lr_schedule="cosine", steps=4)
    straight = train_controlnet(config(shapes_data, tiny_base, tmp_path / "a", **cos))
    from shared.errors import Cancelled

    def stop_at_2(p):
        if p.stage == "train" and p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "b", **cos), progress=stop_at_2)
    resumed = train_controlnet(config(shapes_data, tiny_base, tmp_path / "b", resume="latest",
                                      **cos))
    a = json.loads((straight / "training_log.json").read_text())["losses"]
    b = json.loads((resumed / "training_log.json").read_text())["losses"]
    assert a == b
    with pytest.raises(TrainingError, match="steps was 4, now 8"):
        train_controlnet(config(shapes_data, tiny_base, tmp_path / "b", resume="latest",
                                lr_schedule="cosine", steps=8))


def test_frozen_check_catches_a_trainable_base_parameter(tiny_base):
    import torch

    from backend.training.common import check_frozen, freeze, load_base
    from backend.training.controlnet import make_controlnet
    from backend.training.errors import TrainingError

    base = load_base(str(tiny_base))
    freeze(base.unet, base.vae, base.text_encoder)
    net = make_controlnet(base, (8, 8, 16, 16))
    optimizer = torch.optim.AdamW(net.parameters())
    check_frozen({"UNet": base.unet}, net, optimizer)
    base.unet.conv_out.weight.requires_grad_(True)
    with pytest.raises(TrainingError, match="UNet must be frozen"):
        check_frozen({"UNet": base.unet}, net, optimizer)


def test_bf16_mixed_precision_trains_on_cpu(tiny_base, shapes_data, tmp_path):
    from backend.training.controlnet import train_controlnet

    out = train_controlnet(config(shapes_data, tiny_base, tmp_path / "bf16", steps=2,
                                  mixed_precision="bf16", gradient_checkpointing=True))
    losses = json.loads((out / "training_log.json").read_text())["losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))


# -----------------------------------------------------------------------------
# The committed demo model
# -----------------------------------------------------------------------------

def test_demo_model_loads_and_draws_the_shape_where_drawn(torch_threads):  # noqa: F811
    from diffusers import ControlNetModel

    from backend.training import fidelity

    net = ControlNetModel.from_pretrained(DEMO / "controlnet", local_files_only=True)
    assert net.config.conditioning_embedding_out_channels == [16, 32, 64]
    pipe = fidelity.load_pipeline(str(DEMO / "base"), str(DEMO / "controlnet"))
    result = fidelity.measure(pipe, samples=fidelity.heldout(3))
    assert result["iou_with_control"] >= 0.5
    assert result["iou_with_control"] > result["iou_without_control"] + 0.25


def test_demo_model_is_a_catalogue_folder():
    from backend.engines.catalogue import Catalogue, ModelConfig

    catalogue = Catalogue(ModelConfig(trust_request_paths=True))  # paths of the user's own
    base = catalogue.resolve_base(str(DEMO / "base"))
    assert (base.source, base.family) == ("folder", "sd15")
    net = catalogue.resolve_controlnet("lineart", base, override=str(DEMO / "controlnet"))
    assert net.source == "folder"


def test_train_cost_reports_ratios():
    from backend.bench.training import bench_train_cost

    result = bench_train_cost(preset="tiny", batch=2, repeats=1)
    assert result["ratio"] > 0 and result["memory_ratio"] > 0
    assert result["controlnet_peak_mb"] > 0 and result["unet_peak_mb"] > 0


def test_bench_fidelity_reports_non_square_canvases_per_colour(torch_threads):  # noqa: F811
    from backend.bench.training import bench_fidelity
    from backend.training.shapes import COLOURS

    result = bench_fidelity(samples=2, steps=4, canvas_samples=2)
    for key in ("iou_with_control", "iou_without_control", "colour_accuracy",
                "colour_accuracy_without_control", "iou_ceiling", "meets_targets"):
        assert key in result  # the 64² figures keep their keys
    assert {"512x288", "288x512", "256x256"} <= set(result["canvases"])
    for figures in result["canvases"].values():
        assert 0.0 <= figures["iou_with_control"] <= 1.0
        assert 0.0 <= figures["iou_without_control"] <= 1.0
        per_colour = figures["colour_accuracy_per_colour"]
        assert set(per_colour) == set(COLOURS)
        # the colours are taken in turn: the first two samples are red and orange
        assert per_colour["red"] is not None and per_colour["orange"] is not None
        assert set(figures["colour_accuracy_per_colour_without_control"]) == set(COLOURS)
    assert result["canvas_samples"] == 2
