"""Durable jobs (backend.server.store): queued jobs and uncollected results survive a
server that is killed (SIGKILL, no cleanup), and come back by ``resume`` after a
restart on the same store folder; acked and expired ones do not; damaged files and
databases are reported (typed), never a crash.

The crash tests run the server in its own process (backend.bench.process), as a user
does, and kill it; the others run it on a thread of this process."""

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from backend.bench.process import ServerProcess
from backend.engines.base import NullContext
from backend.engines.fake import FakeEngine
from backend.server import store as store_module
from backend.server.config import ServerConfig, build_config, default_store_dir
from backend.server.jobs import CANCELLED, FAILED, QUEUED, Job
from backend.server.local import ServerThread
from backend.server.store import DiskJobStore
from shared.client import Client
from shared.errors import (Cancelled, Expired, Interrupted, StoredJobDamaged, UnknownJob)
from shared.images import Image
from shared.messages import ControlUnit, Generate, GenerateRequest, Queued, new_job_id
from tests.test_jobs import Recorder, loop, on_loop  # noqa: F401 (loop is a fixture)

LINES = ControlUnit(condition="lineart", image=0)


def request(seed, steps=3, side=32):
    return GenerateRequest(width=side, height=side, steps=steps, seed=seed,
                           prompt=f"durable {seed}", controls=(LINES,))


def canvas(side=32):
    return Image(side, side, bytes((i * 7) % 256 for i in range(side * side * 4)))


def expected(req):
    return FakeEngine().generate(req, {0: canvas(req.width)}, NullContext())[0].image


