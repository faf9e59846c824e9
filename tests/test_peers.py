"""Per-peer limits of the real server (issue 18, findings 1-4 and 8), attacked over
sockets on 127.0.0.1: strangers flooding the handshake, a huge frame before ``hello``,
an authenticated client flooding requests, a client that never reads its results."""

import asyncio
import base64
import json
import os
import socket
import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from backend.bench.peers import RequestFlood, Strangers
from shared.client import Client
from shared.errors import LimitError, QueueFull
from shared.images import Image
from shared.messages import PROTOCOL_VERSION, ControlUnit, GenerateRequest, Status, to_json

HELLO_TIMEOUT = 30.0  # long: a test that passes must not rely on it running out


def hello_text(token):
    return json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": token})


# -- a websocket peer written by hand, so it can lie about sizes and never read ---------

def open_socket(server, headers=""):
    """A socket past the websocket handshake (status 101 checked)."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.split(b" ", 2)[1] == b"101", response
    return sock


def frame_header(opcode, length):
    """A masked client frame header (mask all zero: the payload goes as is)."""
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\0\0\0\0"


def text_frame(text):
    data = text.encode("utf-8")
    return frame_header(0x1, len(data)) + data


def close_code_from(sock, timeout):
    """Read server frames until its close frame; its code (None: none came in time)."""
    sock.settimeout(timeout)
    buffer = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buffer += chunk
            while len(buffer) >= 2:
                opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
                start = 2
                if length == 126:
                    length, start = struct.unpack("!H", buffer[2:4])[0], 4
                elif length == 127:
                    length, start = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < start + length:
                    break
                payload, buffer = buffer[start:start + length], buffer[start + length:]
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0]
    except (socket.timeout, OSError):
        return None
    return None


# -- finding 1: strangers have their own few slots ------------------------------------

def test_strangers_flooding_cannot_lock_out_clients(make_server):
    """40 reconnecting connections without the token: every one of 12 clients that has
    it still gets in (before: 4 of 23 did), and strangers never hold more than their few
    slots."""
    server = make_server(max_clients=4, max_unauthenticated=3, hello_timeout=1.0)
    waiting_seen = []
    with Strangers(server.url, 40, settle_connected=3) as flood:
        for attempt in range(12):
            with Client.connect(server.url, server.token, client=f"legit-{attempt}",
                                timeout=10) as client:
                assert isinstance(client.status(timeout=10), Status)
            waiting_seen.append(server.call(lambda: server.server.peer_stats()["waiting"]))
    stats = server.call(server.server.peer_stats)
    assert flood.counts["connected"] >= 3 and stats["refused"]["waiting"] > 0  # the flood was real
    assert max(waiting_seen) <= 3


def test_a_waiting_connection_never_takes_a_full_client_slot(make_server):
    server = make_server(max_clients=1, hello_timeout=HELLO_TIMEOUT)
    with Client.connect(server.url, server.token):
        # without the token in the handshake: a waiting slot, then refused at hello
        with connect(server.url, max_size=None, compression=None) as ws:
            ws.send(hello_text(server.token))
            reply = json.loads(ws.recv(5))
            assert reply["code"] == "limit" and "max_clients" in reply["message"]
            with pytest.raises(ConnectionClosed):
                ws.recv(5)


def test_a_wrong_token_in_the_handshake_is_refused_at_once(make_server):
    server = make_server()
    with pytest.raises(InvalidStatus) as info:
        connect(server.url, additional_headers={"Authorization": "Bearer nope"})
    assert info.value.response.status_code == 401
    assert b"token" in info.value.response.body


# -- finding 2: before hello, one small text frame --------------------------------------

@pytest.mark.parametrize("opcode, size", [(0x2, 10_000_000), (0x1, 10_000_000), (0x1, 8192)])
def test_big_frame_before_hello_is_refused_before_it_is_read(make_server, opcode, size):
    """Only the frame's header is sent: the server must close (1009, message too big) on
    the header alone, without waiting for (and buffering) megabytes of payload."""
    server = make_server(hello_timeout=HELLO_TIMEOUT)
    sock = open_socket(server)
    try:
        sock.sendall(frame_header(opcode, size) + b"\0" * 1024)
        assert close_code_from(sock, timeout=5) == 1009
    finally:
        sock.close()
    with Client.connect(server.url, server.token) as client:  # the server is fine
        assert isinstance(client.status(), Status)


def test_small_binary_frame_before_hello_closes_with_policy(make_server):
    server = make_server(hello_timeout=HELLO_TIMEOUT)
    with connect(server.url, max_size=None, compression=None) as ws:
        ws.send(b"CCIM" + bytes(60))
        assert json.loads(ws.recv(5))["code"] == "out_of_order"
        with pytest.raises(ConnectionClosed):
            ws.recv(5)
        assert ws.close_code == 1008


def test_frames_may_be_image_sized_once_the_token_is_shown(make_server):
    server = make_server(hello_timeout=HELLO_TIMEOUT)
    with Client.connect(server.url, server.token) as client:  # 256x256: 256 KiB frames
        image = Image.filled(256, 256, (200, 10, 10, 255))
        result = client.wait(client.preprocess("none", image), timeout=30)
        assert result.images[0][1] == image


# -- finding 3: one client's flood does not freeze the others -----------------------------

@pytest.mark.parametrize("reads", [False, True], ids=["never-reads", "reads"])
def test_request_flood_does_not_freeze_other_clients(make_server, reads):
    """20,000 ``models`` requests from one client: the others' round trips and new
    handshakes are still served (before: frozen for 108 s). A flooder that never reads
    is held back (reading from it stops: its outbox stays within its bound); one that
    reads as fast as it can gets its turns, and so does everyone else."""
    server = make_server(max_outbox_bytes=256 << 10, max_outbox_frames=64)
    canvas = Image.filled(32, 32, (255, 255, 255, 255))
    request = GenerateRequest(width=32, height=32, steps=2,
                              controls=(ControlUnit(condition="scribble", image=0),))
    with RequestFlood(server, 20_000, reads) as flood:  # under way once entered
        t0 = time.monotonic()
        for _ in range(10):
            with Client.connect(server.url, server.token, timeout=10) as other:
                assert isinstance(other.status(timeout=10), Status)
                assert other.wait(other.submit(request, {0: canvas}), timeout=10).images
        served_in = time.monotonic() - t0
        stats = server.call(server.server.peer_stats)
        replies_read = flood.received
    assert served_in < 30  # behavioural: served at all while the flood lasts
    print(f"10 other clients served in {served_in:.2f} s during the flood "
          f"({flood.received} bytes of replies read by the flooder)")
    reply = len(to_json(server.engine.models()).encode("utf-8"))
    assert replies_read < 19_000 * reply  # the others were served while the flood lasted
    flooder = max(stats["outboxes"].values(), key=lambda box: box["peak_frames"])
    if not reads:
        assert flooder["peak_frames"] == 64 or flooder["peak_bytes"] >= 256 << 10  # filled
    assert flooder["peak_bytes"] <= (256 << 10) + reply and flooder["peak_frames"] <= 64 + 1


def test_jobs_per_client_are_capped(make_server):
    from backend.engines.fake import FakeEngine
    server = make_server(engine=FakeEngine(step_seconds=0.2), max_jobs_per_client=2)
    canvas = Image.filled(16, 16)
    request = GenerateRequest(width=16, height=16, steps=20,
                              controls=(ControlUnit(condition="scribble", image=0),))
    with Client.connect(server.url, server.token) as client:
        first = [client.submit(request, {0: canvas}) for _ in range(2)]
        third = client.submit(request, {0: canvas})
        with pytest.raises(QueueFull, match="limit per client is 2"):
            client.wait(third, timeout=10)
        for job in first:
            client.cancel(job)
        with Client.connect(server.url, server.token) as other:  # others are not affected
            other.cancel(other.submit(request, {0: canvas}))


# -- finding 4: held bytes honestly bounded; pixels x batch --------------------------------

def test_a_client_that_never_reads_cannot_hold_past_retention(make_server):
    """16 results of 1 MiB for a client that never reads, with 4 MiB of retention: the
    bytes the server holds for it (job table and outbox together) never pass 4 MiB; the
    oldest results expire."""
    from backend.engines.fake import FakeEngine
    from shared import codec
    from shared.messages import Generate, new_job_id
    retention = 4 << 20
    server = make_server(engine=FakeEngine(), retention_bytes=retention,
                         retention_bytes_per_client=0)
    sock = open_socket(server)
    sock.sendall(text_frame(hello_text(server.token)))
    canvas = Image.filled(8, 8)
    request = GenerateRequest(width=512, height=512, steps=1,
                              controls=(ControlUnit(condition="scribble", image=0),))
    held = []
    try:
        for _ in range(16):
            job = new_job_id()
            image = codec.encode_frame(codec.KIND_INPUT, job, 0, canvas)
            sock.sendall(text_frame(to_json(Generate(job_id=job, request=request)))
                         + frame_header(0x2, len(image)) + image)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = server.call(server.server.peer_stats)
            held.append(stats["held_bytes"])
            if server.call(lambda: not server.server.manager._lanes
                           and server.server.manager._running is None) and len(held) > 5:
                expired = server.call(lambda: len(server.server.manager._expired))
                if expired >= 16 - retention // (1 << 20):
                    break
            time.sleep(0.02)
    finally:
        sock.close()
    assert max(held) <= retention, held
    assert expired >= 12  # the oldest went first; none lingers in an outbox


def test_pixels_times_batch_is_capped_by_default(fake_server):
    """Sixteen images of 6000x6000 pass every per-image cap (side, pixels, batch): the
    job is refused with the figure, the limit and what to do."""
    request = GenerateRequest(width=6000, height=6000, batch=16, steps=1)
    with Client.connect(fake_server.url, fake_server.token) as client:
        with pytest.raises(LimitError) as info:
            client.wait(client.submit(request, {}), timeout=10)
    message = info.value.message
    assert "576,000,000" in message and "67,108,864" in message
    assert "batch to 1" in message and "max_job_pixels" in message


# -- finding 8: hostile text over the wire ----------------------------------------------

@pytest.mark.parametrize("first, code", [
    ('{"type":"hello","protocol":1,"token":"\\ud800"}', "bad_field"),
    ('{"type":"hello","protocol":1,"token":"x","\\udc80":1}', "bad_field"),
    ("[" * 1500 + "]" * 1500, "malformed"),
    (json.dumps({"type": "hello", "protocol": "é" * 300}), "bad_field"),
])
def test_hostile_hello_gets_a_typed_error_and_a_clean_close(make_server, caplog, first, code):
    server = make_server(hello_timeout=HELLO_TIMEOUT)
    with connect(server.url, max_size=None, compression=None) as ws:
        ws.send(first)
        assert json.loads(ws.recv(5))["code"] == code
        with pytest.raises(ConnectionClosed):
            ws.recv(5)
        assert ws.close_code == 1008
    assert "Traceback" not in caplog.text and "handler failed" not in caplog.text
    with Client.connect(server.url, server.token) as client:
        assert isinstance(client.status(), Status)


def test_hostile_text_after_hello_keeps_the_connection(fake_server):
    with connect(fake_server.url, max_size=None, compression=None) as ws:
        ws.send(hello_text(fake_server.token))
        assert json.loads(ws.recv(5))["type"] == "welcome"
        for text, code in (('{"type":"cancel","job_id":"\\udfff"}', "bad_field"),
                           ('{"type":"status","\\ud800":1}', "bad_field"),
                           ('{"type":"status","x":' + "[" * 5000 + "]" * 5000 + "}",
                            "malformed")):
            ws.send(text)
            assert json.loads(ws.recv(5))["code"] == code
        ws.send('{"type":"status"}')
        assert json.loads(ws.recv(5))["type"] == "status"


# -- the outbox and the slots on their own ------------------------------------------------

def test_outbox_drops_events_and_holds_the_reader_while_full():
    from backend.server.peers import Outbox, result_due

    async def scenario():
        box = Outbox(max_bytes=100, max_frames=4)
        box.put(["x" * 60])
        assert box.put_event(["p" * 10, b"y" * 10])  # a preview: text + frame together
        assert not box.full
        box.put(["z" * 30])  # 110 bytes: full
        assert box.full and not box.put_event(["dropped"]) and box.dropped_events == 1
        box.put_result(object())  # a result reference costs no bytes
        reader = asyncio.ensure_future(box.wait_for_room())
        await asyncio.sleep(0)
        assert not reader.done()  # the connection stops reading this client
        for _ in range(3):  # 60 + 10 + 10 written: 30 bytes and 1 result left
            item, size = await box.get()
            box.sent()
        await asyncio.sleep(0)
        assert reader.done()  # below half: reading resumes
        item, _ = await box.get()
        assert item == "z" * 30
        box.sent()
        item, _ = await box.get()
        assert result_due(item) is not None
        assert box.peak_bytes == 110 and box.peak_frames == 5
    asyncio.run(scenario())


def test_slots_count_lanes_apart_and_forget_the_dead():
    from backend.server.peers import CLIENT, WAITING, Slots
    dead = set()
    slots = Slots(max_clients=1, max_waiting=2, alive=lambda conn: conn not in dead)
    assert slots.take("w1", WAITING) and slots.take("w2", WAITING)
    assert not slots.take("w3", WAITING)  # strangers: their own few slots...
    assert slots.take("c1", CLIENT)  # ...never a client's
    assert not slots.promote("w1")  # the one client slot is taken
    slots.release("c1")
    assert slots.promote("w1") and slots.count(CLIENT) == 1 and slots.count(WAITING) == 1
    dead.add("w2")  # its handshake failed after the slot was taken
    assert slots.take("w3", WAITING)


def test_hello_only_client_with_a_wrong_token_is_refused_and_frees_its_slot(make_server):
    server = make_server(max_unauthenticated=1, hello_timeout=HELLO_TIMEOUT)
    for _ in range(3):  # the one waiting slot comes back each time
        with connect(server.url, max_size=None, compression=None) as ws:
            ws.send(hello_text("wrong"))
            assert json.loads(ws.recv(5))["code"] == "auth"
            with pytest.raises(ConnectionClosed):
                ws.recv(5)


def test_a_bug_while_reading_costs_the_connection_not_a_traceback(make_server, monkeypatch):
    from shared.session import ServerSession
    real = ServerSession.receive

    def buggy(self, frame):
        if frame == '{"type":"status","boom":1}':
            raise RuntimeError("a bug")
        return real(self, frame)

    monkeypatch.setattr(ServerSession, "receive", buggy)
    server = make_server()
    with connect(server.url, max_size=None, compression=None) as ws:
        ws.send(hello_text(server.token))
        assert json.loads(ws.recv(5))["type"] == "welcome"
        ws.send('{"type":"status","boom":1}')
        reply = json.loads(ws.recv(5))
        assert reply["code"] == "protocol" and "Traceback" not in reply["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(5)
        assert ws.close_code == 1008
    with Client.connect(server.url, server.token) as client:
        assert isinstance(client.status(), Status)
