"""Fitting big models in memory (backend/engines/fit.py): the planned loading for every
branch with fake free-memory figures, the does_not_fit error, the engine applying the
plan on a tiny Flux stack, and a GGUF transformer read with GGUFQuantizationConfig."""

from __future__ import annotations

import pytest

from backend.engines import fit, tiny
from backend.engines.catalogue import Catalogue, ModelConfig
from backend.engines.diffusers import engine as engine_module
from backend.engines.diffusers.acceleration import offload_setting
from backend.engines.diffusers.engine import DiffusersEngine, engine_options
from shared.errors import ConfigError, DoesNotFit, OutOfMemory, error_from_code

from tiny_fixtures import torch_threads  # noqa: F401

G = fit.GIB


def _klein9():
    return fit.REAL["FLUX.2 [klein] 9B"].with_dtype("bf16")


def _plan(model, free, ram=None):
    return fit.plan(model, free, ram, fit.smaller_variants(model, "bf16"))


@pytest.mark.parametrize("free,choice", [(80 * G, "gpu"), (24 * G, "model"),
                                         (8 * G, "sequential"), (None, "gpu")])
def test_each_loading_choice(free, choice):
    plan = _plan(_klein9(), free, ram=64 * G)
    assert plan.choice == choice
    assert plan.needs["gpu"] > plan.needs["model"] > plan.needs["sequential"]


def test_offload_needs_the_weights_in_ram():
    model = fit.REAL["Qwen-Image"].with_dtype("bf16")
    assert _plan(model, 24 * G, ram=64 * G).choice == "sequential"
    with pytest.raises(DoesNotFit) as caught:
        _plan(model, 24 * G, ram=32 * G)  # 53.7 GiB of weights wait nowhere
    assert "GGUF" in caught.value.message and "Qwen-Image" in caught.value.message


def test_sequential_says_what_would_run_faster():
    plan = _plan(fit.REAL["Qwen-Image"].with_dtype("bf16"), 24 * G, ram=64 * G)
    assert plan.notes and "faster" in plan.line() and "GGUF" in plan.notes[0]


def test_refusal_names_the_smallest_variant_that_fits():
    model = _klein9()
    need = fit.REAL["FLUX.2 [klein] 4B"].with_dtype("bf16").quantized("q4_k").needs()
    free = need["sequential"] + G // 100  # only a small variant, one block at a time
    with pytest.raises(DoesNotFit) as caught:
        _plan(model, free, ram=12 * G)
    err = caught.value
    assert err.code == "does_not_fit" and isinstance(err, OutOfMemory)
    assert err.field == "base_model"
    assert "FLUX.2 [klein] 9B does not fit" in err.message
    assert "FLUX.2 [klein] 4B (GGUF" in err.message  # the 4B instead of the 9B, quantized
    assert "sequential CPU offload" in err.message


def test_refusal_when_nothing_of_the_family_fits():
    with pytest.raises(DoesNotFit) as caught:
        _plan(_klein9(), 1 * G, ram=64 * G)
    assert "Nothing of its family fits" in caught.value.message
    assert "device = \"cpu\"" in caught.value.message


def test_error_code_round_trips():
    err = error_from_code("does_not_fit", "too big")
    assert isinstance(err, DoesNotFit)


def test_bytes_per_quantization():
    model = fit.REAL["FLUX.1 [dev]"]
    bf16 = model.with_dtype("bf16").weights()
    q4 = model.with_dtype("bf16").quantized("q4_k").weights()
    transformer = 11.90e9
    assert bf16 - q4 == pytest.approx(transformer * (2 - 4.5 / 8), rel=1e-6)
    assert model.with_dtype("fp32").weights() == pytest.approx(2 * bf16, rel=1e-6)


def test_real_size_table_covers_every_family():
    table = fit.real_size_table()
    assert {"FLUX.1 [dev]", "SD3.5 Large", "SD3.5 Medium", "Z-Image Turbo", "Qwen-Image",
            "FLUX.2 [klein] 4B", "FLUX.2 [klein] 9B", "SDXL", "SD1.5"} <= set(table)
    flux = table["FLUX.1 [dev]"]
    assert flux["bf16"]["weights"] > flux["bf16+q4_k"]["weights"]


def test_offload_option():
    assert offload_setting(None) == "auto" and offload_setting("auto") == "auto"
    assert offload_setting(True) is True and offload_setting(False) is False
    with pytest.raises(ConfigError, match="auto"):
        offload_setting("sometimes")
    assert engine_options({"offload": "auto"}) == {"offload": "auto"}
    with pytest.raises(ConfigError):
        engine_options({"offload": 3})


# -- on the tiny Flux stack ----------------------------------------------------------

