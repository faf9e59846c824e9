"""The job queue: fair FIFO, one worker thread per engine that owns it, cancel,
progress, and results kept until the client acknowledges them.

Threading: every public method of :class:`JobManager` runs on the asyncio loop
thread.  A worker thread touches only the queue (under ``_lock``) and the job it
runs, and hands everything else back to the loop with ``call_soon_threadsafe``.
So job bookkeeping needs no lock, and each engine is only ever called from its one
thread.  With several engines (an ``EngineGroup``: one per GPU) there is one worker per
engine: the fair order below says which job starts next, backend.server.workers says on
which free worker (the one holding its models, then the most free memory); a worker
whose device fails ends its job with ``WorkerLost`` and stops, the others go on.

Ownership: a job belongs to the connection that submitted it or last resumed it
(``owner``).  When a connection goes away its jobs become orphans and keep
running (unless submitted with ``cancel_on_disconnect``); their outcome waits
until a client sends ``resume`` with the job id, and is dropped after ``ack`` or
after the retention time / memory budget.

Durability: with a ``JobStore`` (backend.server.store) queued jobs and outcomes are kept
on disk too, and the ones kept before a crash or restart come back when the manager
starts.  A client hears of a job (``queued``, progress, its result) only once the store
holds what it needs to give it back: the job's inputs before it is announced or run,
its result files before the result is sent.  Without a store, everything is in memory.

Live jobs (``Generate.live``, docs/live.md) are throwaway frames of live painting:

* **Supersede.** A client has at most one live job: a new one replaces its queued live job
  (that one ends with ``superseded``) and cancels its running one at the engine's next
  cancel check, unless that one is past half its steps: then it ends, and the new one runs
  next (so a client that sends faster than frames take still gets a frame at least every
  1.5 frame times, instead of none until it stops).  A superseded job's result is dropped,
  never delivered or kept, and so is a finished live result the client has not collected
  yet.  Live jobs are never written to the store, and they are cancelled (or dropped) when
  their connection goes.
* **Priority lane.** Queued live jobs (one per client, oldest first) start before the
  clients' lanes, but never twice in a row while a lane waits: a live round, then a
  lane's job, then a live round...  So a job of another client waits for at most one
  live round, and a live job for at most one other job.
* **Preemption.** With an engine that can pause between two denoising steps
  (``preempts_between_steps``: it calls ``ctx.step_boundary()`` after each step), the
  live jobs waiting at a step boundary of a running non-live job run right there, on the
  worker thread, one round (each waiting client's live job once), and then the paused job
  takes its next step.  So a live job waits for at most one step of another client's
  long job, and that job still advances at least one step per live round.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import ctypes.util
import functools
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from shared.errors import (Cancelled, ControlCanvasError, DuplicateJob, EngineError, Expired,
                           MissingImage, QueueFull, Superseded, UnknownJob, WorkerLost)
from shared.images import Image
from shared.messages import MAX_SEED, Generate, JobInfo, Preprocess, Train

from ..annotators.registry import Annotated
from ..engines.base import Engine
from ..engines.group import devices_of, engines_of
from ..training.folders import TrainRoots
from .config import ServerConfig
from .workers import Worker, device_lost, job_models, place

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 8 << 20


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_heap() -> bool:
    """Give freed memory back to the system (glibc's ``malloc_trim``).

    Results are tens of MiB of bytes objects; after they are dropped glibc keeps the
    pages in its arenas, so the server's RSS would stay at its high-water mark. The
    bytes are freed by reference counting as soon as they are dropped (no cycles), so
    no garbage collection is needed first. True if the trim ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def job_log_line(job: "Job", error: Optional[ControlCanvasError]) -> str:
    """The one log line of a finished job: id, client, kind, size, steps, seconds, outcome."""
    message = job.message
    if isinstance(message, Generate):
        r = message.request
        kind = f"generate {r.mode}" + (f" x{r.batch}" if r.batch > 1 else "")
        size, steps = f"{r.width}x{r.height}", str(r.steps)
    elif isinstance(message, Preprocess):
        image = job.images.get(message.image)
        kind, steps = f"preprocess {message.annotator}", "-"
        size = f"{message.width}x{message.height}" if message.width else \
            f"{image.width}x{image.height}" if image is not None else "-"
    else:
        kind, size, steps = "train", str(getattr(message, "resolution", "-")), str(message.steps)
    if error is None:
        outcome = DONE
    elif isinstance(error, Cancelled):
        outcome = CANCELLED
    else:
        outcome = f"{FAILED} ({error.code})"
    client = getattr(job.owner, "label", None) or job.submitter
    seconds = max(0.0, job.finished_at - job.started_at) if job.started_at else 0.0
    return (f"job {job.job_id} client {client} {kind} size {size} steps {steps} "
            f"{seconds:.2f} s {outcome}")


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class JobStore(Protocol):
    """Where jobs are kept across restarts (backend.server.store.DiskJobStore).

    ``add`` and ``finished`` return futures whose value is True once the job is on disk
    (False: it could not be written, and lives in memory only); ``started`` blocks."""

    def load(self) -> List["Job"]: ...
    def add(self, job: "Job", images: Dict[int, Image]) -> "concurrent.futures.Future": ...
    def started(self, job: "Job") -> None: ...
    def finished(self, job: "Job", result: Sequence[Tuple[Optional[int], Image]],
                 error: Optional[ControlCanvasError]) -> "concurrent.futures.Future": ...
    def requeue(self, job: "Job") -> "concurrent.futures.Future": ...
    def forget(self, job_ids: Sequence[str]) -> None: ...
    def close(self) -> None: ...


class Owner(Protocol):
    """What a job reports to: a live client connection (see backend.server.websocket)."""
    key: str
    label: str  # for the log: the connection and the client's name, never its token

    def job_queued(self, job: "Job", position: int) -> None: ...
    def job_progress(self, job: "Job", step: int, total: int, stage: str) -> None: ...
    def job_preview(self, job: "Job", step: int, image: Image) -> None: ...
    def job_finished(self, job: "Job") -> None: ...


@dataclass(eq=False)
class Job:
    message: Union[Generate, Preprocess, Train]
    images: Dict[int, Image]
    submitter: str
    owner: Optional[Owner] = None
    state: str = QUEUED
    cancel_event: threading.Event = field(default_factory=threading.Event)
    result: Tuple[Tuple[Optional[int], Image], ...] = ()  # (seed, image) per slot
    error: Optional[ControlCanvasError] = None
    info: Dict[str, object] = field(default_factory=dict)  # sent with the result
    last_progress: Tuple[int, int, str] = (0, 0, "queued")
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    finished_at: float = 0.0
    dropped: str = ""  # "acked", "expired" or "superseded": forgotten, result bytes released
    stored: Optional[concurrent.futures.Future] = None  # the store's add(), if any
    superseded: bool = False  # a newer live job of its client replaced it
    worker: str = ""  # the worker that ran it (its index and device), for the log and tests

    @property
    def live(self) -> bool:
        """A throwaway live-painting frame (see the module docstring)."""
        return isinstance(self.message, Generate) and self.message.live

    @property
    def durable(self) -> bool:
        """False while the store is still writing the job: nobody hears of it yet."""
        return self.stored is None or self.stored.done()

    @property
    def job_id(self) -> str:
        return self.message.job_id

    @property
    def kept_bytes(self) -> int:
        return sum(len(img.data) for _, img in self.result)

    @property
    def elapsed(self) -> float:
        return max(0.0, self.finished_at - self.started_at) if self.started_at else 0.0


class JobManager:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, *, max_queue: int = 64,
                 retention_seconds: float = 3600.0, retention_bytes: int = 2 << 30,
                 retention_bytes_per_client: int = 0, max_jobs_per_client: int = 0,
                 held_outside: Optional[Callable[[], Dict[str, int]]] = None,
                 tombstones: int = 4096, store: Optional[JobStore] = None,
                 training: Optional[TrainRoots] = None, live_preemption: bool = True) -> None:
        """``retention_bytes`` bounds the result bytes held for all clients together,
        ``retention_bytes_per_client`` those of one client (0: no separate cap);
        ``held_outside()`` gives, per client key, result bytes held elsewhere (frames on
        their way to the client), which count against both. With a ``store``, jobs are
        kept on disk too and the ones it kept come back (see the module docstring).
        ``training``: where a client's `train` job may read and write.
        ``live_preemption``: live jobs run between two steps of another job when the
        engine can pause there (``engine.preempts_between_steps``)."""
        self.engine = engine
        # where a client's `train` job may read and write (default: the per-user folders)
        self.training = training or ServerConfig().training_roots()
        self.loop = loop
        self.max_queue = max_queue
        self.max_jobs_per_client = max_jobs_per_client
        self.retention_seconds = retention_seconds
        self.retention_bytes = retention_bytes
        self.retention_bytes_per_client = retention_bytes_per_client
        self._held_outside = held_outside or dict
        self.jobs: Dict[str, Job] = {}
        self._expired: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._unreleased = 0  # result bytes dropped since the heap was last trimmed
        self._tombstones = tombstones
        self._lock = threading.Condition()
        self._lanes: "collections.OrderedDict[str, Deque[Job]]" = collections.OrderedDict()
        self._turn = 0
        self._last_served: Dict[str, int] = {}  # client key -> turn it was last served
        self._live: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self._live_round = False  # the last job started was live (lanes go next)
        self.preemption = bool(live_preemption and
                               getattr(engine, "preempts_between_steps", False))
        self.live_stats = {"superseded": 0, "preempted_steps": 0, "nested": 0}
        self._stopping = False
        self.store = store
        if store is not None:
            self._restore(store.load())
        # one worker thread per engine (an EngineGroup: one per device; backend.server.workers)
        self._workers = [Worker(i, e, d) for i, (e, d) in
                         enumerate(zip(engines_of(engine), devices_of(engine)))]
        for worker in self._workers:
            name = "controlcanvas-engine" + (f"-{worker.index}" if len(self._workers) > 1 else "")
            worker.thread = threading.Thread(target=self._work, args=(worker,), name=name,
                                             daemon=True)
            worker.thread.start()

    @property
    def _running(self) -> Optional[Job]:
        """A job running on some worker (the job, with one worker), or None."""
        return next((w.running for w in self._workers if w.running is not None), None)

    def _busy(self) -> List[Job]:
        """Every job running now, on every worker (live jobs nested in a pause too)."""
        return [j for w in self._workers for j in (w.running, w.nested) if j is not None]

    # -- loop-thread API -------------------------------------------------------

    def submit(self, message: Union[Generate, Preprocess, Train], images: Dict[int, Image],
               owner: Owner) -> Job:
        job_id = message.job_id
        if job_id in self.jobs or job_id in self._expired:
            raise DuplicateJob(f"Job id {job_id} is already in use; give every job a new "
                               f"random id.", job_id=job_id)
        missing = set(message.slots()) - set(images)
        if missing:
            raise MissingImage(f"Image slot(s) {sorted(missing)} were not received.",
                               job_id=job_id)
        if isinstance(message, Generate) and message.request.seed == -1:
            message = replace(message, request=replace(message.request,
                                                       seed=secrets.randbelow(MAX_SEED + 1)))
        job = Job(message=message, images=images, submitter=owner.key, owner=owner)
        if job.live:
            return self._submit_live(job)
        with self._lock:
            if not any(w.alive for w in self._workers):
                raise WorkerLost("Every engine worker of this server has stopped (their GPUs "
                                 "failed); restart the server, leaving out the failed GPUs "
                                 "with --devices.", job_id=job_id)
            if self._queued_count() >= self.max_queue:
                raise QueueFull(f"The queue already holds {self.max_queue} jobs; wait for some "
                                f"to finish or cancel one, then submit again.", job_id=job_id)
            mine = len(self._lanes.get(owner.key, ())) + sum(
                w.running is not None and w.running.submitter == owner.key
                for w in self._workers)
            if self.max_jobs_per_client and mine >= self.max_jobs_per_client:
                raise QueueFull(f"This connection already has {mine} jobs queued or running "
                                f"(the server's limit per client is "
                                f"{self.max_jobs_per_client}); wait for one to finish or "
                                f"cancel one, then submit again.", job_id=job_id)
            self.jobs[job_id] = job
            if self.store is not None:  # announced once its inputs are on disk
                job.stored = self.store.add(job, images)
                job.stored.add_done_callback(lambda _: self._post(self._announce_positions))
            self._lanes.setdefault(owner.key, collections.deque()).append(job)
            self._lock.notify()
        self._announce_positions()
        return job

    def _submit_live(self, job: Job) -> Job:
        """Queue a live job in the priority lane, replacing the client's previous one."""
        key = job.submitter
        with self._lock:
            replaced = self._live.pop(key, None)
            running = [j for j in self._busy() if j.live and j.submitter == key]
            self.jobs[job.job_id] = job
            self._live[key] = job
            self._lock.notify()
        for old in running:
            step, total, _ = old.last_progress
            if total and 2 * step >= total:
                continue  # past half its steps: it ends (a frame shown), the new one is next
            old.superseded = True  # stops at the engine's next cancel check, result dropped
            old.cancel_event.set()
        if replaced is not None:
            replaced.superseded = True
            self._finish(replaced, error=Superseded(job_id=replaced.job_id))
        self._drop_uncollected_live(key, keep=job)
        self._announce_positions()
        return job

    def _drop_uncollected_live(self, key: str, keep: Job) -> None:
        """A client's finished live results it has not collected yet are replaced by the
        newer frame: dropped (a result still waiting in its outbox goes as ``superseded``)."""
        stale = [j for j in self.jobs.values() if j.live and j.submitter == key
                 and j is not keep and j.state in FINISHED]
        for job in stale:
            if job.state == DONE:  # (a superseded one was counted when it finished)
                self.live_stats["superseded"] += 1
            self._release(job, "superseded")
        if stale:
            self._trim_if_worth_it()

    def cancel(self, job_id: str, owner: Owner) -> None:
        job = self._owned(job_id, owner)
        if job.state in FINISHED:
            return  # its outcome has been or will be delivered already
        job.cancel_event.set()
        with self._lock:
            queued = self._dequeue(job)
        if queued:
            error = Cancelled(f"Job {job_id} was cancelled before it started.", job_id=job_id)
            if self.store is not None and not job.live:
                self.store.finished(job, (), error)
            self._finish(job, error=error)
            self._announce_positions()
        # a running job stops at the engine's next check (before its next UNet block)

    def _dequeue(self, job: Job) -> bool:
        """Take a queued job out of its lane (under the lock); False if it was not queued."""
        if job.live:
            if self._live.get(job.submitter) is job:
                del self._live[job.submitter]
                return True
            return False
        lane = self._lanes.get(job.submitter)
        if lane is None or job not in lane:
            return False
        lane.remove(job)
        if not lane:
            del self._lanes[job.submitter]
        return True

    def ack(self, job_ids: Sequence[str], owner: Owner) -> None:
        self._drop_acked(job_ids, owner)
        self._trim_if_worth_it()  # the acked jobs are unreferenced now

    def _drop_acked(self, job_ids: Sequence[str], owner: Owner) -> None:
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and job.owner is owner and job.state in FINISHED:
                self._release(job, "acked")

    def _trim_if_worth_it(self) -> None:
        """Past ``TRIM_AFTER_BYTES`` of dropped result bytes, return them to the OS (called
        once the results are unreferenced, so one trim frees them all)."""
        if self._unreleased >= TRIM_AFTER_BYTES:
            self._unreleased = 0
            release_heap()

    def resume(self, job_ids: Sequence[str], owner: Owner) -> List[ControlCanvasError]:
        """Re-attach jobs to ``owner`` and replay their state; errors for unknown ids."""
        problems: List[ControlCanvasError] = []
        positions = self._positions()
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None:
                if job_id in self._expired:
                    problems.append(Expired(f"Job {job_id} finished but nobody collected its "
                                            f"result within the retention time; it is gone.",
                                            job_id=job_id))
                else:
                    problems.append(UnknownJob(f"No job {job_id} on this server (it never "
                                               f"existed, or the server was restarted).",
                                               job_id=job_id))
                continue
            job.owner = owner
            if job.state == QUEUED:
                if job.durable:  # else announced once it is
                    owner.job_queued(job, positions.get(job_id, 0))
            elif job.state == RUNNING:
                step, total, stage = job.last_progress
                owner.job_progress(job, step, total, stage)
            else:
                owner.job_finished(job)
        return problems

    def detach(self, owner: Owner) -> None:
        """The owner's connection closed: orphan its jobs (or cancel those that asked)."""
        for job in list(self.jobs.values()):
            if job.owner is not owner:
                continue
            job.owner = None
            if job.live and job.state in FINISHED:  # a frame nobody will look at
                self._release(job, "expired")
            elif (job.message.cancel_on_disconnect or job.live) and job.state not in FINISHED:
                log.info("client gone: cancelling job %s", job.job_id)
                self.cancel(job.job_id, owner=_Nobody)

    def status(self, owner: Owner) -> Tuple[int, Tuple[JobInfo, ...]]:
        positions = self._positions()
        mine = tuple(JobInfo(job_id=j.job_id, state=j.state, position=positions.get(j.job_id, 0))
                     for j in self.jobs.values() if j.owner is owner)
        return len(positions), mine

    def expire(self, now: Optional[float] = None) -> int:
        """Drop outcomes kept longer than the retention time or over the memory budget."""
        dropped = self._drop_expired(now)
        if dropped:  # the dropped jobs are unreferenced now (not while the loop held them)
            self._trim_if_worth_it()
        return dropped

    def _drop_expired(self, now: Optional[float]) -> int:
        """Oldest outcomes first: those past the retention time, then a client's oldest
        while it holds more than its share, then anyone's oldest while all together hold
        more than ``retention_bytes`` (results on their way to clients included)."""
        now = time.monotonic() if now is None else now
        finished = sorted((j for j in self.jobs.values() if j.state in FINISHED),
                          key=lambda j: j.finished_at)
        total, per_client = self.held_bytes()
        dropped = 0
        for job in finished:
            client = job.submitter
            too_old = now - job.finished_at > self.retention_seconds
            over_share = 0 < self.retention_bytes_per_client < per_client.get(client, 0)
            if not (too_old or over_share or total > self.retention_bytes):
                continue
            total -= job.kept_bytes
            per_client[client] -= job.kept_bytes
            self._release(job, "expired")
            self._expired[job.job_id] = None
            dropped += 1
            log.info("dropped the uncollected outcome of job %s (%s)", job.job_id,
                     "retention time" if too_old else "retention bytes")
        while len(self._expired) > self._tombstones:
            self._expired.popitem(last=False)
        return dropped

    def _release(self, job: Job, why: str) -> None:
        """Forget a finished job and let go of its result bytes, even where a reference
        to the job lingers (a result still waiting in a client's outbox)."""
        self._unreleased += job.kept_bytes
        del self.jobs[job.job_id]
        job.result, job.dropped = (), why
        if self.store is not None and not job.live:  # gone from the disk too
            self.store.forget((job.job_id,))

    def held_bytes(self) -> Tuple[int, Dict[str, int]]:
        """Result bytes held: (all clients, per client key); the job table's results and
        those on their way to clients (``held_outside``) together."""
        per_client: Dict[str, int] = collections.Counter()
        for job in self.jobs.values():
            per_client[job.submitter] += job.kept_bytes
        for client, held in self._held_outside().items():
            per_client[client] += held
        return sum(per_client.values()), per_client

    @property
    def kept_bytes(self) -> int:
        return sum(j.kept_bytes for j in self.jobs.values())

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            for lane in [*self._lanes.values(), self._live.values()]:
                for job in lane:
                    job.cancel_event.set()
            self._lanes.clear()
            self._live.clear()
            for job in self._busy():
                job.cancel_event.set()
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if self.store is not None:  # queued jobs stay in it for the next start
            self.store.close()

    def _restore(self, jobs: Sequence[Job]) -> None:
        """Jobs the store kept from before a restart (interrupted first, then queued in
        submit order, then outcomes): outcomes wait for ``resume``, queued jobs queue."""
        for job in jobs:
            self.jobs[job.job_id] = job
            if job.state == QUEUED:
                self._lanes.setdefault(job.submitter, collections.deque()).append(job)
        self._drop_expired(None)  # outcomes past the retention time or byte budget

    # -- helpers (loop thread) ---------------------------------------------------

    def _owned(self, job_id: str, owner: Owner) -> Job:
        job = self.jobs.get(job_id)
        if job is None or (job.owner is not owner and owner is not _Nobody):
            raise UnknownJob(f"No job {job_id} belongs to this connection; send 'resume' "
                             f"with its id first if it was submitted before a reconnect.",
                             job_id=job_id)
        return job

    def _queued_count(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def _order(self) -> List[Job]:
        """Queued jobs in the order the worker will take them (see ``_next_lane``); live
        jobs first (they run at the next step boundary, or next)."""
        with self._lock:
            lanes = {key: collections.deque(lane) for key, lane in self._lanes.items()}
            served = dict(self._last_served)
            live = list(self._live.values())
        order: List[Job] = live
        turn = self._turn
        while lanes:
            key = self._next_lane(lanes, served)
            order.append(lanes[key].popleft())
            if not lanes[key]:
                del lanes[key]
            served[key] = turn
            turn += 1
        return order

    @staticmethod
    def _next_lane(lanes, served) -> str:
        """Fair choice: the client served longest ago (never = first); ties by lane age."""
        return min(lanes, key=lambda key: served.get(key, -1))

    def _positions(self) -> Dict[str, int]:
        return {job.job_id: i + 1 for i, job in enumerate(self._order())}

    def _announce_positions(self) -> None:
        for job_id, position in self._positions().items():
            job = self.jobs.get(job_id)
            if job is not None and job.owner is not None and job.durable:
                job.owner.job_queued(job, position)

    def _finish(self, job: Job, result: Tuple[Tuple[Optional[int], Image], ...] = (),
                error: Optional[ControlCanvasError] = None) -> None:
        if job.superseded and (error is None or isinstance(error, Cancelled)):
            result, error = (), Superseded(job_id=job.job_id)  # its frame is not shown
            self.live_stats["superseded"] += 1
        job.finished_at = time.monotonic()
        log.info("%s", job_log_line(job, error))
        job.images = {}  # inputs are no longer needed
        if error is None:
            job.state, job.result = DONE, result
        else:
            error.job_id = job.job_id
            job.state = CANCELLED if isinstance(error, Cancelled) else FAILED
            job.error = error
        if job.owner is not None:
            job.owner.job_finished(job)
        elif job.live:  # its client is gone: nobody will look at this frame
            self._release(job, "expired")
        self.expire()

    def _post(self, callback, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    # -- worker threads ----------------------------------------------------------

    def _take(self, worker: Worker) -> Optional[Job]:
        """The next job for ``worker``: one another worker placed on it, else the next in
        fair order, placed on the best free worker (backend.server.workers.place): when
        that is another one, it is handed over and this worker looks again."""
        with self._lock:
            while True:
                if self._stopping or not worker.alive:
                    return None
                if worker.running is not None:  # placed here by another worker
                    return worker.running
                job = self._next_job()
                if job is None:
                    worker.idle = True
                    self._lock.wait()
                    worker.idle = False
                    continue
                candidates = [w for w in self._workers if w.free and w is not worker]
                target = place(job_models(job.message), [worker, *candidates])
                self._start(job, target, nested=False)
                if target is worker:
                    return job
                self._lock.notify_all()

    def _next_job(self) -> Optional[Job]:
        """Take the job that starts next (under the lock): a live round, else the client
        served longest ago (see the module docstring); None when nothing waits."""
        if self._live and not (self._live_round and self._lanes):
            self._live_round = True
            return self._live.popitem(last=False)[1]
        if not self._lanes:
            return None
        self._live_round = False
        key = self._next_lane(self._lanes, self._last_served)
        lane = self._lanes[key]
        job = lane.popleft()
        if not lane:
            del self._lanes[key]
        self._last_served[key] = self._turn
        self._turn += 1
        if len(self._last_served) > 1024:  # forget clients long gone
            horizon = self._turn - 1024
            self._last_served = {k: t for k, t in self._last_served.items()
                                 if t >= horizon or k in self._lanes}
        return job

    def _start(self, job: Job, worker: Worker, nested: bool) -> Job:
        """Mark ``job`` running on ``worker`` (under the lock)."""
        if nested:
            worker.nested = job
        else:
            worker.running = job
        job.state = RUNNING
        job.started_at = time.monotonic()
        job.worker = worker.label
        return job

    def _work(self, worker: Worker) -> None:
        while True:
            job = self._take(worker)
            if job is None:
                return
            try:
                self._execute(job, worker)
            except BaseException as err:  # the worker's device is gone, not just this job
                self._lose_worker(worker, err)
                return

    def _execute(self, job: Job, worker: Worker) -> None:
        """Run one job on ``worker``'s thread and hand its outcome to the loop."""
        durable = self.store is not None and not job.live
        if durable:
            self.store.started(job)  # waits: its inputs and this attempt are on disk
        self._post(self._started, job)
        result, error = (), None
        try:
            result = self._run(job, worker)
        except ControlCanvasError as err:
            error = err
        except Exception as err:  # an engine bug must not kill the worker
            if device_lost(err):
                raise
            log.exception("job %s failed", job.job_id)
            error = EngineError(f"The engine failed: {type(err).__name__}: {err}. "
                                f"See the server log; other jobs are not affected.")
        with self._lock:
            if job is worker.nested:
                worker.nested = None
            else:
                worker.running = None
                worker.models = job_models(job.message) or worker.models
                worker.jobs_run += 1
            stopping = self._stopping
        self._finished_on_worker(job, result, error, stopping)

    def _finished_on_worker(self, job: Job, result, error: Optional[ControlCanvasError],
                            stopping: bool) -> None:
        """Keep ``job``'s outcome (on disk first, when durable) and hand it to the loop."""
        if self.store is not None and not job.live:
            if stopping and isinstance(error, Cancelled):
                self.store.requeue(job)  # stopped by the server: it runs at next start
            else:  # on disk before the client hears of it
                self.store.finished(job, result, error).result()
        self._post(self._finish, job, result, error)

    def _lose_worker(self, worker: Worker, err: BaseException) -> None:
        """``worker``'s device failed under a job (worker thread): its jobs fail with
        ``WorkerLost``, the worker stops, the others go on; with none left, the queued jobs
        fail too (and new ones are refused)."""
        log.error("worker %s stopped: its device failed (%s: %s); the other workers go on",
                  worker.label, type(err).__name__, err)
        with self._lock:
            worker.alive = False
            lost = [j for j in (worker.nested, worker.running) if j is not None]
            worker.running = worker.nested = None
            stopping = self._stopping
            last = not any(w.alive for w in self._workers)
            self._lock.notify_all()
        for job in lost:
            self._finished_on_worker(job, (), WorkerLost(job_id=job.job_id), stopping)
        if last:
            self._post(self._fail_queued)

    def _fail_queued(self) -> None:
        """No worker is left: every queued job fails with ``WorkerLost`` (loop thread)."""
        with self._lock:
            waiting = [*self._live.values(), *(j for lane in self._lanes.values() for j in lane)]
            self._live.clear()
            self._lanes.clear()
        for job in waiting:
            error = WorkerLost("Every engine worker of this server stopped before this job "
                               "started; restart the server.", job_id=job.job_id)
            if self.store is not None and not job.live:
                self.store.finished(job, (), error)
            self._finish(job, error=error)

    def _preempt(self, paused: Job, worker: Worker) -> None:
        """At a step boundary of ``paused`` (its worker's thread): run one round of the
        live jobs waiting now (each of those clients' newest, once), then let ``paused``
        take its next step. Not while another worker is free: that one takes them."""
        if not self.preemption or paused.live:
            return
        with self._lock:
            if (worker.nested is not None or self._stopping or not self._live
                    or any(w.free for w in self._workers)):
                return
            clients = list(self._live)
            self.live_stats["preempted_steps"] += 1
        for key in clients:
            with self._lock:  # taken and started at once: a newer one supersedes it cleanly
                job = self._live.pop(key, None)
                if job is None or self._stopping:
                    continue
                self._start(job, worker, nested=True)
            self.live_stats["nested"] += 1
            self._execute(job, worker)

    def _started(self, job: Job) -> None:
        self._announce_positions()
        if job.owner is not None:
            job.owner.job_progress(job, 0, 0, "start")

    def _run(self, job: Job, worker: Worker) -> Tuple[Tuple[Optional[int], Image], ...]:
        ctx = _Context(self, job, worker)
        engine = worker.engine
        ctx.check_cancelled()
        message = job.message
        if isinstance(message, Generate):
            # The engine annotates control images itself (annotators.controls.prepare_controls)
            # at the size it generates at: only it knows that size.
            generated = engine.generate(message.request, job.images, ctx)
            ctx.check_cancelled()
            return tuple((g.seed, g.image) for g in generated)
        if isinstance(message, Train):
            return self._train(job, message, ctx)
        annotated = engine.preprocess(message, job.images[message.image], ctx)
        ctx.check_cancelled()
        if isinstance(annotated, Image):  # a bare image: an engine with nothing to add
            annotated = Annotated(annotated)
        image = annotated.image
        job.info = {k: v for k, v in annotated.info.items()
                    if isinstance(v, (bool, int, float, str))}
        return ((None, image),)


    def _train(self, job: Job, message: Train, ctx: "_Context") -> tuple:
        """Training runs on the worker thread too: it owns the GPU, so generation and
        training never compete for it. Cancel stops after writing a checkpoint."""
        from ..training.controlnet import config_from_message, job_progress, train_controlnet
        config = config_from_message(message, self.training)  # confined to the roots
        out = train_controlnet(config, progress=job_progress(ctx))
        job.info = {"out": str(out)}
        return ()


class _NobodyType:
    key = ""


_Nobody = _NobodyType()


class _Context:
    """The JobContext an engine sees while it runs one job (worker thread)."""

    def __init__(self, manager: JobManager, job: Job, worker: Worker) -> None:
        self._manager = manager
        self._job = job
        self._worker = worker
        self.job_id = job.job_id
        every = job.message.preview_every if isinstance(job.message, Generate) else 0
        self._preview_every = every

    def check_cancelled(self) -> None:
        if self._job.cancel_event.is_set():
            raise Cancelled(f"Job {self.job_id} was cancelled.", job_id=self.job_id)

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        self.check_cancelled()
        self._job.last_progress = (step, total, stage)
        self._manager._post(self._deliver_progress, step, total, stage)

    def _deliver_progress(self, step: int, total: int, stage: str) -> None:
        owner = self._job.owner
        if owner is not None and self._job.state == RUNNING:
            owner.job_progress(self._job, step, total, stage)

    def wants_preview(self, step: int) -> bool:
        return self._preview_every > 0 and step % self._preview_every == 0

    def step_boundary(self) -> None:
        """The engine finished a denoising step and may pause here: live jobs waiting now
        run before its next step (see the module docstring). Only an engine whose state
        survives another job running in between calls it."""
        self._manager._preempt(self._job, self._worker)

    def preview(self, step: int, image: Image) -> None:
        self._manager._post(self._deliver_preview, step, image)

    def _deliver_preview(self, step: int, image: Image) -> None:
        owner = self._job.owner
        if owner is not None and self._job.state == RUNNING:
            owner.job_preview(self._job, step, image)
