"""``controlcanvas bench soak``: the spine's promises under attack and stress, in figures.

The server runs in its own process (as in real use), so its resident memory can be
measured from outside.  Five parts, each bounded in count and time, all traffic on
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
  client that never reads;
- crash_restart: the server killed (SIGKILL) at random moments of a 4-client load and
  started again on the same job store, 100 times; counts results lost and delivered
  twice, and the restart time.
"""

from __future__ import annotations

import collections
import json
import os
import random
import statistics
import threading
import time
from typing import Dict, List

from shared import codec
from shared.client import Client
from shared.errors import Cancelled, ControlCanvasError, UnknownJob
from shared.images import Image
from shared.messages import (CLIENT_MESSAGES, PROTOCOL_VERSION, ControlUnit, Error, Generate,
                             GenerateRequest, Progress, Queued, Status, from_json, new_job_id,
                             to_dict, to_json)
from shared.session import ResultReady

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

# Jobs one load client keeps queued or running: well under the server's per-client cap
# (max_jobs_per_client, 32), and enough to keep every lane of the fair queue busy.
LOAD_WINDOW = 16


def load(server: ServerProcess, jobs: int, clients: int) -> Dict:
    rss_start = _rss_mb(server.pid)
    per_client = jobs // clients
    finish_order: List[int] = []
    lock = threading.Lock()
    failures: List[str] = []

    def worker(k: int) -> None:
        try:
            with Client.connect(server.url, server.token, client=f"load-{k}") as client:
                in_flight: "collections.deque[str]" = collections.deque()

                def collect() -> None:
                    client.wait(in_flight.popleft(), timeout=300)
                    with lock:
                        finish_order.append(k)

                for i in range(per_client):
                    if len(in_flight) >= LOAD_WINDOW:  # under the server's per-client cap
                        collect()
                    in_flight.append(client.submit(_request(k * 1000 + i, 3), {0: _canvas()}))
                while in_flight:
                    collect()
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


# -- crash and restart -------------------------------------------------------------------

class _CrashClient:
    """One editor-like client of the crash bench: keeps ``in_flight`` jobs going; when the
    link breaks it reconnects (to wherever the server now listens), resumes every job it
    has not received, and sends again a job the server never acknowledged in any way
    (``unknown_job`` before any ``queued``/``progress``: it never reached the store)."""

    def __init__(self, index: int, where: Dict, token: str, in_flight: int, steps: int,
                 stop: threading.Event, expected) -> None:
        self.index, self.where, self.token = index, where, token
        self.in_flight, self.steps, self.stop, self.expected = in_flight, steps, stop, expected
        self.pending: Dict[str, Dict] = {}  # job id -> {"request", "seen"}
        self.delivered: Dict[str, int] = {}
        self.submitted = self.duplicated = self.wrong = self.resent = self.reconnects = 0
        self.lost: List[str] = []
        self.unexpected: List[str] = []
        self._count = 0

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline and not (self.stop.is_set() and not self.pending):
            try:
                client = Client.connect(self.where["url"], self.token,
                                        client=f"crash-{self.index}", timeout=5)
            except (ControlCanvasError, OSError, TimeoutError):
                time.sleep(0.05)  # the server is restarting
                continue
            except Exception as err:  # an untyped error from the client library: a bug
                self.unexpected.append(f"connect: {type(err).__name__}: {err}")
                time.sleep(0.05)
                continue
            try:
                self._serve(client, deadline)
            except ControlCanvasError:
                self.reconnects += 1  # killed under us: reconnect and resume
            except Exception as err:
                self.reconnects += 1
                self.unexpected.append(f"{type(err).__name__}: {err}")
            finally:
                try:
                    client.close()
                except Exception:
                    pass
        self.lost.extend(self.pending)  # never came back before the deadline

    def _serve(self, client: Client, deadline: float) -> None:
        if self.pending:
            client.resume(*self.pending)
        while time.monotonic() < deadline:
            while not self.stop.is_set() and len(self.pending) < self.in_flight:
                self._count += 1
                request = _request(self.index * 1_000_000 + self._count, self.steps, side=32)
                job = new_job_id()
                self.pending[job] = {"request": request, "seen": False}
                self.submitted += 1
                client.submit(request, {0: _CRASH_CANVAS}, job_id=job)
            if self.stop.is_set() and not self.pending:
                return
            event = client.next_event(0.2)
            if event is not None:
                self._handle(client, event)

    def _handle(self, client: Client, event) -> None:
        job = getattr(event, "job_id", None)
        if isinstance(event, ResultReady):
            client.ack(job)
            if job in self.delivered:
                self.duplicated += 1
            elif job in self.pending:
                entry = self.pending.pop(job)
                self.delivered[job] = 1
                self.wrong += event.images[0][1] != self.expected(entry["request"])
            else:
                self.unexpected.append(f"a result for a job never submitted: {job}")
        elif isinstance(event, Error) and job in self.pending:
            entry = self.pending[job]
            if event.code == "unknown_job" and not entry["seen"]:
                self.resent += 1  # lost on its way in, before the server kept it
                client.submit(entry["request"], {0: _CRASH_CANVAS}, job_id=job)
            else:
                del self.pending[job]
                self.lost.append(job)
                self.unexpected.append(f"{event.code}: {event.message}")
        elif isinstance(event, (Queued, Progress)) and job in self.pending:
            self.pending[job]["seen"] = True
        elif isinstance(event, Error) and job is None:
            self.unexpected.append(f"{event.code}: {event.message}")