@pytest.fixture(scope="module")
def flux_root(tmp_path_factory, torch_threads):  # noqa: F811
    root = tmp_path_factory.mktemp("tiny-fit")
    tiny.ensure_tiny("flux", root)
    return root


def _engine(root) -> DiffusersEngine:
    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root),
                                                 cache_dir=str(root / "empty-hf-cache"),
                                                 roots=(str(root),))), device="cpu")


def test_sizes_from_headers_match_the_loaded_modules(flux_root):
    engine = _engine(flux_root)
    resolved = engine.catalogue.resolve_base("tiny-flux")
    entry = engine._load_base(resolved)
    sized = fit.sized_for(resolved.name, resolved.family, resolved.path, "fp32")
    params = {c.name: c.params for c in sized.components}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(entry.pipe, name)
        assert params[name] == sum(p.numel() for p in module.parameters()), name
    engine.close()


@pytest.fixture
def planning(flux_root, monkeypatch):
    """An engine that plans as on CUDA (free memory faked), loading on the CPU."""
    engine = _engine(flux_root)
    monkeypatch.setattr(DiffusersEngine, "_plans_loading", lambda self: True)
    monkeypatch.setattr(engine_module, "available_ram", lambda: 64 * G)
    resolved = engine.catalogue.resolve_base("tiny-flux")
    needs = fit.sized_for(resolved.name, resolved.family, resolved.path, "fp32").needs()
    yield engine, resolved, needs, monkeypatch
    engine.close()


@pytest.mark.parametrize("choice", ["gpu", "model", "sequential"])
def test_engine_applies_the_plan(planning, choice):
    engine, resolved, needs, monkeypatch = planning
    monkeypatch.setattr(engine_module, "free_bytes", lambda device: needs[choice])
    entry = engine._load_base(resolved)
    assert entry.loading == choice
    assert engine.offload is (choice != "gpu")
    info = engine.info()
    assert info["loading"].startswith(f"tiny-flux: {choice} (needs")
    if choice != "gpu":
        called = []
        kind = "sequential" if choice == "sequential" else "model"
        monkeypatch.setattr(type(entry.pipe), f"enable_{kind}_cpu_offload",
                            lambda pipe, device=None: called.append(device))
        engine._pipeline(entry, "txt2img", False, None)
        assert called == [engine.device]


def test_engine_refuses_what_cannot_fit(planning):
    engine, resolved, needs, monkeypatch = planning
    monkeypatch.setattr(engine_module, "free_bytes", lambda device: needs["sequential"] - 1)
    with pytest.raises(DoesNotFit, match="tiny-flux does not fit"):
        engine._load_base(resolved)
    assert not engine._bases


def test_cpu_engine_plans_nothing(flux_root):
    engine = _engine(flux_root)
    assert engine.offload_setting == "auto" and not engine._plans_loading()
    entry = engine._load_base(engine.catalogue.resolve_base("tiny-flux"))
    assert entry.loading == "gpu" and engine.offload is False and "loading" not in engine.info()
    engine.close()


def test_gguf_transformer_loads(flux_root, tmp_path):
    pytest.importorskip("gguf")
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from backend.engines.diffusers.loaders import read_transformer_file
    from backend.engines.tiny_gguf import write_gguf

    folder = _engine(flux_root).catalogue.resolve_base("tiny-flux").path
    plain = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    path = write_gguf(plain, tmp_path / "tiny-flux-Q8_0.gguf")
    pipe = read_transformer_file(str(path), folder, FluxPipeline, dtype=torch.float32)
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter)
    with torch.no_grad():
        x = torch.randn(1, 16, plain.transformer_blocks[0].attn.to_q.in_features)
        ours = pipe.transformer.transformer_blocks[0].attn.to_q(x)
        theirs = plain.transformer_blocks[0].attn.to_q(x)
    assert torch.allclose(ours, theirs, atol=0.05 * float(theirs.abs().max()))
    image = pipe("a cat", height=64, width=64, num_inference_steps=1, output_type="np",
                 max_sequence_length=16).images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("free,status,text", [(80 * G, "ok", "gpu (needs"),
                                              (G // 2, "fail", "does not fit")])
def test_doctor_reports_the_loading(monkeypatch, tmp_path, free, status, text):
    import torch

    from backend.cli import doctor
    from backend.engines.diffusers import acceleration, devices

    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(acceleration, "choose_device", lambda name=None: torch.device("cuda"))
    monkeypatch.setattr(devices, "free_bytes", lambda device: free)
    monkeypatch.setattr(devices, "available_ram", lambda: 64 * G)
    check = doctor.check_fit()
    assert check.name == "loading" and check.status == status and text in check.detail


def test_offload_text_other_than_auto_is_refused_when_the_engine_is_built():
    with pytest.raises(ConfigError, match="must be \"auto\", true or false"):
        engine_options({"offload": "yes please"})
