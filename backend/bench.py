"""``controlcanvas bench NAME``: figures as one JSON object.

Comparisons are measured side by side in one run, interleaved (A, B, A, B, ...),
and carry ``ratio`` = ours / reference, computed from the medians.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Callable, Dict

from shared.client import Client
from shared.images import Image


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


def _bench_servers(pipe, max_size: int) -> None:
    """Child process: our server (fake engine) and a bare websockets echo server,
    configured alike (no compression, same max_size), in one event loop."""
    import logging

    from websockets.asyncio.server import serve

    from .config import ServerConfig
    from .engine import FakeEngine
    from .server import Server

    logging.disable(logging.INFO)

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        ours = Server(ServerConfig(port=0), FakeEngine(), token="bench")
        await ours.start()
        bare = await serve(echo, "127.0.0.1", 0, max_size=max_size, compression=None)
        pipe.send((ours.url, bare.sockets[0].getsockname()[1]))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pipe.recv)  # parent says stop
        bare.close()
        await ours.close()

    asyncio.run(main())


def bench_transport(repeats: int = 15, side: int = 2048) -> Dict:
    """Round trip of a side x side RGBA frame: our protocol vs a bare websockets echo.

    Both servers run in a separate process, as the real server does (a client and
    a server sharing one interpreter would mostly measure GIL hand-offs).
    """
    import multiprocessing

    from websockets.sync.client import connect

    pixels = bytes(range(256)) * (side * side * 4 // 256)
    image = Image(side, side, pixels)
    frame_bytes = len(pixels)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_bench_servers, args=(child, frame_bytes + 1024), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("benchmark servers did not start")
        url, echo_port = parent.recv()
        client = Client.connect(url, "bench", client="bench")
        raw = connect(f"ws://127.0.0.1:{echo_port}", max_size=frame_bytes + 1024,
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
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    figures.update({"name": "transport", "side": side, "frame_bytes": frame_bytes,
                    "ours": "preprocess job (identity annotator, fake engine) through "
                            "shared.client + backend.server, server in its own process",
                    "reference": "bare websockets echo of the same bytes, same process",
                    "target_ratio": 1.2})
    return figures


BENCHES = {"transport": lambda args: bench_transport(args.repeats, args.side)}


def run(name: str, args) -> Dict:
    return BENCHES[name](args)
