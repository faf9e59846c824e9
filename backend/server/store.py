"""The job store: queued jobs and uncollected outcomes on disk, so that a server that
crashes (``kill -9``, power loss) or restarts gives them back.

The folder (``store_dir``; ``jobs`` in the user cache folder for ``controlcanvas serve``)
is created 0700 and every file in it 0600:

    jobs.sqlite         the job table (the standard library's sqlite3; WAL, synchronous FULL)
    lock                locked by the one server that uses the folder
    <job id>.in<slot>   an input image of a job not yet run (a codec frame, kind input)
    <job id>.r<slot>    an image of a finished job's result (a codec frame, kind result)

Write order makes every crash point recoverable: an image file is written under a
temporary name, flushed to disk and renamed into place before the row that names it is
committed, and a row is deleted before its files.  On start, files no row names are
deleted, and a row whose files are missing or damaged comes back as a failed job
(``store_damaged``) rather than as a result with wrong pixels.

A job that was running when the server died is queued again (the seed is fixed in its
stored message, so the engine makes the same pixels) and runs first; one that was
running at ``MAX_ATTEMPTS`` deaths in a row fails with ``interrupted`` instead (so a job
that kills the server cannot do it forever), and so does an interrupted training run
(it restarts from its checkpoint only when asked: ``resume``).  Jobs submitted with
``cancel_on_disconnect`` come back cancelled: their connection is gone.

A damaged or foreign database is moved aside (``jobs.sqlite.damaged``) and the server
starts with an empty store; a folder that cannot be used (another server holds it, it
belongs to another user, it cannot be written) leaves the server keeping jobs in memory
only.  Either way the log says so in one line, and the server starts.

Threading: one thread (``controlcanvas-store``) owns the SQLite connection and does every
file and database operation, in the order they were asked for.  The loop thread never
waits for it (it gets futures); the engine's worker thread waits for it where the order
matters: before a job runs (its inputs and attempt count are on disk) and before a
result is announced (its files are on disk).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from shared import codec
from shared.errors import (Cancelled, ControlCanvasError, Interrupted, StoredJobDamaged,
                           error_from_code)
from shared.images import Image
from shared.messages import CLIENT_MESSAGES, Train, from_json, to_json

from .jobs import CANCELLED, DONE, FAILED, QUEUED, Job

log = logging.getLogger(__name__)

SCHEMA = "controlcanvas-jobs 1"
DB_NAME = "jobs.sqlite"
MAX_ATTEMPTS = 3  # deaths of the server while a job ran, before it is failed instead
_FILE = re.compile(r"^([0-9a-f]{32})\.(in|r)(\d{1,4})$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_LIMITS = dict(max_image_side=1 << 20, max_pixels=1 << 40)  # our own files: size checked

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submit order
    job_id TEXT NOT NULL UNIQUE,
    submitter TEXT NOT NULL,                -- the submitting connection (its queue lane)
    state TEXT NOT NULL,                    -- queued, running, done, failed, cancelled
    attempts INTEGER NOT NULL DEFAULT 0,    -- times it started running
    message TEXT NOT NULL,                  -- the job's message as JSON, seed fixed
    submitted_at REAL NOT NULL,             -- wall-clock seconds (time.time())
    finished_at REAL,                       -- wall-clock: retention survives restarts
    elapsed REAL NOT NULL DEFAULT 0,
    seeds TEXT,                             -- JSON list: one per result image file
    info TEXT,                              -- JSON object sent with the result
    error TEXT                              -- JSON {code, message, field}
);
"""


class StoreUnavailable(Exception):
    """The store folder cannot be used; the server keeps jobs in memory only."""


class StoreDamaged(Exception):
    """A store file (the database, an image) is damaged or not ours."""


def open_store(folder: Path) -> Optional["DiskJobStore"]:
    """The store in ``folder``, or None (logged in one line) when it cannot be used."""
    try:
        return DiskJobStore(folder)
    except StoreUnavailable as err:
        log.warning("job store: %s; queued jobs and results are kept in memory only, and a "
                    "crash loses them.", err)
        return None


