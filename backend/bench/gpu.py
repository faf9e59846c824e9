"""``controlcanvas bench gpu``: the CUDA fast path, measured against bare diffusers.

Nothing is downloaded (the GPU machines have no internet): real-size models with random
weights are built from diffusers configs written below (SD1.5 UNet + ControlNet, SDXL UNet +
ControlNet; the CLIP text encoders are one-layer ones of the right widths, as the text
encoder is not what is timed), saved to a temporary folder and loaded from there the way
a user's models are.  Each group of cases (``sd15``, ``sdxl``, ``compiled``) times four
ways of making the same image, interleaved, same seed, sampler, steps and size:

* ``bare``: the diffusers ControlNet pipeline as diffusers sets it up;
* ``bare_fast``: the same with our fast path applied to its models
  (``acceleration.prepare_pipeline``): the reference for our overhead;
* ``engine``: ``DiffusersEngine.generate`` with the request;
* ``ours``: the request through the job path: a real server on 127.0.0.1 (websocket,
  session, JobManager, engine), as the plug-ins send it.

Per case: median seconds, it/s (steps / seconds, end to end), ``ratio`` = ours ÷ bare_fast
(engine overhead; target <= 1.03), ``fast_path_speedup`` = bare ÷ bare_fast, peak VRAM, NaN
checks (fp16), the largest pixel difference between ours and bare_fast, the target.  The
``compiled`` group reports the compilation (first image) separately.  ``oom`` forces an
out-of-memory error (``torch.cuda.set_per_process_memory_fraction``; on the CPU the error
is simulated) and checks the automatic retry, the typed error and that the server keeps
serving.

``--dry-run`` (automatic without CUDA) runs the same code on the CPU with the tiny models
in seconds and prints the same keys, with ``"device": "cpu", "dry_run": true``.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from shared.errors import ControlCanvasError
from shared.messages import ControlUnit, GenerateRequest

from ..engines import tiny
from ..engines.base import NullContext, engine_info
from ..imaging import to_array
from .engine import _control_image

log = logging.getLogger(__name__)

GROUPS = ("sd15", "sdxl", "compiled", "klein")
PROMPT = "a knight in armour, full body"


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    size: int
    steps: int
    cfg: float = 7.0
    sampler: str = "dpmpp_2m_karras"
    repeats: int = 3
    target_s: Optional[float] = None
    target_fps: Optional[float] = None


def plan(dry_run: bool) -> Dict[str, List[Case]]:
    """The cases of each group: real sizes on CUDA, the tiny models' 64 px on the CPU."""
    side = {"sd15": 64, "sdxl": 64} if dry_run else {"sd15": 512, "sdxl": 1024}
    steps = {"sd15": 4, "sdxl": 4} if dry_run else {"sd15": 20, "sdxl": 30}
    repeats = 2 if dry_run else 3
    live = [Case(f"live{n}", "sd15", side["sd15"], n, cfg=1.0, sampler="lcm",
                 repeats=repeats + 2, target_fps=20.0 if n == 2 else None) for n in (1, 2, 4)]
    return {
        "sd15": [Case("sd15", "sd15", side["sd15"], steps["sd15"], repeats=repeats,
                      target_s=0.25)] + live,
        "sdxl": [Case("sdxl", "sdxl", side["sdxl"], steps["sdxl"], repeats=max(2, repeats - 1),
                      target_s=1.2)],
        "compiled": [Case("sd15_compiled", "sd15", side["sd15"], steps["sd15"],
                          repeats=repeats, target_s=0.25)],
        # Flux.2 Klein 4B (backend.bench.gpu_klein): 1024², 4 steps, alone and with the
        # reference picture an emulated control unit adds
        "klein": [Case(name, "klein", 64 if dry_run else 1024, 4, cfg=1.0, sampler="euler",
                       repeats=repeats) for name in ("klein4b", "klein4b_control")],
    }


# -----------------------------------------------------------------------------
# Models with random weights, built here
# -----------------------------------------------------------------------------

def _real_configs(family: str) -> Dict[str, Dict[str, Any]]:
    """diffusers configs of the real SD1.5 / SDXL UNet and VAE, and CLIP widths."""
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    if family == "sd15":
        unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                    attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        return {"unet": unet, "vae": dict(vae, sample_size=512, scaling_factor=0.18215),
                "text": [768]}
    unet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    return {"unet": unet, "vae": dict(vae, sample_size=1024, scaling_factor=0.13025,
                                      force_upcast=True), "text": [768, 1280]}


