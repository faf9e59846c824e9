"""Property-based tests: no input makes the decoder or a session fail untyped.

CI runs a bounded number of examples; `controlcanvas bench soak` runs many more.
"""

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.errors import ControlCanvasError
from shared.images import Image
from shared.messages import (CLIENT_MESSAGES, PROTOCOL_VERSION, SERVER_MESSAGES, ControlUnit,
                             Generate, GenerateRequest, Limits, LoraRef, Message, from_json,
                             to_dict)
from shared.session import ClientSession, ServerSession, Submit, Violation

JOB = "0123456789abcdef0123456789abcdef"
LIMITS = Limits(max_frame_bytes=codec.HEADER_SIZE + 4 * 1024, max_text_bytes=8192,
                max_image_side=32, max_pixels=1024, max_queue=4, max_batch=4,
                max_images_per_job=4)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)

# Text with lone surrogates (JSON escapes such as "\\ud800" decode to them) and deep nests.
hostile_text = st.text(st.characters(categories=("Cs", "Ll", "Nd", "Po")), max_size=8)
hostile_values = st.recursive(
    st.none() | st.integers(-5, 5) | hostile_text,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(hostile_text, children, max_size=3),
    max_leaves=12)


VALID = to_dict(Generate(job_id=JOB, request=GenerateRequest(
    width=16, height=16, controls=(ControlUnit(condition="canny", image=0),),
    loras=(LoraRef("ink", 0.5),))))


def mutate(obj, data, values=json_values):
    """Randomly replace, delete or add one entry somewhere in a JSON tree."""
    if isinstance(obj, dict) and obj:
        key = data.draw(st.sampled_from(sorted(obj)))
        action = data.draw(st.sampled_from(["replace", "delete", "add", "recurse"]))
        obj = dict(obj)
        if action == "replace":
            obj[key] = data.draw(values)
        elif action == "delete":
            del obj[key]
        elif action == "add":
            key = data.draw(hostile_text if values is not json_values else st.text(max_size=8))
            obj[key] = data.draw(values)
        else:
            obj[key] = mutate(obj[key], data, values)
        return obj
    if isinstance(obj, list) and obj:
        i = data.draw(st.integers(0, len(obj) - 1))
        return obj[:i] + [mutate(obj[i], data, values)] + obj[i + 1:]
    return data.draw(values)


@FUZZ
@given(json_values)
def test_any_json_decodes_or_raises_typed(value):
    for registry in (CLIENT_MESSAGES, SERVER_MESSAGES):
        try:
            assert isinstance(from_json(json.dumps(value), registry), Message)
        except ControlCanvasError:
            pass


@FUZZ
@given(st.data())
def test_mutated_generate_decodes_or_raises_typed(data):
    text = json.dumps(mutate(VALID, data))
    try:
        message = from_json(text, CLIENT_MESSAGES)
    except ControlCanvasError as err:
        assert err.code and err.message
        return
    # whatever decodes is a fully valid message that round-trips
    assert from_json(json.dumps(to_dict(message)), CLIENT_MESSAGES) == message


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_frame_decoder(data):
    try:
        codec.decode_frame(data, max_image_side=32, max_pixels=1024)
    except ControlCanvasError:
        pass


@FUZZ
@given(st.data(), hostile_text, st.booleans())
def test_hostile_text_anywhere_is_refused_typed_and_sendable(data, token, deep):
    """Surrogates in names or values, anywhere in a message (the token too), and nesting
    past the parser's depth: typed errors whose replies the server can encode and send."""
    text = json.dumps(mutate(mutate(VALID, data, hostile_values), data, hostile_values))
    if deep and text.endswith("}"):
        text = text[:-1] + ',"deep":' + "[" * 1500 + "]" * 1500 + "}"
    for hello_token in (token, "tok"):
        session = ServerSession(token="tok", limits=LIMITS, server="s", engine="e")
        session.receive(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                                    "token": hello_token}))
        session.receive(text)
        for out in session.data_to_send():
            if isinstance(out, str):
                json.loads(out.encode("utf-8"))
        session.close_reason.encode("utf-8")


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 300))
def test_lying_headers_are_refused(version, kind, fmt, reserved, slot, width, height, payload):
    header = (b"CCIM" + bytes([version, kind, fmt, reserved]) + struct.pack(">I", slot)
              + bytes(16) + struct.pack(">II", width, height))
    try:
        frame = codec.decode_frame(header + bytes(payload), max_image_side=32, max_pixels=1024)
    except ControlCanvasError:
        return
    assert len(frame.image.data) == width * height * 4 == payload


def frames():
    hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "token": "tok"})
    good_image = codec.encode_frame(codec.KIND_INPUT, JOB, 0, Image.filled(16, 16))
    return st.one_of(
        st.just(hello), st.just(json.dumps(VALID)), st.just(good_image),
        st.builds(lambda v: json.dumps(v), json_values),
        st.binary(max_size=100),
        st.builds(lambda cut: good_image[:cut], st.integers(0, len(good_image))),
        st.text(max_size=50))


@FUZZ
@given(st.lists(frames(), max_size=12))
def test_server_session_survives_any_sequence(sequence):
    session = ServerSession(token="tok", limits=LIMITS, server="s", engine="e")
    for frame in sequence:
        events = session.receive(frame)  # must never raise
        for event in events:
            if isinstance(event, Violation):
                assert event.error.code
            if isinstance(event, Submit):
                assert set(event.images) == set(event.message.slots())
        for out in session.data_to_send():
            if isinstance(out, str):
                reply = json.loads(out)
                assert reply["type"] in SERVER_MESSAGES
        if session.closed:
            assert session.receive(frame) == []


@FUZZ
@given(st.lists(st.one_of(st.builds(json.dumps, json_values), st.binary(max_size=80)),
                max_size=8))
def test_client_session_raises_only_typed_errors(sequence):
    client = ClientSession(token="t")
    for frame in sequence:
        try:
            client.receive(frame)
        except ControlCanvasError:
            pass


def test_real_server_keeps_serving_after_garbage(fake_server):
    """A few hundred random frames over a real socket; then normal work succeeds."""
    import random

    from websockets.sync.client import connect

    from shared.client import Client
    from shared.messages import Status

    rng = random.Random(1234)
    good_image = codec.encode_frame(codec.KIND_INPUT, JOB, 0, Image.filled(16, 16))
    pool = [json.dumps(VALID), good_image, b"", "", "{", "null",
            json.dumps({"type": "resume", "job_ids": ["x" * 32]}),
            json.dumps({"type": "ack", "job_ids": [JOB]}),
            json.dumps({"type": "cancel", "job_id": JOB})]
    for round_ in range(4):
        with connect(fake_server.url, max_size=None, compression=None, max_queue=None,
                     close_timeout=1) as ws:
            if round_:
                ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                                    "token": fake_server.token}))
            for _ in range(60):
                choice = rng.random()
                if choice < 0.4:
                    frame = rng.choice(pool)
                elif choice < 0.7:
                    frame = bytes(rng.getrandbits(8) for _ in range(rng.randrange(60)))
                else:
                    frame = good_image[:rng.randrange(len(good_image))]
                try:
                    ws.send(frame)
                except Exception:
                    break  # the server closed this connection (e.g. no hello): fine
    with Client.connect(fake_server.url, fake_server.token) as client:
        assert isinstance(client.status(), Status)
        request = GenerateRequest(width=16, height=16, steps=2,
                                  controls=(ControlUnit(condition="canny", image=0),))
        assert client.wait(client.submit(request, {0: Image.filled(16, 16)})).images
