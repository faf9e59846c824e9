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

