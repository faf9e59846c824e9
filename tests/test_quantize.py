"""``[engine] quantize`` (backend/engines/quantize.py): the option checked, the choice with
fake devices and packages, the quantized size in fit's plan, the loader handing diffusers a
PipelineQuantizationConfig only where it applies, and on the CPU (or without the package) a
log line, a doctor warning and the engine_info label, never a crash.  The real bitsandbytes
load runs only on CUDA with bitsandbytes installed (skipped cleanly elsewhere)."""

from __future__ import annotations

import logging

import pytest

from backend.engines import fit, quantize, tiny
from backend.engines.catalogue import Catalogue, ModelConfig
from backend.engines.diffusers import loaders
from backend.engines.diffusers.engine import DiffusersEngine, engine_options
from shared.errors import ConfigError

from tiny_fixtures import RecordingContext, torch_threads  # noqa: F401

G = fit.GIB


@pytest.mark.parametrize("value,expected", [("none", "none"), ("nf4", "nf4"), ("NF4", "nf4"),
                                            ("int8", "int8"), ("fp8", "fp8")])
def test_the_option_takes_the_four_choices(value, expected):
    assert engine_options({"quantize": value}) == {"quantize": expected}


@pytest.mark.parametrize("value", ["int4", "", "4bit"])
def test_any_other_value_is_a_config_error_naming_the_choices(value):
    with pytest.raises(ConfigError, match="quantize must be one of 'none', 'nf4', 'int8'"):
        engine_options({"quantize": value})


@pytest.mark.parametrize("value", [4, True])
def test_a_value_not_in_quotes_is_a_config_error(value):
    with pytest.raises(ConfigError, match="quantize must be text in quotes"):
        engine_options({"quantize": value})
    with pytest.raises(ConfigError, match="quantize must be one of"):
        quantize.quantize_setting(value)


def test_the_choice_with_fake_devices_and_packages():
    everything = lambda name: True  # noqa: E731
    nothing = lambda name: False  # noqa: E731
    assert quantize.choose("none", "cuda", everything) == quantize.Quantize("none")
    on = quantize.choose("nf4", "cuda", everything)
    assert on.active and on.label() == "nf4 (bitsandbytes)"
    assert quantize.choose("fp8", "cuda", everything).label() == "fp8 (torchao)"
    cpu = quantize.choose("int8", "cpu", everything)
    assert not cpu.active and "needs a CUDA GPU" in cpu.reason
    assert cpu.label().startswith("int8 asked, off:")
    missing = quantize.choose("fp8", "cuda", nothing)
    assert not missing.active and "pip install torchao" in missing.reason
    asked = []
    quantize.choose("nf4", "cuda", lambda name: asked.append(name) or True)
    assert asked == ["bitsandbytes"]


def test_fit_counts_the_quantized_denoiser():
    model = fit.REAL["FLUX.2 [klein] 9B"].with_dtype("bf16")
    nf4 = fit.denoiser_in(model, "nf4")
    saved = 9.08e9 * (2 - fit.BYTES_PER_PARAM["nf4"])
    assert model.weights() - nf4.weights() == pytest.approx(saved, rel=1e-6)
    assert [c.dtype for c in nf4.components if c.name != "transformer"] == ["bf16", "bf16"]
    unet = fit.denoiser_in(fit.REAL["SDXL"].with_dtype("fp16"), "int8")
    assert next(c for c in unet.components if c.name == "unet").dtype == "int8"
    # 24 GiB free: Klein 9B in bf16 needs model offload; its NF4 transformer fits whole
    assert fit.plan(model, 24 * G, 64 * G).choice == "model"
    assert fit.plan(nf4, 24 * G, 64 * G).choice == "gpu"
    assert fit.denoiser_in(model, "none") is model


class _FakePipeline:
    """Records what diffusers would be asked (a pipeline with a transformer)."""
    calls: list = []

    @classmethod
    def _get_signature_types(cls):
        return {"transformer": (object,), "vae": (object,)}

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append(kwargs)
        return cls()


