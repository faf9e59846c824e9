"""`controlcanvas models download`: which files (fp16 weights first), how big (said before the
transfer), huggingface_hub's progress bar, and the hub out of reach (offline, no network):
the size is unknown and that is said, never a traceback.

The hub is faked offline: FakeHub answers ``model_info(files_metadata=True)`` with file
names and sizes like huggingface.co does, and its ``snapshot_download`` lays the files out
in a hub cache the way huggingface_hub does (``fake_hub_snapshot``), driving the progress
bar class it is handed as snapshot_download drives it."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.cli.main import main
from backend.engines import downloads
from backend.engines.catalogue import Catalogue, ModelConfig
from shared.errors import HubUnreachable, ModelMissing

from test_models import fake_hub_snapshot

GB = 1_000_000_000
MB = 1_000_000
CONFIGS = {"model_index.json": 600, "scheduler/scheduler_config.json": 500,
           "tokenizer/vocab.json": 1_060_000, "tokenizer/merges.txt": 525_000,
           "tokenizer_2/vocab.json": 1_060_000, "tokenizer_2/merges.txt": 525_000,
           "unet/config.json": 1_700, "vae/config.json": 640,
           "text_encoder/config.json": 560, "text_encoder_2/config.json": 570}
# stabilityai/stable-diffusion-xl-base-1.0 as the hub lists it (sizes rounded).
SDXL_REPO = {**CONFIGS,
             "unet/diffusion_pytorch_model.safetensors": 10_270 * MB,
             "unet/diffusion_pytorch_model.fp16.safetensors": 5_140 * MB,
             "vae/diffusion_pytorch_model.safetensors": 335 * MB,
             "vae/diffusion_pytorch_model.fp16.safetensors": 167 * MB,
             "text_encoder/model.safetensors": 492 * MB,
             "text_encoder/model.fp16.safetensors": 246 * MB,
             "text_encoder_2/model.safetensors": 2_780 * MB,
             "text_encoder_2/model.fp16.safetensors": 1_390 * MB,
             "sd_xl_base_1.0.safetensors": 6_940 * MB,  # the single file: never fetched
             "sd_xl_offset_example-lora_1.0.safetensors": 50 * MB,
             "unet/diffusion_flax_model.msgpack": 10_270 * MB,
             "unet/openvino_model.bin": 5_140 * MB}
UNION_REPO = {"config.json": 2_400, "diffusion_pytorch_model.fp16.safetensors": 2_510 * MB,
              "images/sample.png": 900_000}
CANNY_REPO = {"config.json": 1_000, "diffusion_pytorch_model.safetensors": 1_450 * MB,
              "diffusion_pytorch_model.bin": 1_450 * MB, "README.md": 3_000}
SHARDED_REPO = {"config.json": 1_000,
                "diffusion_pytorch_model.safetensors.index.json": 90_000,
                "diffusion_pytorch_model-00001-of-00002.safetensors": 5 * GB,
                "diffusion_pytorch_model-00002-of-00002.safetensors": 3 * GB,
                "diffusion_pytorch_model.safetensors.index.fp16.json": 90_000,
                "diffusion_pytorch_model-00001-of-00002.fp16.safetensors": 3 * GB,
                "diffusion_pytorch_model-00002-of-00002.fp16.safetensors": 1 * GB}


class FakeHub:
    """Stands in for huggingface_hub's HfApi and snapshot_download (see the module doc)."""

    def __init__(self, repos):
        self.repos = repos
        self.fetched = []  # (repo id, allow_patterns, tqdm class)

    def api(self, *args, **kwargs):
        return self

    def model_info(self, repo_id, files_metadata=False, timeout=None):
        from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

        assert files_metadata and timeout, "sizes are asked for, and not forever"
        if repo_id not in self.repos:  # the hub's 404 (its HTTP client varies by release)
            from huggingface_hub.errors import RepositoryNotFoundError

            missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(missing, f"404 Client Error: {repo_id}")
            raise missing
        siblings = [RepoSibling(rfilename=name, size=size, lfs=BlobLfsInfo(
            size=size, sha256="0" * 64, pointer_size=134) if size > MB else None)
            for name, size in self.repos[repo_id].items()]
        return SimpleNamespace(siblings=siblings)

    def snapshot_download(self, repo_id, *, allow_patterns, cache_dir, tqdm_class, **kwargs):
        self.fetched.append((repo_id, list(allow_patterns), tqdm_class))
        sizes = self.repos[repo_id]
        bar = tqdm_class(total=sum(sizes[n] for n in allow_patterns), unit="B",
                         unit_scale=True, desc="Downloading bytes")
        files = {}
        for name in allow_patterns:
            bar.update(sizes[name])
            files[name] = "{}" if name.endswith(".json") else b"weights"
        bar.close()
        return str(fake_hub_snapshot(Path(cache_dir), repo_id, files))