def rows(folder):
    """The job table as another process sees it: (job_id, state) pairs."""
    with sqlite3.connect(f"file:{folder / 'jobs.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT job_id, state FROM jobs ORDER BY seq").fetchall()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def wait_event(client, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = client.next_event(0.1)
        if event is not None and predicate(event):
            return event
    raise AssertionError("the event did not come")


def started(folder, **options):
    return ServerProcess(store_dir=folder, **options).__enter__()


# -- crashes: the server process killed with SIGKILL -----------------------------------

def test_a_result_survives_kill_9_and_resume_gives_the_same_pixels(tmp_path):
    folder = tmp_path / "store"
    req = request(11)
    server = started(folder, step_seconds=0.005)
    try:
        with Client.connect(server.url, server.token) as client:
            job = client.submit(req, {0: canvas()})
            before = client.wait(job, timeout=30, ack=False)  # read, never acknowledged
        server.kill()
    finally:
        server.__exit__()
    server = started(folder)
    try:
        with Client.connect(server.url, server.token) as client:
            client.resume(job)
            after = client.wait(job, timeout=30)  # and now acknowledged
        assert after.images == before.images
        assert after.images[0][1] == expected(req) and after.images[0][0].seed == 11
        # the ack reaches the disk: nothing of the job is left to come back
        assert wait_until(lambda: rows(folder) == [])
        assert not [p for p in folder.iterdir() if p.name.startswith(job)]
        server.kill()
    finally:
        server.__exit__()
    with ServerProcess(store_dir=folder) as server, \
            Client.connect(server.url, server.token) as client:
        client.resume(job)
        with pytest.raises(UnknownJob):
            client.wait(job, timeout=30)


def test_a_queued_job_and_the_running_one_survive_kill_9_and_complete(tmp_path):
    folder = tmp_path / "store"
    first, second = request(21, steps=40), request(22, steps=3)
    server = started(folder, step_seconds=0.05)
    try:
        with Client.connect(server.url, server.token) as client:
            running = client.submit(first, {0: canvas()})
            queued = client.submit(second, {0: canvas()})
            # ``queued`` is only sent once the job's inputs are on disk
            wait_event(client, lambda e: isinstance(e, Queued) and e.job_id == queued
                       and e.position == 1)
            assert wait_until(lambda: dict(rows(folder)).get(running) == "running")
        server.kill()
    finally:
        server.__exit__()
    with ServerProcess(store_dir=folder, step_seconds=0.001) as server, \
            Client.connect(server.url, server.token) as client:
        client.resume(running, queued)
        # the interrupted job runs again (same seed: same pixels), the queued one too
        assert client.wait(running, timeout=60).images[0][1] == expected(first)
        assert client.wait(queued, timeout=60).images[0][1] == expected(second)


def test_expired_results_do_not_come_back_after_a_restart(tmp_path):
    """Retention time is wall-clock time on disk: time the server was down counts."""
    folder = tmp_path / "store"
    server = started(folder, retention_seconds=1.5)
    try:
        with Client.connect(server.url, server.token) as client:
            job = client.submit(request(31), {0: canvas()})
            client.wait(job, timeout=30, ack=False)
        server.kill()
    finally:
        server.__exit__()
    time.sleep(2.0)
    with ServerProcess(store_dir=folder, retention_seconds=1.5) as server, \
            Client.connect(server.url, server.token) as client:
        client.resume(job)
        with pytest.raises(Expired):
            client.wait(job, timeout=30)
        assert wait_until(lambda: rows(folder) == [] and not list(folder.glob(f"{job}.*")))


def test_a_truncated_result_file_is_reported_typed(tmp_path):
    folder = tmp_path / "store"
    server = started(folder)
    try:
        with Client.connect(server.url, server.token) as client:
            job = client.submit(request(41), {0: canvas()})
            client.wait(job, timeout=30, ack=False)
        server.kill()
    finally:
        server.__exit__()
    result = folder / f"{job}.r0"
    result.write_bytes(result.read_bytes()[:100])  # a disk that lost the end of the file
    with ServerProcess(store_dir=folder) as server, \
            Client.connect(server.url, server.token) as client:
        client.resume(job)
        with pytest.raises(StoredJobDamaged) as info:
            client.wait(job, timeout=30)
        assert "submit it again" in info.value.message
        assert not result.exists()
        again = client.submit(request(42), {0: canvas()})  # and the server serves on
        assert client.wait(again, timeout=30).images[0][1] == expected(request(42))


# -- the store folder, in-process -----------------------------------------------------------

def thread_server(folder, **config):
    config.setdefault("port", 0)
    return ServerThread(FakeEngine(step_seconds=0.002), ServerConfig(store_dir=folder, **config))


def keep_one_result(folder, seed=51):
    with thread_server(folder) as server, Client.connect(server.url, server.token) as client:
        job = client.submit(request(seed), {0: canvas()})
        result = client.wait(job, timeout=30, ack=False)
    return job, result


@pytest.mark.parametrize("damage", ["garbage", "foreign"])
def test_a_damaged_or_foreign_database_is_set_aside_and_the_server_starts(tmp_path, caplog,
                                                                            damage):
    folder = tmp_path / "store"
    job, _ = keep_one_result(folder)
    for extra in folder.glob("jobs.sqlite-*"):
        extra.unlink()
    db = folder / "jobs.sqlite"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        db.unlink()
        with sqlite3.connect(db) as other:
            other.execute("CREATE TABLE photos (name TEXT)")
    caplog.set_level(logging.INFO, logger="backend.server.store")
    job2, result2 = keep_one_result(folder, seed=52)  # starts, serves, keeps results again
    assert (folder / "jobs.sqlite.damaged").exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "moved to jobs.sqlite.damaged" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback
    assert not list(folder.glob(f"{job}.*"))  # the old job's files went with its database
    with thread_server(folder) as server, Client.connect(server.url, server.token) as client:
        client.resume(job2)
        assert client.wait(job2, timeout=30).images == result2.images


def test_the_store_is_private_to_the_user(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    keep_one_result(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert any(p.name.endswith(".r0") for p in files) and (folder / "jobs.sqlite").exists()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.name: 0o600 for p in files}


def test_files_without_a_row_are_cleaned_at_start(tmp_path):
    folder = tmp_path / "store"
    job, result = keep_one_result(folder)
    stray = new_job_id()
    (folder / f"{stray}.r0").write_bytes(b"x" * 64)  # a crash after the file, before the row
    (folder / f"{job}.r0.tmp").write_bytes(b"half")  # a crash while writing
    (folder / "notes.txt").write_text("not ours")
    with thread_server(folder) as server, Client.connect(server.url, server.token) as client:
        client.resume(job)
        assert client.wait(job, timeout=30).images == result.images
    names = {p.name for p in folder.iterdir()}
    assert f"{stray}.r0" not in names and f"{job}.r0.tmp" not in names
    assert "notes.txt" in names


def test_a_second_server_on_the_same_store_keeps_jobs_in_memory(tmp_path, caplog):
    folder = tmp_path / "store"
    caplog.set_level(logging.WARNING, logger="backend.server.store")
    with thread_server(folder) as first, thread_server(folder) as second:
        assert first.server.manager.store is not None
        assert second.server.manager.store is None
        with Client.connect(second.url, second.token) as client:
            assert client.wait(client.submit(request(61), {0: canvas()}), timeout=30).images
    assert "another ControlCanvas server is using" in caplog.text


def test_a_job_kept_with_cancel_on_disconnect_comes_back_cancelled(tmp_path):
    folder = tmp_path / "store"
    store = DiskJobStore(folder)
    message = Generate(job_id=new_job_id(), request=request(71), cancel_on_disconnect=True)
    store.add(Job(message=message, images={}, submitter="conn-1"), {0: canvas()}).result()
    store.close()
    store = DiskJobStore(folder)
    (job,) = store.load()
    store.close()
    assert job.state == CANCELLED and isinstance(job.error, Cancelled)
    assert "disconnected" in job.error.message


def test_a_job_that_keeps_killing_the_server_is_failed_not_rerun(tmp_path):
    """Each start of a job is counted on disk before it runs: a job running at
    MAX_ATTEMPTS deaths is failed with ``interrupted`` (no crash loop)."""
    folder = tmp_path / "store"
    message = Generate(job_id=new_job_id(), request=request(81))
    store = DiskJobStore(folder)
    job = Job(message=message, images={}, submitter="conn-1")
    job.stored = store.add(job, {0: canvas()})
    store.started(job)
    store.close()  # the server dies while it runs the job
    for attempt in range(2, store_module.MAX_ATTEMPTS + 1):
        store = DiskJobStore(folder)
        (job,) = store.load()
        assert job.state == QUEUED and job.images[0] == canvas()  # it runs again
        store.started(job)
        store.close()  # and dies again
    store = DiskJobStore(folder)
    (job,) = store.load()
    assert job.state == FAILED and isinstance(job.error, Interrupted)
    assert not list(folder.glob(f"{message.job_id}.in*"))
    store.close()
    store = DiskJobStore(folder)  # the decision is kept
    (job,) = store.load()
    assert job.state == FAILED and job.error.code == "interrupted"
    store.close()


def test_a_graceful_stop_keeps_queued_and_running_jobs_for_the_next_start(tmp_path):
    folder = tmp_path / "store"
    first, second = request(91, steps=150), request(92)
    with ServerThread(FakeEngine(step_seconds=0.02), ServerConfig(port=0, store_dir=folder)) \
            as server, Client.connect(server.url, server.token) as client:
        running = client.submit(first, {0: canvas()})
        queued = client.submit(second, {0: canvas()})
        wait_event(client, lambda e: isinstance(e, Queued) and e.job_id == queued)
        assert wait_until(lambda: dict(rows(folder)).get(running) == "running")
    assert sorted(state for _, state in rows(folder)) == ["queued", "queued"]
    with thread_server(folder) as server, Client.connect(server.url, server.token) as client:
        client.resume(running, queued)
        assert client.wait(running, timeout=60).images[0][1] == expected(first)
        assert client.wait(queued, timeout=60).images[0][1] == expected(second)


def test_results_over_the_byte_budget_are_dropped_at_start(tmp_path):
    folder = tmp_path / "store"
    old, _ = keep_one_result(folder, seed=101)
    new, result = keep_one_result(folder, seed=102)
    one = 32 * 32 * 4
    with thread_server(folder, retention_bytes=one) as server, \
            Client.connect(server.url, server.token) as client:
        client.resume(old)
        with pytest.raises(Expired):
            client.wait(old, timeout=30)
        client.resume(new)
        assert client.wait(new, timeout=30).images == result.images
    assert not list(folder.glob(f"{old}.*"))


def test_a_failed_write_leaves_the_job_in_memory(tmp_path, monkeypatch, caplog):
    """A full disk costs durability, not the job."""
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(DiskJobStore, "_write_image", full)
    caplog.set_level(logging.WARNING, logger="backend.server.store")
    job, result = keep_one_result(tmp_path / "store")
    assert result.images[0][1] == expected(request(51))
    assert "No space left on device" in caplog.text
    assert not any(r.exc_info for r in caplog.records)


def test_serve_keeps_jobs_in_the_user_cache_folder_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTROLCANVAS_STORE_DIR")
    monkeypatch.setenv("CONTROLCANVAS_CACHE_DIR", str(tmp_path / "cache"))
    config = build_config({}, tmp_path / "none.toml")
    assert config.store_dir == default_store_dir() == tmp_path / "cache" / "jobs"
    assert build_config({"store_dir": "none"}, tmp_path / "none.toml").store_dir is None
    assert build_config({"store_dir": str(tmp_path / "s")}, tmp_path / "none.toml") \
        .store_dir == Path(tmp_path / "s")
    assert ServerConfig().store_dir is None  # servers built in code: memory only
    with pytest.raises(ValueError, match="store_dir"):
        build_config({"store_dir": 5}, tmp_path / "none.toml")


# -- the manager waits for the store where the order matters ----------------------------

class HeldStore:
    """A store whose writes finish only when the test says so."""

    def __init__(self):
        import concurrent.futures
        self.added = concurrent.futures.Future()
        self.results = []

    def load(self):
        return []

    def add(self, job, images):
        return self.added

    def started(self, job):
        job.stored.result()

    def finished(self, job, result, error):
        import concurrent.futures
        self.results.append(job.job_id)
        done = concurrent.futures.Future()
        done.set_result(True)
        return done

    def requeue(self, job):
        pass

    def forget(self, job_ids):
        pass

    def close(self):
        pass


def test_a_job_is_announced_and_run_only_once_the_store_holds_it(loop):
    from backend.server.jobs import DONE, JobManager
    store = HeldStore()
    manager = JobManager(FakeEngine(), loop, store=store)
    owner = Recorder("a")
    progress = []
    owner.job_progress = lambda job, step, total, stage: progress.append(step)
    message = Generate(job_id=new_job_id(), request=request(111))
    job = on_loop(loop, manager.submit, message, {0: canvas()}, owner)
    time.sleep(0.3)
    assert owner.queued == {} and progress == [] and owner.finished == []  # client: nothing
    store.added.set_result(True)
    assert wait_until(lambda: job.state == DONE)
    assert progress and owner.finished == store.results == [job.job_id]
    manager.close()
