"""``controlcanvas bench soak``: the spine's promises under attack and stress, in figures.

The server runs in its own process (as in real use), so its resident memory can be
measured from outside.  Four parts, each bounded in count and time, all traffic on
127.0.0.1:

- fuzz: random and mutated JSON messages and binary frames, decoded in-process and
  sent to the live server; counts untyped exceptions (crashes) and whether the
  server still answers afterwards (hangs);
- disconnect: clients that drop the socket at random points (before submit, right
  after it, mid-progress, while the result frames arrive), reconnect and resume;
  counts results lost and delivered twice;
- load: jobs from several concurrent clients; fairness, server RSS at start/end;
- cancel: latency from ``cancel`` to the ``cancelled`` error for a running job;
- per peer (see ``peers``): a pre-auth flood while a client connects and generates,
  a post-auth request flood against other clients' latency, and retention under a
  client that never reads.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from typing import Dict, List

from shared import codec
from shared.client import Client
from shared.errors import Cancelled, ControlCanvasError, UnknownJob
from shared.images import Image
from shared.messages import (CLIENT_MESSAGES, PROTOCOL_VERSION, ControlUnit, Generate,
                             GenerateRequest, Progress, Status, from_json, new_job_id,
                             to_dict, to_json)

from ..engines.base import NullContext
from ..engines.fake import FakeEngine
from .peers import postauth_flood, preauth_flood, retention_nonreader
from .process import ServerProcess
from .process import rss_mb as _rss_mb


def _request(seed: int, steps: int, side: int = 64) -> GenerateRequest:
    return GenerateRequest(width=side, height=side, prompt=f"soak {seed}", seed=seed,
                           steps=steps, controls=(ControlUnit(condition="scribble", image=0),))


def _canvas(side: int = 64) -> Image:
    return Image(side, side, bytes((i * 31) % 256 for i in range(side * side * 4)))


# -- fuzz ---------------------------------------------------------------------------

def _mutations(rng: random.Random, valid: dict):
    def mutate(obj):
        if isinstance(obj, dict) and obj and rng.random() < 0.8:
            obj = dict(obj)
            key = rng.choice(sorted(obj))
            roll = rng.random()
            if roll < 0.3:
                del obj[key]
            elif roll < 0.6:
                obj[key] = rng.choice([None, True, -1, 2**70, 1e308, "", "x" * 40, [], {}])
            elif roll < 0.7:
                obj["extra" + str(rng.randrange(9))] = 1
            else:
                obj[key] = mutate(obj[key])
            return obj
        if isinstance(obj, list) and obj:
            i = rng.randrange(len(obj))
            return obj[:i] + [mutate(obj[i])] + obj[i + 1:]
        return rng.choice([None, 0, -5, 3.5, "lineart", [1], {"a": 1}, float("inf")])
    while True:
        yield mutate(valid)


def _random_frame(rng: random.Random, good: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return good[:rng.randrange(len(good) + 1)]
    if roll < 0.6:  # a header that lies
        header = bytearray(good[:codec.HEADER_SIZE])
        pos = rng.randrange(4, codec.HEADER_SIZE)
        header[pos] = rng.randrange(256)
        return bytes(header) + good[codec.HEADER_SIZE:][:rng.randrange(300)]
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(80)))


def fuzz(server: ServerProcess, cases: int, seed: int = 7) -> Dict:
    from websockets.sync.client import connect

    rng = random.Random(seed)
    job = new_job_id()
    valid = to_dict(Generate(job_id=job, request=_request(1, 2)))
    good = codec.encode_frame(codec.KIND_INPUT, job, 0, _canvas(8))
    crashes: List[str] = []
    decoded = typed = 0
    mutated = _mutations(rng, valid)
    # in-process: the decoders themselves
    for _ in range(cases // 2):
        text = json.dumps(next(mutated)) if rng.random() < 0.9 else \
            "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(40)))
        try:
            from_json(text, CLIENT_MESSAGES)
            decoded += 1
        except ControlCanvasError:
            typed += 1
        except Exception as err:  # an untyped failure is a crash
            crashes.append(f"from_json: {type(err).__name__}: {err}")
        frame = _random_frame(rng, good)
        try:
            codec.decode_frame(frame, max_image_side=64, max_pixels=4096)
        except ControlCanvasError:
            typed += 1
        except Exception as err:
            crashes.append(f"decode_frame: {type(err).__name__}: {err}")
    # over the wire: the rest, in connections of 100 frames
    sent = errors_back = 0
    remaining = cases - cases // 2
    while remaining > 0:
        batch = min(100, remaining)
        remaining -= batch
        with connect(server.url, max_size=None, compression=None, max_queue=None,
                     close_timeout=1) as ws:
            ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                                "token": server.token}))
            for _ in range(batch):
                roll = rng.random()
                frame = (json.dumps(next(mutated)) if roll < 0.5
                         else _random_frame(rng, good) if roll < 0.9 else to_json(
                             Generate(job_id=new_job_id(), request=_request(2, 1))))
                try:
                    ws.send(frame)
                    sent += 1
                except Exception:
                    break
            ws.send(json.dumps({"type": "status"}))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                reply = ws.recv(20)
                if isinstance(reply, str):
                    kind = json.loads(reply)["type"]
                    errors_back += kind == "error"
                    if kind == "status":
                        break
            else:
                crashes.append("server did not answer 'status' after a fuzz batch (hang)")
    alive = _still_serving(server)
    return {"cases": cases, "decoded_ok": decoded, "refused_typed": typed,
            "frames_sent_to_server": sent, "error_replies": errors_back,
            "crashes": len(crashes), "crash_examples": crashes[:5],
            "server_alive_after": alive}


def _still_serving(server: ServerProcess) -> bool:
    try:
        with Client.connect(server.url, server.token, timeout=10) as client:
            client.status()
            job = client.submit(_request(3, 2), {0: _canvas()})
            return bool(client.wait(job, timeout=30).images)
    except Exception:
        return False


# -- disconnect soak -------------------------------------------------------------------

def _raw_client(server: ServerProcess):
    from websockets.sync.client import connect
    ws = connect(server.url, max_size=None, compression=None, close_timeout=1, legacy=True)
    ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": server.token}))
    assert json.loads(ws.recv(10))["type"] == "welcome"
    return ws


def _one_disconnect(server: ServerProcess, index: int, rng: random.Random, expected) -> Dict:
    """Submit, drop at a random point, reconnect, resume, ack, resume again."""
    point = rng.choice(["before_submit", "after_submit", "mid_progress", "during_result"])
    outcome = {"point": point, "delivered": 0, "lost": 0, "duplicated": 0}
    if point == "before_submit":
        ws = _raw_client(server)
        ws.close()
        return outcome
    job = new_job_id()
    seed = 1000 + index
    ws = _raw_client(server)
    header, pixels = codec.encode_frame_parts(codec.KIND_INPUT, job, 0, _canvas())
    ws.send(to_json(Generate(job_id=job, request=_request(seed, 12))))
    ws.send(header + pixels)
    if point == "mid_progress":
        stop_at = rng.randrange(1, 10)
        while True:
            msg = ws.recv(30)
            if isinstance(msg, str) and '"progress"' in msg and \
                    json.loads(msg)["step"] >= stop_at:
                break
    elif point == "during_result":
        while True:
            msg = ws.recv(30)
            if isinstance(msg, str) and '"result"' in msg:
                break  # the frames are on their way: drop now
    ws.close()
    with Client.connect(server.url, server.token) as client:
        client.resume(job)
        try:
            result = client.wait(job, timeout=60)
            same = result.images[0][1] == expected(seed)
            outcome["delivered"] += 1 if same else 0
            outcome["lost"] += 0 if same else 1
        except ControlCanvasError:
            outcome["lost"] += 1
        client.resume(job)  # after the ack, the job must be gone
        try:
            client.wait(job, timeout=10)
            outcome["duplicated"] += 1
        except UnknownJob:
            pass
    return outcome


def disconnect_soak(server: ServerProcess, clients: int, seed: int = 11) -> Dict:

    engine = FakeEngine()

    def expected(s):
        return engine.generate(_request(s, 12), {0: _canvas()}, NullContext())[0].image

    rng = random.Random(seed)
    plans = [random.Random(rng.random()) for _ in range(clients)]
    outcomes: List[Dict] = [None] * clients  # type: ignore[list-item]
    errors: List[str] = []

    def worker(indexes):
        for i in indexes:
            try:
                outcomes[i] = _one_disconnect(server, i, plans[i], expected)
            except Exception as err:
                errors.append(f"client {i}: {type(err).__name__}: {err}")
                outcomes[i] = {"point": "error", "delivered": 0, "lost": 1, "duplicated": 0}

    threads = [threading.Thread(target=worker, args=(range(k, clients, 8),)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    points: Dict[str, int] = {}
    for outcome in outcomes:
        points[outcome["point"]] = points.get(outcome["point"], 0) + 1
    return {"clients": clients, "disconnect_points": points,
            "results_delivered": sum(o["delivered"] for o in outcomes),
            "results_lost": sum(o["lost"] for o in outcomes),
            "results_duplicated": sum(o["duplicated"] for o in outcomes),
            "client_errors": errors[:5]}


# -- load, fairness, memory, cancel -------------------------------------------------------

def load(server: ServerProcess, jobs: int, clients: int) -> Dict:
    rss_start = _rss_mb(server.pid)
    per_client = jobs // clients
    finish_order: List[int] = []
    lock = threading.Lock()
    failures: List[str] = []

    def worker(k: int) -> None:
        try:
            with Client.connect(server.url, server.token, client=f"load-{k}") as client:
                ids = [client.submit(_request(k * 1000 + i, 3), {0: _canvas()})
                       for i in range(per_client)]
                for job in ids:
                    client.wait(job, timeout=300)
                    with lock:
                        finish_order.append(k)
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    samples = []  # (jobs finished so far, RSS)
    while any(t.is_alive() for t in threads):
        samples.append((len(finish_order), _rss_mb(server.pid)))
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t0
    # fairness: in the first half of completions, every client got its share
    half = finish_order[: len(finish_order) // 2]
    shares = [half.count(k) / max(1, len(half)) for k in range(clients)]
    return {"jobs": jobs, "clients": clients, "seconds": round(elapsed, 2),
            "jobs_per_second": round(len(finish_order) / elapsed, 1),
            "failures": len(failures), "failure_examples": failures[:3],
            "first_half_share_min": round(min(shares), 3),
            "first_half_share_max": round(max(shares), 3),
            "rss_mb_start": round(rss_start, 1),
            # after the first tenth of the jobs (models loaded, buffers warm): growth from
            # here to the end would be a leak, growth before it is warm-up
            "rss_mb_after_tenth": round(next((r for n, r in samples if n >= jobs // 10),
                                             rss_start), 1),
            "rss_mb_peak": round(max([r for _, r in samples] or [0]), 1),
            "rss_mb_end": round(_rss_mb(server.pid), 1)}


def cancel_latency(server: ServerProcess, trials: int) -> Dict:
    """Cancel a running job at a random moment within a step; compare the time until its
    ``cancelled`` error with the engine's own step time (measured from its progress)."""
    rng = random.Random(5)
    latencies, steps = [], []
    with Client.connect(server.url, server.token, client="cancel") as client:
        for i in range(trials):
            job = client.submit(_request(i, 150), {0: _canvas()})
            seen = []
            while len(seen) < 4:
                event = client.next_event(60)
                if isinstance(event, Progress) and event.job_id == job and \
                        event.stage == "denoise" and event.step >= 1:
                    seen.append(time.monotonic())
            step = statistics.median(b - a for a, b in zip(seen, seen[1:]))
            steps.append(step)
            time.sleep(rng.random() * step)  # the user clicks at any moment of a step
            t0 = time.monotonic()
            client.cancel(job)
            try:
                client.wait(job, timeout=60, on_event=lambda e: None)
            except Cancelled:
                latencies.append(time.monotonic() - t0)
    latencies.sort()
    step = statistics.median(steps)
    p95 = latencies[max(0, int(round(0.95 * len(latencies))) - 1)] if latencies else None
    return {"trials": trials, "cancelled": len(latencies),
            "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "p95_ms": round(p95 * 1000, 2) if p95 is not None else None,
            "step_ms": round(step * 1000, 2),
            "p95_within_one_step": p95 is not None and p95 <= step}


