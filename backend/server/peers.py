"""What one peer may hold: a connection slot, and a bounded outbox.

Slots: authenticated clients and connections that have not sent the right token yet
are counted apart (``max_clients`` and ``max_unauthenticated``), so strangers who
connect and say nothing can never take a client's place.

Outbox: the frames waiting to be written to one client.  Three kinds of entry:

- replies (welcome, models, status, errors, job outcomes' announcements): always
  queued; when they pile up past the bounds, the connection stops reading that client
  (its requests then wait in TCP: natural backpressure) until half have been written;
- events (queued, progress, previews): advisory, so they are dropped while the outbox
  is full (``status`` and ``resume`` replay a job's state);
- results: a reference to the finished job, turned into frames only when the writer
  reaches it, so a client that does not read pins no result bytes in its outbox:
  those stay counted (and expire) in the job table.  The result being written is
  counted in :attr:`Outbox.result_bytes`.

Event-loop only: no locks.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable, Deque, Dict, Hashable, Optional, Sequence, Tuple, Union

CLIENT = "client"
WAITING = "waiting"  # connected, token not seen yet

Frame = Union[str, bytes, Tuple[bytes, ...]]


class Slots:
    """Connection slots in two lanes. A slot is taken during the handshake (so parallel
    handshakes cannot overbook) and given back when the connection ends; a connection
    that died before its handler ran (``alive`` says so) frees its slot by itself."""

    def __init__(self, max_clients: int, max_waiting: int,
                 alive: Callable[[Hashable], bool]) -> None:
        self.limits = {CLIENT: max_clients, WAITING: max_waiting}
        self._alive = alive
        self._held: Dict[Hashable, str] = {}
        self.refused = {CLIENT: 0, WAITING: 0}

    def count(self, lane: str) -> int:
        self._purge()
        return sum(1 for held in self._held.values() if held == lane)

    def _purge(self) -> None:
        for conn in [c for c in self._held if not self._alive(c)]:
            del self._held[conn]

    def take(self, conn: Hashable, lane: str) -> bool:
        if self.count(lane) >= self.limits[lane]:
            self.refused[lane] += 1
            return False
        self._held[conn] = lane
        return True

    def promote(self, conn: Hashable) -> bool:
        """A waiting connection sent the right token: it becomes a client, if one fits."""
        if self._held.get(conn) == CLIENT:
            return True
        if self.count(CLIENT) >= self.limits[CLIENT]:
            self.refused[CLIENT] += 1
            return False
        self._held[conn] = CLIENT
        return True

    def release(self, conn: Hashable) -> None:
        self._held.pop(conn, None)


def frame_size(frame: Frame) -> int:
    if isinstance(frame, str):
        return len(frame.encode("utf-8", "surrogatepass"))
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return len(frame)
    return sum(len(part) for part in frame)


class Outbox:
    """One client's frames waiting to be written; see the module docstring."""

    def __init__(self, max_bytes: int, max_frames: int) -> None:
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self._items: Deque[Tuple[object, int]] = collections.deque()  # (item, bytes)
        self.queued_bytes = 0      # replies and events waiting (results not included)
        self.sending_bytes = 0     # the reply/event frame being written now
        self.result_bytes = 0      # the result being written now (all its frames)
        self.peak_bytes = 0
        self.peak_frames = 0
        self.dropped_events = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._abandoned = False

    # -- levels --

    @property
    def frames(self) -> int:
        return len(self._items)

    @property
    def held_bytes(self) -> int:
        return self.queued_bytes + self.sending_bytes

    @property
    def full(self) -> bool:
        return self.held_bytes >= self.max_bytes or self.frames >= self.max_frames

    def _below_half(self) -> bool:
        return self.held_bytes <= self.max_bytes // 2 and self.frames <= self.max_frames // 2

    # -- producers (loop thread) --

    def put(self, frames: Sequence[Frame]) -> None:
        """Replies: always queued (reading stops while the outbox is full)."""
        for frame in frames:
            self._append(frame, frame_size(frame))

    def put_event(self, frames: Sequence[Frame]) -> bool:
        """Advisory frames, all or none: dropped (False) while the outbox is full."""
        if not frames:
            return True
        if self.full:
            self.dropped_events += 1
            return False
        self.put(frames)
        return True

    def put_result(self, job: object) -> None:
        """A finished job whose result the writer expands when it gets there."""
        self._append(_ResultDue(job), 0)

    def close(self) -> None:
        """The writer stops after what is queued so far."""
        self._append(None, 0)

    def _append(self, item: object, size: int) -> None:
        self._items.append((item, size))
        self.queued_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self.peak_frames = max(self.peak_frames, self.frames)
        if self.full and not self._abandoned:
            self._room.clear()
        self._ready.set()

    # -- the reader waits for room, the writer takes --

    async def wait_for_room(self) -> None:
        """Return at once unless the outbox is full; then once half of it is written."""
        while not self._room.is_set():
            await self._room.wait()

    async def get(self) -> Tuple[object, int]:
        """The next (item, bytes): a frame, a :class:`_ResultDue`, or None (stop)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item, size = self._items.popleft()
        self.queued_bytes -= size
        self.sending_bytes = size
        return item, size

    def sent(self) -> None:
        """The writer finished writing what it took last."""
        self.sending_bytes = 0
        if not self._room.is_set() and self._below_half():
            self._room.set()

    def abandon(self) -> None:
        """The writer is gone: drop what waits, and never make the reader wait again."""
        self._items.clear()
        self.queued_bytes = self.sending_bytes = self.result_bytes = 0
        self._abandoned = True
        self._room.set()

    def stats(self) -> Dict[str, int]:
        return {"queued_bytes": self.queued_bytes, "frames": self.frames,
                "peak_bytes": self.peak_bytes, "peak_frames": self.peak_frames,
                "dropped_events": self.dropped_events, "result_bytes": self.result_bytes}


class _ResultDue:
    __slots__ = ("job",)

    def __init__(self, job: object) -> None:
        self.job = job


def result_due(item: object) -> Optional[object]:
    """The job of a result entry taken from an outbox, else None."""
    return item.job if isinstance(item, _ResultDue) else None
