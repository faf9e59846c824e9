"""Generation as a Ray Serve deployment: several GPU hosts behind one ControlCanvas front.

The websocket front (auth, protocol, limits, the fair queue, retention, the store) stays
ours and runs where ``controlcanvas serve --ray`` runs; each job it starts is streamed to a
replica of the ``controlcanvas`` Ray Serve deployment (one GPU each, autoscaled between
``ray_min_replicas`` and ``ray_max_replicas``), and progress, previews and the result
stream back. Ray places the replicas on the cluster's GPU hosts and routes each request to
a free one. A replica dying mid-job ends that job with ``WorkerLost``; Ray starts a new
replica and the front goes on. A cancel from the client cancels the Ray request, which
stops the engine at its next cancel check.

``ray`` is an optional extra (``pip install 'controlcanvas[scale]'``): it is imported only
when a server is started with ``--ray``, and by the replicas themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Sequence

from shared.errors import (Cancelled, ConfigError, ControlCanvasError, WorkerLost,
                           error_from_code)
from shared.images import Image
from shared.messages import GenerateRequest, Models, Preprocess

from ..annotators.registry import Annotated
from .base import Generated, JobContext, Scalar
from .factory import create_engine
from .group import EngineGroup

log = logging.getLogger(__name__)

APP_NAME = "controlcanvas"
CANCEL_POLL_S = 0.02


@dataclass(frozen=True)
class RayDeployment:
    """How the deployment is built: the engine each replica runs and the replica bounds.
    ``factory`` (``"module:function"``, for tests) builds the engine instead."""
    engine: str = "diffusers"
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    step_seconds: float = 0.0
    address: str = ""  # "": start Ray on this machine; "auto" / "ray://host:10001": join
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 1.0
    factory: str = ""

    def check(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"ray_min_replicas ({self.min_replicas}) and ray_max_replicas "
                              f"({self.max_replicas}) must satisfy 0 <= min <= max, max >= 1.")
        if self.gpus_per_replica < 0:
            raise ConfigError(f"ray_gpus_per_replica must be 0 (CPU) or more; got "
                              f"{self.gpus_per_replica}.")

    @property
    def gpus(self) -> float:
        return 0.0 if self.engine == "fake" and not self.factory else self.gpus_per_replica


# -- the replica (runs in a Ray worker process) ------------------------------------------

class _ReplicaContext:
    """The JobContext the engine sees inside a replica: events go onto the stream."""

    job_id = "0" * 32

    def __init__(self, cancel: threading.Event, put, previews: FrozenSet[int]) -> None:
        self._cancel, self._put, self._previews = cancel, put, previews

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("The job was cancelled.")

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        self.check_cancelled()
        self._put(("progress", step, total, stage))

    def wants_preview(self, step: int) -> bool:
        return step in self._previews

    def preview(self, step: int, image: Image) -> None:
        self._put(("preview", step, image))

    def step_boundary(self) -> None:
        pass


class GenerationReplica:
    """One replica: one engine on the replica's GPU, one job at a time (the deployment's
    ``max_ongoing_requests`` is 1), its events streamed back as tuples."""

    def __init__(self, spec: RayDeployment) -> None:
        if spec.factory:
            module, _, name = spec.factory.partition(":")
            self.engine = getattr(importlib.import_module(module), name)()
        else:
            self.engine = create_engine(spec.engine, step_seconds=spec.step_seconds,
                                        **dict(spec.engine_options))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "controlcanvas-replica")

    async def run(self, kind: str, payload, images: Mapping[int, Image],
                  previews: FrozenSet[int]):
        loop = asyncio.get_running_loop()
        queue: "asyncio.Queue[tuple]" = asyncio.Queue()
        cancel = threading.Event()

        def put(item: tuple) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        ctx = _ReplicaContext(cancel, put, previews)
        loop.run_in_executor(self._pool, self._work, kind, payload, images, ctx, put)
        try:
            while True:
                item = await queue.get()
                yield item
                if item[0] in ("done", "error"):
                    return
        finally:  # the request was cancelled (or the front went): stop the engine too
            cancel.set()

    def _work(self, kind: str, payload, images, ctx: _ReplicaContext, put) -> None:
        try:
            if kind == "generate":
                out: Any = tuple((g.seed, g.image)
                                 for g in self.engine.generate(payload, images, ctx))
            else:
                annotated = self.engine.preprocess(payload, images[0], ctx)
                if isinstance(annotated, Image):
                    annotated = Annotated(annotated)
                out = (annotated.image, {k: v for k, v in annotated.info.items()
                                         if isinstance(v, (bool, int, float, str))})
            put(("done", out))
        except ControlCanvasError as err:
            put(("error", err.code, str(err)))
        except Exception as err:  # an engine bug: the job fails, the replica goes on
            log.exception("replica job failed")
            put(("error", "engine", f"The engine failed: {type(err).__name__}: {err}. See "
                                    f"the Ray worker's log; other jobs are not affected."))

    def models(self) -> Models:
        return self.engine.models()

    def pid(self) -> int:
        return os.getpid()


# -- the front's side ------------------------------------------------------------------

class RaySlot:
    """What one job worker of the front calls as its engine: it streams the job to a
    replica through the deployment handle (Ray picks the replica)."""

    preempts_between_steps = False  # the job runs elsewhere: no pause to fill here

    def __init__(self, handle, name: str, models: Models) -> None:
        self._handle, self.name, self._models = handle, name, models

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        # the steps the client wants a preview of, as the front's context says
        previews = frozenset(s for s in range(1, request.steps + 1) if ctx.wants_preview(s))
        out = self._stream("generate", request, dict(images), previews, ctx)
        return [Generated(image, seed) for seed, image in out]

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        image_out, info = self._stream("preprocess", message, {0: image}, frozenset(), ctx)
        return Annotated(image_out, info)

    def _stream(self, kind: str, payload, images, previews: FrozenSet[int], ctx: JobContext):
        import ray.exceptions
        from ray.serve import exceptions as serve_errors

        ctx.check_cancelled()
        response = self._handle.options(stream=True).run.remote(kind, payload, images,
                                                                 previews)
        stop = threading.Event()
        threading.Thread(target=_cancel_when_asked, args=(ctx, response, stop),
                         name="controlcanvas-ray-cancel", daemon=True).start()
        try:
            for item in response:
                if item[0] == "progress":
                    ctx.progress(item[1], item[2], item[3])
                elif item[0] == "preview":
                    ctx.preview(item[1], item[2])
                elif item[0] == "done":
                    return item[1]
                elif item[0] == "error":
                    raise error_from_code(item[1], item[2])
            raise WorkerLost("The Ray replica ended the job without a result; submit the "
                             "job again.")
        except Cancelled:
            response.cancel()
            raise
        except (serve_errors.RequestCancelledError, ray.exceptions.TaskCancelledError):
            ctx.check_cancelled()  # raises Cancelled: the client asked
            raise WorkerLost("Ray cancelled the job on its replica; submit it again.") \
                from None
        except ray.exceptions.RayError as err:
            log.warning("ray replica lost mid-job: %s: %s", type(err).__name__, err)
            raise WorkerLost() from None
        finally:
            stop.set()

    def models(self) -> Models:
        return self._models

    def close(self) -> None:
        pass


def _cancel_when_asked(ctx: JobContext, response, stop: threading.Event) -> None:
    """While a job streams, cancel its Ray request as soon as the client cancels."""
    while not stop.wait(CANCEL_POLL_S):
        try:
            ctx.check_cancelled()
        except Cancelled:
            response.cancel()
            return


class RayEngineGroup(EngineGroup):
    """The front's engine: one :class:`RaySlot` per replica it may use at once; closing it
    deletes the deployment (and stops Ray when this server started it)."""

    def __init__(self, slots: Sequence[RaySlot], spec: RayDeployment, started_ray: bool):
        super().__init__(slots, [f"ray:{i}" for i in range(len(slots))])
        self.spec, self._started_ray = spec, started_ray

    def info(self) -> Dict[str, Scalar]:
        return {"ray": True, "replicas": f"{self.spec.min_replicas}-{self.spec.max_replicas}",
                "gpus_per_replica": self.spec.gpus}

    def close(self) -> None:
        """Delete the deployment; stop Serve and Ray when they are this server's own (a
        local Ray), only disconnect from a cluster it joined."""
        import ray
        from ray import serve
        try:
            serve.delete(APP_NAME)
            if self._started_ray and not self.spec.address:
                serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()


def _connect(spec: RayDeployment) -> bool:
    """Join a cluster (``address``) or start Ray here; True when this call connected (the
    server disconnects at close), False when this process was connected already."""
    import ray
    if ray.is_initialized():
        return False
    if spec.address:
        ray.init(address=spec.address, namespace=APP_NAME, logging_level=logging.WARNING,
                 log_to_driver=False)  # replicas log on their hosts (Ray's session logs)
        return True
    # a local Ray: its workers import this very code (not another installed copy)
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=max(os.cpu_count() or 1, spec.max_replicas + 1),
             include_dashboard=False, namespace=APP_NAME, logging_level=logging.WARNING,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def ray_engine(spec: RayDeployment) -> RayEngineGroup:
    """Deploy the replicas and return the front's engine (one slot per replica at most)."""
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install 'controlcanvas[scale]' (or "
                          "pip install 'ray[serve]'), then start the server again.") from None
    spec.check()
    started = _connect(spec)
    try:
        serve.start(proxy_location="Disabled")
        scaling: Dict[str, Any] = ({"num_replicas": spec.min_replicas}
                                   if spec.min_replicas == spec.max_replicas else
                                   {"autoscaling_config": {
                                       "min_replicas": spec.min_replicas,
                                       "max_replicas": spec.max_replicas,
                                       "target_ongoing_requests": 1}})
        deployment = serve.deployment(GenerationReplica, name="generation",
                                      max_ongoing_requests=1,
                                      ray_actor_options={"num_gpus": spec.gpus},
                                      **scaling)
        handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)
        models = handle.models.remote().result()
    except BaseException:
        if started:
            import ray
            ray.shutdown()
        raise
    name = spec.engine if not spec.factory else "custom"
    slots: List[RaySlot] = [RaySlot(handle, name, models) for _ in range(spec.max_replicas)]
    return RayEngineGroup(slots, spec, started)
