"""``controlcanvas bench live``: a scripted artist paints while the canvas regenerates.

Per engine (the tiny random-weight model and the trained demo model), against a server in
its own process:

* **draw**: the artist adds a stroke to a canvas ``rate`` times a second and sends each
  state as a live job (``Generate.live``), as the Krita plug-in does after its debounce;
  on the server each supersedes the previous one.  Stroke-to-preview latency of an edit
  = from the edit until the first frame that includes it arrives (the result of that edit's
  job, or of a later one when a newer edit superseded it); p50 / p95, frames shown, frames
  dropped (superseded), edits left without a frame when the run ended.
* **bare**: interleaved with the drawing (after each second of it, while the server is
  idle), the bare diffusers ControlNet pipeline on the same model, steps, shape and
  scheduler, in this process, on the same number of threads; ``ratio`` = latency p95 /
  bare median (target <= 1.2), ``ratio_p50`` = latency p50 / bare median (the overhead
  without the machine's jitter), ``ratio_p95`` = latency p95 / bare p95 (tail to tail).
* **rss**: the server's resident memory after the warm-up and at the end.
* **contention**: another client's long jobs (40 steps x 2 images, back to back) run while
  the artist paints, on a server that preempts between steps and on one that does not
  (``live_preemption`` off): per edit, how long until a job with it started on the engine
  (p50 / p95 / max), against one step of the long job (the bound with preemption) and one
  long job (the bound without), and the stroke-to-preview latency p95.

Everything on the CPU by default; nothing is downloaded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from shared.client import Client
from shared.images import Image
from shared.messages import ControlUnit, Error, GenerateRequest, Progress
from shared.session import ResultReady

from ..engines import tiny
from ..engines.catalogue import demo_folder
from ..imaging import to_array
from .process import ServerProcess, rss_mb

PROMPT = "a red coat"
TARGET_RATIO = 1.2


class Artist:
    """A canvas the artist draws on: each edit adds a short stroke (a random walk)."""

    def __init__(self, side: int, seed: int = 0) -> None:
        self.side = side
        self.rng = np.random.default_rng(seed)
        self.canvas = np.zeros((side, side, 4), np.uint8)
        self.canvas[..., 3] = 255
        self.pen = np.array([side // 2, side // 2])

    def edit(self) -> Image:
        for _ in range(3):
            step = self.rng.integers(-3, 4, 2)
            self.pen = np.clip(self.pen + step, 2, self.side - 3)
            y, x = self.pen
            self.canvas[y - 1:y + 1, x - 1:x + 1, :3] = 255
        if self.rng.random() < 0.05:  # now and then the artist wipes a corner
            self.canvas[: self.side // 4, : self.side // 4, :3] = 0
        return Image(self.side, self.side, self.canvas.tobytes())


def live_request(side: int, steps: int, sampler: str = "lcm") -> GenerateRequest:
    return GenerateRequest(width=side, height=side, prompt=PROMPT, seed=7, steps=steps, cfg=1.0,
                           sampler=sampler,
                           controls=(ControlUnit(condition="scribble", image=0),))


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value * 1000.0, 1)


@dataclass
class _Stream:
    """The live jobs of one drawing session: when each was sent, started, shown."""
    sent: Dict[str, float] = field(default_factory=dict)  # job id -> edit time
    order: List[str] = field(default_factory=list)
    started: Dict[str, float] = field(default_factory=dict)
    shown: Dict[str, float] = field(default_factory=dict)
    dropped: int = 0
    failed: List[str] = field(default_factory=list)

    def take(self, client: Client, event) -> None:
        job_id = getattr(event, "job_id", None)
        if job_id not in self.sent:
            return
        now = time.perf_counter()
        if isinstance(event, Progress) and event.stage == "start":
            self.started.setdefault(job_id, now)
        elif isinstance(event, ResultReady):
            self.shown[job_id] = now
            client.ack(job_id)
        elif isinstance(event, Error):
            if event.code == "superseded":
                self.dropped += 1
            else:
                self.failed.append(f"{event.code}: {event.message}")

    def pending(self) -> bool:
        last = self.order[-1] if self.order else None
        return last is not None and last not in self.shown and not self.failed and \
            self.dropped + len(self.shown) < len(self.order)

    def latencies(self) -> List[float]:
        """Per edit: until the first frame of its job or a later one."""
        return self._per_edit(self.shown)

    def waits(self) -> List[float]:
        """Per edit: until its job or a later one started on the engine."""
        return self._per_edit(self.started)

    def _per_edit(self, when: Dict[str, float]) -> List[float]:
        out, first_after = [], None
        for job_id in reversed(self.order):
            if job_id in when:
                first_after = when[job_id] if first_after is None else \
                    min(first_after, when[job_id])
            if first_after is not None:
                out.append(first_after - self.sent[job_id])
        return out


def _pump(client: Client, stream: _Stream, until: float) -> None:
    while True:
        left = until - time.perf_counter()
        if left <= 0:
            return
        event = client.next_event(left)
        if event is not None:
            stream.take(client, event)


def _settle(client: Client, stream: _Stream, timeout: float = 30.0) -> None:
    """Wait until the last live job is shown or dropped."""
    deadline = time.perf_counter() + timeout
    while stream.pending() and time.perf_counter() < deadline:
        _pump(client, stream, min(deadline, time.perf_counter() + 0.05))


def _draw(client: Client, artist: Artist, request: GenerateRequest, stream: _Stream,
          seconds: float, rate: float) -> None:
    start = time.perf_counter()
    edits = max(1, int(round(seconds * rate)))
    for i in range(edits):
        due = start + i / rate
        _pump(client, stream, due)
        image = artist.edit()
        sent = time.perf_counter()
        job = client.submit(request, {0: image}, live=True)
        stream.sent[job] = sent
        stream.order.append(job)
    _pump(client, stream, start + edits / rate)


def _bare_pipeline(engine: str, threads: int):
    """diffusers' own ControlNet pipeline on the model the engine uses."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.set_num_threads(threads)
    if engine == "demo":
        base, net_folder = demo_folder() / "base", demo_folder() / "controlnet"
    else:
        base = tiny.ensure_tiny("sd15")
        net_folder = Path(base) / "controlnets" / "lines"
    with tiny.quiet_progress_bars():
        net = ControlNetModel.from_pretrained(net_folder, local_files_only=True)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            base, controlnet=net, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bare_call(pipe, request: GenerateRequest, artist: Artist) -> Callable[[], Any]:
    import torch
    from PIL import Image as PILImage

    from ..engines.diffusers.samplers import make_scheduler

    scheduler = make_scheduler(request.sampler, dict(pipe.scheduler.config))

    def call():
        control = PILImage.fromarray(np.ascontiguousarray(to_array(artist.edit())[..., :3]))
        pipe.scheduler = scheduler
        generator = torch.Generator().manual_seed(request.seed)
        return pipe(request.prompt, image=control, num_inference_steps=request.steps,
                    guidance_scale=request.cfg, generator=generator, height=request.height,
                    width=request.width, output_type="np").images[0]
    return call


