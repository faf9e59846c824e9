"""The per-peer parts of ``controlcanvas bench soak``: what one peer can do to the others.

Each part starts its own server in a child process (its resident memory is measured
from outside) and attacks it from this process, on 127.0.0.1, bounded in time:

- preauth_flood: connections without the token send a big frame before ``hello``
  (the server's RSS at peak), then hold every slot they can get and reconnect at once
  while a legitimate client connects and generates again and again: its success rate
  and latency;
- postauth_flood: one authenticated client sends 20,000 ``models`` requests (reading
  the replies, or never): the latency of other clients' connect + status + generate
  round trips, against the same round trips with no flood;
- retention_nonreader: a client submits jobs and never reads a byte: the server's RSS
  growth against ``retention_bytes``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import struct
import threading
import time
from typing import Any, Dict, List, Optional

from shared import codec
from shared.client import Client
from shared.images import Image
from shared.messages import (PROTOCOL_VERSION, ControlUnit, Generate, GenerateRequest,
                             new_job_id, to_json)

from .process import ServerProcess, rss_mb


def _request(side: int, steps: int = 2) -> GenerateRequest:
    return GenerateRequest(width=side, height=side, steps=steps, seed=1, prompt="peers",
                           controls=(ControlUnit(condition="scribble", image=0),))


def _p95(values: List[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, int(round(0.95 * len(ordered))) - 1)]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


class _RssSampler:
    """The server's RSS every ``every`` seconds on a thread, until stopped."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except OSError:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> float:
        return max(self.samples or [float("nan")])


class _RawPeer:
    """A websocket client written by hand: sends what it likes, reads only if asked."""

    def __init__(self, url: str, headers: str = "") -> None:
        host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the handshake")
            response += chunk
        if response.split(b" ", 2)[1] != b"101":
            raise ConnectionError(response.split(b"\r\n", 1)[0].decode("latin-1"))
        self.sock.settimeout(None)

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        return head + b"\0\0\0\0" + payload  # an all-zero mask: the payload as is

    def hello(self, token: str) -> None:
        self.send_text(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                                   "token": token}))

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.frame(0x1, text.encode("utf-8")))

    def submit(self, side: int) -> None:
        job = new_job_id()
        image = codec.encode_frame(codec.KIND_INPUT, job, 0, Image.filled(8, 8))
        self.sock.sendall(self.frame(0x1, to_json(Generate(job_id=job, request=_request(
            side, 1))).encode()) + self.frame(0x2, image))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _round_trip(server: ServerProcess, timeout: float) -> float:
    """Connect, status, a small generate; its seconds (raises on any failure)."""
    t0 = time.monotonic()
    with Client.connect(server.url, server.token, client="bench-peer", timeout=timeout) as c:
        c.status(timeout=timeout)
        c.wait(c.submit(_request(32), {0: Image.filled(32, 32)}), timeout=timeout)
    return time.monotonic() - t0


def _round_trips(server: ServerProcess, count: int, timeout: float,
                 deadline: float) -> Dict:
    latencies, failures = [], []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            latencies.append(_round_trip(server, timeout))
        except Exception as err:  # a refusal or a timeout is the figure we want
            failures.append(f"{type(err).__name__}: {err}"[:160])
    tried = len(latencies) + len(failures)
    return {"attempts": tried, "succeeded": len(latencies),
            "success_rate": round(len(latencies) / max(1, tried), 3),
            "p50_ms": _ms(statistics.median(latencies)) if latencies else None,
            "p95_ms": _ms(_p95(latencies)), "max_ms": _ms(max(latencies, default=None)),
            "failure_examples": failures[:3]}


# -- pre-auth flood -------------------------------------------------------------------

