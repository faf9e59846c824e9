#!/usr/bin/env python3
"""Build the editor plug-in bundles, reproducibly.

    python packaging/build.py [--out dist] [--cache DIR]

writes into ``--out`` (default ``dist/`` in the checkout):

- ``controlcanvas/``: the GIMP 3 plug-in folder, ready to copy into GIMP's
  ``plug-ins`` folder (folder name == entry file name, entry file executable):
  ``controlcanvas.py``, the ``controlcanvas_gimp`` package, a copy of ``shared``
  and a pure-Python ``websockets`` (no compiled speedups), plus ``BUILD.json``;
- ``controlcanvas-gimp-<version>.zip``: the same folder as a zip (Unix modes
  kept, so the exec bit survives ``unzip``);
- ``controlcanvas-<version>-py3-none-any.whl``: the backend wheel;
- ``controlcanvas-krita-<version>.zip``: the Krita plug-in for *Tools > Scripts > Import
  Python Plugin from File...* (``controlcanvas.desktop`` + ``controlcanvas/`` with
  ``shared`` and websockets inside it, under ``_vendor/``), and its unzipped tree
  ``controlcanvas-krita/``.

The same sources give byte-identical zips: files are sorted, timestamps fixed
(``SOURCE_DATE_EPOCH`` or 1980-01-01), modes normalised (755/644).  websockets
comes from its sdist on PyPI, fetched once with ``pip download`` into the cache
(``--cache``, ``$CONTROLCANVAS_BUILD_CACHE`` or ``~/.cache/controlcanvas-build``)
and checked against a pinned sha256.

The helpers (``fetch_sdist``, ``extract_package``, ``copy_python_package``,
``normalise_tree``, ``write_zip``, ``write_stamp``) are meant for every bundle:
the Krita plug-in zip (``build_krita``) is to be built from them too.

Never add ``packaging/__init__.py``: a top-level ``packaging`` package would
shadow the PyPI ``packaging`` module that pip and pytest import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
GIMP_FOLDER = "controlcanvas"  # GIMP loads plug-ins/<name>/<name>.py only
GIMP_ENTRY = "controlcanvas.py"
COMPILED_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".c", ".h", ".pyc", ".pyo")
ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip can hold


@dataclass(frozen=True)
class Vendored:
    """A pure-Python dependency copied from its sdist into a bundle."""

    name: str
    version: str
    sha256: str  # of the sdist
    package_dir: str  # inside the sdist's top folder
    license_file: str = "LICENSE"

    @property
    def sdist_name(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


# websockets 16 is the newest release that supports Python 3.10 (GIMP 3 on some
# systems, Krita 5.2); its C speedup is optional and dropped.
WEBSOCKETS = Vendored(
    name="websockets", version="16.0",
    sha256="5f6261a5e56e8d5c42a4497b364ea24d94d9563e8fbd44e78ac40879c60179b5",
    package_dir="src/websockets")


class BuildError(Exception):
    """The build cannot go on; the message says why and what to do."""


class MissingTools(BuildError):
    """A bundle needs tools this Python lacks (the backend wheel: pip, setuptools, wheel).
    When every bundle is built, this one is skipped with the message as a note."""


# -- helpers shared by every bundle ---------------------------------------------------------

def default_cache() -> Path:
    override = os.environ.get("CONTROLCANVAS_BUILD_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "controlcanvas-build"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` whole lines of a tool's output (never a line cut in the middle)."""
    kept = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def python_tools(python: Optional[str] = None) -> Dict[str, Optional[str]]:
    """The versions of pip, setuptools and wheel that ``python`` (default: this one, as
    the subprocesses below run it) can import; None for a missing one."""
    code = ("import importlib.util as u, importlib.metadata as m, json\n"
            "def v(n):\n"
            "    if u.find_spec(n) is None: return None\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return '0'\n"
            "print(json.dumps({n: v(n) for n in ('pip', 'setuptools', 'wheel')}))")
    try:
        done = subprocess.run([python or sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=60)
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"pip": None, "setuptools": None, "wheel": None}


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def wheel_tools_missing(tools: Mapping[str, Optional[str]]) -> List[str]:
    """What ``pip wheel --no-build-isolation`` of this checkout still needs: pip, the
    setuptools of pyproject.toml (>= 68), and ``wheel`` for a setuptools older than 70.1
    (which has no ``bdist_wheel`` of its own)."""
    missing = []
    if not tools.get("pip"):
        missing.append("pip")
    setuptools = tools.get("setuptools")
    if not setuptools or _version_tuple(setuptools) < (68,):
        missing.append("setuptools>=68" + (f" (found {setuptools})" if setuptools else ""))
    if (not setuptools or _version_tuple(setuptools) < (70, 1)) and not tools.get("wheel"):
        missing.append("wheel")
    return missing


