"""``controlcanvas bench NAME``: figures as one JSON object.

Comparisons are measured side by side in one run, interleaved (A, B, A, B, ...),
and carry ``ratio`` = ours / reference, computed from the medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

from shared.client import Client
from shared.images import Image

from . import engine as bench_engine
from . import gpu as bench_gpu
from . import training as bench_training
from .process import ServerProcess
from .soak import bench_soak


def _interleave(ours: Callable[[], None], reference: Callable[[], None], repeats: int) -> Dict:
    ours(), reference()  # warm-up: connections, allocators, caches
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((ours, a), (reference, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    med_a, med_b = statistics.median(a), statistics.median(b)
    return {"ours_median_s": round(med_a, 5), "reference_median_s": round(med_b, 5),
            "ours_min_s": round(min(a), 5), "reference_min_s": round(min(b), 5),
            "ratio": round(med_a / med_b, 4), "repeats": repeats}


def bench_transport(repeats: int = 15, side: int = 2048) -> Dict:
    """Round trip of a side x side RGBA frame: our protocol vs a bare websockets echo.

    Both servers run in a separate process, as the real server does (a client and
    a server sharing one interpreter would mostly measure GIL hand-offs).
    """
    from websockets.sync.client import connect


    pixels = bytes(range(256)) * (side * side * 4 // 256)
    image = Image(side, side, pixels)
    frame_bytes = len(pixels)
    with ServerProcess(echo_max_size=frame_bytes + 1024) as server:
        client = Client.connect(server.url, server.token, client="bench")
        raw = connect(f"ws://127.0.0.1:{server.echo_port}", max_size=frame_bytes + 1024,
                      compression=None)

        def ours() -> None:
            job = client.preprocess("none", image)
            result = client.wait(job)
            assert result.images[0][1].data == pixels

        def reference() -> None:
            raw.send(pixels)
            assert raw.recv() == pixels

        figures = _interleave(ours, reference, repeats)
        client.close()
        raw.close()
    figures.update({"name": "transport", "side": side, "frame_bytes": frame_bytes,
                    "ours": "preprocess job (identity annotator, fake engine) through "
                            "shared.client + backend.server.websocket, server in its own process",
                    "reference": "bare websockets echo of the same bytes, same process",
                    "target_ratio": 1.2})
    return figures


def _soak(args) -> Dict:
    return bench_soak(fuzz_cases=args.cases, clients=args.clients, crashes=args.crashes)


def _engine_bench(name: str):
    def run(args) -> Dict:
        figures = bench_engine.run(name)
        figures.setdefault("name", name)
        return figures
    return run


def _gpu(args) -> Dict:
    from pathlib import Path

    return bench_gpu.run(dry_run=True if args.dry_run else None,
                         groups=[g for g in args.groups.split(",") if g],
                         deadline_s=args.deadline, compile_mode=args.compile_mode,
                         out_file=Path(args.out) if args.out else None,
                         work_dir=Path(args.work_dir) if args.work_dir else None)


def _lora_bench() -> Dict:
    from .lora import bench_lora_cost  # torch and peft: only when chosen
    return bench_lora_cost()


def _memory_bench() -> Dict:
    from .memory import bench_memory  # torch: only when chosen
    return bench_memory()


def _live_bench(args) -> Dict:
    from .live import bench_live  # torch: only when chosen
    return bench_live(seconds=args.seconds, rate=args.rate,
                      engines=[e for e in args.engines.split(",") if e],
                      contention=not args.no_contention)


def _scale_bench(args) -> Dict:
    from .scale import bench_scale
    workers = [int(n) for n in args.workers.split(",") if n.strip()]
    return bench_scale(workers=workers, clients=args.clients_at_once, jobs=args.jobs,
                       steps=args.steps, step_seconds=args.step_seconds,
                       engine=args.scale_engine, ray=False if args.no_ray else None)


def _training_bench(name: str) -> Dict:
    return getattr(bench_training, name)()


BENCHES = {
    "transport": lambda args: bench_transport(args.repeats, args.side),
    "soak": _soak,
    "engine": _engine_bench("engine"),
    "controlnet-cost": _engine_bench("controlnet-cost"),
    "scaling": _engine_bench("scaling"),
    "fidelity": lambda args: _training_bench("bench_fidelity"),
    "train-cost": lambda args: _training_bench("bench_train_cost"),
    "gpu": _gpu,
    "lora-cost": lambda args: _lora_bench(),
    "live": _live_bench,
    "scale": _scale_bench,
    "memory": lambda args: _memory_bench(),
}


def run(name: str, args) -> Dict:
    return BENCHES[name](args)
