"""shared.session: both protocol ends driven with literal frames, no sockets."""

import json

import pytest

from shared import codec
from shared.errors import ProtocolError
from shared.images import Image
from shared.messages import (PROTOCOL_VERSION, ControlUnit, Error, GenerateRequest, Limits,
                             Progress, Queued, ResultImage, Welcome)
from shared.session import (Authenticated, ClientSession, PreviewReady, ResultReady,
                            ServerSession, Submit, Violation)

JOB = "0123456789abcdef0123456789abcdef"
LIMITS = Limits(max_frame_bytes=codec.HEADER_SIZE + 4 * 4096, max_text_bytes=4096,
                max_image_side=64, max_pixels=4096, max_queue=4, max_batch=4,
                max_images_per_job=3)
HELLO = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": "tok"})


def server():
    return ServerSession(token="tok", limits=LIMITS, server="test", engine="fake")


def ready_server():
    s = server()
    assert s.receive(HELLO) == [Authenticated("")]
    s.data_to_send()
    return s


def sent(session):
    return [json.loads(f) if isinstance(f, str) else f for f in session.data_to_send()]


def generate_text(job=JOB, **request):
    req = {"width": 8, "height": 8, "controls": [{"condition": "canny", "image": 0}]}
    req.update(request)
    return json.dumps({"type": "generate", "job_id": job, "request": req})


def image_frame(slot=0, job=JOB, w=8, h=8, kind=codec.KIND_INPUT):
    return codec.encode_frame(kind, job, slot, Image(w, h, bytes(w * h * 4)))


def test_hello_then_welcome():
    s = server()
    assert s.receive(HELLO) == [Authenticated("")]
    (welcome,) = sent(s)
    assert welcome["type"] == "welcome" and welcome["limits"]["max_image_side"] == 64


def test_welcome_carries_the_engine_info_it_was_given():
    info = {"device": "cuda:0", "sdpa": True, "compile": False}
    s = ServerSession(token="tok", limits=LIMITS, server="s", engine="diffusers",
                      engine_info=info)
    client = ClientSession(token="tok", client="krita")
    for frame in client.data_to_send():
        s.receive(frame)
    (frame,) = s.data_to_send()
    assert json.loads(frame)["engine_info"] == info
    (welcome,) = client.receive(frame)
    assert welcome.engine_info == info == client.welcome.engine_info


@pytest.mark.parametrize("first, code", [
    (json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": "nope"}), "auth"),
    (json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION}), "bad_field"),
    (json.dumps({"type": "hello", "protocol": 99, "token": "tok"}), "version"),
    (json.dumps({"type": "status"}), "out_of_order"),
    ("not json", "malformed"),
    (b"CCIM", "out_of_order"),
])
def test_refusals_before_hello_close_the_session(first, code):
    s = server()
    (event,) = s.receive(first)
    assert isinstance(event, Violation) and event.fatal and event.error.code == code
    (error,) = sent(s)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    assert s.closed
    assert s.receive(HELLO) == []  # nothing more is read


def test_generate_waits_for_its_images():
    s = ready_server()
    assert s.receive(generate_text()) == []
    (event,) = s.receive(image_frame())
    assert isinstance(event, Submit) and event.job_id == JOB
    assert event.images[0].size == (8, 8)


def test_request_without_images_is_submitted_at_once():
    s = ready_server()
    (event,) = s.receive(generate_text(controls=[]))
    assert isinstance(event, Submit) and event.images == {}


def test_missing_image_slot_is_reported_when_client_moves_on():
    s = ready_server()
    s.receive(generate_text())
    events = s.receive(json.dumps({"type": "status"}))
    assert isinstance(events[0], Violation) and events[0].error.code == "missing_image"
    assert events[1].__class__.__name__ == "StatusRequest"
    (error,) = sent(s)
    assert error["job_id"] == JOB and "slot" in error["message"]


