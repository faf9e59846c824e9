"""Several workers behind one server (backend.server.workers, backend.engines.group):
placement by loaded models, fairness by client across workers, cancel on one worker,
a worker whose device fails, and the real front over sockets."""

import threading

import pytest

from backend.engines.fake import FakeEngine
from backend.engines.group import EngineGroup, create_engines, parse_devices
from backend.server.jobs import CANCELLED, DONE, FAILED, JobManager
from shared.client import Client
from shared.errors import Cancelled, ConfigError, WorkerLost
from shared.messages import ControlUnit, Generate, GenerateRequest, new_job_id

from tests.test_jobs import Recorder, loop, on_loop, wait_for  # noqa: F401 (fixture)


class Held(FakeEngine):
    """Each job waits until the test releases it; records what it ran and where."""

    def __init__(self, name, log):
        super().__init__()
        self.label, self.log = name, log
        self.gate = threading.Semaphore(0)
        self.running = threading.Event()

    def generate(self, request, images, ctx):
        self.log.append((request.prompt, self.label))
        self.running.set()
        while not self.gate.acquire(timeout=0.005):
            ctx.check_cancelled()
        self.running.clear()
        return super().generate(request, images, ctx)


def group(n, log):
    engines = [Held(f"w{i}", log) for i in range(n)]
    return EngineGroup(engines, [f"cpu{i}" for i in range(n)]), engines


def gen(prompt, base="", controls=()):
    units = tuple(ControlUnit(condition="lineart", image=0, model=m) for m in controls)
    return Generate(job_id=new_job_id(), request=GenerateRequest(
        width=8, height=8, prompt=prompt, steps=1, seed=1, base_model=base, controls=units))


def images_for(message):
    from shared.images import Image
    return {0: Image.filled(8, 8, (0, 0, 0, 255))} if message.request.controls else {}


def submit(loop, manager, message, owner):
    return on_loop(loop, manager.submit, message, images_for(message), owner)


def release_all(engines, times=20):
    for engine in engines:
        for _ in range(times):
            engine.gate.release()


def test_two_workers_run_two_jobs_at_once(loop):
    log = []
    engine, engines = group(2, log)
    manager = JobManager(engine, loop)
    a, b = Recorder("a"), Recorder("b")
    submit(loop, manager, gen("a1"), a)
    submit(loop, manager, gen("b1"), b)
    wait_for(lambda: all(e.running.is_set() for e in engines))  # both held at once
    assert sorted(w for _, w in log) == ["w0", "w1"]
    release_all(engines)
    wait_for(lambda: len(a.finished) == 1 and len(b.finished) == 1)
    manager.close()


def test_a_job_goes_to_the_worker_that_holds_its_models(loop):
    log = []
    engine, engines = group(2, log)
    manager = JobManager(engine, loop)
    a = Recorder("a")
    release_all(engines)
    first = submit(loop, manager, gen("x", base="base-x", controls=("cn-lines",)), a)
    wait_for(lambda: first.state == DONE)
    second = submit(loop, manager, gen("y", base="base-y"), a)
    wait_for(lambda: second.state == DONE)
    assert first.worker != second.worker  # nothing loaded for y: the least used worker
    # each base goes back to the worker that holds it (not round robin, not least used)
    for prompt, base, controls in [("x", "base-x", ("cn-lines",))] * 3 + [("y", "base-y", ())] * 3:
        again = submit(loop, manager, gen(prompt, base=base, controls=controls), a)
        wait_for(lambda: again.state == DONE)
        assert again.worker == (first.worker if prompt == "x" else second.worker)
    manager.close()


def test_fairness_by_client_holds_across_workers(loop):
    """Client a queues six jobs before b queues two: with two workers, b's jobs start
    as soon as a worker frees up, alternating with a's, not after all of a's."""
    log = []
    engine, engines = group(2, log)
    manager = JobManager(engine, loop)
    a, b = Recorder("a"), Recorder("b")
    jobs = [submit(loop, manager, gen(f"a{i}"), a) for i in range(6)]
    wait_for(lambda: len(log) == 2)  # a0, a1 hold both workers
    jobs += [submit(loop, manager, gen(f"b{i}"), b) for i in range(2)]
    release_all(engines)
    wait_for(lambda: len(a.finished) + len(b.finished) == 8)
    order = [j.message.request.prompt for j in sorted(jobs, key=lambda j: j.started_at)]
    assert order == ["a0", "a1", "b0", "a2", "b1", "a3", "a4", "a5"]
    manager.close()


def test_cancel_stops_the_job_on_its_worker_only(loop):
    log = []
    engine, engines = group(2, log)
    manager = JobManager(engine, loop)
    a, b = Recorder("a"), Recorder("b")
    keep = submit(loop, manager, gen("keep"), a)
    stop = submit(loop, manager, gen("stop"), b)
    wait_for(lambda: all(e.running.is_set() for e in engines))
    on_loop(loop, manager.cancel, stop.job_id, b)
    wait_for(lambda: stop.state == CANCELLED)
    assert keep.state == "running"
    release_all(engines)
    wait_for(lambda: keep.state == DONE)
    manager.close()


