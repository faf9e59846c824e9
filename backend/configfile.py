"""Reading the user's ``config.toml`` (its ``[server]`` table is the server's, ``[models]``
the catalogue's), so both layers read it the same way. A file that cannot be read or
parsed is a :class:`shared.errors.ConfigError` naming the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from shared.errors import ConfigError


def load_toml(path: Path) -> Dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise ConfigError(f"The config file {path} is a folder; pass a .toml file with "
                          f"--config.") from None
    except OSError as err:
        raise ConfigError(f"The config file {path} cannot be read "
                          f"({(err.strerror or type(err).__name__).lower()}); check its "
                          f"permissions.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"The config file {path} is not valid TOML: {err}. Fix that line "
                          f"(docs/quickstart.md shows the format), or move the file away to "
                          f"use the defaults.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"The config file {path} is not UTF-8 text; save it as UTF-8.") \
            from None


def table(document: Dict[str, Any], name: str, where: Path) -> Dict[str, Any]:
    """The ``[name]`` table of a parsed config file ({} when absent); ConfigError when the
    key holds something other than a table."""
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a table: write [{name}] on its own line "
                          f"with its settings below it.")
    return value