class Strangers:
    """``holders`` connections that never send hello (each holds its slot until dropped,
    then reconnects) and ``stuffers`` that send one ``stuff_bytes`` binary frame first.
    Entering waits until ``settle_connected`` of them got in (at most 10 s), or with None
    one second (every slot they can get is taken).  The peer-limit tests use it too."""

    def __init__(self, url: str, holders: int, stuffers: int = 0, stuff_bytes: int = 0,
                 settle_connected: Optional[int] = None) -> None:
        self.url, self.holders, self.stuffers = url, holders, stuffers
        self.settle_connected = settle_connected
        self.payload = bytes(stuff_bytes)
        self.counts = {"connected": 0, "refused": 0, "stuffed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._all()), daemon=True)

    async def _one(self, stuff: bool) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus
        while not self._stop.is_set():
            try:
                async with connect(self.url, open_timeout=5, close_timeout=0.2,
                                   max_size=None, compression=None) as ws:
                    self.counts["connected"] += 1
                    if stuff:
                        await ws.send(self.payload)
                        self.counts["stuffed"] += 1
                    while not self._stop.is_set():
                        try:
                            await asyncio.wait_for(ws.wait_closed(), 0.1)
                            break
                        except asyncio.TimeoutError:
                            pass
            except InvalidStatus:
                self.counts["refused"] += 1
                await asyncio.sleep(0.02)
            except Exception:  # closed under us, timed out: reconnect
                await asyncio.sleep(0.02)

    async def _all(self) -> None:
        await asyncio.gather(*[self._one(False) for _ in range(self.holders)],
                             *[self._one(True) for _ in range(self.stuffers)])

    def __enter__(self) -> "Strangers":
        self._thread.start()
        if self.settle_connected is None:
            time.sleep(1.0)
            return self
        deadline = time.monotonic() + 10
        while self.counts["connected"] < self.settle_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def preauth_flood(holders: int = 40, stuffers: int = 8, stuff_mb: int = 16,
                  stuff_seconds: float = 5.0, attempts: int = 20,
                  seconds: float = 60.0) -> Dict:
    """Two phases on one server. Memory: ``stuffers`` connections each send a
    ``stuff_mb`` binary frame before ``hello``, reconnecting, for ``stuff_seconds``.
    Slots: ``holders`` hold every slot they get and ``stuffers`` go on, while a client
    with the token connects and generates ``attempts`` times (10 s each at most)."""
    with ServerProcess(step_seconds=0.005) as server:
        _round_trip(server, 10.0)  # warm: imports, first allocations
        rss_start = rss_mb(server.pid)
        with _RssSampler(server.pid) as memory_rss, \
                Strangers(server.url, 0, stuffers, stuff_mb << 20) as memory:
            time.sleep(stuff_seconds)
        with _RssSampler(server.pid) as slots_rss, \
                Strangers(server.url, holders, stuffers, stuff_mb << 20) as strangers:
            legit = _round_trips(server, attempts, 10.0, time.monotonic() + seconds)
        time.sleep(1.0)
        rss_after = rss_mb(server.pid)
    return {"memory_phase": {"stuffers": stuffers, "stuff_mb": stuff_mb,
                             "seconds": stuff_seconds, "strangers": memory.counts,
                             "rss_mb_peak": round(memory_rss.peak, 1)},
            "slots_phase": {"holders": holders, "stuffers": stuffers,
                            "strangers": strangers.counts, "legit": legit,
                            "rss_mb_peak": round(slots_rss.peak, 1)},
            "rss_mb_start": round(rss_start, 1), "rss_mb_after": round(rss_after, 1)}


# -- post-auth flood ------------------------------------------------------------------

class RequestFlood:
    """An authenticated client sending ``count`` ``models`` requests as fast as TCP takes
    them; ``reads``: it reads every reply as fast as it can (else never).  ``server``: anything
    with ``url`` and ``token`` (a :class:`ServerProcess`, the tests' in-process server)."""

    def __init__(self, server: Any, count: int, reads: bool) -> None:
        self.peer = _RawPeer(server.url)
        self.peer.hello(server.token)
        self.blob = _RawPeer.frame(0x1, b'{"type":"models"}') * count
        self.received = 0
        self._threads = [threading.Thread(target=self._send, daemon=True)]
        if reads:
            self._threads.append(threading.Thread(target=self._read, daemon=True))

    def _send(self) -> None:
        try:
            self.peer.sock.sendall(self.blob)
        except OSError:
            pass

    def _read(self) -> None:
        try:
            while True:
                chunk = self.peer.sock.recv(1 << 20)
                if not chunk:
                    return
                self.received += len(chunk)
        except OSError:
            pass

    def __enter__(self) -> "RequestFlood":
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)  # under way
        return self

    def __exit__(self, *exc) -> None:
        self.peer.close()
        for thread in self._threads:
            thread.join(10)