@pytest.mark.parametrize("frame, code", [
    (image_frame(slot=5), "bad_frame"),
    (image_frame(job="f" * 32), "bad_frame"),
    (image_frame(kind=codec.KIND_RESULT), "bad_frame"),
    (image_frame()[:-1], "bad_frame"),
    (image_frame(w=65, h=1), "limit"),
])
def test_bad_image_refuses_the_job_not_the_connection(frame, code):
    s = ready_server()
    s.receive(generate_text())
    (event,) = s.receive(frame)
    assert isinstance(event, Violation) and not event.fatal and event.error.code == code
    (error,) = sent(s)
    assert error["job_id"] == JOB
    # the connection still works
    s.receive(generate_text(job="a" * 32))
    assert isinstance(s.receive(image_frame(job="a" * 32))[0], Submit)


def test_duplicate_slot_refused():
    s = ready_server()
    s.receive(generate_text(controls=[{"condition": "canny", "image": 0},
                                      {"condition": "depth", "image": 1}]))
    s.receive(image_frame(slot=0))
    (event,) = s.receive(image_frame(slot=0))
    assert event.error.code == "bad_frame" and "twice" in event.error.message


def test_images_of_a_refused_request_are_skipped_quietly():
    s = ready_server()
    (event,) = s.receive(generate_text(batch=99))
    assert event.error.field == "request.batch" and event.error.job_id == JOB
    assert s.receive(image_frame()) == []
    assert [m["job_id"] for m in sent(s)] == [JOB]


def test_limits_on_output_size_and_image_count():
    s = ready_server()
    (event,) = s.receive(generate_text(width=128))
    assert event.error.code == "limit"
    many = [{"condition": "canny", "image": i} for i in range(4)]
    (event,) = s.receive(generate_text(job="b" * 32, controls=many))
    assert event.error.code == "limit" and "at most 3" in event.error.message


def test_orphan_binary_frame():
    s = ready_server()
    (event,) = s.receive(image_frame())
    assert event.error.code == "bad_frame" and "announcing" in event.error.message


def test_text_over_limit():
    s = ready_server()
    (event,) = s.receive(json.dumps({"type": "status", "pad": "x" * 5000}))
    assert event.error.code == "limit" and not event.fatal


def test_second_hello_refused():
    s = ready_server()
    (event,) = s.receive(HELLO)
    assert event.error.code == "out_of_order" and not s.closed


# -- client side ---------------------------------------------------------------

def welcome_text():
    from shared.messages import to_json
    return to_json(Welcome(protocol=PROTOCOL_VERSION, server="s", engine="fake", limits=LIMITS))


def test_client_full_exchange_with_server_session():
    client = ClientSession(token="tok", client="krita")
    srv = server()
    for frame in client.data_to_send():
        srv.receive(frame)
    for frame in srv.data_to_send():
        (welcome,) = client.receive(frame)
    assert isinstance(welcome, Welcome) and client.limits == LIMITS
    request = GenerateRequest(width=8, height=8, controls=(ControlUnit(condition="canny",
                                                                        image=0),))
    canvas = Image(8, 8, bytes(range(256)))
    job = client.generate(request, {0: canvas})
    events = []
    for frame in client.data_to_send():
        events += srv.receive(frame)
    (submit,) = events
    assert submit.images[0] == canvas and submit.message.request == request
    result = Image(8, 8, bytes(reversed(range(256))))
    srv.send(Queued(job_id=job, position=1))
    srv.send(Progress(job_id=job, step=1, total=2))
    srv.send_preview(job, 1, Image.filled(2, 2, (1, 2, 3, 4)))
    srv.send_result(job, [(5, result)])
    got = []
    for frame in srv.data_to_send():
        got += client.receive(frame)
    assert [type(e).__name__ for e in got] == ["Queued", "Progress", "PreviewReady",
                                               "ResultReady"]
    assert isinstance(got[2], PreviewReady) and got[2].image.pixel(1, 1) == (1, 2, 3, 4)
    final = got[3]
    assert isinstance(final, ResultReady) and final.seeds == (5,)
    assert final.images[0][1] == result


