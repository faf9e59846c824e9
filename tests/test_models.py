"""Model catalogue and resolution: hub ids, folders, single files, config overrides,
and the errors a user sees when a model is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.engines import tiny
from backend.engines.catalogue import (CONTROLNETS, DEFAULT_BASES, SDXL_UNION, Catalogue,
                                       ModelConfig, T2I_ADAPTERS, family_of_file,
                                       list_models)
from shared.errors import ModelMissing
from shared.messages import CONDITIONS, ControlUnit, GenerateRequest, Models

from tiny_fixtures import (RecordingContext, fake_hub_snapshot, tiny_catalogue,  # noqa: F401
                           tiny_engine, tiny_root, torch_threads)

REPO = Path(__file__).resolve().parents[1]


def empty_cache_catalogue(tmp_path, **config) -> Catalogue:
    """No hub models; a request may name models in the session's temporary folders."""
    config.setdefault("roots", (str(tmp_path.parent),))
    return Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf"), **config))


# -----------------------------------------------------------------------------
# The catalogue
# -----------------------------------------------------------------------------

def test_every_condition_has_an_sd15_default_and_ids_are_well_formed():
    assert set(CONTROLNETS["sd15"]) == set(CONDITIONS)
    for family, table in CONTROLNETS.items():
        for condition, repo in table.items():
            assert condition in CONDITIONS
            assert repo.count("/") == 1
    assert CONTROLNETS["sd15"]["lineart"] == "lllyasviel/control_v11p_sd15_lineart"
    # SDXL: one union ControlNet (xinsir's ProMax) for every condition it serves
    assert set(CONTROLNETS["sdxl"]) == set(CONDITIONS) - {"shuffle"}
    assert set(CONTROLNETS["sdxl"].values()) == {SDXL_UNION}


def test_missing_hub_model_names_it_and_the_download_command(tmp_path):
    catalogue = empty_cache_catalogue(tmp_path)
    with pytest.raises(ModelMissing) as info:
        catalogue.resolve_base()
    repo = DEFAULT_BASES["sd15"]
    assert repo in info.value.message
    assert f"controlcanvas models download {repo}" in info.value.message
    assert info.value.code == "model_missing"
    base = catalogue.resolve_base("tiny-sd15")  # built in, always present
    with pytest.raises(ModelMissing) as info:
        catalogue.resolve_controlnet("openpose", base, "someone/controlnet-openpose")
    assert "controlcanvas models download someone/controlnet-openpose" in info.value.message


def test_engine_reports_a_missing_model_as_typed_error(tmp_path, tiny_root):
    from backend.engines.diffusers.engine import DiffusersEngine

    engine = DiffusersEngine(Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf"),
                                                   tiny_root=str(tiny_root))), device="cpu")
    request = GenerateRequest(width=64, height=64, seed=1, steps=2, base_model="tiny-sd15",
                              controls=(ControlUnit(condition="canny", image=0,
                                                    model="lllyasviel/control_v11p_sd15_canny"),))
    from tiny_fixtures import random_rgba
    with pytest.raises(ModelMissing) as info:
        engine.generate(request, {0: random_rgba(64, 64)}, RecordingContext())
    assert "controlcanvas models download lllyasviel/control_v11p_sd15_canny" in \
        info.value.message


def test_hub_model_in_the_cache_resolves_to_its_snapshot(tmp_path, tiny_root):
    cache = tmp_path / "hf"
    repo = CONTROLNETS["sd15"]["scribble"]
    snapshot = fake_hub_snapshot(cache, repo, {
        "config.json": "{}", "diffusion_pytorch_model.safetensors": b"x"})
    catalogue = empty_cache_catalogue(tmp_path)
    # an SD1.5 base in a folder uses the catalogue's ControlNets (the built-in tiny name
    # would use its own)
    base = catalogue.resolve_base(str(tiny.tiny_dir("sd15", tiny_root)))
    assert base.source == "folder" and base.family == "sd15"
    resolved = catalogue.resolve_controlnet("scribble", base)
    assert resolved.source == "hub" and resolved.repo_id == repo
    assert Path(resolved.path) == snapshot
    # config alone (an interrupted download) is not "present"
    fake_hub_snapshot(cache, "owner/half-done", {"config.json": "{}"})
    with pytest.raises(ModelMissing):
        catalogue.resolve_controlnet("scribble", base, "owner/half-done")


