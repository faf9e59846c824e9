"""A FakeEngine that remembers what it was asked and what it answered."""

from __future__ import annotations

import threading

from backend.engines.fake import FakeEngine


class RecordingEngine(FakeEngine):
    def __init__(self, step_seconds: float = 0.0) -> None:
        super().__init__(step_seconds=step_seconds)
        self.calls: list = []  # (request, images, [Generated...])
        self.preprocessed: list = []  # (message, image, result)
        self.started = threading.Event()

    def generate(self, request, images, ctx):
        self.started.set()
        out = super().generate(request, images, ctx)
        self.calls.append((request, dict(images), list(out)))
        return out

    def preprocess(self, message, image, ctx):
        out = super().preprocess(message, image, ctx)
        self.preprocessed.append((message, image, out.image))
        return out


class OfferingEngine(RecordingEngine):
    """A server that says, per base model, which conditions it serves, and lists LoRAs
    of several families (what a server with the catalogue's per-base lists sends)."""

    SD15_CONDITIONS = ("canny", "depth", "softedge", "mlsd", "seg", "openpose", "scribble",
                       "lineart", "lineart_anime", "normal", "tile", "shuffle", "inpaint")
    XL_CONDITIONS = ("canny", "depth", "openpose", "scribble", "tile")

    def models(self):
        from dataclasses import replace

        from shared.messages import LoraInfo, ModelInfo

        base = super().models()
        return replace(base, models=(
            ModelInfo(name="fake", kind="base", family="sd15", present=True,
                      conditions=self.SD15_CONDITIONS),
            ModelInfo(name="anime-xl", kind="base", family="sdxl", present=True,
                      conditions=self.XL_CONDITIONS),
            ModelInfo(name="mystery-base", kind="base", present=False)),
            loras=(LoraInfo(name="ink", family="sd15", size=9_400_000),
                   LoraInfo(name="watercolour", family="sd15", size=151_000_000),
                   LoraInfo(name="xl_ink", family="sdxl", size=228_000_000),
                   LoraInfo(name="homemade", family="unknown", size=40_000)))
