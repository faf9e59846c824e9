"""Train the tiny shapes demo model: ``python -m backend.training.demo_model --out DIR``.

1. Write the synthetic shapes dataset (fill50k layout) into the work folder.
2. Train the tiny base from scratch (:mod:`backend.training.tiny_base`).
3. Train the ControlNet on it with our trainer (:func:`train_controlnet`), measuring
   control fidelity on held-out shapes every ``--eval-every`` steps.
4. Measure the final fidelity through ``StableDiffusionControlNetPipeline``, write
   ``OUT/base`` (diffusers pipeline folder), ``OUT/controlnet`` (``config.json`` +
   safetensors), ``OUT/training.json`` (figures and curve) and ``OUT/README.md``;
   optionally plot the curve (``--plot``, needs matplotlib).

Deterministic: every random draw comes from fixed seeds and torch runs on
``--threads`` threads (default 1, which is also what keeps it fast on a shared
2-core machine); the same command on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger("controlcanvas.demo_model")

DATA_SEED = 0
DATA_COUNT = 8192
EVAL_COUNT = 64      # held-out shapes per curve point
FINAL_COUNT = 256    # held-out shapes for the final figures


@dataclass
class DemoRecipe:
    data_count: int = DATA_COUNT
    vae_steps: int = 1200
    unet_steps: int = 3000
    controlnet_steps: int = 2000
    controlnet_lr: float = 2e-4
    controlnet_lr_schedule: str = "constant"
    controlnet_batch: int = 32
    eval_every: int = 250
    eval_count: int = EVAL_COUNT
    final_count: int = FINAL_COUNT


QUICK = DemoRecipe(data_count=256, vae_steps=20, unet_steps=20, controlnet_steps=20,
                   controlnet_batch=8, eval_every=10, eval_count=8, final_count=8)


def _progress(every: int):
    def report(p) -> None:
        if p.stage in ("prepare", "validate", "done") or p.step % every == 0:
            log.info("%-8s step %5d/%d loss %.4f (avg %.4f) lr %.2e %.0f s", p.stage, p.step,
                     p.total, p.loss, p.loss_avg, p.lr, p.seconds)
    return report


def _copy_controlnet(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(src / name, dst / name)


def _copy_base(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("training_log.json"))


def build_demo(out: Path, work: Path, recipe: DemoRecipe, reuse_base: bool = False,
               plot: Optional[Path] = None) -> Dict[str, Any]:
    import torch

    from . import fidelity
    from .controlnet import TrainConfig, train_controlnet
    from .shapes import write_dataset
    from .tiny_base import TinyBaseConfig, train_tiny_base

    started = time.monotonic()
    figures: Dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "machine": platform.machine(), "recipe": vars(recipe)}
    data = work / "data"
    if not (data / "prompt.json").is_file():
        write_dataset(data, recipe.data_count, DATA_SEED)
    base_dir = work / "base"
    if not (reuse_base and (base_dir / "model_index.json").is_file()):
        train_tiny_base(str(data), str(base_dir),
                        TinyBaseConfig(vae_steps=recipe.vae_steps, unet_steps=recipe.unet_steps,
                                       vae_crop_on_shape=True),
                        progress=_progress(100))
    else:
        figures["base_reused"] = True
    # the base's own log says how long it took (also when it was trained by an earlier run)
    base_log = json.loads((base_dir / "training_log.json").read_text(encoding="utf-8"))
    figures["base_seconds"] = base_log["seconds"]
    figures["vae_seconds"], figures["unet_seconds"] = base_log["vae_seconds"], \
        base_log["unet_seconds"]
    held = fidelity.heldout(recipe.eval_count)
    curve: List[Dict[str, Any]] = []

    eval_seconds = 0.0

    def evaluate(step: int, pipe) -> Dict[str, float]:
        nonlocal eval_seconds
        t_eval = time.monotonic()
        result = fidelity.measure(pipe, samples=held, without=not curve)
        eval_seconds += time.monotonic() - t_eval
        point = {"step": step, "iou_with_control": result["iou_with_control"],
                 "colour_accuracy": result["colour_accuracy"]}
        if "iou_without_control" in result:
            figures["curve_iou_without_control"] = result["iou_without_control"]
            figures["curve_iou_ceiling"] = result["iou_ceiling"]
        curve.append(point)
        log.info("fidelity at step %d: %s", step, point)
        return point

    net_dir = work / "controlnet"
    if net_dir.exists():
        shutil.rmtree(net_dir)
    t0 = time.monotonic()
    train_controlnet(TrainConfig(
        data=str(data), base=str(base_dir), out=str(net_dir), steps=recipe.controlnet_steps,
        batch=recipe.controlnet_batch, lr=recipe.controlnet_lr,
        lr_schedule=recipe.controlnet_lr_schedule, resolution=64, prompt_drop=0.5,
        seed=0, cache_latents=True, checkpoint_every=500, checkpoints_kept=1,
        validation_every=recipe.eval_every, validation_count=4, validation_guidance=3.0,
        conditioning_channels=(16, 32, 64)), progress=_progress(100), evaluate=evaluate)
    figures["controlnet_seconds"] = round(time.monotonic() - t0, 1)  # includes the curve
    figures["curve_eval_seconds"] = round(eval_seconds, 1)
    net_log = json.loads((net_dir / "training_log.json").read_text(encoding="utf-8"))
    losses = net_log["losses"]
    figures["controlnet_prompt_drop_observed"] = round(
        net_log["prompts_dropped"] / max(1, net_log["samples_seen"]), 4)
    figures["curve"] = [dict(point, loss_avg=round(sum(losses[max(0, point["step"] - 50):
                                                             point["step"]]) /
                                                   len(losses[max(0, point["step"] - 50):
                                                              point["step"]]), 5))
                        for point in curve]
    figures["controlnet_losses_every_10"] = [round(x, 5) for x in losses[::10]]
    figures["base_losses_every_10"] = _base_losses(base_dir)

    out.mkdir(parents=True, exist_ok=True)
    _copy_base(base_dir, out / "base")
    _copy_controlnet(net_dir, out / "controlnet")
    t0 = time.monotonic()
    final = fidelity.measure_folders(out / "base", out / "controlnet", recipe.final_count)
    figures["final"] = final
    figures["final_eval_seconds"] = round(time.monotonic() - t0, 1)
    figures["total_seconds"] = round(time.monotonic() - started, 1) + (
        figures["base_seconds"] if figures.get("base_reused") else 0.0)
    (out / "training.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    write_readme(out, figures)
    if plot is not None:
        from .plot import plot_curve

        plot_curve(figures, plot)
    return figures


def _base_losses(base_dir: Path) -> Dict[str, List[float]]:
    path = base_dir / "training_log.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {"vae": [round(x, 5) for x in data["vae_losses"][::10]],
            "unet": [round(x, 5) for x in data["unet_losses"][::10]]}


def write_readme(out: Path, figures: Dict[str, Any]) -> None:
    r, f = figures["recipe"], figures["final"]
    unet_s = figures["base_seconds"] - figures["vae_seconds"]
    net_s = figures["controlnet_seconds"] - figures["curve_eval_seconds"]
    eval_s = figures["curve_eval_seconds"] + figures["final_eval_seconds"]
    reused = ("\nThe base was trained by an earlier run of the same command (`--reuse-base`); "
              "its times come from its own training log.\n" if figures.get("base_reused") else "")
    schedule = r.get("controlnet_lr_schedule", "constant")
    minutes = lambda s: f"{s / 60:.1f} min" if isinstance(s, (int, float)) else "reused"  # noqa
    text = f"""# shapes-demo: a tiny trained ControlNet and its base

