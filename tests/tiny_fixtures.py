"""Tiny diffusers models for the engine tests: built offline once per session.

Register in ``tests/conftest.py`` with ``pytest_plugins = ["tiny_fixtures"]``; the
engine test modules also import the fixtures they use, so they run either way
(the builds are cached in this module, so a second registration costs nothing).

Tests load the tiny models through the same resolution code a user's model goes
through (``Catalogue`` with ``tiny_root`` pointing at the session folder).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads its constants

from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shared.errors import Cancelled  # noqa: E402
from shared.images import Image  # noqa: E402

_CACHE: dict = {}


class RecordingContext:
    """A JobContext that records progress and previews; optionally cancels at a step."""

    job_id = "0" * 32

    def __init__(self, cancel_at: Optional[int] = None, preview_every: int = 0) -> None:
        self.events: List[tuple] = []
        self.cancel_at = cancel_at
        self.preview_every = preview_every
        self.previews: List[Image] = []

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        self.events.append(("progress", step, total, stage))
        if self.cancel_at is not None and step >= self.cancel_at:
            raise Cancelled(job_id=self.job_id)

    def wants_preview(self, step: int) -> bool:
        return bool(self.preview_every) and step % self.preview_every == 0

    def preview(self, step: int, image: Image) -> None:
        self.previews.append(image)
        self.events.append(("preview", step, image.width, image.height))

    def check_cancelled(self) -> None:
        if self.cancel_at is not None and self.steps_done() >= self.cancel_at:
            raise Cancelled(job_id=self.job_id)

    def steps_done(self) -> int:
        return sum(1 for e in self.events if e[0] == "progress")


def random_rgba(width: int, height: int, seed: int = 0, opaque: bool = True) -> Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if opaque:
        array[..., 3] = 255
    return Image(width, height, array.tobytes())


def lines_image(width: int, height: int, seed: int = 0) -> Image:
    """White strokes on black: what a line-art unit gets."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 4), np.uint8)
    array[..., 3] = 255
    for _ in range(6):
        if rng.random() < 0.5:
            array[rng.integers(0, height), :, :3] = 255
        else:
            array[:, rng.integers(0, width), :3] = 255
    return Image(width, height, array.tobytes())


def _root(tmp_path_factory) -> Path:
    if "root" not in _CACHE:
        from backend.engines import tiny

        root = tmp_path_factory.mktemp("tiny-models")
        for family in tiny.FAMILIES:
            tiny.ensure_tiny(family, root)
        _CACHE["root"] = root
    return _CACHE["root"]


@pytest.fixture(scope="session")
def torch_threads():
    """One torch thread for the tiny models (override: CONTROLCANVAS_TEST_THREADS).

    Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine
    spinning OpenMP threads made this suite ~5x slower (164 s vs 28 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CONTROLCANVAS_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory, torch_threads) -> Path:
    """Folder holding the tiny sd15 and sdxl stacks (``backend.engines.tiny.tiny_dir(family, root)``)."""
    return _root(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_catalogue(tiny_root):
    """A Catalogue with no config except where the tiny models live (no hub cache used);
    its models folder is the session's temporary folder, so a request may name models the
    tests write under their ``tmp_path``."""
    from backend.engines.catalogue import Catalogue, ModelConfig

    return Catalogue(ModelConfig(tiny_root=str(tiny_root),
                                 cache_dir=str(tiny_root / "empty-hf-cache"),
                                 roots=(str(tiny_root.parent),)))


@pytest.fixture(scope="session")
def tiny_engine(tiny_catalogue):
    """A CPU DiffusersEngine over the tiny models, shared by the session (caches warm)."""
    if "engine" not in _CACHE:
        from backend.engines.diffusers.engine import DiffusersEngine

        _CACHE["engine"] = DiffusersEngine(tiny_catalogue, device="cpu")
    return _CACHE["engine"]


@pytest.fixture
def fresh_engine(tiny_catalogue):
    """A DiffusersEngine of its own (for tests that break or instrument it)."""
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(tiny_catalogue, device="cpu")
    yield engine
    engine.close()


def build_inpaint_stack(source: Path, folder: Path) -> Path:
    """A tiny *inpainting* stack: ``source`` (a tiny stack) with a 9-channel UNet (latents +
    mask + masked-image latents), as stable-diffusion-inpainting and the SDXL inpainting
    models are."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("controlnets", ".complete"))
    four = UNet2DConditionModel.from_pretrained(source / "unet")
    nine = UNet2DConditionModel.from_config({**four.config, "in_channels": 9})
    state = four.state_dict()
    weight = state["conv_in.weight"]
    extra = torch.randn((weight.shape[0], 5) + tuple(weight.shape[2:]),
                        generator=torch.Generator().manual_seed(5)) * 0.05
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    nine.load_state_dict(state)
    shutil.rmtree(folder / "unet")
    nine.save_pretrained(folder / "unet")
    return folder


