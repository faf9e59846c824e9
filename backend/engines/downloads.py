"""Fetching a model from the Hugging Face hub: which files, how big, with a progress bar.

``controlcanvas models download NAME`` asks the hub for the repo's file list with each
file's size (``HfApi.model_info`` with the files' metadata), picks the files the engine loads, says how much
that is, then fetches exactly those (``snapshot_download`` with huggingface_hub's own
progress bars) into the hub cache.

Which files: the diffusers layout only (``model_index.json`` + component folders for a
base, ``config.json`` + weights for a ControlNet), never the multi-GB single-file
checkpoints or EMA copies some repos also hold.  For each component's weights the fp16
variant comes first where the repo has one (``unet/diffusion_pytorch_model.fp16
.safetensors``: an SDXL UNet is 5 GB in fp16 against 10 GB in fp32; the engine loads it
as ``variant="fp16"`` and casts to its own dtype), then full safetensors (single or
sharded), then ``.bin``.

Offline (``HF_HUB_OFFLINE``), or with the hub out of reach, the size is unknown and
that is said: :class:`~shared.errors.HubUnreachable`, never a traceback.  Nothing here
runs at import: ``huggingface_hub`` is imported when the hub is asked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from shared.errors import HubUnreachable, ModelMissing

log = logging.getLogger(__name__)

# Component folders whose weights a base needs, and each one's weight file stem.
BASE_COMPONENTS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                   ("text_encoder", "model"), ("text_encoder_2", "model"))
CONTROLNET_STEM = "diffusion_pytorch_model"
# Small files a base needs besides weights (configs, tokenizers); weight indexes are left
# to the weight choice.
BASE_CONFIGS = ("model_index.json", "*/config.json", "*/*.json", "*/*.txt", "tokenizer*/*")
CONTROLNET_CONFIGS = ("config.json",)
HUB_TIMEOUT = 10.0  # seconds to wait for the hub's file list
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".index.fp16.json", ".ckpt", ".pt",
                   ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data")


@dataclass(frozen=True)
class HubFile:
    path: str
    size: Optional[int] = None  # bytes; None when the hub did not say


@dataclass(frozen=True)
class DownloadPlan:
    """The files ``models download`` fetches for one repo, and what they weigh."""

    repo_id: str
    kind: str                 # "base" | "controlnet" | "lora" (a few-step preset's file)
    #                           | "ipadapter" (an IP-Adapter's files: references.ADAPTERS)
    files: Tuple[HubFile, ...]
    variant: str = ""         # "fp16" when fp16 weights were chosen (for some component)
    full_size: Optional[int] = None  # the same model with full-precision weights, when known

    @property
    def size(self) -> Optional[int]:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)

    def describe(self) -> str:
        """``owner/name (ControlNet): 2 files, 2.50 GB (fp16 weights; 5.00 GB in fp32)``."""
        what = {"base": "base model", "lora": "LoRA", "ipadapter": "IP-Adapter"}.get(
            self.kind, "ControlNet")
        size = f"{human_size(self.size)}" if self.size is not None else "size unknown"
        if self.kind in ("lora", "ipadapter"):
            return f"{self.repo_id} ({what}): {', '.join(f.path for f in self.files)}, {size}"
        if self.variant and self.full_size:
            weights = f"fp16 weights; {human_size(self.full_size)} in fp32"
        elif self.variant:
            weights = "fp16 weights"
        else:
            weights = "full-precision weights: the repo has no fp16 variant"
        return f"{self.repo_id} ({what}): {len(self.files)} files, {size} ({weights})"


def human_size(nbytes: Optional[int]) -> str:
    if nbytes is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


# -- asking the hub ---------------------------------------------------------------------------

@contextlib.contextmanager
def hub_errors(repo_id: str, doing: str = "download") -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into typed ones that say what to do."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)
    try:
        yield
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise HubUnreachable(f"Cannot {doing} {repo_id}: offline ({err}).",
                             field="model") from None
    except GatedRepoError:
        raise ModelMissing(f"{repo_id} is gated: accept its licence on huggingface.co and log "
                           f"in (`hf auth login`), then retry.", field="model") from None
    except RepositoryNotFoundError:
        raise ModelMissing(f"{repo_id} does not exist on huggingface.co (or is private).",
                           field="model") from None
    except (OSError, ConnectionError) as err:
        raise HubUnreachable(f"Cannot {doing} {repo_id}: huggingface.co is not reachable "
                             f"({type(err).__name__}: {err}). Check the internet connection "
                             f"or proxy and retry.", field="model") from None
    except Exception as err:  # noqa: BLE001 - httpx and hub errors vary between versions
        name = type(err).__name__.lower()
        if "connect" in name or "timeout" in name or "proxy" in name or "network" in name:
            raise HubUnreachable(f"Cannot {doing} {repo_id}: huggingface.co is not reachable "
                                 f"({type(err).__name__}).", field="model") from None
        raise


def check_online(repo_id: str, doing: str = "download") -> None:
    """HubUnreachable at once when offline mode is on (no network call is tried)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(
            f"Cannot {doing} {repo_id}: offline mode is on (HF_HUB_OFFLINE is set), so the hub "
            f"is not asked and the download size is unknown. Unset it and retry on a connected "
            f"machine, or copy the model folder here and put its path in config.toml.",
            field="model")