def bench_engine_live(engine: str = "tiny", seconds: float = 30.0, rate: float = 10.0,
                      steps: int = 4, side: int = 64, threads: int = 1) -> Dict[str, Any]:
    """The draw / bare / rss figures of one engine (see the module docstring)."""
    request = live_request(side, steps)
    artist = Artist(side)
    stream = _Stream()
    bare_times: List[float] = []
    pipe = _bare_pipeline(engine, threads)
    bare = _bare_call(pipe, request, Artist(side, seed=1))
    bare()  # warm-up
    options = dict(engine=engine, engine_options={"cpu_threads": threads})
    with ServerProcess(**options) as server:
        client = Client.connect(server.url, server.token, client="bench live")
        warm = client.submit(request, {0: artist.edit()}, live=True)
        client.wait(warm, timeout=300)
        rss_start = rss_mb(server.pid)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _draw(client, artist, request, stream, min(1.0, seconds), rate)
            _settle(client, stream)
            for _ in range(2):  # the bare pipeline, interleaved, while the server idles
                began = time.perf_counter()
                bare()
                bare_times.append(time.perf_counter() - began)
        rss_end = rss_mb(server.pid)
        client.close()
    latencies = stream.latencies()
    p95 = _percentile(latencies, 0.95)
    bare_median = statistics.median(bare_times)
    return {
        "engine": engine, "seconds": seconds, "edits_per_s": rate, "steps": steps,
        "shape": [side, side], "threads": threads, "edits": len(stream.order),
        "frames_shown": len(stream.shown), "frames_dropped": stream.dropped,
        "edits_without_frame": len(stream.order) - len(latencies),
        "failed": stream.failed[:3],
        "latency_p50_ms": _ms(_percentile(latencies, 0.5)), "latency_p95_ms": _ms(p95),
        "latency_max_ms": _ms(max(latencies) if latencies else None),
        "bare_median_ms": _ms(bare_median), "bare_p95_ms": _ms(_percentile(bare_times, 0.95)),
        "bare_runs": len(bare_times),
        "ratio": round(p95 / bare_median, 3) if p95 else None, "target_ratio": TARGET_RATIO,
        "ratio_p50": round(_percentile(latencies, 0.5) / bare_median, 3) if p95 else None,
        "ratio_p95": round(p95 / _percentile(bare_times, 0.95), 3) if p95 else None,
        "server_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
    }


