"""The LoRA folder: which LoRA files the server has, the base family each one fits, and
the file a request's LoRA name means.  No torch here (listing reads file headers only);
:mod:`backend.engines.diffusers.lora` loads what this module finds.

The folder (``[models] lora_dir`` in config.toml, ``serve --lora-dir``; default
``models/loras`` in the data folder, :func:`shared.paths.data_dir`) holds ``.safetensors``
files.  A LoRA's name is its file name without ``.safetensors`` (the rule for names is
``shared.messages.lora_name_problem``); subfolders are not read, and neither are
``.ckpt`` / ``.pt`` / ``.bin`` files (pickles can run code when loaded).  A symbolic link
is used only when it points to a file inside the folder.

The family comes from the file's tensors, never from its name:

* Flux: ``single_transformer_blocks`` / ``single_blocks`` / ``double_blocks`` keys;
  Qwen-Image: its blocks' ``img_mlp`` / ``txt_mlp`` / ``img_mod`` / ``txt_mod`` parts (a
  LoRA on its attention alone is named as SD3's: it reads as SD3);
  SD3: ``joint_blocks`` keys, or diffusers ``transformer.transformer_blocks`` keys;
* UNet LoRAs (kohya ``lora_unet_...``, diffusers ``unet.`` / peft ``lora_A``): the width
  of the text embeddings that the cross-attention key/value projections read, i.e. the
  second dimension of an ``attn2 to_k`` / ``to_v`` down (A) matrix: 768 SD1.5, 1024
  SD2, 2048 SDXL (:data:`CONTEXT_FAMILIES`); other widths (the tiny test models) are
  ``unknown`` but still checked against the base by width;
* text-encoder-only LoRAs: kohya ``lora_te1_`` / ``lora_te2_`` or diffusers
  ``text_encoder_2.`` keys are SDXL; a single ``lora_te_`` / ``text_encoder.`` is SD1.5
  when its width is 768;
* last, kohya's ``ss_base_model_version`` / ``modelspec.architecture`` metadata.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from shared.errors import ModelMissing
from shared.messages import LORA_SUFFIX, LoraInfo, lora_name_problem
from shared.paths import data_dir

log = logging.getLogger(__name__)

CONTEXT_FAMILIES: Dict[int, str] = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES: Dict[str, str] = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux",
                                "sd3": "SD3", "qwen": "Qwen-Image"}
# Qwen-Image's block parts (its image / text streams' MLPs and modulations), which SD3's
# joint blocks name otherwise (ff, norm1); Flux's double blocks, checked first, share some.
_QWEN_PARTS = (".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Names of a LoRA's down (A) matrix: [rank, in_features] for a linear layer.
_DOWN = ("lora_down.weight", "lora.down.weight", "lora_A.weight", "lora_A.default.weight",
         "hada_w1_b", "hada_w2_b")
_HEADER_LIMIT = 100 * 1024 * 1024  # a bigger JSON header is not a LoRA


def default_lora_dir() -> Path:
    """``models/loras`` in the per-user data folder."""
    return data_dir() / "models" / "loras"


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of the folder: what a request's name resolves to."""

    name: str
    path: Path
    family: str            # sd15 | sd2 | sdxl | flux | sd3 | qwen | unknown
    context_dim: int       # width of the text embeddings its cross-attention reads (0: none)
    size: int
    mtime_ns: int

    @property
    def key(self) -> Tuple[str, int, int]:
        """Changes when the file is replaced (a loaded copy is then stale)."""
        return (str(self.path), self.size, self.mtime_ns)

    def info(self) -> LoraInfo:
        return LoraInfo(name=self.name, family=self.family, size=self.size)


def family_of_tensors(shapes: Mapping[str, Sequence[int]],
                      metadata: Optional[Mapping[str, str]] = None) -> Tuple[str, int]:
    """(family, context width) of a LoRA from its tensor names and shapes (module docstring)."""
    keys = list(shapes)
    if any(part in k for k in keys for part in ("single_transformer_blocks", "single_blocks",
                                                 "double_blocks")):
        return "flux", 0
    if any(part in k for k in keys for part in _QWEN_PARTS):
        return "qwen", 0
    if any("joint_blocks" in k for k in keys) or \
            any(k.startswith("transformer.") and ".transformer_blocks." in k for k in keys):
        return "sd3", 0
    width = 0
    for key in keys:
        shape = shapes[key]
        if "attn2" in key and ("to_k" in key or "to_v" in key) and key.endswith(_DOWN) \
                and len(shape) == 2:
            width = int(shape[1])
            break
    if width:
        return CONTEXT_FAMILIES.get(width, "unknown"), width
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")) for k in keys):
        return "sdxl", 0
    te_widths = {int(shapes[k][1]) for k in keys
                 if k.startswith(("lora_te_", "text_encoder.", "te.")) and k.endswith(_DOWN)
                 and len(shapes[k]) == 2}
    if te_widths == {768}:
        return "sd15", 0
    return _family_of_metadata(metadata or {}), 0