def build_real(folder: Path, family: str, device: str) -> Path:
    """A real-size ``family`` stack with random weights (fp16 on disk), tiny's layout."""
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, DPMSolverMultistepScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = _real_configs(family)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: seconds instead of minutes
        unet = UNet2DConditionModel(**configs["unet"]).half()
        net = ControlNetModel.from_unet(unet).half()
        vae = AutoencoderKL(**configs["vae"]).half()
    for i, width in enumerate(configs["text"]):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        tokenizer = tiny._tokenizer(folder / name.replace("text_encoder", "tokenizer"))
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text = CLIPTextConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=eos,
                              hidden_size=width, intermediate_size=4 * width,
                              num_attention_heads=width // 64, num_hidden_layers=1,
                              vocab_size=len(tokenizer), projection_dim=width,
                              max_position_embeddings=77)
        model = (CLIPTextModelWithProjection if i else CLIPTextModel)(text)
        model.half().save_pretrained(folder / name)
    DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading" if family == "sdxl" else "linspace",
        algorithm_type="dpmsolver++", use_karras_sigmas=True).save_pretrained(
            folder / "scheduler")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    net.save_pretrained(folder / "controlnets" / "lines")
    (folder / "model_index.json").write_text(
        json.dumps(tiny._model_index(family == "sdxl")), encoding="utf-8")
    return folder