@pytest.fixture
def fake_config(monkeypatch):
    made = []

    def config(q, cls, dtype):
        made.append((q.setting, quantize.denoiser("transformer" in cls._get_signature_types())))
        return "the-config"
    monkeypatch.setattr(loaders, "pipeline_quantization", config)
    _FakePipeline.calls = []
    return made


def _resolved(source, path="/models/x"):
    from backend.engines.catalogue import Resolved

    return Resolved("x", "base", "flux", source, path)


def test_the_loader_quantizes_folders_when_active(fake_config):
    active = quantize.choose("nf4", "cuda", lambda name: True)
    loaders.read_base(_resolved("folder"), _FakePipeline, "bf16", None, quantize=active)
    assert _FakePipeline.calls[-1]["quantization_config"] == "the-config"
    assert fake_config == [("nf4", "transformer")]
    off = quantize.choose("nf4", "cpu")
    loaders.read_base(_resolved("hub"), _FakePipeline, "bf16", None, quantize=off)
    assert "quantization_config" not in _FakePipeline.calls[-1]


def test_a_single_file_loads_as_stored_with_a_log_line(fake_config, monkeypatch, caplog):
    active = quantize.choose("int8", "cuda", lambda name: True)
    monkeypatch.setattr(loaders, "_around_transformer", lambda *a: "read")
    resolved = _resolved("file", "/models/x.gguf")
    with caplog.at_level(logging.INFO, logger=loaders.__name__):
        assert loaders.read_base(resolved, _FakePipeline, "bf16", None, quantize=active) \
            == "read"
    assert not fake_config and "does not apply to x" in caplog.text


def test_on_the_cpu_the_engine_says_so_and_generates(tmp_path, caplog, torch_threads):  # noqa: F811
    from shared.messages import GenerateRequest

    tiny.ensure_tiny("sd15", tmp_path)
    with caplog.at_level(logging.WARNING):
        engine = DiffusersEngine(Catalogue(ModelConfig(base="tiny-sd15", tiny_root=str(tmp_path))),
                                 device="cpu", **engine_options({"quantize": "nf4"}))
    assert "quantize = 'nf4'" in caplog.text and "needs a CUDA GPU" in caplog.text
    assert engine.info()["quantize"].startswith("nf4 asked, off: ")
    out = engine.generate(GenerateRequest(width=64, height=64, prompt="x", seed=1, steps=2),
                          {}, RecordingContext())
    assert out and out[0].image.width == 64
    engine.close()


@pytest.mark.parametrize("setting,status", [("nf4", "warn"), ("none", "ok"),
                                            ("int4", "fail")])
def test_doctor_reports_the_choice(tmp_path, monkeypatch, setting, status):
    from backend.cli import doctor

    (tmp_path / "config.toml").write_text(f'[engine]\ndevice = "cpu"\nquantize = "{setting}"\n')
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    check = doctor.check_quantize()
    assert check.name == "quantize" and check.status == status
    if status == "warn":
        assert "needs a CUDA GPU" in check.detail
    if status == "fail":
        assert "must be one of" in check.detail


def test_nf4_on_cuda_with_bitsandbytes(tmp_path, torch_threads):  # noqa: F811
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes quantization needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from shared.messages import GenerateRequest

    tiny.ensure_tiny("flux", tmp_path)
    engine = DiffusersEngine(Catalogue(ModelConfig(base="tiny-flux", tiny_root=str(tmp_path))),
                             device="cuda", dtype="bf16", quantize="nf4")
    assert engine.info()["quantize"] == "nf4 (bitsandbytes)"
    out = engine.generate(GenerateRequest(width=64, height=64, prompt="x", seed=1, steps=2,
                                          base_model="tiny-flux"), {}, RecordingContext())
    entry = next(iter(engine._bases.values()))
    assert getattr(entry.pipe.transformer, "is_quantized", False) and out
    engine.close()