def _family_of_metadata(metadata: Mapping[str, str]) -> str:
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version",
                                                       "modelspec.architecture")).lower()
    for needle, family in (("flux", "flux"), ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"),
                           ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("sd_v1", "sd15"),
                           ("stable-diffusion-v1", "sd15"), ("sd_v2", "sd2"),
                           ("stable-diffusion-v2", "sd2")):
        if needle in text:
            return family
    return "unknown"


def read_family(path: Path) -> Tuple[str, int]:
    """(family, context width) of a LoRA file from its header only ("unknown", 0 when the
    header cannot be read: loading it then says why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as err:  # noqa: BLE001 - a damaged file is listed as unknown
        log.warning("cannot read the LoRA header of %s: %s", path, err)
        return "unknown", 0
    return family_of_tensors(shapes, metadata)


class LoraFolder:
    """The LoRA files of one folder (scanned on every call; headers read once per file
    version)."""

    def __init__(self, folder: Optional[os.PathLike] = None) -> None:
        self.folder = Path(folder).expanduser() if folder else default_lora_dir()
        self._families: Dict[Tuple[str, int, int], Tuple[str, int]] = {}

    def scan(self) -> List[LoraFile]:
        """Every usable LoRA of the folder, sorted by name."""
        try:
            with os.scandir(self.folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:  # no folder (yet): no LoRAs
            return []
        found: Dict[str, LoraFile] = {}
        for entry in entries:
            lora = self._entry(entry)
            if lora is None:
                continue
            if lora.name in found:
                log.warning("LoRA folder: %s and %s have the same name; using the first",
                            found[lora.name].path.name, entry.name)
                continue
            found[lora.name] = lora
        return list(found.values())

    def _entry(self, entry: os.DirEntry) -> Optional[LoraFile]:
        if not entry.name.lower().endswith(LORA_SUFFIX):
            return None
        name = entry.name[:-len(LORA_SUFFIX)]
        if lora_name_problem(name):
            log.warning("LoRA folder: %r is skipped: its name %s", entry.name,
                        lora_name_problem(name))
            return None
        path = Path(entry.path)
        try:
            if entry.is_symlink() and not self._inside(path):
                log.warning("LoRA folder: %s is a link to a file outside the folder; skipped",
                            entry.name)
                return None
            info = path.stat()
        except (OSError, RuntimeError):
            return None
        if not path.is_file():
            return None
        version = (str(path), info.st_size, info.st_mtime_ns)
        if version not in self._families:
            self._families[version] = read_family(path)
        family, width = self._families[version]
        return LoraFile(name, path, family, width, info.st_size, info.st_mtime_ns)

    def _inside(self, path: Path) -> bool:
        try:
            target = path.resolve(strict=True)
            root = self.folder.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return target.parent == root or root in target.parents

    def infos(self) -> Tuple[LoraInfo, ...]:
        return tuple(lora.info() for lora in self.scan())

    def find(self, name: str, field: str = "loras") -> LoraFile:
        """The LoRA called ``name``; ModelMissing naming the ones that exist otherwise (the
        folder's path goes to the log only: a client learns no paths of the server)."""
        found = {lora.name: lora for lora in self.scan()}
        if name in found:
            return found[name]
        pickles = [self.folder / f"{name}{suffix}" for suffix in PICKLE_SUFFIXES]
        pickle = next((p for p in pickles if p.is_file()), None)
        if pickle is not None:
            raise ModelMissing(
                f"The LoRA {name!r} is a {pickle.suffix} file, which ControlCanvas does not "
                f"load (such files can run code). Put the .safetensors version of it in the "
                f"server's LoRA folder.", field=field)
        log.info("no LoRA %r in the LoRA folder %s", name, self.folder)
        listed = ", ".join(sorted(found)) if found else "none"
        raise ModelMissing(
            f"There is no LoRA {name!r} on the server; its LoRAs: {listed}. Put the "
            f".safetensors file in the server's LoRA folder (`controlcanvas models` on the "
            f"server shows where; a name is the file name without .safetensors).", field=field)


def fit_problem(lora: LoraFile, base_name: str, base_family: str, base_context: int) -> str:
    """Why ``lora`` does not fit the base ('' when it fits, or when that cannot be told
    before loading): its family or text-embedding width differ from the base's."""
    if lora.context_dim and base_context:
        if lora.context_dim == base_context:
            return ""
        detail = f" (its attention reads {lora.context_dim}-wide text embeddings, the " \
                 f"base's {base_context}-wide ones)"
    elif lora.family != "unknown" and base_family and lora.family != base_family:
        detail = ""
    else:
        return ""
    made_for = "another kind of base model" if lora.family == "unknown" else \
        f"{FAMILY_NAMES.get(lora.family, lora.family)} base models"
    return (f"The LoRA {lora.name!r} was made for {made_for}{detail}, not for the base "
            f"{base_name!r} ({FAMILY_NAMES.get(base_family, base_family)}). Pick a LoRA listed "
            f"for {FAMILY_NAMES.get(base_family, base_family)}, or a base model it fits.")
