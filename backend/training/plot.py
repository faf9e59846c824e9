"""Plot the demo model's training curve (matplotlib: a dev-only import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def _smooth(values: List[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_curve(figures: Dict[str, Any], path) -> Path:
    """Loss (left) and control fidelity (right) of the ControlNet over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = figures["curve"]
    losses = figures["controlnet_losses_every_10"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    steps = np.arange(len(losses)) * 10
    smooth = _smooth(losses, 10)
    left.plot(steps, losses, color="#bbbbbb", linewidth=0.6, label="loss (every 10th step)")
    left.plot(steps[len(steps) - len(smooth):], smooth, color="#1f4e99", label="moving average")
    left.set_xlabel("ControlNet training step")
    left.set_ylabel("noise-prediction MSE")
    left.set_title("ControlNet loss")
    left.legend(loc="upper right", fontsize=8)
    xs = [p["step"] for p in curve]
    right.plot(xs, [p["iou_with_control"] for p in curve], "o-", color="#c0392b",
               label="IoU with control")
    right.plot(xs, [p["colour_accuracy"] for p in curve], "s--", color="#27ae60",
               label="colour accuracy")
    if "curve_iou_without_control" in figures:
        right.axhline(figures["curve_iou_without_control"], color="#7f8c8d", linestyle=":",
                      label="IoU without control")
    if "curve_iou_ceiling" in figures:
        right.axhline(figures["curve_iou_ceiling"], color="#34495e", linestyle="-.",
                      linewidth=0.8, label="IoU ceiling (VAE)")
    right.set_ylim(0, 1)
    right.set_xlabel("ControlNet training step")
    right.set_title(f"Control fidelity ({figures['recipe']['eval_count']} held-out shapes)")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
