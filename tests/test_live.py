"""Live painting on the server (docs/live.md): a client's new live job supersedes its
previous one, superseded results are dropped, live jobs are never stored, they take a
priority lane, and with an engine that can pause between steps they run between two
steps of another client's long job.  Driven on a private event loop (JobManager) and
through the real websocket server with the fake engine."""

from __future__ import annotations

import json
import threading
import time

import pytest

from backend.engines.base import NullContext
from backend.engines.fake import FakeEngine
from backend.server.jobs import CANCELLED, DONE, JobManager
from backend.server.store import DiskJobStore
from shared.client import Client
from shared.errors import FieldError, Superseded
from shared.images import Image
from shared.messages import (CLIENT_MESSAGES, SERVER_MESSAGES, Generate, GenerateRequest, Models,
                             PresetInfo, from_json, new_job_id, to_json)
from tests.test_jobs import loop, on_loop  # noqa: F401 (loop is a fixture)
from tests.test_store import rows
from tiny_fixtures import torch_threads  # noqa: F401 (a fixture)


class Owner:
    """A connection as the job manager sees it: remembers every finished job."""

    def __init__(self, key):
        self.key = key
        self.label = key
        self.done = []
        self.finished_event = threading.Event()

    def job_queued(self, job, position):
        pass

    def job_progress(self, job, step, total, stage):
        pass

    def job_preview(self, job, step, image):
        pass

    def job_finished(self, job):
        self.done.append((job, job.state, job.error, job.result))
        self.finished_event.set()

    def outcome(self, job_id):
        for job, state, error, result in self.done:
            if job.job_id == job_id:
                return state, error, result
        return None


class StepLog(FakeEngine):
    """The fake engine, logging (prompt, step, time) of every finished step."""

    def __init__(self, step_seconds=0.01, preempts=True):
        super().__init__(step_seconds=step_seconds)
        self.preempts_between_steps = preempts
        self.steps = []
        self.starts = {}

    def generate(self, request, images, ctx):
        self.starts.setdefault(request.prompt, time.monotonic())

        class Logged:
            def __getattr__(_, name):
                return getattr(ctx, name)

            def progress(_, step, total, stage="denoise"):
                self.steps.append((request.prompt, step, time.monotonic()))
                ctx.progress(step, total, stage)

        return super().generate(request, images, Logged())


def gen(prompt, steps=2, live=False, side=8):
    return Generate(job_id=new_job_id(), live=live,
                    request=GenerateRequest(width=side, height=side, prompt=prompt,
                                            steps=steps, seed=1))


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- the protocol ----------------------------------------------------------------------------

def test_live_and_preset_travel_only_when_set_so_older_servers_still_read_requests():
    plain = gen("p")
    text = to_json(plain)
    assert '"live"' not in text and '"preset"' not in text
    assert from_json(text, CLIENT_MESSAGES) == plain
    live = Generate(job_id=new_job_id(), live=True,
                    request=GenerateRequest(prompt="p", preset="lcm-sd15", steps=4))
    back = from_json(to_json(live), CLIENT_MESSAGES)
    assert back.live and back.request.preset == "lcm-sd15"
    with pytest.raises(FieldError, match="one frame"):
        Generate(job_id=new_job_id(), live=True, request=GenerateRequest(batch=2))
    with pytest.raises(FieldError) as err:
        GenerateRequest(preset="../x")
    assert err.value.field == "preset"
    # a server's presets are left out when it has none, and a client reads them when sent
    assert '"presets"' not in to_json(Models())
    models = Models(presets=(PresetInfo(name="lcm-sd15", family="sd15", commercial=True),))
    assert from_json(to_json(models), SERVER_MESSAGES).presets[0].name == "lcm-sd15"
    raw = json.loads(to_json(live))
    assert raw["live"] is True


# -- supersede ----------------------------------------------------------------------------

def test_a_new_live_job_replaces_the_queued_one_and_cancels_the_running_one(loop):
    engine = StepLog(step_seconds=0.02)
    manager = JobManager(engine, loop)
    a = Owner("a")
    first = on_loop(loop, manager.submit, gen("live1", steps=50, live=True), {}, a)
    wait_for(lambda: any(p == "live1" for p, _, _ in engine.steps))
    second = on_loop(loop, manager.submit, gen("live2", steps=50, live=True), {}, a)
    third = on_loop(loop, manager.submit, gen("live3", steps=2, live=True), {}, a)
    wait_for(lambda: a.outcome(third.job_id) is not None)
    # the running one stopped at its next check, the queued one never ran
    for job in (first, second):
        state, error, result = a.outcome(job.job_id)
        assert state == CANCELLED and isinstance(error, Superseded) and result == ()
    assert a.outcome(third.job_id)[0] == DONE
    assert max(s for p, s, _ in engine.steps if p == "live1") < 50
    assert "live2" not in {p for p, _, _ in engine.steps}
    assert manager.live_stats["superseded"] == 2
    manager.close()