class DiskJobStore:
    """The ``JobStore`` of backend.server.jobs, in a folder (see the module docstring)."""

    def __init__(self, folder: Path, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.folder = Path(folder)
        self.max_attempts = max_attempts
        self._lock_fd = _claim_folder(self.folder)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="controlcanvas-store")
        self._db: Optional[sqlite3.Connection] = None
        try:
            self._pool.submit(self._open_db).result()
        except BaseException:
            self.close()
            raise

    # -- the interface JobManager calls (any thread; the work runs on the store thread) --

    def load(self) -> List[Job]:
        """The kept jobs, cleaned and decided (see the module docstring): interrupted
        jobs first, then queued ones in submit order, then outcomes."""
        try:
            return self._pool.submit(self._load).result()
        except (OSError, sqlite3.Error) as err:  # damage the open-time check did not see
            log.warning("job store: cannot read the jobs kept in %s (%s: %s); starting "
                        "without them", self.folder, type(err).__name__, err)
            return []

    def add(self, job: Job, images: Mapping[int, Image]) -> "concurrent.futures.Future":
        """Keep a job just queued, with its inputs; the future's value: True once kept."""
        return self._submit(self._add, job, dict(images))

    def started(self, job: Job) -> None:
        """Worker thread, before the engine runs ``job``: wait until it is kept, then
        count the attempt (so a job that kills the server is not run forever)."""
        if job.stored is not None:
            job.stored.result()
        self._submit(self._started, job.job_id).result()

    def finished(self, job: Job, result: Sequence[Tuple[Optional[int], Image]],
                 error: Optional[ControlCanvasError]) -> "concurrent.futures.Future":
        """Keep a job's outcome; True once kept. Its result images (tens of MB) are written
        here, on the calling thread (the engine's worker: never the loop), while the store
        thread goes on with other jobs; then the row is committed on the store thread."""
        wall, elapsed = time.time(), \
            max(0.0, time.monotonic() - job.started_at) if job.started_at else 0.0
        try:
            self._write_results(job.job_id, result)
        except OSError as err:
            log.warning("job store: keeping the result of job %s failed (%s); it is kept in "
                        "memory only", job.job_id, err)
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(False)
            return done
        return self._submit(self._finished, job, tuple(result), error, wall, elapsed)

    def requeue(self, job: Job) -> "concurrent.futures.Future":
        """The server is stopping while ``job`` runs: it runs again at the next start,
        and this attempt does not count."""
        return self._submit(self._requeue, job.job_id)

    def forget(self, job_ids: Sequence[str]) -> None:
        """Drop rows (collected or expired outcomes) and then their files."""
        if job_ids:
            self._submit(self._forget, tuple(job_ids))

    def close(self) -> None:
        """Finish the writes asked for, close the database (on its own thread), unlock."""
        try:
            self._pool.submit(self._close_db).result()
        except RuntimeError:  # closed already
            pass
        self._pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- store thread ------------------------------------------------------------------

    def _submit(self, func, *args) -> "concurrent.futures.Future":
        """Run ``func`` on the store thread; its failures are logged (one line) and the
        future's value is then False: the job goes on, in memory only."""
        def run():
            try:
                func(*args)
                return True
            except (OSError, sqlite3.Error, ValueError) as err:  # disk full, I/O error...
                log.warning("job store: %s failed (%s: %s); that job is kept in memory only",
                            func.__name__.strip("_"), type(err).__name__, err)
            except Exception:  # a bug: the jobs go on, in memory
                log.exception("job store: %s failed", func.__name__.strip("_"))
            return False
        try:
            return self._pool.submit(run)
        except RuntimeError:  # closed: the server is stopping
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(False)
            return done

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _open_db(self) -> None:
        path = self.folder / DB_NAME
        try:
            self._db = _connect(path)
        except sqlite3.OperationalError as err:  # cannot open, read-only, I/O error...
            raise StoreUnavailable(f"cannot open {path} ({err})") from None
        except (sqlite3.DatabaseError, StoreDamaged) as err:  # not a database, corrupt
            aside = path.with_name(DB_NAME + ".damaged")
            log.warning("job store: %s is damaged or not ControlCanvas's (%s); moved to %s, "
                        "starting with an empty store", path, err, aside.name)
            try:
                os.replace(path, aside)
                for suffix in ("-wal", "-shm", "-journal"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
                self._db = _connect(path)
            except (OSError, sqlite3.Error, StoreDamaged) as again:
                raise StoreUnavailable(f"cannot start a new database in {self.folder} "
                                       f"({again})") from None
        except OSError as err:
            raise StoreUnavailable(f"cannot open {path} ({err})") from None

    def _add(self, job: Job, images: Dict[int, Image]) -> None:
        for slot, image in images.items():
            self._write_image(_name(job.job_id, "in", slot), codec.KIND_INPUT, job.job_id,
                              slot, image)
        _sync_folder(self.folder)
        with self._transaction(durable=True):  # the client hears of the job after this
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, submitter, state, message, submitted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (job.job_id, job.submitter, QUEUED, to_json(job.message), time.time()))

    def _started(self, job_id: str) -> None:
        with self._transaction(durable=False):
            self._db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1 "
                             "WHERE job_id = ?", (job_id,))

    def _requeue(self, job_id: str) -> None:
        with self._transaction(durable=False):
            self._db.execute("UPDATE jobs SET state = 'queued', attempts = max(0, attempts - 1)"
                             " WHERE job_id = ? AND state = 'running'", (job_id,))

    def _write_results(self, job_id: str, result) -> None:
        for slot, (_, image) in enumerate(result):
            self._write_image(_name(job_id, "r", slot), codec.KIND_RESULT, job_id, slot, image)
        if result:
            _sync_folder(self.folder)

    def _finished(self, job: Job, result, error, wall: float, elapsed: float) -> None:
        """The outcome's row (its result files are on disk already), then no inputs."""
        state = DONE if error is None else CANCELLED if isinstance(error, Cancelled) else FAILED
        error_json = None if error is None else json.dumps(
            {"code": error.code, "message": error.message, "field": error.field})
        with self._transaction(durable=True):  # the client hears of the outcome after this
            self._db.execute(
                "INSERT INTO jobs (job_id, submitter, state, message, submitted_at, "
                "finished_at, elapsed, seeds, info, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(job_id) DO UPDATE SET state = excluded.state, "
                "finished_at = excluded.finished_at, elapsed = excluded.elapsed, "
                "seeds = excluded.seeds, info = excluded.info, error = excluded.error",
                (job.job_id, job.submitter, state, to_json(job.message), wall, wall, elapsed,
                 json.dumps([seed for seed, _ in result]), json.dumps(job.info), error_json))
        for slot in job.message.slots():
            _remove(os.path.join(self.folder, _name(job.job_id, "in", slot)))

    def _forget(self, job_ids: Tuple[str, ...]) -> None:
        files = []
        for job_id in job_ids:
            row = self._db.execute("SELECT message, seeds FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
            files += self._files_of(job_id, *row) if row else []
        with self._transaction(durable=False):  # lost on power loss: it expires then
            self._db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])
        for name in files:
            _remove(os.path.join(self.folder, name))

    def _files_of(self, job_id: str, message: str, seeds: Optional[str]) -> List[str]:
        """The image files a row may name: its inputs, then its results."""
        try:
            slots = from_json(message, CLIENT_MESSAGES).slots()
            count = len(json.loads(seeds)) if seeds else 0
        except (ControlCanvasError, TypeError, ValueError):  # damaged: cleaned at start
            return []
        return [_name(job_id, "in", slot) for slot in slots] + \
            [_name(job_id, "r", slot) for slot in range(count)]

    @contextlib.contextmanager
    def _transaction(self, durable: bool):
        """A transaction; ``durable`` ones are on disk when it ends (synchronous FULL), the
        others survive a killed server but maybe not a power cut (NORMAL: no fsync)."""
        self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        with self._db:
            yield

    def _write_image(self, name: str, kind: int, job_id: str, slot: int, image: Image) -> None:
        """Atomically: a temporary file, written and flushed, renamed into place."""
        header, pixels = codec.encode_frame_parts(kind, job_id, slot, image)
        final = os.path.join(self.folder, name)
        tmp = final + ".tmp"
        _remove(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o600)
        try:
            for part in (header, pixels):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    def _read_image(self, name: str, kind: int, job_id: str, slot: int) -> Image:
        try:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY | _NOFOLLOW | _BINARY)
        except OSError as err:
            raise StoreDamaged(f"{name} cannot be read ({err.strerror or err})") from None
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
        try:
            frame = codec.decode_frame(data, **_LIMITS)
        except ControlCanvasError as err:
            raise StoreDamaged(f"{name}: {err.message}") from None
        if (frame.kind, frame.job_id, frame.slot) != (kind, job_id, slot):
            raise StoreDamaged(f"{name} holds another image")
        return frame.image

    # -- loading (store thread, at start) ----------------------------------------------

    def _load(self) -> List[Job]:
        rows = self._db.execute(
            "SELECT job_id, submitter, state, attempts, message, submitted_at, finished_at, "
            "elapsed, seeds, info, error FROM jobs ORDER BY state != 'running', "
            "state != 'queued', seq").fetchall()
        jobs: List[Job] = []
        for row in rows:
            job = self._restore(*row)
            if job is not None:
                jobs.append(job)
        self._clean_files(jobs)
        queued = sum(job.state == QUEUED for job in jobs)
        if jobs:
            log.info("job store: %d job(s) back from before the restart: %d queued, %d "
                     "outcome(s) waiting for their client", len(jobs), queued,
                     len(jobs) - queued)
        return jobs

    def _restore(self, job_id, submitter, state, attempts, message, submitted_at,
                 finished_at, elapsed, seeds, info, error) -> Optional[Job]:
        """One row back as a Job; a row that cannot be read is dropped (logged)."""
        try:
            if not isinstance(job_id, str) or not re.fullmatch(r"[0-9a-f]{32}", job_id):
                raise StoreDamaged(f"the row of job {job_id!r} has a damaged id")
            msg = from_json(message, CLIENT_MESSAGES)
            if getattr(msg, "job_id", None) != job_id:
                raise StoreDamaged(f"the row of job {job_id} holds another job's message")
        except (ControlCanvasError, StoreDamaged, TypeError, ValueError) as err:
            log.warning("job store: dropped an unreadable job (%s)", _reason(err))
            self._forget((str(job_id),))
            return None
        now_wall, now = time.time(), time.monotonic()
        job = Job(message=msg, images={}, submitter=f"restored:{submitter}")
        job.submitted_at = now - max(0.0, now_wall - float(submitted_at or now_wall))
        try:
            if state in (QUEUED, "running"):
                return self._restore_unfinished(job, state, attempts)
            seeds_list = json.loads(seeds) if seeds else []
            if not isinstance(seeds_list, list):
                raise StoreDamaged("its seeds are damaged")
            job.result = tuple(
                (seed, self._read_image(_name(job_id, "r", slot), codec.KIND_RESULT, job_id,
                                        slot)) for slot, seed in enumerate(seeds_list))
            job.info = json.loads(info) if info else {}
            if not isinstance(job.info, dict):
                raise StoreDamaged("its info is damaged")
            if state != DONE:
                fields = json.loads(error)
                job.error = error_from_code(str(fields["code"]), str(fields["message"]),
                                            field=fields.get("field"), job_id=job_id)
            job.state = state if state in (DONE, FAILED, CANCELLED) else FAILED
        except (StoreDamaged, TypeError, ValueError, KeyError, AttributeError) as err:
            return self._damaged(job, err)
        job.finished_at = now - max(0.0, now_wall - float(finished_at or now_wall))
        job.started_at = job.finished_at - max(0.0, float(elapsed or 0.0))
        return job

    def _restore_unfinished(self, job: Job, state: str, attempts: int) -> Job:
        message = job.message
        if message.cancel_on_disconnect:
            return self._decide(job, Cancelled(
                f"Job {job.job_id} was cancelled: its client was disconnected when the "
                f"server stopped."))
        if state == "running" and isinstance(message, Train):
            return self._decide(job, Interrupted(
                f"Training job {job.job_id} was interrupted when the server stopped; "
                f"train again with resume to continue from its last checkpoint."))
        if state == "running" and attempts >= self.max_attempts:
            return self._decide(job, Interrupted(
                f"The server stopped {attempts} times while it ran job {job.job_id}, so it "
                f"is not run again; see the server log for why (out of memory?), then "
                f"submit it again, smaller."))
        job.images = {slot: self._read_image(_name(job.job_id, "in", slot), codec.KIND_INPUT,
                                             job.job_id, slot)
                      for slot in message.slots()}
        if state == "running":
            log.info("job store: job %s was running when the server stopped; it runs again",
                     job.job_id)
        return job

    def _decide(self, job: Job, error: ControlCanvasError) -> Job:
        """Finish a restored job with ``error``, on disk too."""
        error.job_id = job.job_id
        job.state = CANCELLED if isinstance(error, Cancelled) else FAILED
        job.error = error
        job.finished_at = job.started_at = time.monotonic()
        self._finished(job, (), error, time.time(), 0.0)
        return job

    def _damaged(self, job: Job, err: Exception) -> Job:
        log.warning("job store: job %s came back damaged (%s); its client gets "
                    "'store_damaged'", job.job_id, _reason(err))
        job.result, job.images, job.info = (), {}, {}  # its files are cleaned with strays
        return self._decide(job, StoredJobDamaged(
            f"The server kept job {job.job_id} on disk across a restart, but its files were "
            f"damaged or missing; submit it again."))

    def _clean_files(self, jobs: List[Job]) -> None:
        """Delete temporary files and the image files no kept job needs (another's, or a
        damaged job's); other files are not ours and stay."""
        needed = {_name(job.job_id, "in", slot) for job in jobs for slot in job.images} | \
            {_name(job.job_id, "r", slot) for job in jobs for slot in range(len(job.result))}
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tmp") or \
                    (_FILE.match(entry.name) and entry.name not in needed):
                _remove(entry.path)