def fetch_sdist(dep: Vendored, cache: Path) -> Path:
    """The dependency's sdist in ``cache``, downloaded with pip once, hash checked.
    Only the download needs pip: with the sdist already in the cache (put there by any
    Python's ``pip download``), a plain stdlib-only Python builds the plug-in bundles."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / dep.sdist_name
    if target.exists() and sha256_of(target) == dep.sha256:
        return target
    manual = (f"`python3 -m pip download {dep.name}=={dep.version} --no-deps "
              f"--no-binary :all: --dest \"{cache}\"`")
    if not python_tools().get("pip"):
        raise BuildError(f"{dep.sdist_name} is not in the build cache {cache} and "
                         f"{sys.executable} has no pip to download it: run {manual} with "
                         f"any Python that has pip, then run build.py again.")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", f"{dep.name}=={dep.version}",
                   "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
                   "--quiet", "--dest", tmp]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"pip could not download {dep.sdist_name} into {cache} (is "
                             f"PyPI reachable?); run {manual} where it is, then run "
                             f"build.py again. pip said:\n"
                             f"{tail(done.stderr or done.stdout)}")
        got = Path(tmp) / dep.sdist_name
        if not got.exists():
            raise BuildError(f"pip did not produce {dep.sdist_name} (got "
                             f"{sorted(p.name for p in Path(tmp).iterdir())}).")
        digest = sha256_of(got)
        if digest != dep.sha256:
            raise BuildError(f"{dep.sdist_name} has sha256 {digest}, expected the pinned "
                             f"{dep.sha256}; refusing to bundle it.")
        os.replace(got, target)
    return target


def extract_package(sdist: Path, dep: Vendored, dest: Path) -> List[str]:
    """Copy the dependency's Python package (no compiled files) from its sdist into
    ``dest/<name>/``, with its licence; returns the relative paths written."""
    top = f"{dep.name}-{dep.version}"
    prefix = PurePosixPath(top, dep.package_dir)
    written = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            path = PurePosixPath(member.name)
            if path == PurePosixPath(top, dep.license_file) and member.isfile():
                rel = PurePosixPath(dep.name, "LICENSE")
            elif prefix in path.parents and member.isfile():
                rel = PurePosixPath(dep.name, *path.relative_to(prefix).parts)
            else:
                continue
            if ".." in rel.parts or rel.suffix in COMPILED_SUFFIXES \
                    or "__pycache__" in rel.parts:
                continue
            out = dest.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source:
                out.write_bytes(source.read())
            written.append(str(rel))
    if f"{dep.name}/__init__.py" not in written:
        raise BuildError(f"{sdist.name} has no {dep.package_dir}/__init__.py; wrong sdist?")
    return sorted(written)


def copy_python_package(source: Path, dest: Path) -> List[Path]:
    """Copy the .py files of package ``source`` (recursively) into ``dest``."""
    if not (source / "__init__.py").exists():
        raise BuildError(f"{source} is not a Python package (no __init__.py).")
    copied = []
    for path in sorted(source.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out = dest / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        copied.append(out)
    return copied


def source_date_epoch() -> int:
    """File dates inside the bundles: ``SOURCE_DATE_EPOCH``, else the time of the checkout's
    last commit (the same sources give the same bytes), else 1980-01-01.  Not a constant:
    GIMP re-reads a plug-in only when its entry file's date changes, so a constant date
    would keep the previous release's menus after an upgrade."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        try:
            value = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            value = ""
    return max(ZIP_EPOCH, int(value)) if value.isdigit() else ZIP_EPOCH


def normalise_tree(root: Path, executables: Iterable[str] = ()) -> List[Path]:
    """Modes 755 (folders, executables) / 644 (files) and fixed timestamps below ``root``;
    returns every file, sorted.  ``executables`` are paths relative to ``root``."""
    executable = {PurePosixPath(e) for e in executables}
    epoch = source_date_epoch()
    files = []
    for path in sorted(root.rglob("*")):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if rel in executable else 0o644)
            files.append(path)
        os.utime(path, (epoch, epoch))
    root.chmod(0o755)
    os.utime(root, (epoch, epoch))
    return files


