"""IP-Adapter weights for reference units: which adapter a reference uses, where its files
are, how ``controlcanvas models download`` fetches them.

A reference unit (``shared.messages.ReferenceUnit``) names an adapter of :data:`ADAPTERS`
(or "" for the default of its base family and mode, :data:`DEFAULTS`).  The weights are
h94/IP-Adapter's: one ``.safetensors`` file per adapter plus the CLIP image encoder it was
trained with (ViT-H, ``models/image_encoder``: the SDXL ``*_vit-h`` adapters use the same
encoder as SD1.5).  ``face`` needs a face adapter (``ip-adapter-plus-face``); the FaceID
models need insightface and are not offered.  The tiny bases (``tiny-sd15``,
``tiny-sdxl``) use a tiny adapter built locally (:mod:`.tiny_ipadapter`) for every mode
but ``face``.

Only the hub cache is read here (downloading is the explicit ``models download NAME``);
nothing here imports torch: :mod:`backend.engines.diffusers.ipadapter` loads what this
module resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from shared.errors import ModelMissing, ReferenceUnsupported

HUB_REPO = "h94/IP-Adapter"
VIT_H = "models/image_encoder"
FAMILIES = ("sd15", "sdxl")  # the families with an IP-Adapter here
ENCODER_FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class AdapterSpec:
    """One IP-Adapter of h94/IP-Adapter: its family, weight file and image encoder, and
    ``plus`` (a Resampler projection reading the encoder's hidden states, as the face
    models) or not (one image embedding)."""
    name: str
    family: str
    weight: str
    encoder: str = VIT_H
    plus: bool = False
    face: bool = False

    @property
    def files(self) -> Tuple[str, ...]:
        return (self.weight,) + tuple(f"{self.encoder}/{name}" for name in ENCODER_FILES)


ADAPTERS: Dict[str, AdapterSpec] = {a.name: a for a in (
    AdapterSpec("ip-adapter-sd15", "sd15", "models/ip-adapter_sd15.safetensors"),
    AdapterSpec("ip-adapter-plus-sd15", "sd15", "models/ip-adapter-plus_sd15.safetensors",
                plus=True),
    AdapterSpec("ip-adapter-plus-face-sd15", "sd15",
                "models/ip-adapter-plus-face_sd15.safetensors", plus=True, face=True),
    AdapterSpec("ip-adapter-sdxl-vit-h", "sdxl", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors"),
    AdapterSpec("ip-adapter-plus-sdxl-vit-h", "sdxl",
                "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", plus=True),
    AdapterSpec("ip-adapter-plus-face-sdxl-vit-h", "sdxl",
                "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors", plus=True,
                face=True),
)}

# The adapter a reference uses when it names none: per family, face or not.
DEFAULTS: Dict[Tuple[str, bool], str] = {
    ("sd15", False): "ip-adapter-sd15", ("sd15", True): "ip-adapter-plus-face-sd15",
    ("sdxl", False): "ip-adapter-sdxl-vit-h", ("sdxl", True): "ip-adapter-plus-face-sdxl-vit-h",
}
TINY = "tiny"  # the name of the built-in tiny adapter (tiny bases only)


@dataclass(frozen=True)
class ResolvedAdapter:
    """Where one adapter's files are: ``weight`` (a .safetensors file) and ``encoder`` (the
    CLIP image encoder's folder)."""
    name: str
    family: str
    weight: str
    encoder: str
    plus: bool = False

    @property
    def key(self) -> str:
        return self.weight


def download_command(name: str) -> str:
    return f"controlcanvas models download {name}"


def unsupported_family(family: str, base: str) -> ReferenceUnsupported:
    return ReferenceUnsupported(
        f"The base model {base!r} ({(family or 'unknown').upper()}) cannot take a reference "
        f"(IP-Adapter): references run on {' and '.join(f.upper() for f in FAMILIES)} bases. "
        f"Pick one of those, or remove the reference.", field="references")


