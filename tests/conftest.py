"""Shared fixtures: a real server with the fake engine on 127.0.0.1, port 0."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _job_store_in_a_temp_dir(monkeypatch, tmp_path_factory):
    """`controlcanvas serve` keeps its jobs in the user cache folder: never in a test."""
    monkeypatch.setenv("CONTROLCANVAS_STORE_DIR", str(tmp_path_factory.mktemp("store")))


@pytest.fixture
def fake_server():
    """A running server (FakeEngine, 5 ms per step) and its token."""
    from backend.server.config import ServerConfig
    from backend.engines.fake import FakeEngine
    from backend.server.local import ServerThread

    with ServerThread(FakeEngine(step_seconds=0.005), ServerConfig(port=0)) as server:
        yield server


@pytest.fixture
def make_server():
    """Factory for servers with custom config/engine; all stopped at the end."""
    from backend.server.config import ServerConfig
    from backend.engines.fake import FakeEngine
    from backend.server.local import ServerThread

    started = []

    def make(engine=None, **config):
        config.setdefault("port", 0)
        server = ServerThread(engine or FakeEngine(step_seconds=0.005), ServerConfig(**config))
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()


def pytest_sessionstart(session):
    # Marks the chroot sandboxes this session starts (tests/editors/jail.sh passes it in).
    os.environ["CC_JAIL_OWNER"] = f"pytest-{os.getpid()}-{int(time.time())}"


def pytest_sessionfinish(session, exitstatus):
    """Nothing the editor tiers started may outlive the run: no mount at or below the
    chroot cache, no chroot sandbox of this session still running."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return
    from tests.editor_jail import cache_root, mounts_below

    cache = cache_root()
    left = [f"mounted: {m}" for m in mounts_below(cache)]
    needle = f"CC_JAIL_OWNER={os.environ.get('CC_JAIL_OWNER', '')}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle in cmdline:
                left.append(f"process {entry.name}: {cmdline[:200]!r}")
    if left:
        sys.stderr.write("\nERROR: the editor tiers left these behind:\n  "
                         + "\n  ".join(left) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
