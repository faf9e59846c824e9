"""IP-Adapter weights for reference units: which adapter a reference uses, where its files
are, how ``controlcanvas models download`` fetches them.

A reference unit (``shared.messages.ReferenceUnit``) names an adapter of :data:`ADAPTERS`
(or "" for the default of its base family and mode, :data:`DEFAULTS`).  The weights are
h94/IP-Adapter's: one ``.safetensors`` file per adapter plus the CLIP image encoder it was
trained with (ViT-H, ``models/image_encoder``: the SDXL ``*_vit-h`` adapters use the same
encoder as SD1.5).  ``face`` needs a face adapter (``ip-adapter-plus-face``); the FaceID
models need insightface and are not offered.  The tiny bases (``tiny-sd15``,
``tiny-sdxl``) use tiny adapters built locally (:mod:`.tiny_ipadapter`): ``tiny`` (plain,
the default), ``tiny-plus`` and ``tiny-plus-face`` (IP-Adapter Plus's Resampler layout;
the default for ``face``).

Flux.1 (``flux``) has XLabs-AI/flux-ip-adapter (``ip-adapter-flux``: its
``ip_adapter.safetensors`` and the openai/clip-vit-large-patch14 image encoder, a second
hub repo; FLUX.1 [dev] Non-Commercial License).  It runs the ``reference`` mode only:
there is no published layer scheme for ``style`` / ``composition`` on Flux's blocks and no
Flux face adapter, so those modes are ReferenceUnsupported naming "reference".  The tiny
Flux bases use a tiny adapter of that layout (``tiny``).

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
FLUX_REPO = "XLabs-AI/flux-ip-adapter"
CLIP_L = "openai/clip-vit-large-patch14"  # the image encoder XLabs' Flux adapter reads
FAMILIES = ("sd15", "sdxl", "flux")  # the families with an IP-Adapter here
ENCODER_FILES = ("config.json", "model.safetensors")
# The modes a family's adapters serve (absent: all of them).
MODES: Dict[str, Tuple[str, ...]] = {"flux": ("reference",)}


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
    repo: str = HUB_REPO
    encoder_repo: str = ""  # "" = the adapter's own repo
    licence: str = ""       # "" = the base family's (open RAIL for h94's)

    @property
    def files(self) -> Tuple[str, ...]:
        """The files of :attr:`repo`: the weight, and the encoder's when it lives there."""
        return (self.weight,) + (() if self.encoder_repo else self.encoder_files)

    @property
    def encoder_files(self) -> Tuple[str, ...]:
        return tuple(f"{self.encoder}/{name}" if self.encoder else name
                     for name in ENCODER_FILES)


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
    AdapterSpec("ip-adapter-flux", "flux", "ip_adapter.safetensors", encoder="",
                repo=FLUX_REPO, encoder_repo=CLIP_L,
                licence="FLUX.1 [dev] Non-Commercial License"),
)}

# The adapter a reference uses when it names none: per family, face or not.
DEFAULTS: Dict[Tuple[str, bool], str] = {
    ("sd15", False): "ip-adapter-sd15", ("sd15", True): "ip-adapter-plus-face-sd15",
    ("sdxl", False): "ip-adapter-sdxl-vit-h", ("sdxl", True): "ip-adapter-plus-face-sdxl-vit-h",
    ("flux", False): "ip-adapter-flux",
}
TINY = "tiny"  # the name of the built-in tiny adapter (tiny bases only)
TINY_PLUS, TINY_FACE = "tiny-plus", "tiny-plus-face"  # tiny SD1.5 / SDXL: plus, plus-face


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
        f"(IP-Adapter): references run on {', '.join(f.upper() for f in FAMILIES[:-1])} "
        f"and {FAMILIES[-1].upper()} bases. "
        f"Pick one of those, or remove the reference.", field="references")


def resolve(model: str, mode: str, family: str, base: str, *, tiny_base: bool = False,
            tiny_root: Optional[Path] = None, cache_dir: Optional[str] = None,
            field: str = "references") -> ResolvedAdapter:
    """The adapter of one reference unit on a base of ``family`` (typed errors: a family
    without IP-Adapter, an unknown name, one of another family, one not downloaded)."""
    if family not in FAMILIES:
        raise unsupported_family(family, base)
    check_mode(mode, family, base, field)
    face = mode == "face"
    if tiny_base and model in ("", TINY, TINY_PLUS, TINY_FACE):
        return _tiny(model, face, family, base, tiny_root, field)
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