@pytest.fixture
def hub(monkeypatch):
    """The fake hub, online (the tests run with HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub({"stabilityai/stable-diffusion-xl-base-1.0": SDXL_REPO,
                    "owner/union-promax": UNION_REPO,
                    "lllyasviel/control_v11p_sd15_canny": CANNY_REPO,
                    "owner/sharded": SHARDED_REPO})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def catalogue_in(tmp_path) -> Catalogue:
    return Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf")))


# -- which files ---------------------------------------------------------------------------------

def test_an_sdxl_base_comes_as_fp16_weights_and_configs_only(hub):
    plan = downloads.plan("stabilityai/stable-diffusion-xl-base-1.0")
    names = {f.path for f in plan.files}
    assert names == set(CONFIGS) | {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors"}
    assert plan.kind == "base" and plan.variant == "fp16"
    weights = (5_140 + 167 + 246 + 1_390) * MB
    assert plan.size == weights + sum(CONFIGS.values())
    assert plan.full_size == (10_270 + 335 + 492 + 2_780) * MB + sum(CONFIGS.values())
    assert plan.describe() == ("stabilityai/stable-diffusion-xl-base-1.0 (base model): 14 "
                               "files, 6.95 GB (fp16 weights; 13.88 GB in fp32)")


@pytest.mark.parametrize("repo, files, variant, says", [
    ("owner/union-promax", {"config.json", "diffusion_pytorch_model.fp16.safetensors"}, "fp16",
     "2 files, 2.51 GB (fp16 weights)"),
    ("lllyasviel/control_v11p_sd15_canny", {"config.json",
                                            "diffusion_pytorch_model.safetensors"}, "",
     "2 files, 1.45 GB (full-precision weights: the repo has no fp16 variant)"),
    ("owner/sharded", {"config.json", "diffusion_pytorch_model.safetensors.index.fp16.json",
                       "diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
                       "diffusion_pytorch_model-00002-of-00002.fp16.safetensors"}, "fp16",
     "4 files, 4.00 GB (fp16 weights; 8.00 GB in fp32)"),
])
def test_controlnets_fp16_first_then_safetensors_never_pickles_or_extras(hub, repo, files,
                                                                        variant, says):
    plan = downloads.plan(repo)
    assert {f.path for f in plan.files} == files
    assert plan.kind == "controlnet" and plan.variant == variant
    assert plan.describe() == f"{repo} (ControlNet): {says}"


def test_a_repo_without_diffusers_weights_is_refused_with_what_to_do():
    with pytest.raises(ModelMissing, match="single .safetensors file yourself"):
        downloads.choose("someone/checkpoint", [downloads.HubFile("model.safetensors", 2)])
    with pytest.raises(ModelMissing, match="no diffusers weights for unet"):
        downloads.choose("someone/flax", [downloads.HubFile("model_index.json", 1),
                                          downloads.HubFile("unet/config.json", 1),
                                          downloads.HubFile("unet/flax_model.msgpack", 9)])


# -- the command ----------------------------------------------------------------------------

def test_download_says_the_size_first_then_shows_the_progress_bar(hub, tmp_path, capsys,
                                                                  monkeypatch):
    from huggingface_hub.utils import tqdm as hf_tqdm

    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "config.toml").write_text(f'[models]\ncache_dir = "{tmp_path / "hf"}"\n')
    assert main(["models", "download", "canny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out == ("would download lllyasviel/control_v11p_sd15_canny (ControlNet): 2 files, "
                   "1.45 GB (full-precision weights: the repo has no fp16 variant)\n")
    assert hub.fetched == [] and not (tmp_path / "hf").exists()
    assert main(["models", "download", "canny"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == ("downloading lllyasviel/control_v11p_sd15_canny (ControlNet): 2 "
                        "files, 1.45 GB (full-precision weights: the repo has no fp16 "
                        "variant)")
    assert lines[1].startswith("canny: ready in ") and "control_v11p_sd15_canny" in lines[1]
    (repo, patterns, bar), = hub.fetched
    assert bar is hf_tqdm, "huggingface_hub's own progress bars"
    assert "Downloading bytes" in captured.err and "1.45G" in captured.err
    # it is there now: listed as present, and a second download fetches nothing
    assert main(["models"]) == 0
    assert any(line.split()[:4] == ["✓", "sd15", "controlnet", "canny"]
               for line in capsys.readouterr().out.splitlines())
    assert main(["models", "download", "canny"]) == 0
    assert len(hub.fetched) == 1 and "ready in" in capsys.readouterr().out


def test_download_without_a_progress_bar_and_an_fp16_base(hub, tmp_path, capsys):
    said = []
    catalogue = catalogue_in(tmp_path)
    path = catalogue.download("sdxl", progress=False, on_plan=said.append)
    assert said[0].variant == "fp16" and said[0].size < 7 * GB
    assert (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (path / "sd_xl_base_1.0.safetensors").exists()
    assert "Downloading bytes" not in capsys.readouterr().err
    assert catalogue.cached_snapshot("stabilityai/stable-diffusion-xl-base-1.0", "base") == path


def test_models_sizes_lists_each_missing_download(hub, tmp_path):
    catalogue = catalogue_in(tmp_path)
    sizes, unreachable = catalogue.download_sizes(api=hub)
    assert unreachable == ""
    assert sizes["stabilityai/stable-diffusion-xl-base-1.0"] == "download 6.95 GB, fp16"
    assert sizes["lllyasviel/control_v11p_sd15_canny"] == "download 1.45 GB"
    assert sizes["lllyasviel/control_v11p_sd15_lineart"] == (
        "size unknown: lllyasviel/control_v11p_sd15_lineart does not exist on huggingface.co "
        "(or is private).")


# -- the hub out of reach -------------------------------------------------------------------

def test_offline_the_size_is_unknown_and_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    assert main(["models", "--sizes"]) == 0
    out = capsys.readouterr().out
    assert "(missing: controlcanvas models download lllyasviel/control_v11p_sd15_canny; " \
           "size unknown: hub unreachable)" in out
    assert "Download sizes unknown: Cannot ask the hub about " in out
    assert "offline mode is on (HF_HUB_OFFLINE is set)" in out
    for argv in (["models", "download", "canny", "--dry-run"], ["models", "download", "canny"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "offline mode is on" in err and "download size is unknown" in err
        assert "[hub_unreachable]" in err and "Traceback" not in err


def test_no_network_is_said_at_once_not_retried(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    catalogue = catalogue_in(tmp_path)
    with pytest.raises(HubUnreachable, match="not reachable") as info:
        catalogue.download_plan("canny")
    assert info.value.code == "hub_unreachable"
    sizes, unreachable = catalogue.download_sizes()
    assert "not reachable" in unreachable
    assert set(sizes.values()) == {"size unknown: hub unreachable"}