def resolve(model: str, mode: str, family: str, base: str, *, tiny_base: bool = False,
            tiny_root: Optional[Path] = None, cache_dir: Optional[str] = None,
            field: str = "references") -> ResolvedAdapter:
    """The adapter of one reference unit on a base of ``family`` (typed errors: a family
    without IP-Adapter, an unknown name, one of another family, one not downloaded)."""
    if family not in FAMILIES:
        raise unsupported_family(family, base)
    face = mode == "face"
    if tiny_base and model in ("", TINY):
        if face:
            raise ModelMissing(
                f"The built-in tiny model {base!r} has no face IP-Adapter; face references "
                f"need a real {family.upper()} base and `{download_command(DEFAULTS[family, True])}`.",
                field=f"{field}.mode")
        from .tiny_ipadapter import ENCODER, WEIGHT_NAME, ensure_tiny_adapter

        folder = ensure_tiny_adapter(family, tiny_root)
        return ResolvedAdapter(TINY, family, str(folder / WEIGHT_NAME), str(folder / ENCODER))
    name = model or DEFAULTS[family, face]
    spec = ADAPTERS.get(name)
    if spec is None:
        raise ModelMissing(f"There is no IP-Adapter {name!r}; known: "
                           f"{', '.join(names_for(family))}.", field=f"{field}.model")
    if spec.family != family:
        raise ReferenceUnsupported(
            f"The IP-Adapter {name!r} was made for {spec.family.upper()}, but the base "
            f"{base!r} is {family.upper()}: use {DEFAULTS[family, face]!r} (or leave the "
            f"reference's model empty).", field=f"{field}.model")
    if face and not spec.face:
        raise ReferenceUnsupported(
            f"The IP-Adapter {name!r} is not a face model; face references use "
            f"{DEFAULTS[family, True]!r} (FaceID models need insightface and are not "
            f"supported).", field=f"{field}.model")
    paths = cached_files(spec, cache_dir)
    if paths is None:
        what = "face IP-Adapter" if face else "IP-Adapter"
        raise ModelMissing(f"The {what} {name!r} is not downloaded. Fetch it once with: "
                           f"`{download_command(name)}`", field=f"{field}.model")
    weight, encoder = paths
    return ResolvedAdapter(name, family, weight, encoder, plus=spec.plus)


def names_for(family: str) -> List[str]:
    return [a.name for a in ADAPTERS.values() if a.family == family]


def cached_files(spec: AdapterSpec, cache_dir: Optional[str] = None
                 ) -> Optional[Tuple[str, str]]:
    """(weight file, image encoder folder) in the local hub cache, or None when a file of
    them is missing."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in spec.files:
        try:
            path = try_to_load_from_cache(HUB_REPO, name, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an invalid cache is "not present"
            return None
        if not isinstance(path, str):
            return None
        found.append(path)
    return found[0], str(Path(found[1]).parent)


def download_plan(name: str, api=None) -> "downloads.DownloadPlan":
    """The files ``models download NAME`` fetches for adapter ``name`` (its weight file and
    image encoder), with sizes (asks the hub; offline: HubUnreachable)."""
    from . import downloads

    spec = ADAPTERS[name]
    listed = {f.path: f for f in downloads.list_files(HUB_REPO, api)}
    return downloads.DownloadPlan(HUB_REPO, "ipadapter", tuple(
        listed.get(path, downloads.HubFile(path)) for path in spec.files))


def download(name: str, cache_dir: Optional[str] = None, *, progress: bool = True, api=None,
             snapshot=None, on_plan=None) -> Path:
    """Fetch adapter ``name``'s weight file and image encoder into the hub cache (nothing
    when they are there); returns the weight file."""
    from . import downloads

    spec = ADAPTERS[name]
    found = cached_files(spec, cache_dir)
    if found is not None:
        return Path(found[0])
    plan = download_plan(name, api)
    if on_plan is not None:
        on_plan(plan)
    folder = downloads.fetch(plan, cache_dir, progress=progress, snapshot=snapshot)
    return folder / spec.weight


def listing(cache_dir: Optional[str] = None) -> List[Tuple[str, str, bool, str]]:
    """(name, family, downloaded, the modes it serves) of every adapter: for
    ``controlcanvas models``."""
    return [(spec.name, spec.family, cached_files(spec, cache_dir) is not None,
             "face" if spec.face else "reference, style, composition" +
             (" (plus: finer detail)" if spec.plus else ""))
            for spec in ADAPTERS.values()]