def test_client_checks_slots_before_sending():
    client = ClientSession(token="t")
    client.data_to_send()
    request = GenerateRequest(width=8, height=8, controls=(ControlUnit(condition="canny",
                                                                        image=0),))
    with pytest.raises(Exception, match="slot"):
        client.generate(request, {})
    with pytest.raises(Exception, match="not used"):
        client.generate(request, {0: Image.filled(8, 8), 4: Image.filled(8, 8)})
    assert client.data_to_send() == []


def test_client_refuses_broken_server_stream():
    client = ClientSession(token="t")
    client.receive(welcome_text())
    with pytest.raises(ProtocolError):
        client.receive(image_frame(kind=codec.KIND_RESULT))
    from shared.messages import Result, to_json
    client.receive(to_json(Result(job_id=JOB, images=(ResultImage(slot=0, width=8, height=8),))))
    with pytest.raises(ProtocolError):
        client.receive(json.dumps({"type": "queued", "job_id": JOB, "position": 1}))


def test_client_passes_errors_through():
    client = ClientSession(token="t")
    (event,) = client.receive(json.dumps({"type": "error", "code": "auth", "message": "no"}))
    assert isinstance(event, Error) and event.code == "auth"


def test_client_refuses_a_result_of_another_size_than_announced():
    """A result frame whose size differs from what the server announced for it is refused
    (a plug-in would otherwise paste it at the wrong size); the right size passes."""
    from shared.messages import Result, to_json
    announce = to_json(Result(job_id=JOB, images=(ResultImage(slot=0, width=8, height=8,
                                                              seed=1),)))
    client = ClientSession(token="t")
    client.receive(welcome_text())
    assert client.receive(announce) == []
    with pytest.raises(ProtocolError, match="is 4x8, announced 8x8"):
        client.receive(image_frame(w=4, h=8, kind=codec.KIND_RESULT))
    good = ClientSession(token="t")
    good.receive(welcome_text())
    good.receive(announce)
    (event,) = good.receive(image_frame(w=8, h=8, kind=codec.KIND_RESULT))
    assert isinstance(event, ResultReady) and event.images[0][1].size == (8, 8)


@pytest.mark.parametrize("first", [
    '{"type":"hello","protocol":1,"token":"\\ud800"}',
    '{"type":"hello","protocol":1,"token":"tok","\\udc80":1}',
    "[" * 1500 + "]" * 1500,
    json.dumps({"type": "hello", "protocol": "é" * 200, "token": "tok"}),
])
def test_hostile_hello_is_refused_with_a_sendable_error(first):
    """Lone surrogates in the token or a field name, deep nesting, long non-ASCII values:
    a typed refusal whose reply and close reason can be encoded and sent."""
    s = server()
    (event,) = s.receive(first)
    assert isinstance(event, Violation) and event.fatal
    (reply,) = s.data_to_send()
    assert json.loads(reply.encode("utf-8"))["code"] in ("bad_field", "malformed")
    assert s.closed and s.close_reason.encode("utf-8")


def test_surrogates_after_hello_keep_the_connection():
    s = ready_server()
    (event,) = s.receive('{"type":"cancel","job_id":"\\udfff"}')
    assert isinstance(event, Violation) and not event.fatal
    (reply,) = s.data_to_send()
    assert json.loads(reply.encode("utf-8"))["field"] == "job_id"
    s.receive(json.dumps({"type": "status"}))
    assert not s.closed


def test_pixels_times_batch_is_capped():
    """Sixteen images at the per-image limit pass every per-image cap; their sum must not:
    the refusal names the figure, the limit and what to do."""
    s = ServerSession(token="tok", limits=LIMITS, server="test", engine="fake",
                      max_job_pixels=3 * 32 * 32)
    s.receive(HELLO)
    s.data_to_send()
    (event,) = s.receive(generate_text(width=32, height=32, batch=3, controls=[]))
    assert not isinstance(event, Violation)  # exactly the limit: fine
    (event,) = s.receive(generate_text(job="1" * 32, width=32, height=32, batch=4,
                                       controls=[]))
    assert isinstance(event, Violation) and event.error.code == "limit"
    message = event.error.message
    assert "4,096" in message and "3,072" in message and "batch to 3" in message
    assert event.error.field == "request.batch" and event.error.job_id == "1" * 32