def build_taesd(folder: Path, dry_run: bool) -> Path:
    """An ``AutoencoderTiny`` (TAESD's shape; tiny on the CPU) with random weights."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    small = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    AutoencoderTiny(**(small if dry_run else {})).save_pretrained(folder)
    return folder


# -----------------------------------------------------------------------------
# The four ways of making the same image
# -----------------------------------------------------------------------------

class _Device:
    """Synchronising, peak memory and generator device for CUDA or the CPU."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = cuda
        self.name = torch.cuda.get_device_name(0) if cuda else "cpu"
        self.type = "cuda" if cuda else "cpu"

    def timed(self, fn: Callable[[], Any]):
        """(seconds, peak MiB allocated during the call or None, result)."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        return seconds, peak, out

    def free(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _bare_pipeline(folder: Path, family: str, dtype, dev: _Device, fast=None):
    """diffusers' own ControlNet pipeline on the built stack (optionally with our fast
    path on its models)."""
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    from ..engines.diffusers.acceleration import prepare_model, prepare_pipeline
    from ..engines.diffusers.loaders import dtype_kwargs

    with tiny.quiet_progress_bars():
        net = ControlNetModel.from_pretrained(folder / "controlnets" / "lines",
                                              local_files_only=True, **dtype_kwargs(dtype))
        if family == "sdxl":
            pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
                folder, controlnet=net, local_files_only=True, **dtype_kwargs(dtype))
        else:
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                folder, controlnet=net, local_files_only=True, **dtype_kwargs(dtype),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dev.type)
    pipe.set_progress_bar_config(disable=True)
    if fast is not None:
        prepare_pipeline(pipe, fast, family, dtype, {}, "bare_fast", compile_it=False)
        prepare_model(net, fast, "bare_fast ControlNet", {})
    return pipe


def _bare_call(pipe, case: Case, control, dev: _Device) -> Callable[[], np.ndarray]:
    import torch
    from PIL import Image as PILImage

    from ..engines.diffusers.samplers import make_scheduler

    scheduler = make_scheduler(case.sampler, dict(pipe.scheduler.config))
    image = PILImage.fromarray(np.ascontiguousarray(to_array(control)[..., :3]))

    def call() -> np.ndarray:
        pipe.scheduler = scheduler
        generator = torch.Generator(device=dev.type).manual_seed(42)
        return pipe(PROMPT, image=image, num_inference_steps=case.steps,
                    guidance_scale=case.cfg, generator=generator, height=case.size,
                    width=case.size, output_type="np").images[0]
    return call


def _request(case: Case) -> GenerateRequest:
    return GenerateRequest(width=case.size, height=case.size, prompt=PROMPT, seed=42,
                           steps=case.steps, cfg=case.cfg, sampler=case.sampler,
                           base_model=f"bench-{case.family}",
                           controls=(ControlUnit(condition="lineart", image=0),))


def _to8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def measure(case: Case, ways: Dict[str, Callable[[], Any]], dev: _Device) -> Dict[str, Any]:
    """Warm each way up once, then ``case.repeats`` interleaved rounds (rotating order)."""
    names = list(ways)
    first = {}
    for name in names:
        seconds, _, out = dev.timed(ways[name])
        first[name] = (seconds, out)
    times: Dict[str, List[float]] = {n: [] for n in names}
    peaks: Dict[str, float] = {}
    for r in range(case.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, peak, _ = dev.timed(ways[name])
            times[name].append(seconds)
            if peak is not None:
                peaks[name] = round(max(peaks.get(name, 0.0), peak), 1)
    med = {n: statistics.median(v) for n, v in times.items()}
    row: Dict[str, Any] = {"name": case.name, "family": case.family, "size": case.size,
                           "steps": case.steps, "cfg": case.cfg, "sampler": case.sampler,
                           "repeats": case.repeats}
    row.update({f"{n}_s": round(med[n], 4) for n in names})
    row.update({f"{n}_first_s": round(first[n][0], 4) for n in names})
    row["its_bare"] = round(case.steps / med["bare"], 2)
    row["its_ours"] = round(case.steps / med["ours"], 2)
    row["fps_ours"] = round(1.0 / med["ours"], 2)
    row["ratio"] = round(med["ours"] / med["bare_fast"], 4)
    row["engine_ratio"] = round(med["engine"] / med["bare_fast"], 4)
    row["fast_path_speedup"] = round(med["bare"] / med["bare_fast"], 4)
    row["peak_vram_mb"] = peaks or None
    bare_fast = first["bare_fast"][1]
    row["finite"] = {"bare": bool(np.isfinite(first["bare"][1]).all()),
                     "bare_fast": bool(np.isfinite(bare_fast).all())}
    ours = to_array(first["ours"][1])[..., :3].astype(np.int16)
    row["max_pixel_diff"] = int(np.abs(ours - _to8(bare_fast)).max())
    if case.target_s is not None:
        row["target_s"] = case.target_s
        row["meets_target"] = med["ours"] <= case.target_s
    if case.target_fps is not None:
        row["target_fps"] = case.target_fps
        row["meets_target"] = 1.0 / med["ours"] >= case.target_fps
    return row


# -----------------------------------------------------------------------------
# A group: one family's models, the bare pipelines, the engine behind a server
# -----------------------------------------------------------------------------

@dataclass
class _Run:
    dev: _Device
    dry_run: bool
    work: Path
    deadline: float  # time.monotonic() after which cases are skipped
    compile_mode: str = "default"


def _engine_options(run: _Run, family: str, taesd: Path, compiled: bool) -> Dict[str, Any]:
    """The engine's options: the CUDA defaults (on the CPU the same choices, explicitly),
    TAESD previews from the random one built here, and compile for the compiled group."""
    options: Dict[str, Any] = {f"taesd_{family}": str(taesd), "taesd": "auto"}
    if run.dry_run:
        options.update(sdpa=True, fuse_qkv=True, channels_last=True)
    if compiled:
        options.update(compile=True, compile_mode=run.compile_mode)
        if run.dry_run:
            options["compile_backend"] = "eager"  # traced by dynamo; no C++ build on a CPU
    return options


def _build(run: _Run, family: str) -> Path:
    folder = run.work / family
    if not (folder / "model_index.json").is_file():
        if run.dry_run:
            tiny.build(folder, family)
        else:
            build_real(folder, family, run.dev.type)
    return folder


def run_group(run: _Run, group: str, cases: Sequence[Case]) -> Dict[str, Any]:
    """Every case of ``group`` (and for ``sd15`` the preview and out-of-memory checks)."""
    from backend.server.local import ServerThread
    from shared.client import Client

    from ..engines.catalogue import Catalogue, ModelConfig
    from ..engines.diffusers.engine import DiffusersEngine, engine_options

    family = cases[0].family
    start = time.perf_counter()
    folder = _build(run, family)
    taesd = run.work / f"taesd-{family}"
    if not (taesd / "config.json").is_file():
        build_taesd(taesd, run.dry_run)
    built = time.perf_counter() - start
    catalogue = Catalogue(ModelConfig(
        bases={f"bench-{family}": (str(folder), family)},
        controlnets={family: {"lineart": str(folder / "controlnets" / "lines")}},
        cache_dir=str(run.work / "hf-cache")))
    options = _engine_options(run, family, taesd, group == "compiled")
    engine = DiffusersEngine(catalogue, device=run.dev.type, **engine_options(options))
    out: Dict[str, Any] = {"build_s": round(built, 2), "engine_settings": engine.info(),
                           "cases": {}, "skipped": []}
    with ExitStack() as stack:
        bare = _bare_pipeline(folder, family, engine.dtype, run.dev)
        bare_fast = _bare_pipeline(folder, family, engine.dtype, run.dev, engine.fast)
        stack.callback(run.dev.free)
        server = stack.enter_context(ServerThread(engine))
        client = stack.enter_context(Client.connect(server.url, server.token,
                                                    client="bench-gpu"))
        out["welcome_engine_info"] = dict(client.welcome.engine_info)
        for case in cases:
            if time.monotonic() > run.deadline:
                out["skipped"].append(case.name)
                continue
            out["cases"][case.name] = _run_case(case, engine, client, bare, bare_fast, run)
        if group == "sd15" and time.monotonic() <= run.deadline:
            out["previews"] = check_previews(client, cases[0])
            out["oom"] = check_out_of_memory(engine, client, cases[0], run.dev)
        del bare, bare_fast
    return out


def _run_case(case: Case, engine, client, bare, bare_fast, run: _Run) -> Dict[str, Any]:
    images = {0: _control_image(case.size, case.size)}
    request = _request(case)
    nonfinite = engine.stats["nonfinite"]
    compile_before = engine.stats["compile_s"]
    ways = {
        "bare": _bare_call(bare, case, images[0], run.dev),
        "bare_fast": _bare_call(bare_fast, case, images[0], run.dev),
        "engine": lambda: engine.generate(request, images, NullContext())[0].image,
        "ours": lambda: client.wait(client.submit(request, images)).images[0][1],
    }
    row = measure(case, ways, run.dev)
    row["finite"]["ours"] = engine.stats["nonfinite"] == nonfinite
    row["compile_s"] = round(engine.stats["compile_s"] - compile_before, 2)
    row["compile_fallbacks"] = engine.stats["compile_fallbacks"]
    if run.dry_run and "meets_target" in row:
        row["meets_target"] = None  # the targets are GPU figures
    log.info("bench gpu %s: ours %.4f s, bare %.4f s, ratio %.3f, fast path x%.2f", case.name,
             row["ours_s"], row["bare_s"], row["ratio"], row["fast_path_speedup"])
    return row


def check_previews(client, case: Case) -> Dict[str, Any]:
    """One job with a preview every step: how many came and their size (TAESD previews
    are up to 256 px a side, the latent approximation 1/8 of the work size)."""
    from shared.session import PreviewReady

    previews: List[Any] = []
    request = _request(case)
    job = client.submit(request, {0: _control_image(case.size, case.size)}, preview_every=1)
    client.wait(job, on_event=lambda e: previews.append(e) if isinstance(e, PreviewReady)
                else None)
    sizes = sorted({(p.image.width, p.image.height) for p in previews})
    return {"count": len(previews), "steps": case.steps, "sizes": [list(s) for s in sizes],
            "kind": "taesd" if sizes and sizes[0][0] > case.size // 8 else "latent"}


class _RaiseOom:
    """A forward pre-hook that raises CUDA's out-of-memory error ``times`` times."""

    def __init__(self, times: int) -> None:
        self.times = times

    def __call__(self, module, args) -> None:
        import torch

        if self.times > 0:
            self.times -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (bench gpu: forced)")


