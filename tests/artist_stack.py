"""Issue 15's artist stack, at test size, for the real-editor tiers: an Illustrious-style
SDXL *single file*, the SDXL union ControlNet, a style LoRA and the SDXL IP-Adapter, served
by the tiny diffusers engine exactly as a user's server would find them.

* the single file: the tiny SDXL stack written in Stability's SGM layout
  (:func:`single_file_support.write_checkpoint`), named like a model-site download and
  configured as a named base in ``config.toml``'s ``[models.bases]``;
* the union ControlNet: the tiny SDXL union in the hub cache under the catalogue's SDXL
  default (``SDXL_UNION``), so a lineart unit with no model is served by it as on a
  real install;
* the SDXL configs that a single file needs (``config_repo``), in that hub cache;
* the IP-Adapter: the tiny SDXL adapter under h94/IP-Adapter's names in the hub cache
  (what ``controlcanvas models download ip-adapter-sdxl-vit-h`` leaves there);
* the LoRA: a tiny SDXL LoRA in the LoRA folder.

:func:`start_server` runs the server with that config on 127.0.0.1 (port 0) and a
:class:`RecordingEngine` around the engine: each request, its images and its pictures,
so a test can check what the plug-in really sent and got back.

Issue 23's Edit mode has a server of its own, :func:`start_edit_server`: the tiny engine
with a built-in default base (``tiny-sd15``), so an edit that names no model runs on the
built-in edit model, the tiny FLUX.1 Kontext stack (``tiny-flux-kontext``) - what a user's
demo server does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

BASE_NAME = "illustrious"  # the name config.toml gives the single file
SINGLE_FILE = "waiIllustrious_v14.safetensors"
LORA_NAME = "xl_style"


def _files_of(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def build(where: Path) -> Path:
    """Lay the stack out under ``where``; returns its ``config.toml``."""
    from backend.engines import references, tiny, tiny_ipadapter
    from backend.engines.catalogue import DEFAULT_BASES, SDXL_UNION
    from single_file_support import write_checkpoint
    from tiny_fixtures import config_repo, fake_hub_snapshot, make_tiny_lora

    tiny_root = where / "tiny"
    folder = tiny.ensure_tiny("sdxl", tiny_root)
    models = where / "models"
    models.mkdir(parents=True)
    single = write_checkpoint(folder, models / SINGLE_FILE)
    cache = where / "hf"
    config_repo(cache, DEFAULT_BASES["sdxl"], folder)
    fake_hub_snapshot(cache, SDXL_UNION, _files_of(folder / "controlnets" / "union"))
    adapter = tiny_ipadapter.ensure_tiny_adapter("sdxl", tiny_root)
    spec = references.ADAPTERS[references.DEFAULTS["sdxl", False]]
    encoder = adapter / tiny_ipadapter.ENCODER
    fake_hub_snapshot(cache, references.HUB_REPO, {
        spec.weight: (adapter / tiny_ipadapter.WEIGHT_NAME).read_bytes(),
        **{f"{spec.encoder}/{name}": data for name, data in _files_of(encoder).items()}})
    loras = where / "loras"
    make_tiny_lora(loras / f"{LORA_NAME}.safetensors", tiny_root, family="sdxl", seed=5)
    config = where / "config.toml"
    config.write_text(f"""
[models]
cache_dir = "{cache.as_posix()}"
tiny_root = "{tiny_root.as_posix()}"
roots = ["{models.as_posix()}"]
lora_dir = "{loras.as_posix()}"
[models.bases]
{BASE_NAME} = "{single.as_posix()}"
""", encoding="utf-8")
    return config


class RecordingEngine:
    """An engine that keeps (request, images, pictures) of every generation it runs."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.calls: List[Tuple[Any, Dict[int, Any], list]] = []
        self._lock = threading.Lock()

    def generate(self, request, images, ctx):
        out = self._engine.generate(request, images, ctx)
        with self._lock:
            self.calls.append((request, dict(images), list(out)))
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


def start_server(where: Path, token: str = ""):
    """(server thread, recording engine): the tiny engine over the stack under ``where``."""
    from backend.engines.diffusers.engine import DiffusersEngine
    from backend.server.config import ServerConfig
    from backend.server.local import ServerThread

    config = build(where)
    engine = RecordingEngine(DiffusersEngine.from_options({"device": "cpu"},
                                                          config_file=config))
    extra = {"token": token} if token else {}
    return ServerThread(engine, ServerConfig(port=0), **extra).start(), engine


def start_edit_server(where: Path, token: str = ""):
    """(server thread, recording engine): the tiny engine with a built-in default base, whose
    edit model (a blank Edit model) is the tiny FLUX.1 Kontext stack, built here up front."""
    from backend.engines import tiny_kontext
    from backend.engines.diffusers.engine import DiffusersEngine
    from backend.server.config import ServerConfig
    from backend.server.local import ServerThread

    tiny_root = where / "tiny"
    tiny_kontext.ensure_kontext(tiny_root)
    config = where / "config.toml"
    config.write_text(f"""
[models]
base = "tiny-sd15"
cache_dir = "{(where / 'hf').as_posix()}"
tiny_root = "{tiny_root.as_posix()}"
""", encoding="utf-8")
    engine = RecordingEngine(DiffusersEngine.from_options({"device": "cpu"},
                                                          config_file=config))
    assert engine.catalogue.edit_base("") == tiny_kontext.NAME, "the edit model a blank picks"
    extra = {"token": token} if token else {}
    return ServerThread(engine, ServerConfig(port=0), **extra).start(), engine


def reference_png(path: Path, width: int = 640, height: int = 420) -> Path:
    """The artist's reference picture: a painted-looking sunset over a hill, bigger than
    the 512 px a reference is sent at (so the plug-ins' scaled read runs)."""
    from PIL import Image as PILImage, ImageDraw

    img = PILImage.new("RGBA", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # sky: orange to violet
        t = y / max(1, height - 1)
        draw.line((0, y, width, y), fill=(int(250 - 120 * t), int(150 - 90 * t),
                                          int(60 + 120 * t), 255))
    draw.ellipse((width * 0.55, height * 0.2, width * 0.8, height * 0.55),
                 fill=(255, 230, 120, 255))
    draw.ellipse((-width * 0.2, height * 0.6, width * 0.7, height * 1.6), fill=(40, 90, 60, 255))
    img.save(path)
    return path
