"""The CUDA fast path (issue 17): options, what doctor and the welcome report, compile with
its shape cache and fall back, the VAE in fp32, TAESD previews, out of memory through the
server, and ``bench gpu --dry-run``.

Most tests run on the CPU with the tiny models, by setting the fast-path options
explicitly (on the CPU they default to off).  The ``gpu``-marked tests at the end need
CUDA and skip cleanly without it; ``tests/gpu/run_device_check.sh`` runs them on a GPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engines.diffusers.acceleration import FastPath, planned_settings
from backend.engines.diffusers.cache import module_bytes
from backend.engines.diffusers.compiled import CompiledForward, compile_module, is_compiled
from backend.engines.diffusers.engine import DiffusersEngine, engine_options
from backend.imaging import to_array
from shared.errors import Cancelled, OutOfMemory
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import (RecordingContext, fresh_engine, random_rgba,  # noqa: F401
                           tiny_catalogue, tiny_engine, tiny_root, torch_threads)

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(sdpa=True, fuse_qkv=True, channels_last=True)


def request(**kw) -> GenerateRequest:
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("prompt", "a red coat")
    kw.setdefault("seed", 5)
    kw.setdefault("steps", 3)
    kw.setdefault("base_model", "tiny-sd15")
    kw.setdefault("controls", (ControlUnit(condition="lineart", image=0),))
    if kw.get("mode", "txt2img") != "txt2img":
        kw.setdefault("init_image", 1)
        kw.setdefault("strength", 0.7)
    if kw.get("mode") == "inpaint":
        kw.setdefault("mask_image", 2)
    return GenerateRequest(**kw)


IMAGES = {0: random_rgba(64, 64, 1), 1: random_rgba(64, 64, 2), 2: random_rgba(64, 64, 3)}


def pixels(engine, req, ctx=None) -> np.ndarray:
    return to_array(engine.generate(req, IMAGES, ctx or RecordingContext())[0].image)


def base_pipe(engine):
    return next(iter(engine._bases.values())).pipe


# -----------------------------------------------------------------------------
# Options, and what is reported
# -----------------------------------------------------------------------------

def test_fast_path_is_on_by_default_on_cuda_off_on_cpu_and_explicit_values_win():
    on_cuda = FastPath.from_options({}, cuda=True)
    assert (on_cuda.sdpa, on_cuda.fuse_qkv, on_cuda.channels_last) == (True, True, True)
    assert on_cuda.compile is False and on_cuda.taesd == "auto"
    on_cpu = FastPath.from_options({}, cuda=False)
    assert not (on_cpu.sdpa or on_cpu.fuse_qkv or on_cpu.channels_last or on_cpu.compile)
    assert on_cpu.taesd == "off"
    assert FastPath.from_options({"fuse_qkv": "yes", "compile": True}, cuda=False).fuse_qkv
    assert not FastPath.from_options({"fast_path": False}, cuda=True).sdpa
    for bad, says in [({"compile_mode": "fastest"}, "compile_mode must be one of"),
                      ({"compile_shapes": 0}, "compile_shapes"),
                      ({"vae_precision": "fp8"}, "vae_precision"),
                      ({"sdpa": "maybe"}, "sdpa must be true or false"),
                      ({"warp_speed": True}, "unknown fast-path option")]:
        with pytest.raises(ValueError, match=says):
            FastPath.from_options(bad, cuda=True)


def test_engine_options_gather_the_fast_path_and_refuse_unknown_names():
    kwargs = engine_options({"dtype": "fp16", "compile": True, "memory_budget_gb": 2,
                             "vae_precision": "fp32"})
    assert kwargs == {"dtype": "fp16", "memory_budget": 2 << 30,
                      "fast_options": {"compile": True, "vae_precision": "fp32"}}
    with pytest.raises(ValueError, match="unknown engine option 'turbo'"):
        engine_options({"turbo": 1})


def test_config_toml_engine_table_and_serve_flags_reach_the_engine(tmp_path, tiny_catalogue):
    from backend.cli.main import _server_overrides, build_parser
    from backend.server.config import build_config

    config = tmp_path / "config.toml"
    config.write_text('[engine]\ncompile = true\nchannels_last = false\ndtype = "bf16"\n'
                      '[server]\nengine_options = { compile_shapes = 2 }\n', encoding="utf-8")
    args = build_parser().parse_args(["serve", "--vae-precision", "fp32", "--no-fast-path",
                                      "--config", str(config)])
    options = build_config(_server_overrides(args), config).engine_options
    assert options["compile"] is True and options["compile_shapes"] == 2
    assert options["vae_precision"] == "fp32" and options["fast_path"] is False
    assert options["dtype"] == "bf16" and options["channels_last"] is False
    options.pop("config_file")
    engine = DiffusersEngine(tiny_catalogue, device="cpu", **engine_options(options))
    assert engine.fast.compile and engine.fast.compile_shapes == 2
    assert engine.info()["vae_precision"] == "fp32" and engine.info()["dtype"] == "bf16"


def test_doctor_prints_the_fast_path_and_refuses_a_bad_option(tmp_path, monkeypatch):
    from backend.cli import doctor

    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "config.toml").write_text('[engine]\nfuse_qkv = true\ncompile = true\n',
                                          encoding="utf-8")
    check = doctor.check_fast_path()
    assert check.status == doctor.OK
    assert "fuse_qkv on" in check.detail and "compile default" in check.detail
    assert "sdpa off" in check.detail  # the CPU default; only what was set is on
    (tmp_path / "config.toml").write_text('[engine]\nvae_precision = "fp8"\n', encoding="utf-8")
    check = doctor.check_fast_path()
    assert check.status == doctor.FAIL and "vae_precision must be one of" in check.detail
    assert planned_settings({"device": "cpu"})["sdpa"] is False


def test_welcome_carries_the_engine_settings(tiny_catalogue):
    from backend.server.local import ServerThread
    from shared.client import Client

    engine = DiffusersEngine(tiny_catalogue, device="cpu", fast_options=FAST)
    with ServerThread(engine) as server, \
            Client.connect(server.url, server.token, client="test") as client:
        info = client.welcome.engine_info
    assert info == engine.info()
    assert info["device"] == "cpu" and info["fuse_qkv"] is True and info["compile"] is False


# -----------------------------------------------------------------------------
# What the fast path does to the models
# -----------------------------------------------------------------------------

def test_fused_attention_keeps_the_picture_and_costs_no_memory(tiny_engine, tiny_catalogue):
    fast = DiffusersEngine(tiny_catalogue, device="cpu", fast_options=FAST)
    for base in ("tiny-sd15", "tiny-sdxl"):
        plain = pixels(tiny_engine, request(base_model=base)).astype(int)
        fused = pixels(fast, request(base_model=base)).astype(int)
        assert np.abs(plain - fused).max() <= 2  # float rounding of one fused matmul
    key = next(iter(fast._bases))  # tiny-sd15, in both engines
    unet, plain_unet = fast._bases[key].pipe.unet, tiny_engine._bases[key].pipe.unet
    assert {type(p).__name__ for p in unet.attn_processors.values()} == \
        {"FusedAttnProcessor2_0"}
    assert module_bytes(unet) <= module_bytes(plain_unet)  # the unfused copies were dropped
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_in_fp32_with_an_fp16_model_in_every_mode(tiny_catalogue):
    """fp16 SDXL: the VAE stays fp32 (auto), also after from_pipe made the img2img and
    inpaint pipelines, and the pipelines do not cast it back."""
    engine = DiffusersEngine(tiny_catalogue, device="cpu", dtype="fp16")
    for mode in ("txt2img", "img2img", "inpaint"):
        out = pixels(engine, request(base_model="tiny-sdxl", mode=mode, hires=mode == "img2img",
                                     width=96, height=64))
        assert out.shape == (64, 96, 4)
    entry = next(iter(engine._bases.values()))
    assert entry.vae_fp32 and entry.pipe.unet.dtype == torch.float16
    assert {p.vae.dtype for p in entry.pipes.values()} == {torch.float32}
    assert engine.stats["nonfinite"] == 0
    sd15 = DiffusersEngine(tiny_catalogue, device="cpu", dtype="fp16")
    pixels(sd15, request())
    assert base_pipe(sd15).vae.dtype == torch.float16  # SD1.5's VAE is fine in fp16


def test_nan_pixels_are_counted_and_the_log_says_what_to_set(fresh_engine, caplog):
    pixels(fresh_engine, request())
    vae = base_pipe(fresh_engine).vae
    handle = vae.decoder.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with caplog.at_level(logging.WARNING):
            pixels(fresh_engine, request())
    finally:
        handle.remove()
    assert fresh_engine.stats["nonfinite"] == 1
    assert 'vae_precision = "fp32"' in caplog.text


def test_taesd_previews_replace_the_latent_approximation(tiny_catalogue, tmp_path):
    from backend.bench.gpu import build_taesd

    taesd = build_taesd(tmp_path / "taesd", dry_run=True)
    engine = DiffusersEngine(tiny_catalogue, device="cpu",
                             fast_options={"taesd": "auto", "taesd_sd15": str(taesd)})
    ctx = RecordingContext(preview_every=1)
    pixels(engine, request(), ctx)
    assert {(p.width, p.height) for p in ctx.previews} == {(64, 64)}  # full work size
    off = DiffusersEngine(tiny_catalogue, device="cpu", fast_options={"taesd": "off"})
    ctx = RecordingContext(preview_every=1)
    pixels(off, request(), ctx)
    assert {(p.width, p.height) for p in ctx.previews} == {(8, 8)}  # latent size


# -----------------------------------------------------------------------------
# torch.compile: the shape cache and the fall back
# -----------------------------------------------------------------------------

class _Counting:
    """A stand-in for torch.compile: counts calls of the 'compiled' function."""

    def __init__(self, fail=None):
        self.calls = 0
        self.fail = fail

    def __call__(self, fn, **options):
        def compiled(*args, **kwargs):
            self.calls += 1
            if self.fail is not None:
                raise self.fail
            return fn(*args, **kwargs)
        return compiled


def test_compiled_forward_keeps_a_fixed_number_of_shapes_then_runs_eager():
    layer = torch.nn.Linear(4, 4)
    compiler = _Counting()
    wrapper = compile_module(layer, "test layer", shapes=2, compiler=compiler)
    for rows in (1, 2, 1, 3, 3):
        layer(torch.ones(rows, 4))
    assert compiler.calls == 3  # shapes 1, 2, 1 compiled; shape 3 beyond the cache: eager
    assert len(wrapper.seen) == 2 and is_compiled(layer)
    assert compile_module(layer, "again", compiler=compiler) is wrapper  # idempotent


def test_compile_failure_falls_back_to_eager_once_and_keeps_the_answer(caplog):
    layer = torch.nn.Linear(4, 4)
    expected = layer(torch.ones(2, 4))
    stats = {}
    compiler = _Counting(fail=RuntimeError("inductor: no working C compiler"))
    compile_module(layer, "test layer", stats=stats, compiler=compiler)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(layer(torch.ones(2, 4)), expected)
        assert torch.equal(layer(torch.ones(2, 4)), expected)
    assert compiler.calls == 1 and stats["compile_fallbacks"] == 1
    assert caplog.text.count("torch.compile failed") == 1 and not is_compiled(layer)


def test_out_of_memory_inside_a_compiled_call_is_raised_not_swallowed():
    layer = torch.nn.Linear(4, 4)
    compile_module(layer, "test layer",
                   compiler=_Counting(fail=torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        layer(torch.ones(1, 4))
    assert is_compiled(layer)  # not a compile failure: it stays compiled


def test_compiled_engine_same_pixels_one_compile_per_shape_and_cancel_works(tiny_engine,
                                                                           tiny_catalogue):
    """dynamo traces the real UNet and ControlNet (its 'eager' backend: no C++ build), so
    this is torch.compile's own path on the CPU."""
    engine = DiffusersEngine(tiny_catalogue, device="cpu",
                             fast_options={"compile": True, "compile_backend": "eager"})
    expected = pixels(tiny_engine, request())
    assert np.array_equal(pixels(engine, request()), expected)
    net = next(iter(engine._nets.values())).model
    assert is_compiled(base_pipe(engine).unet) and is_compiled(net)
    assert engine.stats["compile_s"] > 0
    seen = dict(net.forward.seen)
    other = request(controls=(ControlUnit(condition="lineart", image=0, weight=0.6),))
    pixels(engine, other)
    assert net.forward.seen == seen  # a new weight is no new graph (a 0-d tensor)
    with pytest.raises(Cancelled):
        pixels(engine, request(steps=6), RecordingContext(cancel_at=2))
    assert np.array_equal(pixels(engine, request()), expected)


