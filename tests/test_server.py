"""The real server on 127.0.0.1 (port 0) with the fake engine, driven over sockets."""

import json
import threading
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from backend.engines.base import NullContext
from backend.engines.fake import FakeEngine
from backend.imaging import to_array
from shared import codec
from shared.client import Client
from shared.errors import (AuthError, Cancelled, ConnectionLost, EngineError, FieldError,
                           MissingImage, OutOfMemory, ProtocolError, ServerUnavailable,
                           UnknownJob)
from shared.images import Image
from shared.messages import (PROTOCOL_VERSION, ControlUnit, Error, GenerateRequest, Progress,
                             Queued, Status)
from shared.session import PreviewReady

LINES = ControlUnit(condition="lineart", image=0)


def request(**kw):
    kw.setdefault("width", 32)
    kw.setdefault("height", 24)
    kw.setdefault("steps", 4)
    kw.setdefault("controls", (LINES,))
    return GenerateRequest(**kw)


def canvas(w=32, h=24):
    return Image(w, h, bytes((i * 7) % 256 for i in range(w * h * 4)))


def raw(server, **kw):
    return connect(server.url, max_size=None, compression=None, **kw)


def hello(ws, token):
    ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": token}))
    return json.loads(ws.recv(5))


# -- handshake and auth -----------------------------------------------------------

def test_browser_origin_is_refused(fake_server):
    with pytest.raises(InvalidStatus) as info:
        raw(fake_server, origin="http://evil.example")
    assert info.value.response.status_code == 403
    assert b"web pages" in info.value.response.body


def handshake(server, host, extra=""):
    """A hand-written websocket upgrade with exactly the Host we choose; returns status."""
    import base64
    import os
    import socket
    port = int(server.url.rsplit(":", 1)[1])
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


@pytest.mark.parametrize("host", ["attacker.example:7351", "192.168.1.20:7351",
                                  "localhost.attacker.example", "127.0.0.1.nip.io:7351"])
def test_non_loopback_host_is_refused(fake_server, host):
    """DNS rebinding: a page's own host name resolving to 127.0.0.1 must not get in."""
    assert handshake(fake_server, host) == 403


@pytest.mark.parametrize("host", ["127.0.0.1:7351", "localhost:7351", "[::1]:7351",
                                  "127.0.0.2"])
def test_loopback_host_is_accepted(fake_server, host):
    assert handshake(fake_server, host) == 101


def test_two_host_headers_refused(fake_server):
    assert handshake(fake_server, "127.0.0.1", extra="Host: evil.example\r\n") in (400, 403)


def test_remote_host_allowed_when_opted_in(make_server):
    server = make_server(allow_remote=True)
    assert handshake(server, "studio-pc.lan:7351") == 101


def test_client_reports_refused_handshake(make_server):
    server = make_server(max_clients=1)
    with Client.connect(server.url, server.token):
        with pytest.raises(ProtocolError, match="refused"):
            Client.connect(server.url, server.token)


def test_wrong_token(fake_server):
    with pytest.raises(AuthError) as info:
        Client.connect(fake_server.url, "wrong")
    assert "token" in info.value.message


def test_wrong_protocol_version(fake_server):
    with raw(fake_server) as ws:
        ws.send(json.dumps({"type": "hello", "protocol": 999, "token": fake_server.token}))
        reply = json.loads(ws.recv(5))
        assert reply["code"] == "version" and "update" in reply["message"]
        with pytest.raises(Exception):
            ws.recv(5)  # then the server closes


def test_hello_timeout_closes(make_server):
    server = make_server(hello_timeout=0.3)
    with raw(server) as ws:
        reply = json.loads(ws.recv(5))
        assert reply["code"] == "limit" and "hello" in reply["message"]


def test_no_server_is_a_clear_error():
    with pytest.raises(ServerUnavailable, match="controlcanvas serve"):
        Client.connect("ws://127.0.0.1:9", "t", timeout=2)


# -- generation -----------------------------------------------------------------------