def check_mode(mode: str, family: str, base: str, field: str = "references") -> None:
    """ReferenceUnsupported for a mode the family's adapters do not serve (Flux: only
    ``reference``, see the module docstring)."""
    served = MODES.get(family)
    if served is None or mode in served:
        return
    why = ("no Flux face adapter exists" if mode == "face" else
           f"there is no published layer scheme for {mode!r} on {family.upper()}'s blocks")
    raise ReferenceUnsupported(
        f"References on the {family.upper()} base {base!r} run in mode "
        f"{' or '.join(repr(m) for m in served)} only ({why}). Set the reference's mode to "
        f"{served[0]!r}, or use an SD1.5 or SDXL base for {mode!r}.", field=f"{field}.mode")


def _tiny(model: str, face: bool, family: str, base: str, tiny_root: Optional[Path],
          field: str) -> ResolvedAdapter:
    """The built-in tiny adapter a tiny base's reference names (face: ``tiny-plus-face``)."""
    from . import tiny_ipadapter as tiny

    if family == "flux":
        if model not in ("", TINY):
            raise ModelMissing(f"The tiny Flux base {base!r} has the tiny adapter {TINY!r} "
                               f"only; leave the reference's model empty.",
                               field=f"{field}.model")
        folder = tiny.ensure_tiny_adapter(family, tiny_root)
        return ResolvedAdapter(TINY, family, str(folder / tiny.FLUX_WEIGHT_NAME),
                               str(folder / tiny.ENCODER))
    name = model or (TINY_FACE if face else TINY)
    if face and name != TINY_FACE:
        raise ReferenceUnsupported(f"The tiny IP-Adapter {name!r} is not a face model; face "
                                   f"references on {base!r} use {TINY_FACE!r} (or leave the "
                                   f"model empty).", field=f"{field}.model")
    weight = {TINY: tiny.WEIGHT_NAME, TINY_PLUS: tiny.PLUS_NAME, TINY_FACE: tiny.FACE_NAME}[name]
    folder = tiny.ensure_tiny_adapter(family, tiny_root)
    return ResolvedAdapter(name, family, str(folder / weight), str(folder / tiny.ENCODER),
                           plus=name != TINY)


def names_for(family: str) -> List[str]:
    return [a.name for a in ADAPTERS.values() if a.family == family]


def cached_files(spec: AdapterSpec, cache_dir: Optional[str] = None
                 ) -> Optional[Tuple[str, str]]:
    """(weight file, image encoder folder) in the local hub cache, or None when a file of
    them is missing."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    wanted = [(spec.repo, name) for name in spec.files]
    if spec.encoder_repo:
        wanted += [(spec.encoder_repo, name) for name in spec.encoder_files]
    for repo, name in wanted:
        try:
            path = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an invalid cache is "not present"
            return None
        if not isinstance(path, str):
            return None
        found.append(path)
    return found[0], str(Path(found[1]).parent)


def download_plans(name: str, api=None) -> List["downloads.DownloadPlan"]:
    """The files ``models download NAME`` fetches for adapter ``name``, one plan per hub
    repo (its weight file, and the image encoder: in the same repo for h94's, in
    openai/clip-vit-large-patch14 for Flux's), with sizes (asks the hub; offline:
    HubUnreachable)."""
    from . import downloads

    spec = ADAPTERS[name]
    parts = [(spec.repo, spec.files)]
    if spec.encoder_repo:
        parts.append((spec.encoder_repo, spec.encoder_files))
    plans = []
    for repo, files in parts:
        listed = {f.path: f for f in downloads.list_files(repo, api)}
        plans.append(downloads.DownloadPlan(repo, "ipadapter", tuple(
            listed.get(path, downloads.HubFile(path)) for path in files)))
    return plans


def download_plan(name: str, api=None) -> "downloads.DownloadPlan":
    """The adapter repo's part of :func:`download_plans` (the whole plan for h94's)."""
    return download_plans(name, api)[0]


def download(name: str, cache_dir: Optional[str] = None, *, progress: bool = True, api=None,
             snapshot=None, on_plan=None) -> Path:
    """Fetch adapter ``name``'s weight file and image encoder into the hub cache (nothing
    when they are there); returns the weight file."""
    from . import downloads

    spec = ADAPTERS[name]
    found = cached_files(spec, cache_dir)
    if found is not None:
        return Path(found[0])
    folders = []
    for plan in download_plans(name, api):
        if on_plan is not None:
            on_plan(plan)
        folders.append(downloads.fetch(plan, cache_dir, progress=progress, snapshot=snapshot))
    return folders[0] / spec.weight


def listing(cache_dir: Optional[str] = None) -> List[Tuple[str, str, bool, str]]:
    """(name, family, downloaded, the modes it serves) of every adapter: for
    ``controlcanvas models``."""
    return [(spec.name, spec.family, cached_files(spec, cache_dir) is not None,
             "face" if spec.face else ", ".join(MODES.get(spec.family, (
                 "reference", "style", "composition"))) +
             (" (plus: finer detail)" if spec.plus else "") +
             (f"; {spec.licence}" if spec.licence else ""))
            for spec in ADAPTERS.values()]