def test_a_running_frame_past_half_its_steps_ends_and_the_new_one_follows(loop):
    """A client sending faster than frames take still sees frames: a running live job past
    half its steps is not cancelled by the next one."""
    engine = StepLog(step_seconds=0.01)
    manager = JobManager(engine, loop)
    a = Owner("a")
    first = on_loop(loop, manager.submit, gen("half", steps=10, live=True), {}, a)
    wait_for(lambda: sum(p == "half" for p, _, _ in engine.steps) >= 6)
    second = on_loop(loop, manager.submit, gen("next", steps=2, live=True), {}, a)
    wait_for(lambda: a.outcome(second.job_id) is not None)
    assert a.outcome(first.job_id)[0] == DONE and a.outcome(first.job_id)[2]
    assert a.outcome(second.job_id)[0] == DONE
    assert [p for p, s, _ in engine.steps].count("half") == 10
    manager.close()


def test_a_finished_live_frame_not_collected_yet_is_dropped_by_the_next_one(loop):
    manager = JobManager(FakeEngine(), loop)
    a = Owner("a")
    first = on_loop(loop, manager.submit, gen("f1", live=True, side=64), {}, a)
    wait_for(lambda: a.outcome(first.job_id) is not None)
    assert first.kept_bytes == 64 * 64 * 4  # waiting for the client's ack
    on_loop(loop, manager.submit, gen("f2", live=True, side=64), {}, a)
    assert first.dropped == "superseded" and first.result == ()
    assert first.job_id not in manager.jobs
    manager.close()


def test_clients_do_not_supersede_each_other(loop):
    manager = JobManager(FakeEngine(step_seconds=0.005), loop)
    a, b = Owner("a"), Owner("b")
    ja = on_loop(loop, manager.submit, gen("a", live=True), {}, a)
    jb = on_loop(loop, manager.submit, gen("b", live=True), {}, b)
    wait_for(lambda: a.outcome(ja.job_id) and b.outcome(jb.job_id))
    assert a.outcome(ja.job_id)[0] == DONE and b.outcome(jb.job_id)[0] == DONE
    manager.close()


def test_live_jobs_are_never_stored_and_a_gone_client_takes_them_along(loop, tmp_path):
    store = DiskJobStore(tmp_path / "store")
    manager = JobManager(StepLog(step_seconds=0.02), loop, store=store)
    a = Owner("a")
    done = on_loop(loop, manager.submit, gen("kept?", live=True), {}, a)
    wait_for(lambda: a.outcome(done.job_id) is not None)
    running = on_loop(loop, manager.submit, gen("long", steps=100, live=True), {}, a)
    wait_for(lambda: running.state == "running")
    assert rows(tmp_path / "store") == []  # neither the queued, the running nor the result
    on_loop(loop, manager.detach, a)
    wait_for(lambda: running.state == CANCELLED)
    assert done.job_id not in manager.jobs and running.job_id not in manager.jobs or \
        running.state == CANCELLED
    manager.close()
    store = DiskJobStore(tmp_path / "store")
    assert store.load() == []
    store.close()


def test_a_live_frame_finished_after_its_client_left_is_not_kept(loop):
    from tests.test_jobs import Gate
    engine = Gate()  # no cancel check once it runs: the frame completes after all
    manager = JobManager(engine, loop)
    a = Owner("a")
    job = on_loop(loop, manager.submit, gen("orphan", live=True, side=64), {}, a)
    wait_for(lambda: job.state == "running")
    on_loop(loop, manager.detach, a)
    engine.gate.release()
    wait_for(lambda: job.finished_at > 0)
    time.sleep(0.05)
    assert job.job_id not in manager.jobs and manager.kept_bytes == 0
    manager.close()


# -- the priority lane ------------------------------------------------------------------------

def test_without_preemption_a_live_job_waits_for_one_job_of_another_client(loop):
    engine = StepLog(step_seconds=0.005, preempts=False)
    manager = JobManager(engine, loop)
    assert not manager.preemption
    a, b = Owner("a"), Owner("b")
    on_loop(loop, manager.submit, gen("b1", steps=10), {}, b)
    on_loop(loop, manager.submit, gen("b2", steps=10), {}, b)
    on_loop(loop, manager.submit, gen("b3", steps=10), {}, b)
    wait_for(lambda: "b1" in engine.starts)
    live = on_loop(loop, manager.submit, gen("live", live=True), {}, a)
    wait_for(lambda: a.outcome(live.job_id) is not None and len(b.done) == 3)
    order = sorted(engine.starts, key=engine.starts.get)
    assert order == ["b1", "live", "b2", "b3"]  # jumped the queue, behind one job only
    manager.close()