def inpaint_folder(tiny_root: Path, family: str = "sd15") -> Path:
    """The tiny ``family`` stack with a 9-channel inpainting UNet (built once a session)."""
    key = f"inpaint-{family}"
    if key not in _CACHE:
        from backend.engines import tiny

        _CACHE[key] = build_inpaint_stack(tiny.tiny_dir(family, tiny_root),
                                          tiny_root / f"tiny-{family}-inpaint")
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_inpaint_folder(tiny_root) -> Path:
    """The tiny SD1.5 stack with a 9-channel inpainting UNet (a diffusers folder)."""
    return inpaint_folder(tiny_root, "sd15")


def fake_hub_snapshot(cache: Path, repo_id: str, files: dict) -> Path:
    """Lay out a Hugging Face cache entry the way huggingface_hub writes it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return snapshot


def config_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """``repo_id`` in the hub cache ``cache`` with only ``folder``'s small files (configs,
    tokenizers, scheduler: what diffusers fetches online for a single file)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and path.suffix in (".json", ".txt") and \
                not rel.startswith(("controlnets/", ".")):
            files[rel] = path.read_bytes()
    return fake_hub_snapshot(cache, repo_id, files)


# -----------------------------------------------------------------------------
# Tiny LoRAs (made with peft on the tiny UNets, saved as diffusers or kohya files)
# -----------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_tiny_lora(path: Path, root: Path, family: str = "sd15", seed: int = 1,
                   text_encoder: bool = False, kohya: bool = False) -> Path:
    """A rank-4 LoRA on the tiny ``family`` UNet's attention (and, with ``text_encoder``,
    its CLIP text encoder), random non-zero up (B) matrices so it changes the picture;
    saved with diffusers' ``save_lora_weights`` (``unet.`` / ``text_encoder.`` keys), or
    with kohya's ``lora_unet_..`` names and ``alpha`` tensors."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, \
        UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    from backend.engines import tiny

    folder = tiny.ensure_tiny(family, root)
    generator = torch.Generator().manual_seed(seed)

    def lora_of(model, targets):
        # peft itself (transformers' own add_adapter wants a newer peft than diffusers does)
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets),
                                        model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        return get_peft_model_state_dict(model)

    with torch.random.fork_rng():  # the A matrices' init draws from the global generator
        torch.manual_seed(seed)
        unet_layers = lora_of(UNet2DConditionModel.from_pretrained(folder / "unet"),
                              LORA_TARGETS)
        te_layers = lora_of(CLIPTextModel.from_pretrained(folder / "text_encoder"),
                            ["q_proj", "k_proj", "v_proj", "out_proj"]) if text_encoder else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        from safetensors.torch import save_file

        tensors = {}
        for key, value in unet_layers.items():
            module, _, kind = key.rpartition(".lora_")  # ...to_q.lora_A.weight
            stem = "lora_unet_" + module.replace(".", "_")
            tensors[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = \
                value.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(4.0)
        save_file(tensors, str(path))
        return path
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(str(path.parent), unet_lora_layers=unet_layers,
                          text_encoder_lora_layers=te_layers, weight_name=path.name)
    return path


def make_header_lora(path: Path, keys_shapes: dict, metadata: Optional[dict] = None) -> Path:
    """A LoRA-shaped .safetensors file with zero tensors of the given names and shapes
    (for the family detection of real-size LoRAs, which are too big to build here)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(shape, np.float16) for k, shape in keys_shapes.items()}, str(path),
              metadata=metadata)
    return path


# Real-size LoRA headers: kohya SD1.5 / SDXL names and widths, a diffusers Flux transformer.
SD15_KOHYA = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down"
              ".weight": (4, 768),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up"
              ".weight": (320, 4)}
SDXL_KOHYA = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight":
              (4, 2048),
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight":
              (640, 4)}
FLUX_DIFFUSERS = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
                  "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4)}


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_root, tmp_path_factory) -> Path:
    """A LoRA folder: ``ink`` and ``paper`` (tiny SD1.5, paper with a text-encoder part),
    ``ink_kohya`` (ink in kohya names), ``xl_ink`` (tiny SDXL), and real-size headers
    ``sd15_size`` / ``sdxl_size`` / ``flux_size``."""
    if "loras" not in _CACHE:
        folder = tmp_path_factory.mktemp("loras")
        make_tiny_lora(folder / "ink.safetensors", tiny_root, seed=1)
        make_tiny_lora(folder / "paper.safetensors", tiny_root, seed=2, text_encoder=True)
        make_tiny_lora(folder / "ink_kohya.safetensors", tiny_root, seed=1, kohya=True)
        make_tiny_lora(folder / "xl_ink.safetensors", tiny_root, family="sdxl", seed=3)
        make_header_lora(folder / "sd15_size.safetensors", SD15_KOHYA)
        make_header_lora(folder / "sdxl_size.safetensors", SDXL_KOHYA)
        make_header_lora(folder / "flux_size.safetensors", FLUX_DIFFUSERS)
        _CACHE["loras"] = folder
    return _CACHE["loras"]


@pytest.fixture
def lora_engine(tiny_root, tiny_lora_dir):
    """A DiffusersEngine of its own over the tiny models with the tiny LoRA folder."""
    from backend.engines.catalogue import Catalogue, ModelConfig
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(
        tiny_root=str(tiny_root), cache_dir=str(tiny_root / "empty-hf-cache"),
        lora_dir=str(tiny_lora_dir))), device="cpu")
    yield engine
    engine.close()