def check_out_of_memory(engine, client, case: Case, dev: _Device) -> Dict[str, Any]:
    """Through the server: one OOM -> the engine's retry (tiling, offload) succeeds; no
    memory at all (CUDA: ``set_per_process_memory_fraction``; CPU: simulated) -> the typed
    ``out_of_memory`` error; then the next job works.  Leaves offload on (CUDA)."""
    request = _request(case)
    images = {0: _control_image(case.size, case.size)}
    unet = next(iter(engine._bases.values())).pipe.unet
    out: Dict[str, Any] = {"method": "memory_fraction" if dev.cuda else "simulated",
                           "messages": []}

    def job() -> Optional[str]:
        try:
            client.wait(client.submit(request, images))
            return None
        except ControlCanvasError as err:
            out["messages"].append(err.message)
            return err.code

    retries = engine.stats["oom_retries"]
    handle = unet.register_forward_pre_hook(_RaiseOom(1))
    try:
        out["retry_error"] = job()
    finally:
        handle.remove()
    out["retried"] = engine.stats["oom_retries"] > retries
    out["retry_ok"] = out["retry_error"] is None and out["retried"]
    with ExitStack() as stack:
        if dev.cuda:
            torch = dev.torch
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(0.001)
            stack.callback(torch.cuda.set_per_process_memory_fraction, 1.0)
        else:
            hook = unet.register_forward_pre_hook(_RaiseOom(10**6))
            stack.callback(hook.remove)
        out["typed_error"] = job()
    out["next_job_ok"] = job() is None
    out["offload_after"] = engine.offload
    return out