def postauth_flood(messages: int = 20_000, rounds: int = 20, seconds: float = 60.0) -> Dict:
    """Other clients' round trips with no flood, then during a flooder that never reads,
    then during one that reads all it is sent (each phase bounded to ``seconds``)."""
    figures: Dict = {"messages": messages}
    with ServerProcess(step_seconds=0.005) as server:
        figures["baseline"] = _round_trips(server, rounds, 10.0, time.monotonic() + seconds)
        for reads in (False, True):
            with RequestFlood(server, messages, reads) as flood:
                phase = _round_trips(server, rounds, 10.0, time.monotonic() + seconds)
                phase["flooder_reply_mb_read"] = round(flood.received / 2**20, 1)
            figures["flooder_reads" if reads else "flooder_never_reads"] = phase
            time.sleep(0.5)
        figures["rss_mb_end"] = round(rss_mb(server.pid), 1)
    return figures


# -- retention under a client that never reads ------------------------------------------

def _wait_idle(server: ServerProcess, seconds: float) -> bool:
    """True once the server's queue is empty (asked from another client)."""
    deadline = time.monotonic() + seconds
    with Client.connect(server.url, server.token, client="bench-watch") as watcher:
        while time.monotonic() < deadline:
            if watcher.status(timeout=10).queue_length == 0:
                return True
            time.sleep(0.1)
    return False


def retention_nonreader(jobs: int = 64, side: int = 512, retention_mb: int = 16,
                        seconds: float = 60.0) -> Dict:
    """``jobs`` results of side² RGBA for a client that never reads, with
    ``retention_mb`` of retention: the server's RSS growth while it holds them."""
    result_mb = side * side * 4 / 2**20
    with ServerProcess(step_seconds=0.0, retention_bytes=retention_mb << 20,
                       retention_bytes_per_client=retention_mb << 20,
                       max_jobs_per_client=jobs, max_queue=max(64, jobs)) as server:
        with Client.connect(server.url, server.token, client="bench-warm") as warm:
            warm.wait(warm.submit(_request(side, 1), {0: Image.filled(8, 8)}), timeout=30)
        rss_start = rss_mb(server.pid)
        peer = _RawPeer(server.url)
        try:
            peer.hello(server.token)
            with _RssSampler(server.pid) as rss:
                for _ in range(jobs):
                    peer.submit(side)
                idle = _wait_idle(server, seconds)
                time.sleep(1.0)
            rss_holding = rss_mb(server.pid)
        finally:
            peer.close()
        time.sleep(1.0)
        rss_closed = rss_mb(server.pid)
    return {"jobs": jobs, "result_mb_each": round(result_mb, 2),
            "results_mb_total": round(jobs * result_mb, 1), "retention_mb": retention_mb,
            "all_jobs_ran": idle, "rss_mb_start": round(rss_start, 1),
            "rss_mb_peak": round(rss.peak, 1), "rss_mb_holding": round(rss_holding, 1),
            "rss_mb_growth_peak": round(rss.peak - rss_start, 1),
            "rss_mb_after_close": round(rss_closed, 1)}
