"""What ships into editors must run on their Pythons (3.10+) with only the standard
library, the editor's own modules and what packaging bundles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["shared", "plugin_krita", "plugin_gimp"]
# Provided by the editors themselves, or bundled by packaging/.
EDITOR_MODULES = {"krita", "pykrita", "PyQt5", "PyQt6", "sip", "gi", "cairo"}
BUNDLED = {"websockets", "shared"}
VERMIN = str(Path(sys.executable).with_name("vermin"))


def python_files():
    for folder in SHIPPED:
        yield from sorted((ROOT / folder).rglob("*.py"))


def local_names(path: Path):
    """Modules that live next to the file or in its shipped folder (plug-in packages)."""
    top = next(ROOT / f for f in SHIPPED if (ROOT / f) in path.parents)
    names = {p.stem for p in top.rglob("*.py")} | {p.name for p in top.rglob("*") if p.is_dir()}
    return names


def test_shared_is_not_empty():
    assert len(list((ROOT / "shared").glob("*.py"))) >= 6


@pytest.mark.parametrize("path", list(python_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_stdlib_and_bundled(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    allowed = set(sys.stdlib_module_names) | EDITOR_MODULES | BUNDLED | local_names(path)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        bad += [n for n in names if n.split(".")[0] not in allowed]
    if path.parent.name == "shared" and path.name != "client.py":
        # the protocol itself is stdlib-only; only the client needs websockets
        bad += [n for n in _imports(tree) if n.split(".")[0] == "websockets"]
    assert not bad, f"{path} imports {bad}: not in the standard library nor bundled"


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_vermin_says_python_310_is_enough():
    targets = [str(ROOT / f) for f in SHIPPED if any((ROOT / f).rglob("*.py"))]
    out = subprocess.run([VERMIN, "-t=3.10-", "--no-tips",
                          "--violations", "--eval-annotations", "--backport", "typing",
                          *targets], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_vermin_catches_newer_syntax(tmp_path):
    """The check above can fail: a 3.11-only construct is reported."""
    sample = tmp_path / "new.py"
    sample.write_text("try:\n    pass\nexcept* ValueError:\n    pass\n")
    out = subprocess.run([VERMIN, "-t=3.10-", "--no-tips",
                          "--violations", str(sample)], capture_output=True, text=True)
    assert out.returncode != 0


def test_import_backend_is_cheap():
    """`import backend` and the server path do not import torch or diffusers."""
    code = ("import sys, backend, backend.server.websocket, backend.cli.main, shared.client; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