class DeviceGone(BaseException):
    """What a worker thread sees when its device is gone (not an ordinary job failure)."""


class Dying(Held):
    def generate(self, request, images, ctx):
        if request.prompt == "crash":
            raise DeviceGone("GPU fell off the bus")
        return super().generate(request, images, ctx)


@pytest.mark.parametrize("how", ["thread", "cuda"])
def test_a_worker_whose_device_fails_fails_its_job_and_the_others_go_on(loop, how):
    log = []
    dying = Dying("w1", log)
    if how == "cuda":  # torch's RuntimeError after which the device is unusable
        def crash(request, images, ctx):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        dying.generate = crash
    healthy = Held("w0", log)
    manager = JobManager(EngineGroup([healthy, dying], ["cpu0", "cpu1"]), loop)
    a, b = Recorder("a"), Recorder("b")
    hold = submit(loop, manager, gen("hold"), a)
    wait_for(lambda: healthy.running.is_set())  # w0 busy: the next job goes to w1
    crash = submit(loop, manager, gen("crash"), b)
    wait_for(lambda: crash.state == FAILED)
    assert isinstance(crash.error, WorkerLost) and crash.error.code == "worker_lost"
    after = [submit(loop, manager, gen(f"after{i}"), b) for i in range(2)]
    release_all([healthy])
    wait_for(lambda: hold.state == DONE and all(j.state == DONE for j in after))
    assert {j.worker for j in after} == {hold.worker}  # the lost worker takes nothing
    manager.close()


def test_when_every_worker_is_lost_queued_jobs_fail_and_new_ones_are_refused(loop):
    log = []
    dying = Dying("w0", log)
    manager = JobManager(EngineGroup([dying], ["cpu0"]), loop)
    a = Recorder("a")
    crash = submit(loop, manager, gen("crash"), a)
    wait_for(lambda: crash.state == FAILED)
    with pytest.raises(WorkerLost):
        submit(loop, manager, gen("later"), a)
    manager.close()


def test_devices_option():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="twice"):
        parse_devices("cuda:0,cuda:0")
    with pytest.raises(ConfigError, match="names no device"):
        parse_devices(" , ")
    from backend.engines.factory import create_engine
    engine = create_engines(create_engine, "fake", ["cpu", "cpu"], step_seconds=0.0)
    assert isinstance(engine, EngineGroup) and len(engine.engines) == 2
    assert engine.info()["workers"] == 2
    single = create_engines(create_engine, "fake", ["cpu"])
    assert isinstance(single, FakeEngine)


def test_the_front_stays_up_when_a_worker_dies(make_server):
    """Over the real websocket front: the job on the failed worker ends with worker_lost,
    progress and results of the others arrive as before, and a cancel works."""
    log = []
    healthy, dying = FakeEngine(step_seconds=0.01), Dying("w1", log)
    release_all([dying], 50)
    server = make_server(EngineGroup([healthy, dying], ["cpu0", "cpu1"]))
    with Client.connect(server.url, server.token) as client:
        long = client.submit(GenerateRequest(width=8, height=8, steps=150, prompt="long"), {})
        crash = client.submit(GenerateRequest(width=8, height=8, steps=1, prompt="crash"), {})
        with pytest.raises(WorkerLost):
            client.wait(crash, on_event=lambda e: None)
        client.cancel(long)
        with pytest.raises(Cancelled):
            client.wait(long, on_event=lambda e: None)
        steps = []
        done = client.submit(GenerateRequest(width=8, height=8, steps=3, prompt="ok"), {})
        result = client.wait(done, on_event=lambda e: steps.append(getattr(e, "step", None)))
        assert result.images and 3 in steps


def test_bench_scale_reports_each_worker_count():
    from backend.bench.scale import bench_scale
    figures = bench_scale(workers=(1, 2), clients=2, jobs=2, steps=2, step_seconds=0.01,
                          ray=False)
    for n in ("1", "2"):
        run = figures["workers"][n]
        assert run["jobs"] == 4 and not run["errors"]
        assert {"jobs_per_s", "p95_latency_s", "fairness_jain", "ratio"} <= set(run)


def test_serve_devices_option_gives_one_engine_per_device(tmp_path):
    from backend.cli.main import _server_overrides, build_parser
    from backend.server.config import build_config
    from backend.server.scale import serving_engine
    args = build_parser().parse_args(["serve", "--engine", "fake", "--devices", "cpu,cpu",
                                      "--config", str(tmp_path / "config.toml")])
    config = build_config(_server_overrides(args), args.config)
    engine = serving_engine(config)
    assert isinstance(engine, EngineGroup) and engine.devices == ["cpu", "cpu"]
    (tmp_path / "config.toml").write_text('[server]\ndevices = "cpu,cpu,cpu"\n'
                                          'engine = "fake"\n')
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "config.toml")])
    assert len(serving_engine(build_config(_server_overrides(args), args.config)).engines) == 3


def test_ray_without_the_extra_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray[serve] were not installed
    from backend.engines.rayserve import RayDeployment, ray_engine
    with pytest.raises(ConfigError, match=r"controlcanvas\[scale\]"):
        ray_engine(RayDeployment(engine="fake"))