_CRASH_CANVAS = Image(32, 32, bytes((i * 31) % 256 for i in range(32 * 32 * 4)))


def _restart(store: str, port: int, step_seconds: float) -> ServerProcess:
    """A server on the same store, on the same port when it is free again."""
    for attempt in (port, 0):
        try:
            return ServerProcess(store_dir=store, port=attempt,
                                 step_seconds=step_seconds).__enter__()
        except RuntimeError:
            if attempt == 0:
                raise
    raise AssertionError("unreachable")


def _held_after_ack(server: ServerProcess, job_ids: List[str]) -> int:
    """Results the clients acknowledged that the server still keeps (an ack lost with the
    server that was killed before it reached the disk); collected here."""
    held = 0
    with Client.connect(server.url, server.token, client="crash-check") as client:
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            client.resume(*chunk)
            for job in chunk:
                try:
                    client.wait(job, timeout=30)  # and acknowledged again
                    held += 1
                except ControlCanvasError:  # unknown_job: gone, as it should be
                    pass
    return held


def crash_restart(crashes: int = 100, clients: int = 4, step_seconds: float = 0.01,
                  steps: int = 4, in_flight: int = 3, kill_after=(0.1, 1.0),
                  seed: int = 17) -> Dict:
    """Kill the server (SIGKILL) at random moments of a ``clients``-client load and start
    it again on the same job store, ``crashes`` times; the clients reconnect and resume.
    Counts results lost (never delivered, or delivered with other pixels) and delivered
    twice, and the time from the kill until the new server listens."""
    import tempfile

    engine = FakeEngine()

    def expected(request):
        return engine.generate(request, {0: _CRASH_CANVAS}, NullContext())[0].image

    rng = random.Random(seed)
    stop = threading.Event()
    restarts: List[float] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cc-crash-") as tmp:
        store = os.path.join(tmp, "jobs")
        server = ServerProcess(store_dir=store, step_seconds=step_seconds).__enter__()
        port = int(server.url.rsplit(":", 1)[1])
        where = {"url": server.url}
        deadline = time.monotonic() + 120 + crashes * 5.0
        workers = [_CrashClient(k, where, server.token, in_flight, steps, stop, expected)
                   for k in range(clients)]
        threads = [threading.Thread(target=w.run, args=(deadline,)) for w in workers]
        for thread in threads:
            thread.start()
        try:
            for _ in range(crashes):
                time.sleep(rng.uniform(*kill_after))
                server.kill()
                killed = time.monotonic()
                server.__exit__()
                server = _restart(store, port, step_seconds)
                restarts.append(time.monotonic() - killed)
                where["url"] = server.url
            stop.set()
            for thread in threads:
                thread.join()
            acked = [job for w in workers for job in w.delivered]
            held = _held_after_ack(server, acked)
        finally:
            stop.set()
            server.__exit__()
    restarts.sort()
    return {"crashes": crashes, "clients": clients, "seconds": round(time.monotonic() - t0, 1),
            "jobs_submitted": sum(w.submitted for w in workers),
            "results_delivered": sum(len(w.delivered) for w in workers),
            # every job submitted and not delivered with the right pixels is lost
            "results_lost": sum(w.submitted - len(w.delivered) + w.wrong for w in workers),
            "results_duplicated": sum(w.duplicated for w in workers),
            "wrong_pixels": sum(w.wrong for w in workers),
            "resent_never_kept": sum(w.resent for w in workers),
            "reconnects": sum(w.reconnects for w in workers),
            "held_after_ack": held,
            "restart_s_p50": round(statistics.median(restarts), 3) if restarts else None,
            "restart_s_p95": round(restarts[max(0, int(round(0.95 * len(restarts))) - 1)], 3)
            if restarts else None,
            "restart_s_max": round(restarts[-1], 3) if restarts else None,
            "client_errors": [e for w in workers for e in w.unexpected][:5]}


def bench_soak(fuzz_cases: int = 10_000, clients: int = 100, jobs: int = 200,
               load_clients: int = 4, cancel_trials: int = 20,
               step_seconds: float = 0.01, tiny: bool = True, per_peer: bool = True,
               crashes: int = 100) -> Dict:
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
    if crashes:
        figures["crash_restart"] = crash_restart(crashes, clients=load_clients,
                                                 step_seconds=step_seconds)
    return figures