def list_files(repo_id: str, api=None, doing: str = "ask the hub about"
               ) -> Tuple[HubFile, ...]:
    """Every file of the hub repo with its size (an LFS file's real size, not its
    pointer's): one ``model_info`` call with the files' metadata, which fails at once when
    the hub is out of reach (no retries)."""
    check_online(repo_id, doing)
    from huggingface_hub import HfApi

    api = api or HfApi()
    with hub_errors(repo_id, doing):
        info = api.model_info(repo_id, files_metadata=True, timeout=HUB_TIMEOUT)
    return tuple(HubFile(f.rfilename, f.lfs.size if f.lfs is not None else f.size)
                 for f in info.siblings or ())


# -- choosing the files -------------------------------------------------------------------------

def _weights(names: set, folder: str, stem: str) -> Tuple[List[str], str, List[str]]:
    """(files to fetch, variant, the full-precision files) for one component's weights:
    the fp16 variant first, then full safetensors, then .bin; ([], "", []) when none."""
    prefix = f"{folder}/" if folder else ""
    base = f"{prefix}{stem}"

    def sharded(index: str, fp16: bool) -> List[str]:
        if index not in names:
            return []
        shards = sorted(n for n in names if fnmatch.fnmatch(n, f"{base}-*.safetensors")
                        and (n.endswith(".fp16.safetensors") == fp16))
        return [index] + shards if shards else []

    full = [f"{base}.safetensors"] if f"{base}.safetensors" in names else \
        sharded(f"{base}.safetensors.index.json", False)
    fp16 = [f"{base}.fp16.safetensors"] if f"{base}.fp16.safetensors" in names else \
        sharded(f"{base}.safetensors.index.fp16.json", True)
    if fp16:
        return fp16, "fp16", full
    if full:
        return full, "", full
    if f"{base}.bin" in names:
        return [f"{base}.bin"], "", [f"{base}.bin"]
    return [], "", []


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def choose(repo_id: str, files: Sequence[HubFile]) -> DownloadPlan:
    """The files to fetch from a repo listing (see the module docstring)."""
    by_name = {f.path: f for f in files}
    names = set(by_name)
    if "model_index.json" in names:
        kind, patterns, parts = "base", BASE_CONFIGS, [
            (folder, stem) for folder, stem in BASE_COMPONENTS
            if any(n.startswith(folder + "/") for n in names)]
    elif "config.json" in names:
        kind, patterns, parts = "controlnet", CONTROLNET_CONFIGS, [("", CONTROLNET_STEM)]
    else:
        raise ModelMissing(f"{repo_id} is not a model in diffusers layout (it has neither "
                           f"model_index.json nor config.json). Download its single "
                           f".safetensors file yourself and put that path in config.toml.",
                           field="model")
    chosen = sorted(n for n in names if not _is_weight(n)
                    and any(fnmatch.fnmatch(n, pattern) for pattern in patterns))
    configs = list(chosen)
    variant, full, fp16_only = "", [], False
    for folder, stem in parts:
        picked, part_variant, part_full = _weights(names, folder, stem)
        if not picked:
            raise ModelMissing(f"{repo_id} has no diffusers weights for "
                               f"{folder or 'the ControlNet'} ({stem}.safetensors or .bin); it "
                               f"cannot be downloaded as a model folder.", field="model")
        chosen += picked
        full += part_full
        fp16_only = fp16_only or not part_full
        variant = variant or part_variant
    full_sizes = [by_name[n].size for n in configs + full]
    full_size = sum(full_sizes) if variant and not fp16_only and None not in full_sizes \
        else None
    return DownloadPlan(repo_id, kind, tuple(by_name[n] for n in chosen), variant,
                        full_size)


def plan(repo_id: str, api=None, doing: str = "ask the hub about") -> DownloadPlan:
    """What ``models download`` would fetch from ``repo_id``, with sizes (asks the hub)."""
    return choose(repo_id, list_files(repo_id, api, doing))


# -- fetching ----------------------------------------------------------------------------------

def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def fetch(download: DownloadPlan, cache_dir: Optional[str] = None, *, progress: bool = True,
          snapshot=None) -> Path:
    """Fetch the plan's files into the hub cache with huggingface_hub's progress bars (bytes
    received, files done); returns the snapshot folder.  ``snapshot``: the function that
    fetches (``huggingface_hub.snapshot_download``; tests pass a fake hub)."""
    check_online(download.repo_id)
    if snapshot is None:
        from huggingface_hub import snapshot_download as snapshot
    from huggingface_hub.utils import tqdm as hf_tqdm

    with hub_errors(download.repo_id):
        path = snapshot(download.repo_id, allow_patterns=[f.path for f in download.files],
                        cache_dir=cache_dir, tqdm_class=hf_tqdm if progress else _quiet_tqdm())
    log.info("downloaded %s into %s", download.repo_id, path)
    return Path(path)


def sizes_of(repo_ids: Iterable[str], api=None) -> Tuple[Dict[str, str], str]:
    """({repo id: download size text}, why the hub could not be asked or ''): once the hub
    proves unreachable the rest are "size unknown" without asking again."""
    sizes: Dict[str, str] = {}
    unreachable = ""
    for repo_id in repo_ids:
        if unreachable:
            sizes[repo_id] = "size unknown: hub unreachable"
            continue
        try:
            found = plan(repo_id, api)
        except HubUnreachable as err:
            unreachable = err.message
            sizes[repo_id] = "size unknown: hub unreachable"
            continue
        except ModelMissing as err:
            sizes[repo_id] = f"size unknown: {err.message}"
            continue
        variant = ", fp16" if found.variant else ""
        sizes[repo_id] = f"download {human_size(found.size)}{variant}"
    return sizes, unreachable
