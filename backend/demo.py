"""``controlcanvas demo``: the path an editor takes, end to end, on this machine.

A real server on 127.0.0.1 and a real websocket client: the client sends a line-art
"canvas" layer (dark strokes on transparency, as an artist draws them), asks for a
line-art-controlled image at the canvas's exact size, shows progress, and writes the
returned layer next to the canvas as PNG files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from shared.client import Client
from shared.images import Image
from shared.messages import ControlUnit, GenerateRequest, Progress
from shared.session import PreviewReady

from .engine import create_engine
from .local import ServerThread

CANVAS_SIZE = (500, 375)  # deliberately not a multiple of 8


def draw_line_art(size=CANVAS_SIZE) -> PILImage.Image:
    """Dark strokes on a transparent layer: a circle, a square and a triangle."""
    w, h = size
    layer = PILImage.new("RGBA", size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    ink, width = (20, 20, 20, 255), max(2, w // 120)
    pen.ellipse((w * 0.08, h * 0.2, w * 0.38, h * 0.6), outline=ink, width=width)
    pen.rectangle((w * 0.5, h * 0.15, w * 0.9, h * 0.5), outline=ink, width=width)
    pen.polygon([(w * 0.3, h * 0.92), (w * 0.55, h * 0.6), (w * 0.8, h * 0.92)],
                outline=ink, width=width)
    return layer


def pil_to_image(picture: PILImage.Image) -> Image:
    rgba = picture.convert("RGBA")
    return Image(rgba.width, rgba.height, rgba.tobytes())


def image_to_pil(image: Image) -> PILImage.Image:
    return PILImage.frombytes("RGBA", image.size, image.data)


def run_demo(out: Path, engine: str = "tiny", steps: int = 20, seed: int = 1234) -> int:
    out.mkdir(parents=True, exist_ok=True)
    canvas = draw_line_art()
    canvas.save(out / "canvas.png")
    started = time.monotonic()
    with ServerThread(create_engine(engine, step_seconds=0.02)) as server:
        print(f"server: {server.url} (engine: {server.engine.name})")
        with Client.connect(server.url, server.token, client="controlcanvas-demo") as client:
            request = GenerateRequest(
                width=canvas.width, height=canvas.height, prompt="a red circle, a blue square "
                "and a green triangle, flat colours", seed=seed, steps=steps,
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
    ink = np.asarray(canvas)[..., 3] > 0
    print(f"canvas {canvas.width}x{canvas.height} -> result {layer.width}x{layer.height}, "
          f"seed {meta.seed}, {time.monotonic() - started:.1f} s; {int(ink.sum())} line pixels")
    print(f"wrote {out / 'canvas.png'}, {out / 'result.png'}, {out / 'result-with-lines.png'}")
    return 0