def test_generate_round_trip_with_progress_and_previews(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        events = []
        job = client.submit(request(seed=11, batch=3, steps=4), {0: canvas()}, preview_every=2)
        result = client.wait(job, on_event=events.append)
    assert result.seeds == (11, 12, 13)
    expected = FakeEngine().generate(request(seed=11, batch=3, steps=4), {0: canvas()},
                                     NullContext())
    assert [img for _, img in result.images] == [g.image for g in expected]
    steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "denoise"]
    assert steps == list(range(1, 13))
    assert any(isinstance(e, Queued) for e in events)
    assert sum(isinstance(e, PreviewReady) for e in events) == 6


def test_random_seed_is_reported_and_reproducible(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        first = client.wait(client.submit(request(seed=-1), {0: canvas()}))
        (seed,) = first.seeds
        assert 0 <= seed < 2**32
        again = client.wait(client.submit(request(seed=seed), {0: canvas()}))
    assert again.images[0][1] == first.images[0][1]


def test_big_image_round_trip(fake_server):
    side = 2048
    big = Image(side, side, bytes(range(256)) * (side * side * 4 // 256))
    with Client.connect(fake_server.url, fake_server.token) as client:
        result = client.wait(client.preprocess("none", big))
    assert result.images[0][1] == big


def test_img2img_and_inpaint_modes(fake_server):
    init = canvas()
    mask = Image.filled(32, 24, (0, 0, 0, 255))
    with Client.connect(fake_server.url, fake_server.token) as client:
        job = client.submit(request(mode="inpaint", init_image=1, mask_image=2),
                            {0: canvas(), 1: init, 2: mask})
        result = client.wait(job)
    out = to_array(result.images[0][1])
    assert (out == to_array(init)).all()  # nothing selected: nothing changes


# -- bad input over the wire -------------------------------------------------------------

def test_image_bytes_not_matching_size(fake_server):
    with raw(fake_server) as ws:
        hello(ws, fake_server.token)
        job = "1" * 32
        ws.send(json.dumps({"type": "generate", "job_id": job,
                            "request": {"width": 8, "height": 8,
                                        "controls": [{"condition": "canny", "image": 0}]}}))
        header, pixels = codec.encode_frame_parts(codec.KIND_INPUT, job, 0,
                                                  Image.filled(8, 8))
        ws.send(header + pixels[:-4])
        reply = json.loads(ws.recv(5))
        assert reply["code"] == "bad_frame" and reply["job_id"] == job
        ws.send(json.dumps({"type": "status"}))
        assert json.loads(ws.recv(5))["type"] == "status"  # still serving


def test_unknown_type_and_malformed_json_keep_the_connection(fake_server):
    with raw(fake_server) as ws:
        hello(ws, fake_server.token)
        for text, code in (("{nope", "malformed"), ('{"type": "rm -rf"}', "unknown_type"),
                           ('{"type": "cancel", "job_id": 5}', "bad_field")):
            ws.send(text)
            assert json.loads(ws.recv(5))["code"] == code
        ws.send(json.dumps({"type": "status"}))
        assert json.loads(ws.recv(5))["type"] == "status"


def test_oversize_frame_closes_with_1009_and_server_lives(make_server):
    server = make_server(max_pixels=64 * 64)
    with raw(server) as ws:
        hello(ws, server.token)
        ws.send(b"\x00" * (codec.HEADER_SIZE + 4 * 64 * 64 + 1))
        with pytest.raises(Exception):
            ws.recv(5)
        assert ws.close_code == 1009
    with Client.connect(server.url, server.token) as client:
        assert isinstance(client.status(), Status)


def test_control_slot_missing(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        with pytest.raises(MissingImage):
            client.submit(request(), {})
    with raw(fake_server) as ws:
        hello(ws, fake_server.token)
        job = "2" * 32
        ws.send(json.dumps({"type": "generate", "job_id": job,
                            "request": {"controls": [{"condition": "canny", "image": 0}]}}))
        ws.send(json.dumps({"type": "status"}))
        reply = json.loads(ws.recv(5))
        assert reply["code"] == "missing_image" and reply["job_id"] == job


def test_bad_request_field_error_names_the_field(fake_server):
    with raw(fake_server) as ws:
        hello(ws, fake_server.token)
        ws.send(json.dumps({"type": "generate", "job_id": "3" * 32,
                            "request": {"controls": [{"condition": "canny", "image": 0,
                                                      "weight": 9}]}}))
        reply = json.loads(ws.recv(5))
        assert reply["field"] == "request.controls[0].weight" and reply["job_id"] == "3" * 32


def test_cancel_unknown_job(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        client.cancel("4" * 32)
        event = client.next_event(5)
        assert isinstance(event, Error) and event.code == "unknown_job"


def test_duplicate_job_id(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        job = client.submit(request(steps=40), {0: canvas()})
        client.submit(request(), {0: canvas()}, job_id=job)
        with pytest.raises(Exception) as info:
            client.wait(job)
        assert getattr(info.value, "code", "") == "duplicate_job"


# -- cancel, disconnect, resume, isolation -------------------------------------------------

def test_cancel_running_job_within_a_step(make_server):
    server = make_server(FakeEngine(step_seconds=0.05))
    with Client.connect(server.url, server.token) as client:
        job = client.submit(request(steps=100), {0: canvas()})
        follow = client.submit(request(steps=2), {0: canvas()})
        while True:
            event = client.next_event(5)
            if isinstance(event, Progress) and event.job_id == job and event.step >= 2:
                break
        t0 = time.monotonic()
        client.cancel(job)
        with pytest.raises(Cancelled):
            client.wait(job, on_event=lambda e: None)
        assert time.monotonic() - t0 < 0.5  # one step is 50 ms
        assert client.wait(follow).images  # the next job runs


def test_cancel_queued_job(make_server):
    server = make_server(FakeEngine(step_seconds=0.05))
    with Client.connect(server.url, server.token) as client:
        first = client.submit(request(steps=10), {0: canvas()})
        second = client.submit(request(steps=10), {0: canvas()})
        client.cancel(second)
        with pytest.raises(Cancelled, match="before it started"):
            client.wait(second, on_event=lambda e: None)
        assert client.wait(first).images


def test_client_vanishing_mid_job_keeps_result_for_resume(make_server):
    server = make_server(FakeEngine(step_seconds=0.02))
    client = Client.connect(server.url, server.token)
    job = client.submit(request(steps=10, seed=5), {0: canvas()})
    client.close()  # the editor crashed
    time.sleep(0.4)  # the job finishes meanwhile
    with Client.connect(server.url, server.token) as again:
        again.resume(job)
        result = again.wait(job)
        assert result.seeds == (5,)
        again.resume(job)  # acked: gone
        with pytest.raises(UnknownJob):
            again.wait(job)


def test_resume_while_running_gets_progress_then_result(make_server):
    server = make_server(FakeEngine(step_seconds=0.03))
    client = Client.connect(server.url, server.token)
    job = client.submit(request(steps=20), {0: canvas()})
    client.next_event(5)
    client.close()
    with Client.connect(server.url, server.token) as again:
        again.resume(job)
        events = []
        assert again.wait(job, on_event=events.append).images
        assert any(isinstance(e, Progress) for e in events)


def test_cancel_on_disconnect(make_server):
    engine = FakeEngine(step_seconds=0.02)
    server = make_server(engine)
    client = Client.connect(server.url, server.token)
    job = client.submit(request(steps=150), {0: canvas()}, cancel_on_disconnect=True)
    client.next_event(5)
    client.close()  # GIMP's Cancel button kills the plug-in
    time.sleep(0.3)
    with Client.connect(server.url, server.token) as again:
        again.resume(job)
        with pytest.raises(Cancelled):
            again.wait(job)
        # the worker is free again at once
        assert again.wait(again.submit(request(steps=2), {0: canvas()}), timeout=2).images


def test_two_clients_are_isolated(fake_server):
    a = Client.connect(fake_server.url, fake_server.token, client="a")
    b = Client.connect(fake_server.url, fake_server.token, client="b")
    job_a = a.submit(request(prompt="a", steps=6), {0: canvas()})
    job_b = b.submit(request(prompt="b", steps=6), {0: canvas()})
    seen_by_a, seen_by_b = [], []
    ra = a.wait(job_a, on_event=seen_by_a.append)
    rb = b.wait(job_b, on_event=seen_by_b.append)
    assert ra.images[0][1] != rb.images[0][1]
    assert all(getattr(e, "job_id", job_a) == job_a for e in seen_by_a)
    assert all(getattr(e, "job_id", job_b) == job_b for e in seen_by_b)
    b.cancel(job_a)  # not b's job
    event = b.next_event(5)
    assert isinstance(event, Error) and event.code == "unknown_job"
    assert b.status().jobs == ()
    a.close(), b.close()


def test_status_lists_own_jobs(make_server):
    server = make_server(FakeEngine(step_seconds=0.05))
    with Client.connect(server.url, server.token) as client:
        job = client.submit(request(steps=50), {0: canvas()})
        status = client.status()
        assert [j.job_id for j in status.jobs] == [job]
        client.cancel(job)


def test_queue_full(make_server):
    server = make_server(FakeEngine(step_seconds=0.05), max_queue=2)
    with Client.connect(server.url, server.token) as client:
        jobs = [client.submit(request(steps=20), {0: canvas()}) for _ in range(4)]
        codes = []
        for job in jobs:
            try:
                client.wait(job, timeout=10)  # other jobs' outcomes stay queued
                codes.append("ok")
            except Exception as err:
                codes.append(err.code)
        assert "queue_full" in codes and codes.count("ok") >= 2


def test_engine_failures_are_typed_and_the_next_job_runs(make_server):
    class Flaky(FakeEngine):
        calls = 0

        def generate(self, request, images, ctx):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise OutOfMemory(job_id=ctx.job_id)
            if Flaky.calls == 2:
                raise RuntimeError("boom")
            return super().generate(request, images, ctx)

    server = make_server(Flaky())
    with Client.connect(server.url, server.token) as client:
        with pytest.raises(OutOfMemory):
            client.wait(client.submit(request(), {0: canvas()}))
        with pytest.raises(EngineError, match="boom"):
            client.wait(client.submit(request(), {0: canvas()}))
        assert client.wait(client.submit(request(), {0: canvas()})).images


def test_connection_lost_is_typed(make_server):
    server = make_server(FakeEngine(step_seconds=0.05))
    client = Client.connect(server.url, server.token)
    job = client.submit(request(steps=100), {0: canvas()})
    threading.Timer(0.2, server.stop).start()
    with pytest.raises(ConnectionLost, match="reconnect"):
        client.wait(job, on_event=lambda e: None, timeout=10)


def test_field_error_from_client_side_checks(fake_server):
    with Client.connect(fake_server.url, fake_server.token) as client:
        with pytest.raises(FieldError):
            client.submit(request(), {0: canvas(), 7: canvas()})



def test_client_maps_oversize_close_to_limit_error(make_server):
    from shared.errors import LimitError
    server = make_server(max_pixels=32 * 32)
    with Client.connect(server.url, server.token) as client:
        client.session.limits = None  # skip the client's own check, as an old client would
        with pytest.raises(LimitError, match="larger than its limit"):
            # the refusal may arrive while sending, or while waiting: both say the same
            client.wait(client.preprocess("none", Image.filled(64, 64)))


def test_preprocessor_runs_before_the_engine(fake_server):
    """Dark strokes on a transparent layer + lineart_from_drawing: the engine sees white
    lines on black (pixel perfect, at the output size), and the picture follows them."""
    w, h = 64, 48
    layer = bytearray(w * h * 4)
    for x in range(w):  # one dark horizontal stroke at y = 20..23
        for y in range(20, 24):
            layer[(y * w + x) * 4:(y * w + x) * 4 + 4] = b"\x10\x10\x10\xff"
    drawn = Image(w, h, bytes(layer))
    unit = ControlUnit(condition="lineart", image=0, preprocessor="lineart_from_drawing")
    req = GenerateRequest(width=w, height=h, steps=2, seed=3, controls=(unit,))
    with Client.connect(fake_server.url, fake_server.token) as client:
        annotated = client.wait(client.preprocess("lineart_from_drawing", drawn))
        result = client.wait(client.submit(req, {0: drawn}))
    lines = to_array(annotated.images[0][1])
    assert lines[21, 10, 0] > 200 and lines[5, 10, 0] < 50  # white on black
    out = to_array(result.images[0][1]).astype(int)
    assert out[21, 10, :3].sum() < out[5, 10, :3].sum()  # the stroke steers the picture


def test_pose_unit_without_image(fake_server):
    from shared.pose import default_pose
    pose = default_pose(64, 64).to_message()
    req = GenerateRequest(width=64, height=64, steps=2, seed=1,
                          controls=(ControlUnit(condition="openpose", pose=pose),))
    with Client.connect(fake_server.url, fake_server.token) as client:
        result = client.wait(client.submit(req, {}))
    assert result.images[0][1].size == (64, 64)


def test_preprocess_result_carries_the_annotators_info(make_server):
    """Pose detection sends the keypoints with the picture, so plug-ins need not parse it."""
    from backend.annotators.registry import Annotated

    class Detecting(FakeEngine):
        def preprocess(self, message, image, ctx):
            return Annotated(image, {"keypoints": '{"people": []}', "people": 0, "bad": [1]})

    server = make_server(Detecting())
    with Client.connect(server.url, server.token) as client:
        result = client.wait(client.preprocess("pose_from_photo", canvas()))
    assert result.info == {"keypoints": '{"people": []}', "people": 0}


def test_train_job_through_the_server(make_server, tmp_path):
    """`train` runs as a job: progress over the socket, then the trained folder's path.
    Its folders are names inside the server's training folders."""
    from backend.training import shapes
    shapes.write_dataset(tmp_path / "datasets" / "shapes", count=4, seed=1, size=64)
    server = make_server(train_data_root=tmp_path / "datasets",
                         train_out_root=tmp_path / "trained")
    with Client.connect(server.url, server.token) as client:
        events = []
        job = client.train(data="shapes", base="tiny-sd15", out="cn", steps=2, batch=2,
                           resolution=64, lr=1e-4, lr_schedule="cosine")
        result = client.wait(job, on_event=events.append, timeout=300)
    out = tmp_path / "trained" / "cn"
    assert result.images == () and result.info["out"] == str(out.resolve())
    assert (out / "config.json").is_file()
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["lr_schedule"] == "cosine" and settings["steps"] == 2
    assert any(isinstance(e, Progress) and e.stage == "train" for e in events)


def test_train_job_with_bad_data_is_a_typed_error(make_server, tmp_path):
    (tmp_path / "datasets" / "nope").mkdir(parents=True)
    server = make_server(train_data_root=tmp_path / "datasets",
                         train_out_root=tmp_path / "trained")
    with Client.connect(server.url, server.token) as client:
        job = client.train(data="nope", base="tiny-sd15", out="cn", steps=2, resolution=64)
        with pytest.raises(Exception) as info:
            client.wait(job, timeout=120)
    assert getattr(info.value, "code", "") == "bad_dataset"
    assert "nope" in info.value.message


def test_one_log_line_per_job_and_never_the_token(fake_server, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    canvas = Image.filled(40, 24, (255, 255, 255, 255))
    request = GenerateRequest(width=40, height=24, steps=2,
                              controls=(ControlUnit(condition="scribble", image=0),))
    with pytest.raises(AuthError):
        Client.connect(fake_server.url, fake_server.token[::-1])  # a wrong token
    with Client.connect(fake_server.url, fake_server.token, client="log-test") as client:
        job_id = client.submit(request, {0: canvas})
        client.wait(job_id, timeout=30)
        bad = client.preprocess("no-such-annotator", canvas)
        with pytest.raises(Exception):  # the annotator is unknown: the job fails
            client.wait(bad, timeout=30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(bad in r.getMessage() for r in caplog.records):
        time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.server.jobs"
             and r.getMessage().startswith("job ")]
    mine = [line for line in lines if job_id in line]
    assert len(mine) == 1, lines
    assert "log-test" in mine[0] and "generate txt2img" in mine[0] and "size 40x24" in mine[0]
    assert "steps 2" in mine[0] and mine[0].endswith(" s done")
    failed = [line for line in lines if bad in line]
    assert len(failed) == 1 and "preprocess no-such-annotator" in failed[0]
    assert "failed (" in failed[0]
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert fake_server.token not in text and fake_server.token[::-1] not in text


def test_a_server_that_goes_away_mid_handshake_is_a_typed_error(monkeypatch):
    """A server killed while a client connects (seen when it is restarting): the socket
    resets while the upgrade request is sent, and websockets raises ConnectionClosedError."""
    import websockets.sync.client
    from websockets.exceptions import ConnectionClosedError

    def reset(*args, **kwargs):
        raise ConnectionClosedError(None, None)
    monkeypatch.setattr(websockets.sync.client, "connect", reset)
    with pytest.raises(ServerUnavailable, match="may be restarting"):
        Client.connect("ws://127.0.0.1:9", "token")