def test_engine_with_a_compile_that_fails_serves_eager(tiny_engine, tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue, device="cpu",
                             fast_options={"compile": True,
                                           "compile_backend": "no_such_backend"})
    assert np.array_equal(pixels(engine, request()), pixels(tiny_engine, request()))
    assert engine.stats["compile_fallbacks"] >= 1
    assert engine.info()["compile"] == "eager (failed)"


# -----------------------------------------------------------------------------
# Out of memory through the server (simulated on the CPU)
# -----------------------------------------------------------------------------

class _OomHook:
    def __init__(self, times):
        self.times = times

    def __call__(self, module, args):
        if self.times > 0:
            self.times -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")


def test_out_of_memory_is_retried_then_typed_and_the_server_keeps_serving(tiny_catalogue):
    from backend.server.local import ServerThread
    from shared.client import Client

    engine = DiffusersEngine(tiny_catalogue, device="cpu")
    req = request()
    with ServerThread(engine) as server, \
            Client.connect(server.url, server.token, client="test") as client:
        def job():
            return to_array(client.wait(client.submit(req, {0: IMAGES[0]})).images[0][1])

        expected = job()
        unet = base_pipe(engine).unet
        handle = unet.register_forward_pre_hook(_OomHook(1))
        try:
            assert job().shape == expected.shape  # retried once, low memory: still an image
        finally:
            handle.remove()
        assert engine.stats["oom_retries"] == 1
        handle = unet.register_forward_pre_hook(_OomHook(10**6))
        try:
            with pytest.raises(OutOfMemory) as info:
                job()
        finally:
            handle.remove()
        assert info.value.code == "out_of_memory" and "Lower the size" in info.value.message
        assert np.array_equal(job(), expected)  # the next job works, same pixels


