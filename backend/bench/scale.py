"""``controlcanvas bench scale``: one server with 1, 2 and 4 workers (and Ray Serve
replicas) under several clients at once: throughput against one worker, fairness between
the clients, latency.

Each client submits its jobs at once and waits for all of them; the server runs in its
own process (backend.bench.process), the clients on threads here. The fake engine's steps
sleep a fixed time, so N workers should finish the same work close to N times faster
(``target_ratio`` 0.9·N); the tiny engine's steps use the CPU, so on a machine with fewer
cores than workers the ratio shows the cores, not the scheduler.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Dict, List, Optional, Sequence

from shared.client import Client
from shared.messages import GenerateRequest

from .process import ServerProcess


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when every value is equal, 1/n when one takes all."""
    total = sum(values)
    return total * total / (len(values) * sum(v * v for v in values)) if total else 1.0


def _client(url: str, token: str, name: str, jobs: int, steps: int, side: int,
            latencies: List[float], done_at: Dict[str, float], errors: List[str]) -> None:
    try:
        with Client.connect(url, token, client=name) as client:
            sent = {}
            for i in range(jobs):
                request = GenerateRequest(width=side, height=side, steps=steps,
                                          prompt=f"{name} {i}", seed=i)
                sent[client.submit(request, {})] = time.perf_counter()
            for job_id, t0 in sent.items():
                client.wait(job_id, timeout=600)
                latencies.append(time.perf_counter() - t0)
            done_at[name] = time.perf_counter()
    except Exception as err:  # reported in the figures, not raised: the other runs go on
        errors.append(f"{name}: {type(err).__name__}: {err}")


def run_load(server_options: Dict, clients: int, jobs: int, steps: int, side: int) -> Dict:
    """One server, ``clients`` clients with ``jobs`` jobs each: the figures of that run."""
    with ServerProcess(**server_options) as server:
        # warm-up: connections, and each replica / worker's first job
        _client(server.url, server.token, "warm", 2, 1, side, [], {}, [])
        latencies: List[float] = []
        done_at: Dict[str, float] = {}
        errors: List[str] = []
        threads = [threading.Thread(target=_client, args=(server.url, server.token, f"c{i}",
                                                          jobs, steps, side, latencies,
                                                          done_at, errors))
                   for i in range(clients)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
    finished = [at - t0 for at in done_at.values()]
    return {"jobs": len(latencies), "wall_s": round(wall, 3),
            "jobs_per_s": round(len(latencies) / wall, 3),
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_latency_s": round(_percentile(latencies, 0.95), 3) if latencies else None,
            "fairness_jain": round(_jain(finished), 4) if finished else None,
            "client_spread": round(max(finished) / min(finished), 3) if finished else None,
            "errors": errors}


def bench_scale(workers: Sequence[int] = (1, 2, 4), clients: int = 6, jobs: int = 8,
                steps: int = 10, step_seconds: float = 0.02, engine: str = "fake",
                ray: Optional[bool] = None, side: int = 64) -> Dict:
    """Figures for each worker count (``ratio``: its throughput / one worker's), and with
    ``ray`` (default: when Ray Serve is installed) the same load through a local Ray Serve
    deployment of the largest replica count that fits, against as many in-process workers."""
    base = {"engine": engine, "step_seconds": step_seconds, "store_dir": None}
    if engine != "fake":
        base["engine_options"] = {"cpu_threads": 1}
    runs: Dict[str, Dict] = {}
    for n in workers:
        options = dict(base, devices=",".join(["cpu"] * n)) if n > 1 else dict(base)
        runs[str(n)] = run_load(options, clients, jobs, steps, side)
    one = runs[str(min(workers))]["jobs_per_s"]
    for n in workers:
        figures = runs[str(n)]
        figures["ratio"] = round(figures["jobs_per_s"] / one, 3)
        figures["target_ratio"] = round(0.9 * n / min(workers), 2)
    out = {"name": "scale", "engine": engine, "clients": clients, "jobs_per_client": jobs,
           "steps": steps, "step_seconds": step_seconds if engine == "fake" else None,
           "workers": runs}
    if ray is None:
        try:
            import ray as _ray  # noqa: F401
            from ray import serve as _serve  # noqa: F401
            ray = True
        except ImportError:
            ray = False
            out["ray"] = "skipped: Ray Serve is not installed (pip install 'ray[serve]')"
    if ray:
        out["ray"] = _ray_vs_workers(base, clients, jobs, steps, side, replicas=2)
    return out


def _ray_vs_workers(base: Dict, clients: int, jobs: int, steps: int, side: int,
                    replicas: int) -> Dict:
    """The same load on a local Ray Serve deployment and on as many in-process workers."""
    ray_options = dict(base, ray=True, ray_min_replicas=replicas, ray_max_replicas=replicas,
                       ray_gpus_per_replica=0.0)
    ours = run_load(ray_options, clients, jobs, steps, side)
    reference = run_load(dict(base, devices=",".join(["cpu"] * replicas)), clients, jobs,
                         steps, side)
    return {"replicas": replicas, "ray": ours, "in_process": reference,
            "ratio": round(ours["jobs_per_s"] / reference["jobs_per_s"], 3),
            "ratio_means": "Ray Serve throughput / in-process workers' throughput"}