def retention(cases: int = 20, seconds: float = 1.5) -> Dict:
    """Uncollected results are dropped after the retention time: memory comes back."""
    big = 512
    with ServerProcess(step_seconds=0.0, retention_seconds=seconds) as server:
        rss0 = _rss_mb(server.pid)
        ids = []
        for i in range(cases):
            client = Client.connect(server.url, server.token)
            job = client.submit(_request(i, 1, side=big), {0: _canvas(big)})
            ids.append(job)
            client.wait(job, ack=False)
            client.close()  # never acknowledged: the server keeps it... for a while
        rss_full = _rss_mb(server.pid)
        time.sleep(seconds + 2.5)
        with Client.connect(server.url, server.token) as client:
            status: Status = client.status()
            client.resume(ids[0])
            try:
                client.wait(ids[0], timeout=10)
                expired = False
            except ControlCanvasError as err:
                expired = err.code == "expired"
        rss_after = _rss_mb(server.pid)
    return {"uncollected_results": cases, "result_mb_each": big * big * 4 / 2**20,
            "rss_mb_start": round(rss0, 1), "rss_mb_holding": round(rss_full, 1),
            "rss_mb_after_expiry": round(rss_after, 1), "resume_says_expired": expired,
            "queue_length_after": status.queue_length}


def bench_soak(fuzz_cases: int = 10_000, clients: int = 100, jobs: int = 200,
               load_clients: int = 4, cancel_trials: int = 20,
               step_seconds: float = 0.01, tiny: bool = True, per_peer: bool = True) -> Dict:
    figures: Dict = {"name": "soak"}
    with ServerProcess(step_seconds=step_seconds, max_queue=max(256, jobs)) as server:
        figures["fuzz"] = fuzz(server, fuzz_cases)
        figures["disconnect"] = disconnect_soak(server, clients)
        figures["load"] = load(server, jobs, load_clients)
        figures["cancel"] = cancel_latency(server, cancel_trials)
    if tiny:  # the same load and cancel on the real engine with the embedded tiny model
        with ServerProcess(engine="tiny", max_queue=max(256, jobs)) as server:
            figures["load_tiny"] = load(server, jobs, load_clients)
            figures["cancel_tiny"] = cancel_latency(server, max(5, cancel_trials // 2))
    figures["retention"] = retention()
    if per_peer:
        figures["preauth_flood"] = preauth_flood()
        figures["postauth_flood"] = postauth_flood()
        figures["retention_nonreader"] = retention_nonreader()
    return figures