def test_live_jobs_run_between_two_steps_of_another_clients_batch(loop):
    engine = StepLog(step_seconds=0.01)
    manager = JobManager(engine, loop)
    assert manager.preemption
    a, b = Owner("a"), Owner("b")
    batch = on_loop(loop, manager.submit, gen("batch", steps=60), {}, b)
    wait_for(lambda: sum(p == "batch" for p, _, _ in engine.steps) >= 3)
    submitted = time.monotonic()
    live = on_loop(loop, manager.submit, gen("live", steps=3, live=True), {}, a)
    wait_for(lambda: a.outcome(live.job_id) is not None)
    assert batch.state == "running"  # the batch was paused, not finished first
    first_live = min(t for p, _, t in engine.steps if p == "live")
    waited = [s for p, s, t in engine.steps if p == "batch" and submitted < t < first_live]
    assert len(waited) <= 1, waited  # at most the step in progress when it came
    wait_for(lambda: b.outcome(batch.job_id) is not None)
    assert b.outcome(batch.job_id)[0] == DONE
    steps = [s for p, s, _ in engine.steps if p == "batch"]
    assert steps == list(range(1, 61))  # every step once, in order
    assert manager.live_stats["nested"] == 1
    manager.close()


def test_a_live_artist_cannot_starve_another_clients_job(loop):
    engine = StepLog(step_seconds=0.004)
    manager = JobManager(engine, loop)
    a, b = Owner("a"), Owner("b")
    stop = threading.Event()

    def artist():
        while not stop.is_set():
            on_loop(loop, manager.submit, gen("live", steps=3, live=True), {}, a)
            # 100 edits/s (ten times an artist's): at 500/s on a loaded machine every frame
            # was superseded before its first step, so the test never saw a live step
            time.sleep(0.01)

    thread = threading.Thread(target=artist)
    thread.start()
    try:
        wait_for(lambda: any(p == "live" for p, _, _ in engine.steps))
        batch = on_loop(loop, manager.submit, gen("batch", steps=20), {}, b)
        wait_for(lambda: b.outcome(batch.job_id) is not None, timeout=30)
    finally:
        stop.set()
        thread.join()
    assert b.outcome(batch.job_id)[0] == DONE
    # between two live rounds the batch took at least one step
    order = [p for p, _, _ in engine.steps]
    start = order.index("batch")
    runs = "".join("b" if p == "batch" else "l" for p in order[start:])
    assert "bb" in runs or runs.count("b") == 20
    manager.close()


# -- end to end --------------------------------------------------------------------------------

def test_over_the_wire_a_superseded_frame_arrives_as_an_error_and_the_newest_as_a_result(
        make_server):
    server = make_server(StepLog(step_seconds=0.02))
    with Client.connect(server.url, server.token, client="live test") as client:
        request = GenerateRequest(width=16, height=16, prompt="stroke", steps=20, seed=3)
        old = client.submit(request, {}, live=True)
        new = client.submit(GenerateRequest(width=16, height=16, prompt="stroke 2", steps=2,
                                            seed=3), {}, live=True)
        with pytest.raises(Superseded):
            client.wait(old, timeout=10)
        result = client.wait(new, timeout=10)
        expected = FakeEngine().generate(
            GenerateRequest(width=16, height=16, prompt="stroke 2", steps=2, seed=3), {},
            NullContext())[0].image
        assert result.images[0][1] == expected
    assert server.server.manager.kept_bytes == 0


def test_a_live_frame_arrives_with_the_seed_it_was_asked_for(make_server):
    server = make_server(FakeEngine())
    with Client.connect(server.url, server.token) as client:
        image = Image(8, 8, bytes(8 * 8 * 4))
        from shared.messages import ControlUnit
        request = GenerateRequest(width=8, height=8, seed=42, steps=1,
                                  controls=(ControlUnit(condition="scribble", image=0),))
        result = client.wait(client.submit(request, {0: image}, live=True), timeout=10)
        assert result.seeds == (42,)


# -- the benchmark (figures: `controlcanvas bench live`; here only that it runs) -------------

def test_bench_live_runs_a_short_session_and_reports_every_figure(torch_threads):
    from backend.bench.live import Artist, bench_live

    first = Artist(32).edit()
    assert Artist(32).edit() == first and Artist(32, seed=1).edit() != first  # scripted
    result = bench_live(seconds=2.0, engines=("tiny",), contention=False)
    tiny = result["engines"]["tiny"]
    assert tiny["edits"] == 20 and tiny["failed"] == []
    assert tiny["frames_shown"] >= 1 and tiny["frames_shown"] + tiny["frames_dropped"] <= 20
    assert tiny["latency_p50_ms"] <= tiny["latency_p95_ms"] <= tiny["latency_max_ms"]
    assert tiny["bare_median_ms"] > 0 and tiny["ratio"] > 0 and tiny["bare_runs"] >= 4
    assert tiny["server_rss_mb"]["start"] > 0 and tiny["server_rss_mb"]["end"] > 0