def test_library_allocation_failures_count_as_out_of_memory():
    from backend.engines.diffusers.cache import is_out_of_memory

    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                                         "calling `cublasCreate(handle)`"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# -----------------------------------------------------------------------------
# bench gpu --dry-run, and the device check script in its dry run
# -----------------------------------------------------------------------------

CASE_KEYS = {"bare_s", "bare_fast_s", "engine_s", "ours_s", "its_bare", "its_ours", "ratio",
             "engine_ratio", "fast_path_speedup", "peak_vram_mb", "finite", "max_pixel_diff",
             "compile_s", "size", "steps"}


def test_bench_gpu_dry_run_prints_the_figures_on_the_cpu(torch_threads, tmp_path):
    from backend.bench import gpu

    result = gpu.run(dry_run=True, groups=["sd15"], work_dir=tmp_path)
    assert result["device"] == "cpu" and result["dry_run"] is True
    sd15 = result["groups"]["sd15"]
    assert set(sd15["cases"]) == {"sd15", "live1", "live2", "live4"}
    for row in sd15["cases"].values():
        assert CASE_KEYS <= set(row), CASE_KEYS - set(row)
        assert row["finite"] == {"bare": True, "bare_fast": True, "ours": True}
        assert row["max_pixel_diff"] == 0  # ours and bare diffusers: the same pixels
        assert 0 < row["ratio"] < 10
    assert result["ratio"] == max(r["ratio"] for r in sd15["cases"].values())
    assert sd15["oom"]["retry_ok"] and sd15["oom"]["next_job_ok"]
    assert sd15["oom"]["typed_error"] == "out_of_memory"
    assert sd15["previews"]["kind"] == "taesd"
    assert sd15["welcome_engine_info"]["fuse_qkv"] is True
    with pytest.raises(ValueError, match="unknown bench gpu group"):
        gpu.run(dry_run=True, groups=["sd14"])