def write_zip(root: Path, zip_path: Path, arc_root: str) -> Path:
    """Zip folder ``root`` as ``arc_root/...``: sorted entries, fixed times, Unix modes."""
    stamp = time.gmtime(source_date_epoch())[:6]
    entries: List[Tuple[str, Path]] = [(arc_root + "/", root)]
    for path in sorted(root.rglob("*")):
        name = f"{arc_root}/{path.relative_to(root).as_posix()}"
        entries.append((name + "/" if path.is_dir() else name, path))
    entries.sort(key=lambda e: e[0])
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name, path in entries:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.create_system = 3  # Unix: unzip restores the modes
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10
                archive.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes(), compresslevel=9)
    os.replace(tmp, zip_path)
    return zip_path


def write_stamp(folder: Path, info: Dict[str, object]) -> Path:
    path = folder / "BUILD.json"
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def check_sources(files: Iterable[Path]) -> None:
    """Every bundled .py compiles, and nothing compiled slipped in."""
    for path in files:
        if path.suffix in COMPILED_SUFFIXES:
            raise BuildError(f"{path} is a compiled file; bundles are pure Python.")
        if path.suffix == ".py":
            try:
                compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            except SyntaxError as err:
                raise BuildError(f"{path} does not compile: {err}") from None


def read_version(path: Path, name: str = "__version__") -> str:
    match = re.search(rf'^{name}\s*=\s*["\']([^"\']+)["\']', path.read_text(encoding="utf-8"),
                      re.M)
    if not match:
        raise BuildError(f"no {name} in {path}")
    return match.group(1)


