"""Training benchmarks (``controlcanvas bench fidelity`` / ``bench train-cost``): dicts.

torch and diffusers are imported only when a benchmark runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes-demo"


def bench_fidelity(base: Optional[str] = None, controlnet: Optional[str] = None,
                   samples: int = 128, steps: int = 20, guidance: float = 3.0,
                   seed: int = 0, canvas_samples: int = 48) -> Dict[str, Any]:
    """Control fidelity of a shapes ControlNet (default: the committed demo model) on
    held-out shapes, with vs without control, through StableDiffusionControlNetPipeline.

    Keys: ``iou_with_control``, ``iou_without_control``, ``colour_accuracy``,
    ``colour_accuracy_without_control``, ``iou_ceiling``, ``samples``, ``steps``,
    ``guidance``, ``seconds``, and the targets.  For the committed demo model also
    ``canvases``: the demo engine on 16:9 (512x288), 9:16 (288x512) and square (256x256)
    canvases (``backend.bench.canvas_fidelity``: IoU with/without control, colour
    accuracy overall and per colour, stray pixels), ``canvas_samples`` shapes each
    (0: skip), with ``canvas_seconds``.
    """
    from backend.training import fidelity

    base = base or str(ASSETS / "base")
    controlnet = controlnet or str(ASSETS / "controlnet")
    result = fidelity.measure_folders(base, controlnet, samples, steps=steps,
                                      guidance=guidance, seed=seed)
    result.update(name="fidelity", target_iou_with_control=0.75,
                  target_iou_without_control=0.2, target_colour_accuracy=0.9)
    result["meets_targets"] = (result["iou_with_control"] >= 0.75
                               and result["iou_without_control"] <= 0.2
                               and result["colour_accuracy"] >= 0.9)
    if canvas_samples and base == str(ASSETS / "base") and controlnet == str(ASSETS / "controlnet"):
        from backend.engines.diffusers.engine import DiffusersEngine

        from .canvas_fidelity import measure_canvases

        engine = DiffusersEngine.demo()
        try:
            result.update(measure_canvases(engine, canvas_samples, seed=seed))
        finally:
            engine.close()
    return result


def bench_train_cost(preset: str = "small", batch: int = 0, repeats: int = 6,
                     device: str = "cpu") -> Dict[str, Any]:
    """Time and peak memory per training step, ControlNet vs fine-tuning the UNet alone
    (same UNet, same batch, interleaved in one run); ``ratio`` and ``memory_ratio`` =
    ControlNet / UNet, next to the paper's 1.34 and 1.23."""
    from backend.training.cost import measure_train_cost

    result = measure_train_cost(preset=preset, batch=batch, repeats=repeats, device=device)
    result["name"] = "train-cost"
    return result