# -- helpers ---------------------------------------------------------------------------

def _name(job_id: str, kind: str, slot: int) -> str:
    return f"{job_id}.{kind}{slot}"


def _reason(err: Exception) -> str:
    return getattr(err, "message", None) or str(err) or type(err).__name__


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; Windows has no directory fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating, 0600) the job database; StoreDamaged if it is not ours."""
    if not path.exists():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600))
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise StoreDamaged(f"integrity check: {check[0] if check else 'no answer'}")
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables - {"meta", "jobs", "sqlite_sequence"}:
            raise StoreDamaged(f"it has other tables ({', '.join(sorted(tables))[:80]})")
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None or row[0] != SCHEMA:
                raise StoreDamaged(f"schema {row[0] if row else None!r}, expected {SCHEMA!r}")
        db.executescript(_TABLES)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "error" not in columns or "seeds" not in columns:
            raise StoreDamaged("its job table has other columns")
        db.isolation_level = "DEFERRED"  # `with db:` commits a transaction
    except BaseException:
        db.close()
        raise
    return db


def _claim_folder(folder: Path) -> int:
    """Create the folder (0700), check that it is ours, lock it; the lock's descriptor."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.name == "posix":
            st = os.stat(folder)
            if st.st_uid != os.getuid():
                raise StoreUnavailable(f"{folder} belongs to another user")
            if st.st_mode & 0o077:
                os.chmod(folder, 0o700)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    except OSError as err:
        raise StoreUnavailable(f"cannot use {folder} ({err.strerror or err})") from None
    try:
        _lock(fd)
    except OSError:
        os.close(fd)
        raise StoreUnavailable(f"another ControlCanvas server is using {folder}") from None
    return fd


def _lock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
