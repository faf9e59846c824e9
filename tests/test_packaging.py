"""packaging/build.py: the backend wheel, and build.py run by a stdlib-only Python (the
plug-in bundles themselves are tested beside their plug-ins, in test_gimp_plugin.py and
test_krita_plugin.py)."""

import importlib.util
import os
import shutil
import subprocess
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


# -- build.py outside the project's venv (issue 19, friction 9) --------------------------

BUILD_PY = ROOT / "packaging" / "build.py"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A Python with the standard library only (a venv without pip), run with -I."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    probe = subprocess.run([str(python), "-I", "-c", "import pip"], capture_output=True)
    assert probe.returncode != 0, "the bare venv should have no pip"
    return python


@pytest.fixture(scope="module")
def filled_cache(build, tmp_path_factory):
    """A build cache holding the pinned websockets sdist (fetched once, like the GIMP tests)."""
    cache = tmp_path_factory.mktemp("cache")
    sdist = build.fetch_sdist(build.WEBSOCKETS, build.default_cache())
    shutil.copyfile(sdist, cache / sdist.name)
    return cache


def run_build(python, *args):
    return subprocess.run([str(python), "-I", str(BUILD_PY), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT.parent)


def test_stdlib_only_python_builds_plugins_and_skips_the_wheel(build, bare_python,
                                                               filled_cache, tmp_path):
    done = run_build(bare_python, "--out", tmp_path / "dist", "--cache", filled_cache)
    assert done.returncode == 0, done.stderr
    version = build.project_version()
    gimp_zip = tmp_path / "dist" / f"controlcanvas-gimp-{version}.zip"
    krita_zip = tmp_path / "dist" / f"controlcanvas-krita-{version}.zip"
    assert gimp_zip.is_file() and krita_zip.is_file()
    assert not list((tmp_path / "dist").glob("*.whl"))
    assert "Traceback" not in done.stderr
    (note,) = done.stderr.strip().splitlines()
    assert note.startswith("build.py: backend skipped: the backend wheel needs pip")
    assert note.endswith("(`./dev.sh setup && .venv/bin/python packaging/build.py "
                         "--editor backend`).")
    # the same bytes as a build from the project's venv
    _, archive = build.build_gimp(tmp_path / "venv-dist", filled_cache)
    assert archive.read_bytes() == gimp_zip.read_bytes()


def test_stdlib_only_python_with_an_empty_cache_says_what_to_run(bare_python, tmp_path):
    cache = tmp_path / "empty cache"
    done = run_build(bare_python, "--out", tmp_path / "dist", "--cache", cache)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stdout == ""
    (message,) = done.stderr.strip().splitlines()
    assert message == (
        f"build.py: websockets-16.0.tar.gz is not in the build cache {cache} and "
        f"{bare_python} has no pip to download it: run `python3 -m pip download "
        f"websockets==16.0 --no-deps --no-binary :all: --dest \"{cache}\"` with any Python "
        f"that has pip, then run build.py again.")


def test_backend_asked_for_by_name_fails_without_the_tools(bare_python, filled_cache,
                                                           tmp_path):
    done = run_build(bare_python, "--out", tmp_path / "dist", "--cache", filled_cache,
                     "--editor", "backend")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (message,) = done.stderr.strip().splitlines()
    assert "which lacks pip, setuptools>=68, wheel" in message and message.endswith("`).")


def _system_python3():
    """`python3` on PATH outside this test's venv (what a user types), or None."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != Path(venv_bin).resolve())
    found = shutil.which("python3", path=path)
    if not found:
        return None
    version = subprocess.run([found, "-I", "-c", "import sys; print(sys.version_info >= "
                              "(3, 10))"], capture_output=True, text=True)
    return found if version.stdout.strip() == "True" else None


def test_system_python3_isolated_builds_the_plugin_bundles(filled_cache, tmp_path):
    python = _system_python3()
    if python is None:
        pytest.skip("no python3 >= 3.10 on PATH outside the venv")
    done = run_build(python, "--out", tmp_path / "dist", "--cache", filled_cache)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "dist").glob("controlcanvas-krita-*.zip"))
    assert list((tmp_path / "dist").glob("controlcanvas-gimp-*.zip"))
    # the wheel is built, or skipped with its note (this system Python's pip/setuptools)
    assert list((tmp_path / "dist").glob("*.whl")) or "backend skipped" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("tools, missing", [
    ({"pip": "24.0", "setuptools": "80.9.0", "wheel": None}, []),
    ({"pip": "24.0", "setuptools": "70.1.0", "wheel": None}, []),
    ({"pip": "24.0", "setuptools": "69.5.1", "wheel": "0.43.0"}, []),
    ({"pip": "24.0", "setuptools": "69.5.1", "wheel": None}, ["wheel"]),
    ({"pip": "23.2", "setuptools": "65.5.0", "wheel": None},
     ["setuptools>=68 (found 65.5.0)", "wheel"]),
    ({"pip": None, "setuptools": None, "wheel": None}, ["pip", "setuptools>=68", "wheel"]),
])
def test_wheel_tools_missing(build, tools, missing):
    assert build.wheel_tools_missing(tools) == missing


def test_tool_output_is_cut_at_whole_lines(build):
    text = "\n".join(f"line {i} " + "x" * 50 for i in range(40)) + "\n\n"
    assert build.tail(text, 3).splitlines() == [f"line {i} " + "x" * 50 for i in (37, 38, 39)]