def test_bench_gpu_reports_a_failing_group_and_keeps_the_others(monkeypatch, tmp_path):
    from backend.bench import gpu

    def fake_group(run, group, cases):
        if group == "sdxl":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory building SDXL")
        return {"cases": {"sd15": {"name": "sd15", "ratio": 1.01, "finite": {"ours": True}}}}

    monkeypatch.setattr(gpu, "run_group", fake_group)
    out = tmp_path / "bench.json"
    result = gpu.run(dry_run=True, groups=["sd15", "sdxl"], out_file=out, work_dir=tmp_path)
    assert result["ratio"] == 1.01 and result["all_finite"] is True
    assert "OutOfMemoryError" in result["errors"]["sdxl"]
    assert json.loads(out.read_text())["groups"]["sd15"]["cases"]["sd15"]["ratio"] == 1.01


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_real_size_builder_makes_a_stack_the_engine_loads(family, tmp_path, monkeypatch,
                                                              torch_threads):
    """``bench gpu`` builds real-size models only on a GPU; here its builder runs with the
    UNet and VAE shrunk (the CLIP widths and everything else as on the GPU)."""
    from backend.bench import gpu
    from backend.engines.catalogue import Catalogue, ModelConfig

    real = gpu._real_configs

    def shrunk(name):
        configs = real(name)
        unet = dict(configs["unet"], block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8)
        if name == "sdxl":
            unet.update(transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4))
        vae = dict(configs["vae"], block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                   layers_per_block=1)
        return dict(configs, unet=unet, vae=vae)

    monkeypatch.setattr(gpu, "_real_configs", shrunk)
    folder = gpu.build_real(tmp_path / family, family, "cpu")
    catalogue = Catalogue(ModelConfig(bases={"built": (str(folder), family)},
                                      controlnets={family: {"lineart": str(
                                          folder / "controlnets" / "lines")}}))
    engine = DiffusersEngine(catalogue, device="cpu", dtype="fp32")
    out = pixels(engine, request(base_model="built", steps=1))
    assert out.shape == (64, 64, 4)
    assert engine._nets and next(iter(engine._bases.values())).family == family


