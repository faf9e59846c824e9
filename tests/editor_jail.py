"""The real-editor tiers' way into their chroots (tests/editors/jail.sh: bubblewrap, a
private mount namespace, a minimal /dev of its own), for the Python tests.

``editor_root`` builds or reuses a chroot and skips the test where that cannot be done
here (not Linux, not root) - except with ``CONTROLCANVAS_REQUIRE_EDITORS=1`` (set by
``./dev.sh test`` in CI), where a tier that cannot run fails instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EDITORS = Path(__file__).resolve().parent / "editors"
JAIL = EDITORS / "jail.sh"


def required() -> bool:
    return os.environ.get("CONTROLCANVAS_REQUIRE_EDITORS", "") not in ("", "0")


def unavailable(reason: str):
    """Skip (or, where the editors are required, fail) with the reason."""
    if required():
        pytest.fail(f"CONTROLCANVAS_REQUIRE_EDITORS is set but {reason}")
    pytest.skip(reason)


def editor_root(setup: str, *args: str) -> Path:
    """The chroot that tests/editors/SETUP builds (with ARGS, e.g. --suite sid)."""
    if not sys.platform.startswith("linux"):
        unavailable("the editor chroots need Linux")
    if os.geteuid() != 0:
        unavailable("the editor chroots need root (debootstrap, bubblewrap); run as root "
                    "or in a privileged container")
    script = str(EDITORS / setup)
    done = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        tail = done.stderr.strip()[-3000:] or "(no output)"
        unavailable(f"tests/editors/{setup} {' '.join(args)} failed:\n{tail}")
    root = subprocess.run(["bash", script, *args, "--print-root"], capture_output=True,
                          text=True, check=True).stdout.strip()
    return Path(root)


def jail(root: Path, *env_and_command: str, admin: bool = False) -> list[str]:
    """argv that runs COMMAND inside ROOT (leading VAR=VALUE words set its environment,
    which otherwise holds only PATH, HOME=/root and LANG)."""
    return ["bash", str(JAIL), *(["--admin"] if admin else []), str(root), *env_and_command]


def mounts_below(path: Path) -> list[str]:
    """What is mounted at or below PATH, as the host sees it."""
    done = subprocess.run(["bash", str(JAIL), "--mounts", str(path)], capture_output=True,
                          text=True)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.splitlines()


def cache_root() -> Path:
    """Where the setup scripts keep the chroots (lib.sh's editor_cache, one owner)."""
    done = subprocess.run(["bash", "-c", f"source {str(EDITORS / 'lib.sh')!r}; editor_cache"],
                          capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())