def bench_contention(engine: str = "tiny", seconds: float = 4.0, rate: float = 10.0,
                     steps: int = 4, side: int = 64, long_steps: int = 40,
                     threads: int = 1) -> Dict[str, Any]:
    """Live jobs while another client's long job runs, with and without preemption."""
    out: Dict[str, Any] = {"engine": engine, "long_job_steps": long_steps}
    request = live_request(side, steps)
    long_job = GenerateRequest(width=side, height=side, prompt="a long batch", seed=3,
                               steps=long_steps, cfg=5.0, batch=2,
                               controls=(ControlUnit(condition="scribble", image=0),))
    for preempt in (True, False):
        artist = Artist(side, seed=2)
        stream = _Stream()
        with ServerProcess(engine=engine, engine_options={"cpu_threads": threads},
                           live_preemption=preempt) as server:
            artist_client = Client.connect(server.url, server.token, client="bench artist")
            other = Client.connect(server.url, server.token, client="bench batch")
            artist_client.wait(artist_client.submit(request, {0: artist.edit()}, live=True),
                               timeout=300)
            began = time.perf_counter()
            other.wait(other.submit(long_job, {0: artist.edit()}), timeout=300)
            long_seconds = time.perf_counter() - began
            # long jobs back to back for the whole drawing (and one more)
            jobs = [other.submit(long_job, {0: artist.edit()})
                    for _ in range(int(seconds / long_seconds) + 2)]
            time.sleep(min(0.3, long_seconds / 4))  # the first is running
            _draw(artist_client, artist, request, stream, seconds, rate)
            _settle(artist_client, stream, timeout=long_seconds * 3 + 30)
            for job in jobs:
                other.wait(job, timeout=300)
            artist_client.close()
            other.close()
        waits = stream.waits()
        step = long_seconds / (long_steps * long_job.batch)
        out["preemption" if preempt else "no_preemption"] = {
            "live_jobs": len(stream.order), "frames_shown": len(stream.shown),
            "wait_p50_ms": _ms(_percentile(waits, 0.5)),
            "wait_p95_ms": _ms(_percentile(waits, 0.95)),
            "wait_max_ms": _ms(max(waits) if waits else None),
            "latency_p95_ms": _ms(_percentile(stream.latencies(), 0.95)),
            "long_job_step_ms": _ms(step), "long_job_ms": _ms(long_seconds)}
    return out


def bench_live(seconds: float = 30.0, engines: Sequence[str] = ("tiny", "demo"),
               rate: float = 10.0, steps: int = 4, side: int = 64,
               contention: bool = True) -> Dict[str, Any]:
    """``controlcanvas bench live``: one JSON object (see the module docstring)."""
    result: Dict[str, Any] = {"name": "live", "engines": {}}
    for engine in engines:
        result["engines"][engine] = bench_engine_live(engine, seconds, rate, steps, side)
    if contention:
        result["contention"] = bench_contention(engines[0], min(4.0, seconds), rate, steps,
                                                side)
    return result
