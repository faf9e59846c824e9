"""backend.server.jobs: fairness, retention and expiry, driven on a private event loop."""

import asyncio
import threading
import time

import pytest

from backend.engines.fake import FakeEngine
from backend.server.jobs import CANCELLED, DONE, JobManager
from shared.errors import Expired, QueueFull, UnknownJob
from shared.images import Image
from shared.messages import Generate, GenerateRequest, new_job_id


class Recorder:
    def __init__(self, key):
        self.key = key
        self.finished = []
        self.queued = {}

    def job_queued(self, job, position):
        self.queued[job.job_id] = position

    def job_progress(self, job, step, total, stage):
        pass

    def job_preview(self, job, step, image):
        pass

    def job_finished(self, job):
        self.finished.append(job.job_id)


class Gate(FakeEngine):
    """Runs one job at a time only when the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.order = []
        self.gate = threading.Semaphore(0)

    def generate(self, request, images, ctx):
        self.gate.acquire()
        self.order.append(request.prompt)
        return super().generate(request, images, ctx)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def on_loop(loop, func, *args):
    return asyncio.run_coroutine_threadsafe(_call(func, *args), loop).result(5)


async def _call(func, *args):
    return func(*args)


def gen(prompt, steps=1, width=8):
    return Generate(job_id=new_job_id(), request=GenerateRequest(width=width, height=8,
                                                                 prompt=prompt, steps=steps,
                                                                 seed=1))


def wait_for(condition, timeout=5):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_round_robin_between_clients(loop):
    engine = Gate()
    manager = JobManager(engine, loop)
    a, b = Recorder("a"), Recorder("b")
    for prompt in ("a1", "a2", "a3"):
        on_loop(loop, manager.submit, gen(prompt), {}, a)
    for prompt in ("b1", "b2"):
        on_loop(loop, manager.submit, gen(prompt), {}, b)
    for _ in range(5):
        engine.gate.release()
    wait_for(lambda: len(engine.order) == 5)
    # a1 was taken first; then the lanes alternate: no client starves
    assert engine.order == ["a1", "b1", "a2", "b2", "a3"]
    manager.close()


def test_positions_are_announced(loop):
    engine = Gate()
    manager = JobManager(engine, loop)
    a = Recorder("a")
    jobs = [on_loop(loop, manager.submit, gen(f"p{i}"), {}, a) for i in range(3)]
    wait_for(lambda: len(a.queued) == 3 and a.queued[jobs[2].job_id] == 2)
    assert a.queued[jobs[1].job_id] == 1
    for _ in range(3):
        engine.gate.release()
    manager.close()


def test_queue_limit(loop):
    engine = Gate()
    manager = JobManager(engine, loop, max_queue=2)
    a = Recorder("a")
    on_loop(loop, manager.submit, gen("run"), {}, a)
    wait_for(lambda: manager._running is not None)
    on_loop(loop, manager.submit, gen("q1"), {}, a)
    on_loop(loop, manager.submit, gen("q2"), {}, a)
    with pytest.raises(QueueFull):
        on_loop(loop, manager.submit, gen("q3"), {}, a)
    for _ in range(3):
        engine.gate.release()
    manager.close()


def test_retention_by_time_then_expired_on_resume(loop):
    manager = JobManager(FakeEngine(), loop, retention_seconds=60)
    owner = Recorder("a")
    job = on_loop(loop, manager.submit, gen("x"), {}, owner)
    wait_for(lambda: job.state == DONE)
    assert on_loop(loop, manager.expire, time.monotonic() + 30) == 0
    assert on_loop(loop, manager.expire, time.monotonic() + 61) == 1
    (problem,) = on_loop(loop, manager.resume, [job.job_id], owner)
    assert isinstance(problem, Expired)
    (problem,) = on_loop(loop, manager.resume, [new_job_id()], owner)
    assert isinstance(problem, UnknownJob)
    manager.close()


def test_retention_by_memory_drops_oldest_first(loop):
    manager = JobManager(FakeEngine(), loop, retention_bytes=3 * 64 * 8 * 4)
    owner = Recorder("a")
    jobs = []
    for i in range(5):
        jobs.append(on_loop(loop, manager.submit, gen(f"x{i}", width=64), {}, owner))
        wait_for(lambda: jobs[-1].state == DONE)
    kept = [j.job_id for j in jobs if j.job_id in manager.jobs]
    assert kept == [j.job_id for j in jobs[2:]]
    assert manager.kept_bytes <= manager.retention_bytes
    manager.close()


def test_ack_frees_only_own_finished_jobs(loop):
    manager = JobManager(FakeEngine(), loop)
    a, b = Recorder("a"), Recorder("b")
    job = on_loop(loop, manager.submit, gen("x"), {}, a)
    wait_for(lambda: job.state == DONE)
    on_loop(loop, manager.ack, [job.job_id], b)
    assert job.job_id in manager.jobs
    on_loop(loop, manager.ack, [job.job_id], a)
    assert job.job_id not in manager.jobs
    manager.close()


def test_detach_orphans_and_cancel_on_disconnect(loop):
    engine = Gate()
    manager = JobManager(engine, loop)
    owner = Recorder("a")
    keep = on_loop(loop, manager.submit, gen("keep"), {}, owner)
    drop_msg = gen("drop")
    drop = on_loop(loop, manager.submit,
                   Generate(job_id=drop_msg.job_id, request=drop_msg.request,
                            cancel_on_disconnect=True), {}, owner)
    on_loop(loop, manager.detach, owner)
    assert keep.owner is None and drop.state == CANCELLED
    engine.gate.release()
    wait_for(lambda: keep.state == DONE)
    manager.close()


def test_inputs_released_after_finish(loop):
    manager = JobManager(FakeEngine(), loop)
    owner = Recorder("a")
    message = Generate(job_id=new_job_id(), request=GenerateRequest(
        width=8, height=8, mode="img2img", init_image=0, seed=3))
    job = on_loop(loop, manager.submit, message, {0: Image.filled(8, 8)}, owner)
    wait_for(lambda: job.state == DONE)
    assert job.images == {}
    manager.close()


def test_dropped_results_are_given_back_to_the_system(loop, monkeypatch):
    """Acked or expired result bytes add up; past TRIM_AFTER_BYTES the heap is trimmed."""
    from backend.server import jobs as jobs_module

    trims = []
    monkeypatch.setattr(jobs_module, "release_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(jobs_module, "TRIM_AFTER_BYTES", 2 * 64 * 8 * 4)
    manager = JobManager(FakeEngine(), loop, retention_seconds=60)
    owner = Recorder("a")
    done = []
    for i in range(3):
        done.append(on_loop(loop, manager.submit, gen(f"x{i}", width=64), {}, owner))
        wait_for(lambda: done[-1].state == DONE)
    on_loop(loop, manager.ack, [done[0].job_id], owner)
    assert trims == []  # one result (2 KiB) is below the threshold
    on_loop(loop, manager.expire, time.monotonic() + 61)  # the other two expire
    assert trims == [1] and manager._unreleased == 0  # one trim once all three are gone
    manager.close()


def test_release_heap_runs_on_linux():
    import sys

    from backend.server.jobs import release_heap
    assert release_heap() == sys.platform.startswith("linux")


# -- per-client accounting (issue 18, findings 3 and 4) -----------------------------------

RESULT = 64 * 8 * 4  # bytes of one gen(width=64) result


def test_one_client_over_its_share_loses_its_own_oldest_first(loop):
    """A client that never collects cannot push out another client's results: past its
    own share, its own oldest go first."""
    manager = JobManager(FakeEngine(), loop, retention_bytes=10 * RESULT,
                         retention_bytes_per_client=3 * RESULT)
    hoarder, other = Recorder("hoarder"), Recorder("other")
    theirs = on_loop(loop, manager.submit, gen("other", width=64), {}, other)
    wait_for(lambda: theirs.state == DONE)
    mine = []
    for i in range(6):
        mine.append(on_loop(loop, manager.submit, gen(f"h{i}", width=64), {}, hoarder))
        wait_for(lambda: mine[-1].state == DONE)
    assert theirs.job_id in manager.jobs  # the oldest of all, yet kept
    assert [j.job_id for j in mine if j.job_id in manager.jobs] == [j.job_id for j in mine[3:]]
    total, per_client = manager.held_bytes()
    assert per_client["hoarder"] == 3 * RESULT and total == 4 * RESULT
    assert all(j.dropped == "expired" and j.result == () for j in mine[:3])  # bytes let go
    manager.close()


def test_results_on_their_way_count_against_retention(loop):
    """Bytes held outside the job table (a result being written to a client that does
    not read) count too: the table keeps less."""
    outside = {"a": 0}
    manager = JobManager(FakeEngine(), loop, retention_bytes=4 * RESULT,
                         held_outside=lambda: dict(outside))
    owner = Recorder("a")
    jobs = []
    for i in range(4):
        jobs.append(on_loop(loop, manager.submit, gen(f"x{i}", width=64), {}, owner))
        wait_for(lambda: jobs[-1].state == DONE)
    assert all(j.job_id in manager.jobs for j in jobs)
    outside["a"] = 2 * RESULT
    on_loop(loop, manager.expire)
    assert [j.job_id for j in jobs if j.job_id in manager.jobs] == [j.job_id for j in jobs[2:]]
    assert manager.held_bytes()[0] == 4 * RESULT
    manager.close()


def test_jobs_per_client_capped_others_unaffected(loop):
    engine = Gate()
    manager = JobManager(engine, loop, max_jobs_per_client=2)
    a, b = Recorder("a"), Recorder("b")
    for i in range(2):
        on_loop(loop, manager.submit, gen(f"a{i}"), {}, a)
    wait_for(lambda: manager._running is not None)  # one running, one queued: both count
    with pytest.raises(QueueFull, match="limit per client is 2"):
        on_loop(loop, manager.submit, gen("a2"), {}, a)
    on_loop(loop, manager.submit, gen("b0"), {}, b)
    for _ in range(3):
        engine.gate.release()
    manager.close()
