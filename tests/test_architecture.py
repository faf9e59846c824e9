"""The layers of docs/architecture.md, checked on the source: a module imports only its own
layer and the layers below it, backend modules form no import cycle, and the plug-ins
import only ``shared`` and themselves.  Imports are read with ``ast``, at module level
and inside functions alike (a function-level import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Highest first; a module may import modules of its own rank or lower.  training sits
# between engines and the server (a train job runs in the server; training uses the model
# catalogue); bench measures a server from outside, so it sits above it, beside cli.
LAYERS: Tuple[Tuple[str, int], ...] = (
    ("backend.__main__", 8),
    ("backend.cli", 8),
    ("backend.bench", 7),
    ("backend.server", 6),
    ("backend.training", 5),
    ("backend.engines", 4),
    ("backend.annotators", 3),
    ("backend.pose", 2),
    ("backend.imaging", 1),
    ("backend.weights", 1),
    ("backend.configfile", 1),
    ("backend.confine", 1),
    ("backend", 1),             # the package itself: __version__ only
    ("shared", 0),
)
FIRST_PARTY = ("backend", "shared", "controlcanvas", "controlcanvas_gimp")
PLUGINS = {  # top-level package -> source folder; each may import shared and itself only
    "controlcanvas": ROOT / "plugin_krita" / "controlcanvas",
    "controlcanvas_gimp": ROOT / "plugin_gimp" / "controlcanvas_gimp",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def backend_modules() -> Dict[str, Path]:
    found = {}
    for top in ("backend", "shared"):
        for path in sorted((ROOT / top).rglob("*.py")):
            found[module_name(path, ROOT)] = path
    return found


def imports_of(path: Path, name: str, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file; ``from X import y`` names the
    module X.y when that is a module, else X; relative imports are resolved."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def rank(module: str) -> Optional[int]:
    for prefix, value in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return value
    return None


def layer_violations(modules: Dict[str, Path]) -> List[str]:
    known = set(modules)
    out = []
    for name, path in modules.items():
        mine = rank(name)
        for target, line in imports_of(path, name, known):
            theirs = rank(target) if target.split(".")[0] in FIRST_PARTY else None
            if target.split(".")[0] in ("controlcanvas", "controlcanvas_gimp"):
                out.append(f"{path.relative_to(ROOT)}:{line}: {name} imports the plug-in "
                           f"{target}")
            elif theirs is not None and mine is not None and theirs > mine:
                out.append(f"{path.relative_to(ROOT)}:{line}: {name} (layer {mine}) imports "
                           f"{target} (layer {theirs}), a higher layer")
    return out


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    known = set(modules)
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in imports_of(path, name, known):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_backend_module_has_a_layer():
    missing = [name for name in backend_modules() if rank(name) is None]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_no_module_imports_a_higher_layer():
    problems = layer_violations(backend_modules())
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_backend_modules():
    found = cycles(import_graph(backend_modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", sorted(PLUGINS))
def test_plugins_import_only_shared_and_themselves(package):
    folder = PLUGINS[package]
    files = sorted(folder.rglob("*.py"))
    if package == "controlcanvas_gimp":
        files.append(folder.parent / "controlcanvas.py")  # GIMP's entry script
    problems = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: the plug-in itself
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for target in names:
                top = target.split(".")[0]
                if top in FIRST_PARTY and top not in ("shared", package):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {target}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_planted_violation_and_cycle(tmp_path):
    """The checks themselves, on a tiny planted tree: imaging importing the server is an
    upward import; two modules importing each other (one inside a function) are a cycle."""
    (tmp_path / "backend" / "server").mkdir(parents=True)
    (tmp_path / "backend" / "__init__.py").write_text("")
    (tmp_path / "backend" / "server" / "__init__.py").write_text("")
    (tmp_path / "backend" / "server" / "jobs.py").write_text("from ..imaging import to_array\n")
    (tmp_path / "backend" / "imaging.py").write_text(
        "def f():\n    from backend.server import jobs\n")
    modules = {module_name(p, tmp_path): p for p in tmp_path.rglob("*.py")}
    known = set(modules)
    edges = {(n, t) for n, p in modules.items() for t, _ in imports_of(p, n, known)}
    assert ("backend.imaging", "backend.server.jobs") in edges
    assert ("backend.server.jobs", "backend.imaging") in edges
    assert cycles(import_graph(modules)) == [["backend.imaging", "backend.server.jobs"]]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert any("backend.imaging (layer 1) imports backend.server.jobs (layer 6)" in v
                   for v in layer_violations(modules))
    finally:
        ROOT = saved