def test_hub_base_needs_every_component(tmp_path):
    cache = tmp_path / "hf"
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "U"],
             "vae": ["diffusers", "V"], "text_encoder": ["transformers", "T"],
             "text_encoder_2": ["transformers", "T"], "tokenizer": ["transformers", "K"],
             "tokenizer_2": ["transformers", "K"], "scheduler": ["diffusers", "S"]}
    files = {"model_index.json": json.dumps(index)}
    for sub, weight in (("unet", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.safetensors"),
                        ("text_encoder", "model.safetensors"),
                        ("text_encoder_2", "model.safetensors")):
        files[f"{sub}/config.json"] = "{}"
        files[f"{sub}/{weight}"] = b"w"
    files["tokenizer/vocab.json"] = "{}"
    files["scheduler/scheduler_config.json"] = "{}"
    fake_hub_snapshot(cache, "me/xl-model", files)
    catalogue = empty_cache_catalogue(tmp_path)
    with pytest.raises(ModelMissing):  # tokenizer_2 folder missing
        catalogue.resolve_base("me/xl-model")
    snapshot = next((cache / "models--me--xl-model" / "snapshots").iterdir())
    (snapshot / "tokenizer_2").mkdir()
    resolved = catalogue.resolve_base("me/xl-model")
    assert resolved.family == "sdxl" and resolved.native_size == 1024


# -----------------------------------------------------------------------------
# Local folders and single files
# -----------------------------------------------------------------------------

def test_local_folder_base_loads_through_the_engine(tiny_root, tiny_engine):
    folder = tiny.tiny_dir("sdxl", tiny_root)
    resolved = tiny_engine.catalogue.resolve_base(str(folder))
    assert resolved.source == "folder" and resolved.family == "sdxl"
    request = GenerateRequest(width=72, height=40, seed=3, steps=2, base_model=str(folder),
                              controls=(ControlUnit(condition="canny", image=0, model=str(
                                  folder / "controlnets" / "lines")),))
    from tiny_fixtures import random_rgba
    out = tiny_engine.generate(request, {0: random_rgba(72, 40)}, RecordingContext())
    assert out[0].image.size == (72, 40)


def test_incomplete_or_absent_local_paths_are_clear_errors(tmp_path, tiny_catalogue):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text('{"unet": ["diffusers", "U"]}')
    with pytest.raises(ModelMissing, match="incomplete"):
        tiny_catalogue.resolve_base(str(tmp_path / "half"))
    with pytest.raises(ModelMissing, match="does not exist"):
        tiny_catalogue.resolve_base(str(tmp_path / "nope.safetensors"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelMissing, match="not a model file"):
        tiny_catalogue.resolve_base(str(tmp_path / "notes.txt"))


def test_unloadable_models_are_typed_errors_naming_the_model(tmp_path, tiny_engine):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a checkpoint")
    request = GenerateRequest(width=64, height=64, seed=1, steps=2, base_model=str(broken))
    with pytest.raises(ModelMissing, match="broken.safetensors"):
        tiny_engine.generate(request, {}, RecordingContext())
    net = tmp_path / "net"
    net.mkdir()
    (net / "config.json").write_text("{ not json")
    (net / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    from tiny_fixtures import random_rgba
    request = GenerateRequest(width=64, height=64, seed=1, steps=2, base_model="tiny-sd15",
                              controls=(ControlUnit(condition="depth", image=0, model=str(net)),))
    with pytest.raises(ModelMissing, match="Could not load the ControlNet"):
        tiny_engine.generate(request, {0: random_rgba(64, 64)}, RecordingContext())


def _write_safetensors(path: Path, keys) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))


def test_single_file_family_is_read_from_the_tensor_names(tmp_path, tiny_catalogue):
    xl = tmp_path / "juggernaut.safetensors"
    _write_safetensors(xl, ["conditioner.embedders.1.model.ln_final.weight",
                            "model.diffusion_model.input_blocks.0.0.weight"])
    sd = tmp_path / "anything.safetensors"
    _write_safetensors(sd, ["cond_stage_model.transformer.text_model.final_layer_norm.weight",
                            "model.diffusion_model.input_blocks.0.0.weight"])
    assert family_of_file(xl) == "sdxl" and family_of_file(sd) == "sd15"
    resolved = tiny_catalogue.resolve_base(str(xl))
    assert (resolved.source, resolved.family, resolved.native_size) == ("file", "sdxl", 1024)
    assert tiny_catalogue.resolve_base(str(sd)).family == "sd15"
    # the config can say what a name cannot
    catalogue = Catalogue(ModelConfig(bases={"mine": (str(sd), "sdxl")},
                                      tiny_root=tiny_catalogue.config.tiny_root))
    assert catalogue.resolve_base("mine").family == "sdxl"


def test_single_file_controlnet_loads_and_matches_its_folder(tmp_path, tiny_root, tiny_engine):
    import shutil

    folder = tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines"
    single = tmp_path / "my_lineart.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    shutil.copy(folder / "config.json", tmp_path / "config.json")  # its config beside it
    resolved = tiny_engine.catalogue.resolve_controlnet(
        "lineart", tiny_engine.catalogue.resolve_base("tiny-sd15"), str(single))
    assert resolved.source == "file"
    from tiny_fixtures import random_rgba
    control = {0: random_rgba(64, 48, seed=9)}

    def generate(model):
        request = GenerateRequest(width=64, height=48, seed=5, steps=3, base_model="tiny-sd15",
                                  controls=(ControlUnit(condition="lineart", image=0,
                                                        model=model),))
        return tiny_engine.generate(request, control, RecordingContext())[0].image.data

    assert generate(str(single)) == generate(str(folder)) == generate("")


def _default_repo(cache: Path, folder: Path, weights: bool = True) -> Path:
    """The family's default repo in a hub cache, with ``folder``'s configs, tokenizer and
    scheduler: where a single file's component configs come from.  ``weights``: with
    *other* (random) weights, as after ``models download sd15`` (a component silently
    read from here instead of the file would change the picture, so the test below
    cannot pass by accident); else only the small files diffusers itself fetches online
    for a single file (``*.json``, ``*.txt``)."""
    import torch
    from safetensors.torch import load_file, save

    generator = torch.Generator().manual_seed(99)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.startswith(("controlnets/", ".")):
            continue
        if path.suffix == ".safetensors":
            if weights:
                files[rel] = save({k: torch.randn(v.shape, generator=generator).to(v.dtype)
                                   for k, v in load_file(str(path)).items()})
        elif path.suffix in (".json", ".txt") or weights:
            files[rel] = path.read_bytes()
    return fake_hub_snapshot(cache, DEFAULT_BASES["sd15"], files)


@pytest.mark.parametrize("suffix, repo", [(".safetensors", "downloaded"), (".ckpt", "downloaded"),
                                          (".safetensors", "configs only")])
def test_original_format_single_file_base_matches_its_folder(tmp_path, tiny_root, suffix, repo):
    """An original-format (LDM) checkpoint configured as the base in config.toml loads
    through from_single_file, offline, and gives the same pixels as the same weights in
    a diffusers folder; its component configs come from [models] cache_dir."""
    import torch

    from backend.engines.diffusers.engine import DiffusersEngine
    from single_file_support import write_checkpoint
    from tiny_fixtures import random_rgba

    folder = tiny.tiny_dir("sd15", tiny_root)
    single = write_checkpoint(folder, tmp_path / f"my-model{suffix}")
    if suffix == ".safetensors":
        assert family_of_file(single) == "sd15"  # from the real tensor names
    cache = tmp_path / "hf"
    _default_repo(cache, folder, weights=repo == "downloaded")
    config = tmp_path / "config.toml"
    config.write_text(f"""
[models]
base = "{single.as_posix()}"
family = "sd15"
cache_dir = "{cache.as_posix()}"
tiny_root = "{tiny_root.as_posix()}"
roots = ["{tmp_path.parent.as_posix()}"]
""")
    engine = DiffusersEngine.from_options({"device": "cpu"}, config_file=config)
    resolved = engine.catalogue.resolve_base()
    assert (resolved.source, resolved.family, Path(resolved.path)) == ("file", "sd15", single)
    lines = str(folder / "controlnets" / "lines")
    imgs = {0: random_rgba(72, 48, seed=4), 10: random_rgba(72, 48, seed=5)}

    def generate(base, **kw):
        request = GenerateRequest(width=72, height=48, seed=11, steps=3, base_model=base, **kw)
        return engine.generate(request, imgs, RecordingContext())[0].image.data

    txt = {"controls": (ControlUnit(condition="lineart", image=0, model=lines),)}
    img = {"mode": "img2img", "init_image": 10, "strength": 0.7}  # the VAE encoder too
    from_file = [generate("", **txt), generate("", **img)]
    from_folder = [generate(str(folder), **txt), generate(str(folder), **img)]
    assert from_file == from_folder  # bit-identical: same fp32 tensors, only renamed
    # every weight came from the file (none from the config repo's other weights)
    bases = {e.resolved.source: e.pipe for e in engine._bases.values()}
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = (getattr(bases[s], name).state_dict() for s in ("file", "folder"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    engine.close()


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.makedirs(marker): harmless, but visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_ckpt_that_would_run_code_is_refused_not_run(tmp_path, tiny_root):
    """.ckpt files are pickles: they are read with torch.load(weights_only=True), so a
    checkpoint carrying code is an error naming the file, and the code never runs."""
    import torch

    from backend.engines.diffusers.engine import DiffusersEngine
    from single_file_support import ldm_state_dict

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny.tiny_dir("sd15", tiny_root)),
                "payload": _RunsCodeWhenUnpickled(marker)}, str(evil))
    engine = DiffusersEngine(empty_cache_catalogue(tmp_path, tiny_root=str(tiny_root)),
                             device="cpu")
    request = GenerateRequest(width=64, height=64, seed=1, steps=2, base_model=str(evil))
    with pytest.raises(ModelMissing, match="evil.ckpt"):
        engine.generate(request, {}, RecordingContext())
    assert not marker.exists()


# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------

def test_toml_overrides_base_and_controlnets(tmp_path, tiny_root):
    lines = tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = 1234
[models]
base = "tiny-sd15"
cache_dir = "{(tmp_path / 'hf').as_posix()}"
tiny_root = "{tiny_root.as_posix()}"
[models.bases]
xl = {{ path = "tiny-sdxl", family = "sdxl" }}
[controlnets]
depth = "{lines.as_posix()}"
[controlnets.sdxl]
canny = "someone/sdxl-canny"
""")
    catalogue = Catalogue(ModelConfig.from_toml(config))
    base = catalogue.resolve_base()
    assert base.name == "tiny-sd15" and base.source == "builtin"
    assert Path(catalogue.resolve_controlnet("depth", base).path) == lines
    # conditions not overridden keep the tiny model's own nets
    assert catalogue.resolve_controlnet("openpose", base).source == "builtin"
    xl = catalogue.resolve_base("xl")
    assert xl.family == "sdxl"
    assert catalogue.controlnet_name("canny", "sdxl") == "someone/sdxl-canny"
    assert catalogue.controlnet_name("canny", "sd15") == CONTROLNETS["sd15"]["canny"]
    assert catalogue.controlnet_name("depth", "sdxl") == str(lines.as_posix())
    assert catalogue.download_target("sdxl:canny") == ("someone/sdxl-canny", "controlnet")


@pytest.mark.parametrize("text, message", [
    ("[models]\nbse = 'x'\n", "unknown setting"),
    ("[models]\nfamily = 'sd2'\n", "family"),
    ("[controlnets]\nlinework = 'x'\n", "unknown condition"),
    ("[controlnets.sd2]\ncanny = 'x'\n", "family"),
    ("[models.bases]\nmine = 3\n", "must be a string"),
])
def test_bad_config_says_what_is_wrong(tmp_path, text, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_toml(config)


def test_missing_config_file_means_defaults(tmp_path):
    config = ModelConfig.from_toml(tmp_path / "absent.toml")
    assert Catalogue(config).default_base == DEFAULT_BASES["sd15"]


def test_sdxl_condition_without_default_explains_how_to_configure(tmp_path):
    catalogue = empty_cache_catalogue(tmp_path)
    with pytest.raises(ModelMissing, match=r"\[controlnets.sdxl\] shuffle") as info:
        catalogue.controlnet_name("shuffle", "sdxl")
    assert "union" in info.value.message and "models download shuffle" in info.value.message


# -----------------------------------------------------------------------------
# Listing and downloading
# -----------------------------------------------------------------------------

def test_models_message_says_what_is_present(tmp_path, tiny_root):
    cache = tmp_path / "hf"
    fake_hub_snapshot(cache, CONTROLNETS["sd15"]["canny"], {
        "config.json": "{}", "diffusion_pytorch_model.safetensors": b"x"})
    message = list_models(ModelConfig(cache_dir=str(cache), tiny_root=str(tiny_root)))
    assert isinstance(message, Models)
    by_name = {(m.name, m.kind): m for m in message.models}
    assert by_name[(CONTROLNETS["sd15"]["canny"], "controlnet")].present
    assert not by_name[(CONTROLNETS["sd15"]["depth"], "controlnet")].present
    assert not by_name[(DEFAULT_BASES["sd15"], "base")].present
    assert by_name[("tiny-sd15", "base")].present
    assert message.default_base == DEFAULT_BASES["sd15"]
    names = [(m.name, m.kind, m.family) for m in message.models]
    assert len(names) == len(set(names))
    tiny_default = list_models(ModelConfig(base="tiny-sd15", tiny_root=str(tiny_root),
                                           cache_dir=str(cache)))
    assert tiny_default.default_base == "tiny-sd15"
    assert [m.name for m in tiny_default.models].count("tiny-sd15") == 1
    sdxl_nets = [m for m in message.models if m.kind == "controlnet" and m.family == "sdxl"]
    # the union ControlNet is listed once, with every condition it serves; then the
    # optional T2I-Adapters
    adapters = sorted(set(T2I_ADAPTERS["sdxl"].values()))
    assert [m.name for m in sdxl_nets] == [SDXL_UNION] + \
        sorted(adapters, key=list(T2I_ADAPTERS["sdxl"].values()).index)
    assert set(sdxl_nets[0].condition.split(",")) == set(CONTROLNETS["sdxl"])


def test_the_embedded_demo_model_resolves_for_outline_conditions_only(tmp_path):
    from backend.engines.catalogue import DEMO_BASE, DEMO_CONDITIONS

    catalogue = empty_cache_catalogue(tmp_path, base=DEMO_BASE)
    base = catalogue.resolve_base("")
    assert (base.name, base.source, base.family, base.native_size) == (
        DEMO_BASE, "builtin", "sd15", 64)
    assert (Path(base.path) / "model_index.json").is_file()
    for condition in DEMO_CONDITIONS:
        net = catalogue.resolve_controlnet(condition, base)
        assert (Path(net.path) / "config.json").is_file() and net.source == "builtin"
    with pytest.raises(ModelMissing, match="only has an outline ControlNet.*'depth'") as info:
        catalogue.resolve_controlnet("depth", base)
    assert info.value.field == "condition"
    listed = {m.name: m for m in catalogue.models_message().models if m.kind == "base"}
    assert listed[DEMO_BASE].present
    with pytest.raises(ModelMissing, match="built in"):
        catalogue.download_target(DEMO_BASE)
    # a named alias of a built-in base finds the built-in ControlNets too
    aliased = empty_cache_catalogue(tmp_path, bases={"shapes": (DEMO_BASE, "")})
    alias = aliased.resolve_base("shapes")
    assert alias.name == "shapes" and alias.path == base.path
    assert aliased.resolve_controlnet("lineart", alias).path == \
        catalogue.resolve_controlnet("lineart", base).path


def test_download_aliases_and_offline_message(tmp_path, monkeypatch):
    catalogue = empty_cache_catalogue(tmp_path)
    assert catalogue.download_target("sd15") == (DEFAULT_BASES["sd15"], "base")
    assert catalogue.download_target("lineart") == (CONTROLNETS["sd15"]["lineart"],
                                                    "controlnet")
    assert catalogue.download_target("sdxl:depth") == (CONTROLNETS["sdxl"]["depth"],
                                                       "controlnet")
    with pytest.raises(ModelMissing, match="built in"):
        catalogue.download_target("tiny-sd15")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelMissing, match="offline") as info:
        catalogue.download("lineart")
    assert CONTROLNETS["sd15"]["lineart"] in info.value.message


def test_download_of_a_cached_model_is_a_no_op(tmp_path):
    snapshot = fake_hub_snapshot(tmp_path / "hf", "me/net", {
        "config.json": "{}", "diffusion_pytorch_model.safetensors": b"x"})
    assert empty_cache_catalogue(tmp_path).download("me/net") == snapshot


# -----------------------------------------------------------------------------
# The tiny model itself
# -----------------------------------------------------------------------------

def test_tiny_build_is_deterministic_and_cached(tmp_path):
    a = tiny.ensure_tiny("sd15", tmp_path / "a")
    b = tiny.ensure_tiny("sd15", tmp_path / "b")
    for rel in ("unet/diffusion_pytorch_model.safetensors",
                "controlnets/lines/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    stamp = (a / ".complete").stat().st_mtime_ns
    assert tiny.ensure_tiny("sd15", tmp_path / "a") == a
    assert (a / ".complete").stat().st_mtime_ns == stamp  # not rebuilt
    assert tiny.VERSION in a.name


def test_import_backend_does_not_import_torch():
    code = ("import sys, backend, backend.engines.catalogue, backend.engines.tiny, backend.engines.factory; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, "
            "[m for m in ('torch', 'diffusers') if m in sys.modules]")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
