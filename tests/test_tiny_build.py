"""tiny.build_once: how every tiny model (stacks, adapters, edit bases) reaches its cache
folder - atomically, once, replacing a stale partial folder, leaving no temporary folder."""

from pathlib import Path

import pytest

from backend.engines import tiny


def complete(tmp: Path) -> None:
    (tmp / "model_index.json").write_text("{}")
    (tmp / ".complete").write_text("x")


def test_builds_once_and_returns_a_built_folder_untouched(tmp_path):
    folder = tmp_path / "models" / "tiny-x"
    calls = []
    assert tiny.build_once(folder, lambda t: (calls.append(t), complete(t))) == folder
    assert tiny.is_built(folder) and len(calls) == 1
    assert tiny.build_once(folder, lambda t: calls.append(t)) == folder and len(calls) == 1
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-x"]  # no temporary left


def test_a_stale_partial_folder_is_replaced(tmp_path):
    folder = tmp_path / "tiny-x"
    folder.mkdir()
    (folder / "half-written.bin").write_text("?")  # a crash mid-build, before the rename
    tiny.build_once(folder, complete)
    assert tiny.is_built(folder) and not (folder / "half-written.bin").exists()


def test_a_failed_build_leaves_nothing(tmp_path):
    folder = tmp_path / "tiny-x"

    def broken(tmp: Path) -> None:
        (tmp / "model_index.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError):
        tiny.build_once(folder, broken)
    assert list(tmp_path.iterdir()) == []


def test_the_builder_decides_what_built_means(tmp_path):
    folder = tmp_path / "adapter"
    only_marker = lambda f: (f / ".complete").is_file()  # noqa: E731 - adapters: no index
    tiny.build_once(folder, lambda t: (t / ".complete").write_text("x"), built=only_marker)
    assert only_marker(folder) and not tiny.is_built(folder)