KLEIN_KEYS = {"seconds", "denoise_s", "its", "peak_vram_mb", "finite", "size", "steps",
              "reference_images", "first_s"}


def test_bench_gpu_klein_times_text_to_image_and_an_emulated_control(torch_threads):
    """The klein group's dry run: tiny Klein at 64², 4 steps, on the CPU; the GPU runs
    Klein 4B's transformer at 1024² (the plan)."""
    from backend.bench import gpu

    result = gpu.run(dry_run=True, groups=["klein"])
    klein = result["groups"]["klein"]
    assert "error" not in klein, klein
    rows = klein["cases"]
    assert set(rows) == {"klein4b", "klein4b_control"}
    for row in rows.values():
        assert KLEIN_KEYS <= set(row), KLEIN_KEYS - set(row)
        assert row["finite"] == {"bare": True} and row["size"] == 64 and row["steps"] == 4
        assert row["its"] == round(4 / row["denoise_s"], 2)
    assert rows["klein4b_control"]["reference_images"] == 1
    assert result["all_finite"] is True and result["ratio"] is None  # no engine ratio here
    real = gpu.plan(dry_run=False)["klein"]
    assert [(c.size, c.steps) for c in real] == [(1024, 4), (1024, 4)]


def test_klein_4b_builder_makes_a_pipeline_that_generates(monkeypatch, torch_threads):
    """The GPU builder (Klein 4B's config, the small text encoder) on the CPU, its
    transformer and text width shrunk: the pipeline it makes runs and its widths agree."""
    from backend.bench import gpu, gpu_klein

    assert gpu_klein.KLEIN_4B["num_layers"] == 5 and \
        gpu_klein.KLEIN_4B["num_single_layers"] == 20
    assert gpu_klein.KLEIN_4B["joint_attention_dim"] == 3 * gpu_klein.TEXT_WIDTH
    monkeypatch.setattr(gpu_klein, "KLEIN_4B", dict(
        gpu_klein.KLEIN_4B, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, axes_dims_rope=(4, 4, 4, 4), joint_attention_dim=3 * 64))
    monkeypatch.setattr(gpu_klein, "TEXT_WIDTH", 64)
    pipe = gpu_klein.build_pipeline(False, "cpu", torch.float32)
    assert pipe.text_encoder.config.num_hidden_layers == 28
    row = gpu_klein.run_case(pipe, gpu._Device(False), "klein4b_control", 64, 1, 1, True)
    assert row["finite"] == {"bare": True} and row["reference_images"] == 1


