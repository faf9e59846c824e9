"""GGUF transformer files as bases (backend/engines/gguf_files.py, families, catalogue, fit,
diffusers/loaders.read_transformer_file): the family read from the tensor names with the
safetensors rules, `models` listing the quantization, the size from the file, the rest of
the pipeline from the family's default repo (ModelMissing naming the download when it is
not here), and a tiny Q8_0 Flux transformer generating on the engine.

Needs the ``quant`` extra (gguf); in CI (CONTROLCANVAS_REQUIRE_QUANT=1) a missing package
fails instead of skipping."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CONTROLCANVAS_REQUIRE_QUANT") == "1":  # CI: a missing extra fails
    import gguf
else:
    gguf = pytest.importorskip("gguf")

from backend.engines import fit, gguf_files, tiny  # noqa: E402
from backend.engines.catalogue import DEFAULT_BASES, Catalogue, ModelConfig  # noqa: E402
from backend.engines.families import detect_file  # noqa: E402
from shared.errors import ModelMissing  # noqa: E402
from shared.messages import GenerateRequest  # noqa: E402

from tiny_fixtures import RecordingContext, random_rgba, torch_threads  # noqa: F401,E402

# A few tensor names of each family's real GGUF files (city96's: the original keys).
FAMILY_KEYS = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
             "img_in.weight", "txt_in.weight", "guidance_in.in_layer.weight"),
    "sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight",
            "context_embedder.weight"),
    "klein": ("double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight",
              "img_in.weight", "txt_in.weight"),
    "zimage": ("layers.0.adaLN_modulation.0.weight", "context_refiner.0.attention.qkv.weight",
               "x_embedder.weight"),
    "qwen": ("transformer_blocks.0.attn.to_q.weight", "txt_norm.weight", "img_in.weight",
             "txt_in.weight"),
}


def _names_only(path, names, quant="Q4_0"):
    """A GGUF file holding ``names`` as 32x64 tensors in ``quant``."""
    kind = getattr(gguf.GGMLQuantizationType, quant)
    writer = gguf.GGUFWriter(str(path), arch="test")
    for name in names:
        data = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_KEYS))
def test_family_from_the_tensor_names(tmp_path, family):
    path = _names_only(tmp_path / "some-name-saying-nothing.gguf", FAMILY_KEYS[family])
    found = detect_file(path)
    assert found is not None and found.kind == "base" and found.family == family
    header = gguf_files.read_header(path)
    assert header.quant == "Q4_0" and header.params == 32 * 64 * len(FAMILY_KEYS[family])
    assert header.shapes[FAMILY_KEYS[family][0]] == (32, 64)  # torch's order


def test_unknown_names_are_refused_with_a_message(tmp_path):
    path = _names_only(tmp_path / "llm.gguf", ("blk.0.attn_q.weight",))
    catalogue = Catalogue(ModelConfig(bases={"x": (str(path), "")}))
    with pytest.raises(ModelMissing, match="holds no transformer ControlCanvas knows"):
        catalogue.resolve_base("x")


def test_fit_sizes_a_gguf_base_from_its_file(tmp_path):
    path = _names_only(tmp_path / "q.gguf", FAMILY_KEYS["klein"], "Q8_0")
    sized = fit.sized_for("q", "klein", str(path), "bf16")
    transformer = next(c for c in sized.components if c.name == "transformer")
    assert transformer.dtype == "q8_0" and transformer.params == 32 * 64 * 4
    assert transformer.nbytes == pytest.approx(32 * 64 * 4 * 34 / 32)
    names = {c.name for c in sized.components}
    assert {"text_encoder", "vae"} <= names  # the rest at the family's real size
    assert all(c.dtype == "bf16" for c in sized.components if c.name != "transformer")


# -- the tiny Flux stack ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory, torch_threads):  # noqa: F811
    from diffusers import FluxTransformer2DModel

    from backend.engines.tiny_gguf import write_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    folder = tiny.ensure_tiny("flux", root)
    plain = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    write_gguf(plain, root / "tiny-flux-Q8_0.gguf")
    return root


def _catalogue(root, **kw) -> Catalogue:
    return Catalogue(ModelConfig(tiny_root=str(root), cache_dir=str(root / "empty-hf-cache"),
                                 roots=(str(root),), **kw))


@pytest.fixture
def rest_downloaded(gguf_root, monkeypatch):
    """The tiny Flux stack stands in for FLUX.1 [dev] downloaded (the GGUF file's rest)."""
    folder = tiny.ensure_tiny("flux", gguf_root)
    real = Catalogue.cached_snapshot

    def cached(self, repo_id, kind, complete=True):
        return folder if repo_id == DEFAULT_BASES["flux"] else real(self, repo_id, kind,
                                                                    complete)
    monkeypatch.setattr(Catalogue, "cached_snapshot", cached)
    return folder


def test_models_lists_a_gguf_base_with_its_quantization(gguf_root):
    path = str(gguf_root / "tiny-flux-Q8_0.gguf")
    catalogue = _catalogue(gguf_root, bases={"flux-q8": (path, "")})
    entry = next(m for m in catalogue.entries() if m.name == "flux-q8")
    assert entry.present and entry.family == "flux"
    assert "GGUF Q8_0 transformer" in entry.source and DEFAULT_BASES["flux"] in entry.source


def test_a_request_may_name_a_gguf_in_a_models_root(gguf_root):
    resolved = _catalogue(gguf_root).resolve_base("tiny-flux-Q8_0.gguf")
    assert resolved.family == "flux" and resolved.quant == "Q8_0"


def test_the_rest_missing_names_the_download(gguf_root):
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(_catalogue(gguf_root), device="cpu")
    resolved = engine.catalogue.resolve_base("tiny-flux-Q8_0.gguf")
    with pytest.raises(ModelMissing, match="controlcanvas models download flux"):
        engine._load_base(resolved)
    engine.close()


def test_a_gguf_base_generates_on_the_engine(gguf_root, rest_downloaded):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from backend.engines.diffusers.engine import DiffusersEngine
    from backend.imaging import to_array

    engine = DiffusersEngine(_catalogue(gguf_root), device="cpu")
    request = GenerateRequest(width=64, height=64, prompt="a red coat", seed=7, steps=2,
                              base_model="tiny-flux-Q8_0.gguf")
    out = engine.generate(request, {}, RecordingContext())
    pixels = to_array(out[0].image)
    assert pixels.shape == (64, 64, 4) and pixels[..., :3].std() > 0
    entry = next(iter(engine._bases.values()))
    weight = entry.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter)  # kept quantized, dequantized per layer
    img2img = GenerateRequest(width=64, height=64, prompt="a red coat", seed=7, steps=2,
                              base_model="tiny-flux-Q8_0.gguf", mode="img2img",
                              init_image=0, strength=0.6)
    assert engine.generate(img2img, {0: random_rgba(64, 64, seed=1)}, RecordingContext())
    engine.close()
