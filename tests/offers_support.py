"""A server that says what it offers per base model: conditions per base (as the catalogue
computes them) and LoRAs of several families.  Used by the Krita and GIMP plug-in tests."""

from __future__ import annotations

from tests.krita_support.engines import RecordingEngine


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


class KleinOfferingEngine(OfferingEngine):
    """The same server with a Flux.2 Klein base besides: no ControlNet, its control units
    emulated as reference pictures (the conditions the server lists for it, as
    ``families.REFERENCE_CONTROLS`` says)."""

    KLEIN_CONDITIONS = ("canny", "lineart", "lineart_anime", "scribble", "softedge", "mlsd",
                        "depth", "normal", "openpose", "seg", "tile", "shuffle")

    def models(self):
        from dataclasses import replace

        from shared.messages import ModelInfo

        base = super().models()
        return replace(base, models=base.models + (
            ModelInfo(name="klein-4b", kind="base", family="klein", present=True,
                      conditions=self.KLEIN_CONDITIONS),))
