"""packaging/build.py: the backend wheel (the plug-in bundles are tested beside their
plug-ins, in test_gimp_plugin.py and test_krita_plugin.py)."""

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("cc_build_for_tests",
                                                  ROOT / "packaging" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_backend_wheel_holds_backend_and_shared(build, tmp_path):
    wheel, _ = build.build_backend(tmp_path, build.default_cache())
    assert wheel.name == f"controlcanvas-{build.project_version()}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "backend/server/websocket.py" in names and "shared/messages.py" in names
    # the embedded demo model (the default of `controlcanvas demo` / `serve --engine demo`)
    for part in ("base/unet/diffusion_pytorch_model.safetensors", "base/model_index.json",
                 "controlnet/diffusion_pytorch_model.safetensors", "controlnet/config.json"):
        assert f"backend/assets/shapes-demo/{part}" in names
    assert not any(n.startswith(("tests/", "plugin_", "packaging/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "controlcanvas = backend.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_no_packaging_package_shadows_pypi():
    assert not (ROOT / "packaging" / "__init__.py").exists()
