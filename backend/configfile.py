"""Reading the user's ``config.toml`` (its ``[server]`` table is the server's, ``[models]``
the catalogue's), so both layers read it the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def load_toml(path: Path) -> Dict[str, Any]:
    if not path.exists():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with path.open("rb") as handle:
        return tomllib.load(handle)