def project_version() -> str:
    """The release version; the plug-in and shared must carry the same one."""
    project = re.search(r'^version\s*=\s*"([^"]+)"',
                        (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    versions = {
        "pyproject.toml": project.group(1) if project else "?",
        "shared/__init__.py": read_version(REPO / "shared" / "__init__.py"),
        "plugin_gimp/controlcanvas_gimp/__init__.py":
            read_version(REPO / "plugin_gimp" / "controlcanvas_gimp" / "__init__.py"),
    }
    if len(set(versions.values())) != 1:
        raise BuildError("Version numbers disagree: " + ", ".join(f"{k} {v}" for k, v in
                                                                  versions.items()))
    return versions["pyproject.toml"]


def protocol_version() -> int:
    match = re.search(r"^PROTOCOL_VERSION\s*=\s*(\d+)",
                      (REPO / "shared" / "messages.py").read_text(encoding="utf-8"), re.M)
    return int(match.group(1))


# -- the bundles --------------------------------------------------------------------------

def build_gimp(out: Path, cache: Path) -> Tuple[Path, Path]:
    """The GIMP 3 plug-in folder ``out/controlcanvas`` and its zip."""
    version = project_version()
    sdist = fetch_sdist(WEBSOCKETS, cache)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / GIMP_FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    source = REPO / "plugin_gimp"
    shutil.copyfile(source / GIMP_ENTRY, folder / GIMP_ENTRY)
    copy_python_package(source / "controlcanvas_gimp", folder / "controlcanvas_gimp")
    copy_python_package(REPO / "shared", folder / "shared")
    extract_package(sdist, WEBSOCKETS, folder)
    write_stamp(folder, {
        "name": "controlcanvas-gimp", "version": version, "protocol": protocol_version(),
        "editor": "GIMP 3.0 / 3.2", "python": ">=3.10",
        "bundled": {WEBSOCKETS.name: WEBSOCKETS.version, "shared": version},
    })
    files = normalise_tree(folder, executables=[GIMP_ENTRY])
    check_sources(files)
    archive = write_zip(folder, out / f"controlcanvas-gimp-{version}.zip", GIMP_FOLDER)
    return folder, archive


KRITA_PACKAGE = "controlcanvas"  # pykrita/<name>/ + <name>.desktop (X-KDE-Library)
KRITA_ZIP = "controlcanvas-krita-{version}.zip"  # like GIMP's controlcanvas-gimp-<version>.zip
KRITA_STAGE = "controlcanvas-krita"


def build_krita(out: Path, cache: Path) -> Tuple[Path, Path]:
    """The Krita plug-in for *Tools > Scripts > Import Python Plugin from File...*:
    ``out/controlcanvas-krita-<version>.zip`` holding ``controlcanvas.desktop`` and the package
    folder ``controlcanvas/``; the protocol and websockets go *inside* the package, in
    ``controlcanvas/_vendor/`` (imported as ``controlcanvas._vendor.shared``; see
    plugin_krita/controlcanvas/proto.py), so the zip adds no other top-level name to
    Krita's pykrita folder.  Also leaves the unzipped tree in ``out/controlcanvas-krita``.
    """
    version = project_version()
    plugin_version = read_version(REPO / "plugin_krita" / KRITA_PACKAGE / "__init__.py")
    if plugin_version != version:
        raise BuildError(f"plugin_krita/{KRITA_PACKAGE}/__init__.py says {plugin_version}, "
                         f"the project {version}; make them agree.")
    sdist = fetch_sdist(WEBSOCKETS, cache)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / KRITA_STAGE
    if stage.exists():
        shutil.rmtree(stage)
    package = stage / KRITA_PACKAGE
    copy_python_package(REPO / "plugin_krita" / KRITA_PACKAGE, package)
    vendor = package / "_vendor"
    copy_python_package(REPO / "shared", vendor / "shared")
    (vendor / "__init__.py").write_text(
        '"""The protocol and pure-Python websockets, bundled (see ../proto.py)."""\n',
        encoding="utf-8")
    extract_package(sdist, WEBSOCKETS, vendor)
    desktop = f"{KRITA_PACKAGE}.desktop"
    shutil.copyfile(REPO / "plugin_krita" / desktop, stage / desktop)
    write_stamp(package, {
        "name": "controlcanvas-krita", "version": version, "protocol": protocol_version(),
        "editor": "Krita 5.1+ (PyQt5) / Krita 6 (PyQt6)", "python": ">=3.10",
        "bundled": {WEBSOCKETS.name: WEBSOCKETS.version, "shared": version},
    })
    files = normalise_tree(stage)
    check_sources(files)
    archive = write_zip(package, out / KRITA_ZIP.format(version=version), KRITA_PACKAGE)
    # The .desktop file sits beside the package folder, at the top of the zip.
    stamp = time.gmtime(source_date_epoch())[:6]
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(desktop, date_time=stamp)
        info.create_system = 3
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, (stage / desktop).read_bytes(), compresslevel=9)
    return stage, archive


def build_backend(out: Path, cache: Path) -> Tuple[Path, Path]:
    """The backend wheel (``controlcanvas-<version>-py3-none-any.whl``), built with
    pip from this checkout; ``SOURCE_DATE_EPOCH`` fixes its timestamps."""
    version = project_version()
    missing = wheel_tools_missing(python_tools())
    if missing:
        raise MissingTools(
            f"the backend wheel needs pip, setuptools>=68 and wheel in {sys.executable}, "
            f"which lacks {', '.join(missing)}: build the wheel with the project's "
            f"environment (`./dev.sh setup && .venv/bin/python packaging/build.py "
            f"--editor backend`).")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()))
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "-q", "-w", tmp, str(REPO)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"`pip wheel` could not build the backend wheel; its last "
                             f"lines:\n{tail(done.stderr or done.stdout)}")
        (wheel,) = Path(tmp).glob("controlcanvas-*.whl")
        if f"-{version}-" not in wheel.name:
            raise BuildError(f"the wheel {wheel.name} does not carry version {version}")
        target = out / wheel.name
        shutil.copyfile(wheel, target)
    return target, target


BUILDERS = {"gimp": build_gimp, "krita": build_krita, "backend": build_backend}
DEFAULT_ORDER = ("gimp", "krita", "backend")  # the stdlib-only plug-in bundles first


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist",
                        help="output folder (default: dist/ in the checkout)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="download cache (default: $CONTROLCANVAS_BUILD_CACHE or "
                             "~/.cache/controlcanvas-build)")
    parser.add_argument("--editor", choices=sorted(BUILDERS), action="append",
                        help="build only this editor's bundle (repeatable; default: all)")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    chosen = args.editor or DEFAULT_ORDER
    try:
        for editor in chosen:
            try:
                folder, archive = BUILDERS[editor](args.out.resolve(), cache)
            except MissingTools as err:
                if args.editor:  # asked for by name: its absence is a failure
                    raise
                print(f"build.py: {editor} skipped: {err}", file=sys.stderr)
                continue
            print(f"{editor}: {folder}")
            print(f"{editor}: {archive} (sha256 {sha256_of(archive)})")
    except BuildError as err:
        print(f"build.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
