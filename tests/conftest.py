"""Shared fixtures: a real server with the fake engine on 127.0.0.1, port 0."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def fake_server():
    """A running server (FakeEngine, 5 ms per step) and its token."""
    from backend.config import ServerConfig
    from backend.engine import FakeEngine
    from backend.local import ServerThread

    with ServerThread(FakeEngine(step_seconds=0.005), ServerConfig(port=0)) as server:
        yield server


@pytest.fixture
def make_server():
    """Factory for servers with custom config/engine; all stopped at the end."""
    from backend.config import ServerConfig
    from backend.engine import FakeEngine
    from backend.local import ServerThread

    started = []

    def make(engine=None, **config):
        config.setdefault("port", 0)
        server = ServerThread(engine or FakeEngine(step_seconds=0.005), ServerConfig(**config))
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()
