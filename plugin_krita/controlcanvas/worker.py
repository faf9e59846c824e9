"""The network side: one worker thread owns the synchronous client.

The GUI thread never touches the socket.  It puts commands in (:meth:`Worker.submit`,
:meth:`Worker.cancel`, ...) and takes events out with :meth:`Worker.drain` from a
QTimer (the docker) or a plain loop (batch use); both ends are ``queue.Queue``.

Connection loss is normal life: the worker reports :class:`Disconnected`, retries
with a growing pause, and after reconnecting asks the server to ``resume`` every
job whose outcome it has not seen, so results produced meanwhile still arrive.  A
job the server never received (the link broke during the upload) is sent again
under the same id.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

from .proto import Client, ControlCanvasError, Image, PreviewReady, ResultReady, errors, messages

CLIENT_NAME = "controlcanvas-krita"


# -- events for the GUI -------------------------------------------------------------

@dataclass(frozen=True)
class Connecting:
    url: str
    attempt: int


@dataclass(frozen=True)
class Connected:
    url: str
    server: str
    engine: str
    models: Optional[messages.Models] = None
    resumed: int = 0


@dataclass(frozen=True)
class Disconnected:
    url: str
    message: str
    retry_in: float  # seconds; 0 = not retrying (stopped, or a problem retrying cannot fix)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    code: str
    message: str


# -- what the worker remembers per job ---------------------------------------------

@dataclass
class _Job:
    job_id: str
    kind: str  # "generate" | "preprocess"
    request: Optional[messages.GenerateRequest] = None
    images: Mapping[int, Image] = field(default_factory=dict)
    annotator: str = ""
    params: dict = field(default_factory=dict)
    width: int = 0
    height: int = 0
    preview_every: int = 0
    live: bool = False  # a live-painting frame: throwaway, never resent or resumed
    sent: bool = False  # fully written to a connection
    seen: bool = False  # the server reported it (queued/progress/preview)


FATAL_CODES = ("auth", "version")


class Worker:
    """Owns the connection on its own thread; all methods are thread-safe."""

    def __init__(self, url: str, token: str, *, connect_timeout: float = 5.0,
                 retry_delays=(0.5, 1.0, 2.0, 4.0, 8.0)) -> None:
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout
        self.retry_delays = tuple(retry_delays)
        self.events: "queue.Queue[object]" = queue.Queue()
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self._jobs: Dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._client: Optional[Client] = None
        self._thread = threading.Thread(target=self._run, name="controlcanvas-worker",
                                        daemon=True)
        self.connected = False
        self._dropped = False

    # -- GUI side --------------------------------------------------------------------

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        client = self._client
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        self._thread.join(timeout)

    def submit(self, request: messages.GenerateRequest, images: Mapping[int, Image], *,
               preview_every: int = 0, live: bool = False) -> str:
        """``live``: a live-painting frame; the server drops it with the connection, so
        a dropped link ends it (``cancelled``) instead of resuming it."""
        job = _Job(messages.new_job_id(), "generate", request=request, images=dict(images),
                   preview_every=preview_every, live=live)
        return self._add(job)

    def preprocess(self, annotator: str, image: Image, *, params: Optional[dict] = None,
                   width: int = 0, height: int = 0) -> str:
        job = _Job(messages.new_job_id(), "preprocess", images={0: image}, annotator=annotator,
                   params=dict(params or {}), width=width, height=height)
        return self._add(job)

    def _add(self, job: _Job) -> str:
        with self._lock:
            self._jobs[job.job_id] = job
        self._commands.put(("send", job.job_id))
        self._wake.set()
        return job.job_id

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            unsent = job is not None and not job.sent
            if unsent:  # it never left this machine: drop it now, not at the next connect
                del self._jobs[job_id]
        if unsent:
            self._emit(JobFailed(job_id, "cancelled", "Cancelled."))
            return
        self._commands.put(("cancel", job_id))
        self._wake.set()

    def reconnect(self, url: Optional[str] = None, token: Optional[str] = None) -> None:
        """Drop the connection and connect again (to a new address/token if given)."""
        self._commands.put(("reconnect", url, token))
        self._wake.set()
        client = self._client
        if client is not None:
            try:
                client.close()  # wakes a blocked read
            except Exception:
                pass

    def unfinished(self) -> List[str]:
        with self._lock:
            return list(self._jobs)

    def drain(self) -> List[object]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    # -- worker thread ---------------------------------------------------------------

    def _emit(self, event: object) -> None:
        self.events.put(event)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._apply_reconnect_commands()
            self._emit(Connecting(self.url, attempt))
            try:
                client = Client.connect(self.url, self.token, client=CLIENT_NAME,
                                        timeout=self.connect_timeout)
            except ControlCanvasError as err:
                retry = 0.0 if err.code in FATAL_CODES else \
                    self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
                self._emit(Disconnected(self.url, err.message, retry))
                attempt += 1
                self._pause(retry if retry else None)
                continue
            except Exception as err:  # never let the thread die on a surprise
                self._emit(Disconnected(self.url, f"Could not connect to {self.url} ({err}).",
                                        2.0))
                attempt += 1
                self._pause(2.0)
                continue
            attempt = 0
            self._client = client
            self._dropped = False
            self.connected = True
            try:
                self._serve(client)
            except ControlCanvasError as err:
                self._lost(err.message)
            except Exception as err:  # a bug must cost a reconnect, not the thread
                self._lost(f"The connection to {self.url} failed ({type(err).__name__}: {err}).")
            finally:
                self.connected = False
                self._client = None
                try:
                    client.close()
                except Exception:
                    pass
                self._drop_live()
            if self._dropped:
                self._pause(self.retry_delays[0])

    def _pause(self, seconds: Optional[float]) -> None:
        """Wait before retrying; commands (reconnect, stop) cut the wait short."""
        self._wake.clear()
        self._wake.wait(seconds)

    def _apply_reconnect_commands(self) -> None:
        keep = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "reconnect":
                if command[1]:
                    self.url = command[1]
                if command[2] is not None:
                    self.token = command[2]
            else:
                keep.append(command)
        for command in keep:
            self._commands.put(command)

    def _serve(self, client: Client) -> None:
        models = None
        try:
            models = client.models(timeout=10)
        except (ControlCanvasError, TimeoutError):
            models = None
        with self._lock:
            pending = list(self._jobs.values())
        resumable = [job.job_id for job in pending if job.sent]
        if resumable:
            client.resume(*resumable)
        for job in pending:
            if not job.sent:
                self._send(client, job)
        welcome = client.welcome
        self._emit(Connected(self.url, welcome.server if welcome else "",
                             welcome.engine if welcome else "", models, len(resumable)))
        while not self._stop.is_set():
            if not self._handle_commands(client):
                return
            try:
                event = client.next_event(0.05)
            except ControlCanvasError as err:
                self._lost(err.message)
                return
            except Exception as err:
                self._lost(f"The connection to {self.url} broke ({err}).")
                return
            if event is not None:
                self._handle_event(client, event)

    def _lost(self, message: str) -> None:
        """Report a dropped link; ``_run`` closes it, waits a moment and reconnects."""
        self._dropped = True
        if not self._stop.is_set():
            self._emit(Disconnected(self.url, message, self.retry_delays[0]))

    def _drop_live(self) -> None:
        """The connection ended: its live frames ended with it on the server."""
        with self._lock:
            gone = [job_id for job_id, job in self._jobs.items() if job.live]
            for job_id in gone:
                del self._jobs[job_id]
        for job_id in gone:
            self._emit(JobFailed(job_id, "cancelled", "The live frame ended with the "
                                                      "connection."))

    def _send(self, client: Client, job: _Job) -> None:
        try:
            if job.kind == "generate":
                client.submit(job.request, job.images, job_id=job.job_id,
                              preview_every=job.preview_every, live=job.live)
            else:
                # the id is chosen before sending, so the job can be resumed after a drop
                client.preprocess(job.annotator, job.images[0], params=job.params,
                                  width=job.width, height=job.height, job_id=job.job_id)
            job.sent = True
        except errors.ConnectionLost:
            raise
        except ControlCanvasError as err:  # refused before sending (size limits...)
            self._finish(job.job_id)
            self._emit(JobFailed(job.job_id, err.code, err.message))

    def _handle_commands(self, client: Client) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            kind = command[0]
            try:
                if kind == "send":
                    with self._lock:
                        job = self._jobs.get(command[1])
                    if job is not None and not job.sent:
                        self._send(client, job)
                elif kind == "cancel":
                    with self._lock:
                        job = self._jobs.get(command[1])
                    if job is not None and job.sent:
                        client.cancel(command[1])
                    elif job is not None:  # never left this machine
                        self._finish(command[1])
                        self._emit(JobFailed(command[1], "cancelled", "Cancelled."))
                elif kind == "reconnect":
                    self._commands.put(command)  # handled before the next connect
                    return False
            except ControlCanvasError as err:
                self._lost(err.message)
                return False

    def _finish(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _handle_event(self, client: Client, event: object) -> None:
        job_id = getattr(event, "job_id", None)
        with self._lock:
            job = self._jobs.get(job_id) if job_id else None
        if isinstance(event, ResultReady):
            if job is None:
                client.ack(event.job_id)  # a stray result: collect it so the server forgets
                return
            self._finish(event.job_id)
            client.ack(event.job_id)
            self._emit(event)
        elif isinstance(event, messages.Error):
            if job_id and job is not None:
                if event.code == "unknown_job" and not job.seen:
                    # The server never got it (the link broke mid-upload): send it again.
                    job.sent = False
                    self._send(client, job)
                    return
                self._finish(job_id)
                self._emit(JobFailed(job_id, event.code, event.message))
            elif not job_id:
                self._emit(JobFailed("", event.code, event.message))
        elif isinstance(event, (messages.Queued, messages.Progress, PreviewReady)):
            if job is not None:
                job.seen = True
                self._emit(event)
        else:
            self._emit(event)


def wait_for(worker: Worker, predicate, timeout: float, sink=None) -> bool:
    """Batch helper: drain events into ``sink`` until ``predicate()`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in worker.drain():
            if sink is not None:
                sink(event)
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
