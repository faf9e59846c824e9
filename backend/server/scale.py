"""The engine a server runs on, from its config: one engine, one per device (several
GPUs on this host), or a Ray Serve deployment (several hosts). See docs/remote.md."""

from __future__ import annotations

from ..engines.base import Engine
from ..engines.factory import create_engine
from ..engines.group import create_engines, parse_devices
from .config import ServerConfig


def serving_engine(config: ServerConfig) -> Engine:
    """What ``controlcanvas serve`` generates with (its job manager starts one worker per
    engine of a group: backend.server.jobs)."""
    options = dict(config.engine_options)
    if config.ray:
        from ..engines.rayserve import RayDeployment, ray_engine  # ray: only when chosen
        deployment = RayDeployment(engine=config.engine, engine_options=options,
                                   step_seconds=config.step_seconds,
                                   address=config.ray_address,
                                   min_replicas=config.ray_min_replicas,
                                   max_replicas=config.ray_max_replicas,
                                   gpus_per_replica=config.ray_gpus_per_replica)
        return ray_engine(deployment)
    if config.devices:
        options.pop("device", None)  # each engine gets its own
        return create_engines(create_engine, config.engine, parse_devices(config.devices),
                              step_seconds=config.step_seconds, **options)
    return create_engine(config.engine, step_seconds=config.step_seconds, **options)
