"""A server in a child process, for benchmarks: measured from outside, as in real use
(a client and a server sharing one interpreter would mostly measure GIL hand-offs)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
from typing import Optional

from ..server.config import ServerConfig
from ..server.scale import serving_engine
from ..server.websocket import Server


def _child(pipe, options: dict) -> None:
    logging.disable(logging.INFO)
    # the bench prints one JSON object on stdout: whatever the server or the processes it
    # starts (Ray's) write goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    echo_size = options.pop("echo_max_size", None)
    options.setdefault("engine", "fake")
    options.setdefault("port", 0)
    config = ServerConfig(**options)
    engine = serving_engine(config)  # one engine, one per device, or Ray Serve (not on a loop)

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        server = Server(config, engine, token="bench")
        await server.start()
        echo_port = None
        bare = None
        if echo_size:
            from websockets.asyncio.server import serve
            bare = await serve(echo, "127.0.0.1", 0, max_size=echo_size, compression=None)
            echo_port = bare.sockets[0].getsockname()[1]
        pipe.send((server.url, echo_port))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        if bare is not None:
            bare.close()
        await server.close()

    asyncio.run(main())


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux: /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    """``with ServerProcess(step_seconds=0.01) as s: s.url, s.token, s.pid``; options are
    ServerConfig fields (``store_dir``, ``port``, ``engine`` (default fake),
    ``engine_options``, ``devices``, ``ray``...)."""

    def __init__(self, **options) -> None:
        self.options = options
        self.token = "bench"
        self.url = ""
        self.echo_port: Optional[int] = None
        ctx = multiprocessing.get_context("spawn")
        self._pipe, self._child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(self._child_end, dict(options)),
                                 daemon=True)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __enter__(self) -> "ServerProcess":
        self._proc.start()
        self._child_end.close()  # so a child that dies before it is ready reads as EOF
        if not self._pipe.poll(120):
            self._proc.kill()
            raise RuntimeError("the benchmark server did not start")
        try:
            self.url, self.echo_port = self._pipe.recv()
        except EOFError:
            self._proc.join(15)
            raise RuntimeError(f"the benchmark server stopped before it was ready (exit code "
                               f"{self._proc.exitcode})") from None
        return self

    def kill(self) -> None:
        """Kill the server at once (SIGKILL on POSIX): no cleanup runs, as in a crash."""
        self._proc.kill()
        self._proc.join(15)

    def __exit__(self, *exc) -> None:
        try:
            self._pipe.send("stop")
        except OSError:
            pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