# -----------------------------------------------------------------------------
# The whole bench
# -----------------------------------------------------------------------------

def _summary(result: Dict[str, Any]) -> None:
    """Top-level figures: the worst overhead ratio of the eager groups (the compiled one's
    ratio is compile's gain), every NaN check, targets met."""
    groups = result["groups"]
    rows = [row for group in groups.values() for row in group["cases"].values()]
    eager = [row["ratio"] for name, group in groups.items() if name != "compiled"
             for row in group["cases"].values() if "ratio" in row]
    result["ratio"] = max(eager, default=None)
    result["all_finite"] = all(all(row["finite"].values()) for row in rows) if rows else None
    result["targets_met"] = {row["name"]: row["meets_target"] for row in rows
                             if "meets_target" in row}
    result["errors"] = {name: group["error"] for name, group in groups.items()
                        if "error" in group}


def run(dry_run: Optional[bool] = None, groups: Sequence[str] = ("sd15", "sdxl"),
        deadline_s: float = 420.0, compile_mode: str = "default",
        out_file: Optional[Path] = None, work_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Run ``groups`` (of :data:`GROUPS`); see the module docstring.  With ``out_file`` the
    JSON so far is rewritten after each group (a killed run leaves its figures)."""
    import diffusers
    import torch

    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown bench gpu group(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(GROUPS)}")
    cuda = torch.cuda.is_available()
    dry_run = (not cuda) if dry_run is None else (dry_run or not cuda)
    dev = _Device(cuda and not dry_run)
    began = time.monotonic()
    result: Dict[str, Any] = {
        "bench": "gpu", "device": dev.type, "device_name": dev.name, "dry_run": dry_run,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "controlnet_sdxl": "ControlNetModel (the engine has no union ControlNet yet)",
        "groups": {}, "skipped": [],
        "targets": {"sd15_s": 0.25, "sdxl_s": 1.2, "ratio": 1.03, "live2_fps": 20.0}}
    cases = plan(dry_run)
    with ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="cc-bench-gpu-")))
        state = _Run(dev, dry_run, Path(work), began + deadline_s, compile_mode)
        for group in groups:
            if time.monotonic() > state.deadline:
                result["skipped"].append(group)
                continue
            try:
                if group == "klein":  # bare diffusers only, its own builder
                    from .gpu_klein import run_group as run_klein
                    result["groups"][group] = run_klein(state, cases[group])
                else:
                    result["groups"][group] = run_group(state, group, cases[group])
            except Exception as err:  # noqa: BLE001 - one broken group must not hide the rest
                log.exception("bench gpu: group %s failed", group)
                result["groups"][group] = {"error": f"{type(err).__name__}: {err}"[:500],
                                           "cases": {}}
                dev.free()
            shutil.rmtree(Path(work) / "hf-cache", ignore_errors=True)
            _summary(result)
            result["elapsed_s"] = round(time.monotonic() - began, 1)
            if out_file is not None:
                Path(out_file).write_text(json.dumps(result, sort_keys=True), encoding="utf-8")
    _summary(result)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    return result
