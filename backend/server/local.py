"""Run a server on a background thread: for the demo, benchmarks and tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Optional

from .config import ServerConfig, new_token
from ..engines.base import Engine
from .websocket import Server


class ServerThread:
    """A real server on 127.0.0.1 (port 0 → a free port) in its own event loop."""

    def __init__(self, engine: Engine, config: Optional[ServerConfig] = None,
                 token: Optional[str] = None) -> None:
        self.config = config or ServerConfig(port=0)
        self.token = token or new_token()
        self.engine = engine
        self.server: Optional[Server] = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="controlcanvas-server",
                                        daemon=True)
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.config, self.engine, self.token)
            self.loop.run_until_complete(self.server.start())
        except BaseException as err:  # report to the starting thread
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, func, *args):
        """Run ``func(*args)`` on the server's loop and return its result."""
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, func(*args)))
            except BaseException as err:
                box.append((False, err))
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(30)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        with self._stop_lock:
            if not self._stopped and self._thread.is_alive():
                self._stopped = True
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
