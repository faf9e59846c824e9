"""``controlcanvas demo``: the path an editor takes, end to end, on this machine.

A real server on 127.0.0.1 and a real websocket client: the client sends a line-art
"canvas" layer (dark strokes on transparency, as an artist draws them: the outline
of a circle, off-centre), asks for a line-art-controlled image at the canvas's exact
size, shows progress, and writes the returned layer next to the canvas as PNG files.

With the default engine (``demo``: the embedded model trained on synthetic shapes,
see docs/training.md) the result is a filled circle of the prompt's colour where
the outline was drawn; the demo says how well the two agree (IoU of the drawn disc
with the generated shape). The ``tiny`` engine's random weights give noise instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from shared.client import Client
from shared.images import Image
from shared.messages import ControlUnit, GenerateRequest, Progress
from shared.session import PreviewReady

from ..engines.factory import create_engine
from ..server.local import ServerThread
from ..training.shapes import iou, segment

CANVAS_SIZE = (500, 500)  # deliberately not a multiple of 8
# Where the circle is drawn (fractions of the canvas): left of centre and low, so a
# model that ignores the outline would not land on it by chance.
CIRCLE = (0.14, 0.38, 0.56, 0.80)
PROMPT = "red circle on a white background"
COLOUR = (220, 30, 30)
# What the demo model was trained and measured with (backend/assets/shapes-demo).
SAMPLER, CFG, STEPS = "ddim", 3.0, 20


def _circle_box(size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    w, h = size
    x0, y0, x1, y1 = CIRCLE
    return (w * x0, h * y0, w * x1, h * y1)


def draw_line_art(size: Tuple[int, int] = CANVAS_SIZE) -> PILImage.Image:
    """Dark strokes on a transparent layer: the outline of a circle."""
    layer = PILImage.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).ellipse(_circle_box(size), outline=(20, 20, 20, 255),
                                  width=max(2, size[0] // 100))
    return layer


def drawn_disc(size: Tuple[int, int] = CANVAS_SIZE) -> np.ndarray:
    """The filled disc the outline encloses (the shape the user means)."""
    layer = PILImage.new("L", size, 0)
    ImageDraw.Draw(layer).ellipse(_circle_box(size), fill=255)
    return np.asarray(layer) > 127


def shape_agreement(result: PILImage.Image, size: Tuple[int, int] = CANVAS_SIZE
                    ) -> Tuple[float, float]:
    """(IoU of the generated shape with the drawn disc, share of the shape's pixels
    nearer the prompt's colour than to white)."""

    rgb = np.asarray(result.convert("RGB"))
    shape = segment(rgb, "white", threshold=60.0)   # not background white
    agreement = iou(shape, drawn_disc(size))
    if not shape.any():
        return agreement, 0.0
    near = np.linalg.norm(rgb[shape].astype(np.float32) - np.array(COLOUR, np.float32),
                          axis=-1) < 120.0
    return agreement, float(near.mean())


def pil_to_image(picture: PILImage.Image) -> Image:
    rgba = picture.convert("RGBA")
    return Image(rgba.width, rgba.height, rgba.tobytes())


def image_to_pil(image: Image) -> PILImage.Image:
    return PILImage.frombytes("RGBA", image.size, image.data)


def run_demo(out: Path, engine: str = "demo", steps: int = STEPS, seed: int = 1234) -> int:
    out.mkdir(parents=True, exist_ok=True)
    canvas = draw_line_art()
    canvas.save(out / "canvas.png")
    started = time.monotonic()
    with ServerThread(create_engine(engine, step_seconds=0.02)) as server:
        print(f"server: {server.url} (engine: {server.engine.name})")
        with Client.connect(server.url, server.token, client="controlcanvas-demo") as client:
            request = GenerateRequest(
                width=canvas.width, height=canvas.height, prompt=PROMPT, seed=seed,
                steps=steps, cfg=CFG, sampler=SAMPLER,
                controls=(ControlUnit(condition="lineart", image=0,
                                      preprocessor="lineart_from_drawing"),))
            job = client.submit(request, {0: pil_to_image(canvas)}, preview_every=5)

            def show(event) -> None:
                if isinstance(event, Progress) and event.total:
                    sys.stdout.write(f"\rstep {event.step}/{event.total}")
                    sys.stdout.flush()
                elif isinstance(event, PreviewReady):
                    image_to_pil(event.image).save(out / f"preview-{event.step:03d}.png")

            result = client.wait(job, on_event=show)
    print()
    (meta, layer), = result.images
    picture = image_to_pil(layer)
    picture.save(out / "result.png")
    # The layer an editor would show: the result under the line art.
    composite = picture.copy()
    composite.alpha_composite(canvas)
    composite.save(out / "result-with-lines.png")
    iou, colour = shape_agreement(picture)
    print(f"canvas {canvas.width}x{canvas.height} -> result {layer.width}x{layer.height}, "
          f"seed {meta.seed}, {time.monotonic() - started:.1f} s")
    print(f"prompt {PROMPT!r}: the generated shape covers the drawn circle with IoU "
          f"{iou:.2f}; {colour:.0%} of it is red")
    print(f"wrote {out / 'canvas.png'}, {out / 'result.png'}, {out / 'result-with-lines.png'}")
    return 0
