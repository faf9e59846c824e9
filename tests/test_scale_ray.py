"""Ray Serve behind the real front (backend.engines.rayserve): a local Ray on this machine,
two CPU replicas of the tiny engine; results, progress and previews stream back, a cancel
reaches the replica, and a replica dying mid-job fails only that job (worker_lost).

One Ray for the whole module (it takes ~10-20 s to start on two cores); it is shut down at
the end, leaving no process behind."""

import os
import time

import pytest

if os.environ.get("CONTROLCANVAS_REQUIRE_RAY") == "1":  # CI: a missing extra fails
    import ray.serve  # noqa: F401
else:
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")

from backend.engines.base import NullContext  # noqa: E402
from backend.server.config import ServerConfig  # noqa: E402
from backend.server.local import ServerThread  # noqa: E402
from shared.client import Client  # noqa: E402
from shared.errors import Cancelled, WorkerLost  # noqa: E402
from shared.messages import GenerateRequest, Progress  # noqa: E402
from shared.session import PreviewReady  # noqa: E402


class _MortalTiny:
    """The tiny engine, except that a job with the prompt "die" kills its replica's process
    after its first step (as a GPU host crashing would)."""

    def __init__(self):
        from backend.engines.factory import create_engine
        self._tiny = create_engine("tiny", cpu_threads=1)
        self.name = "tiny"

    def generate(self, request, images, ctx):
        if request.prompt == "die":
            ctx.progress(1, request.steps)
            time.sleep(0.2)
            os._exit(1)
        return self._tiny.generate(request, images, ctx)

    def preprocess(self, message, image, ctx):
        return self._tiny.preprocess(message, image, ctx)

    def models(self):
        return self._tiny.models()

    def close(self):
        self._tiny.close()


def mortal_tiny():
    return _MortalTiny()


def request(prompt="a cat", steps=4, seed=7):
    return GenerateRequest(width=64, height=64, steps=steps, prompt=prompt, seed=seed)


@pytest.fixture(scope="module")
def ray_server():
    from backend.engines.rayserve import RayDeployment, ray_engine
    spec = RayDeployment(factory="tests.test_scale_ray:mortal_tiny", min_replicas=2,
                         max_replicas=2, gpus_per_replica=0)
    engine = ray_engine(spec)
    server = ServerThread(engine, ServerConfig(port=0))
    try:
        server.start()
    except BaseException:
        engine.close()
        raise
    yield server
    server.stop()  # closes the engine: deletes the deployment and stops Ray
    import ray
    assert not ray.is_initialized()


def test_jobs_stream_back_through_ray_with_progress_and_previews(ray_server):
    local = _MortalTiny()
    expected = local.generate(request(seed=11), {}, NullContext())[0].image
    with Client.connect(ray_server.url, ray_server.token) as a, \
            Client.connect(ray_server.url, ray_server.token) as b:
        jobs = [(a, a.submit(request(seed=11), {}, preview_every=2)),
                (b, b.submit(request(seed=11), {}))]
        events = []
        results = [client.wait(job, on_event=events.append, timeout=120) for client, job in jobs]
    assert all(r.images[0][1].data == expected.data for r in results)  # same pixels as here
    assert any(isinstance(e, Progress) and e.step == 4 for e in events)
    assert any(isinstance(e, PreviewReady) for e in events)


def test_a_cancel_reaches_the_replica(ray_server):
    with Client.connect(ray_server.url, ray_server.token) as client:
        job = client.submit(request(steps=150), {})
        while True:
            event = client.next_event(120)
            if isinstance(event, Progress) and event.job_id == job and event.step >= 1:
                break
        client.cancel(job)
        with pytest.raises(Cancelled):
            client.wait(job, on_event=lambda e: None, timeout=60)
        assert client.wait(client.submit(request(), {}), timeout=120).images


def test_a_replica_dying_mid_job_fails_that_job_and_the_front_stays_up(ray_server):
    with Client.connect(ray_server.url, ray_server.token) as client:
        doomed = client.submit(request(prompt="die"), {})
        with pytest.raises(WorkerLost):
            client.wait(doomed, on_event=lambda e: None, timeout=120)
        after = [client.submit(request(seed=s), {}) for s in (1, 2)]
        assert all(client.wait(job, timeout=180).images for job in after)