Made by `python -m backend.training.demo_model --out backend/assets/shapes-demo`
(deterministic: fixed seeds, {figures['threads']} torch thread(s); CPU only).

- `base/`: a tiny Stable-Diffusion-1.x-shaped model trained from scratch on
  {r['data_count']} synthetic 64x64 shapes (VAE {r['vae_steps']} steps, 4x downsampling to
  16x16x4 latents; UNet (32, 64, 64) + CLIP text encoder {r['unet_steps']} steps at batch 32,
  v-prediction on a zero-terminal-SNR schedule).
  Load with `StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=...)`.
- `controlnet/`: a ControlNet (`from_unet`, zero convolutions) trained with
  `backend.training.train_controlnet` for {r['controlnet_steps']} steps at batch
  {r['controlnet_batch']}, lr {r['controlnet_lr']} ({schedule} schedule), 50 % empty prompts,
  base frozen.
  Load with `ControlNetModel.from_pretrained(controlnet)`.

Condition: a white 1-pixel outline on black, 64x64. Prompt: "<colour> <shape> on a
white background" (colours: red, orange, yellow, green, cyan, blue, purple, pink;
shapes: circle, square, triangle). Generate at height = width = 64 (DDIM, 20 steps,
guidance 3).

## Training figures ({figures['machine']}, torch {figures['torch']})

| stage | time |
|---|---|
| base: VAE | {minutes(figures['vae_seconds'])} |
| base: UNet + text encoder (incl. encoding the latents) | {minutes(unet_s)} |
| ControlNet training | {minutes(net_s)} |
| **training total** | **{minutes(figures['vae_seconds'] + unet_s + net_s)}** |
| fidelity curve ({len(figures['curve'])} points) + final evaluation | {minutes(eval_s)} |
| total with evaluation | {minutes(figures['total_seconds'])} |
{reused}

Fidelity on {f['samples']} held-out shapes through `StableDiffusionControlNetPipeline`
(same seeds with and without control): IoU with control {f['iou_with_control']:.3f},
without {f['iou_without_control']:.3f}; colour accuracy {f['colour_accuracy']:.3f}
(without control {f['colour_accuracy_without_control']:.3f}); IoU ceiling of the VAE and
segmentation {f['iou_ceiling']:.3f}; chance IoU of two random held-out shapes
{f['iou_chance']:.3f}. Curve and losses: `training.json`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.training.demo_model",
                                     description="Train the tiny shapes demo model (CPU).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--work", type=Path, help="data, checkpoints, validation images "
                        "(default: OUT.work next to OUT)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reuse-base", action="store_true",
                        help="keep a base already trained in the work folder")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--plot", type=Path, help="write the training curve PNG here")
    parser.add_argument("--controlnet-lr", type=float, help="override the recipe's ControlNet lr")
    parser.add_argument("--controlnet-steps", type=int, help="override its ControlNet steps")
    parser.add_argument("--controlnet-lr-schedule", choices=["constant", "cosine"],
                        help="override its ControlNet LR schedule")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    work = args.work or args.out.with_name(args.out.name + ".work")
    recipe = QUICK if args.quick else DemoRecipe()
    overrides = {"controlnet_lr": args.controlnet_lr, "controlnet_steps": args.controlnet_steps,
                 "controlnet_lr_schedule": args.controlnet_lr_schedule}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    figures = build_demo(args.out, work, recipe,
                         reuse_base=args.reuse_base, plot=args.plot)
    print(json.dumps(figures["final"], sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