def test_device_check_script_dry_run_writes_its_results(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run_device_check.sh"),
                           "--dry-run", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=170, env={**__import__("os").environ,
                                            "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["name"] for s in summary["steps"]] == ["env", "pytest", "bench", "compiled"]
    assert all(s["rc"] == 0 for s in summary["steps"]), summary
    bench = json.loads((out / "bench-gpu.json").read_text())
    assert bench["dry_run"] and set(bench["groups"]) == {"klein", "sd15", "sdxl"}
    klein = bench["groups"]["klein"]["cases"]
    assert set(klein) == {"klein4b", "klein4b_control"}
    assert all(row["finite"]["bare"] and row["its"] > 0 for row in klein.values())
    compiled = json.loads((out / "bench-gpu-compiled.json").read_text())
    assert compiled["groups"]["compiled"]["cases"]["sd15_compiled"]["compile_s"] > 0
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    assert time.monotonic() - started < 170


# -----------------------------------------------------------------------------
# CUDA only (skipped without a GPU; tests/gpu/run_device_check.sh runs them)
# -----------------------------------------------------------------------------

def gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")(fn))


@gpu
def test_cuda_fp16_fast_path_outputs_are_finite(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue)  # CUDA defaults: fp16 and the fast path
    assert engine.dtype == torch.float16 and engine.fast.fuse_qkv
    for base in ("tiny-sd15", "tiny-sdxl"):
        for mode in ("txt2img", "img2img", "inpaint"):
            assert pixels(engine, request(base_model=base, mode=mode)).shape == (64, 64, 4)
    assert engine.stats["nonfinite"] == 0
    sdxl = [e for e in engine._bases.values() if e.family == "sdxl"][0]
    assert sdxl.vae_fp32 and sdxl.pipe.vae.dtype == torch.float32
    engine.close()


@gpu
def test_cuda_compile_matches_eager_closely(tiny_catalogue):
    eager = DiffusersEngine(tiny_catalogue)
    compiled = DiffusersEngine(tiny_catalogue, fast_options={"compile": True})
    a = pixels(eager, request()).astype(int)
    b = pixels(compiled, request()).astype(int)
    assert compiled.stats["compile_fallbacks"] == 0, "inductor failed on this GPU machine"
    assert compiled.stats["compile_s"] > 0 and np.abs(a - b).max() <= 8
    eager.close()
    compiled.close()


@gpu
def test_cuda_compile_failure_falls_back_to_eager(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue, fast_options={"compile": True,
                                                           "compile_backend": "no_such"})
    assert pixels(engine, request()).shape == (64, 64, 4)
    assert engine.info()["compile"] == "eager (failed)"
    engine.close()


@gpu
def test_cuda_real_out_of_memory_is_a_typed_error_and_the_next_job_works(tiny_catalogue):
    engine = DiffusersEngine(tiny_catalogue)
    expected = pixels(engine, request())
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)  # no new CUDA memory at all
    try:
        with pytest.raises(OutOfMemory) as info:
            pixels(engine, request(width=512, height=512))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert info.value.code == "out_of_memory" and engine.stats["oom_retries"] == 1
    assert engine.offload  # the retry turned offload on, and it stays on
    assert pixels(engine, request()).shape == expected.shape
    engine.close()
