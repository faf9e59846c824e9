"""shared.messages: strict decoding, typed errors that name the field."""

import json

import pytest

from shared.errors import FieldError, MalformedMessage, UnknownMessage, VersionMismatch
from shared.messages import (CLIENT_MESSAGES, MAX_SEED, PROTOCOL_VERSION, SERVER_MESSAGES, Ack,
                             ControlUnit, Error, Generate, GenerateRequest, Hello, Limits, Models,
                             Preprocess, Result, ResultImage, Welcome, from_json, new_job_id,
                             to_dict, to_json)

JOB = "0123456789abcdef0123456789abcdef"


def generate_dict(**request):
    req = {"width": 64, "height": 48, "prompt": "a fox",
           "controls": [{"condition": "lineart", "image": 0}]}
    req.update(request)
    return {"type": "generate", "job_id": JOB, "request": req}


def decode(obj, registry=CLIENT_MESSAGES):
    return from_json(json.dumps(obj), registry)


def test_generate_round_trip_keeps_every_field():
    msg = Generate(job_id=JOB, preview_every=3, cancel_on_disconnect=True, request=GenerateRequest(
        width=100, height=60, mode="inpaint", prompt="ä fox 🦊", negative_prompt="blur",
        seed=42, steps=25, cfg=6.5, sampler="unipc", strength=0.5, batch=4, base_model="sd15",
        init_image=1, mask_image=2, hires=True, controls=(
            ControlUnit(condition="openpose", image=0, preprocessor="none", params={"a": 1.5},
                        model="m", weight=1.25, start=0.1, end=0.9, control_mode="control",
                        resize_mode="resize_and_fill"),)))
    back = from_json(to_json(msg), CLIENT_MESSAGES)
    assert back == msg
    assert back.request.controls[0].params == {"a": 1.5}


def test_defaults_match_what_artists_expect():
    req = GenerateRequest(width=512, height=512)
    assert (req.steps, req.cfg, req.seed, req.batch, req.mode) == (20, 7.0, -1, 1, "txt2img")
    unit = ControlUnit(condition="lineart", image=0)
    assert (unit.weight, unit.start, unit.end, unit.control_mode) == (1.0, 0.0, 1.0, "balanced")


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["request"].update(weight=1), "request.weight"),
    (lambda d: d.pop("request"), "request"),
    (lambda d: d.pop("job_id"), "job_id"),
    (lambda d: d["request"]["controls"][0].update(weight=2.5), "request.controls[0].weight"),
    (lambda d: d["request"]["controls"][0].update(weight="1"), "request.controls[0].weight"),
    (lambda d: d["request"]["controls"][0].update(condition="lasers"),
     "request.controls[0].condition"),
    (lambda d: d["request"]["controls"][0].pop("condition"), "request.controls[0].condition"),
    (lambda d: d["request"]["controls"][0].update(start=0.8, end=0.2),
     "request.controls[0].start"),
    (lambda d: d["request"].update(steps=True), "request.steps"),
    (lambda d: d["request"].update(steps=2.0), "request.steps"),
    (lambda d: d["request"].update(steps=0), "request.steps"),
    (lambda d: d["request"].update(seed=MAX_SEED + 1), "request.seed"),
    (lambda d: d["request"].update(mode="img2img"), "request.init_image"),
    (lambda d: d["request"].update(mode="inpaint", init_image=1), "request.mask_image"),
    (lambda d: d["request"].update(controls={"condition": "canny"}), "request.controls"),
    (lambda d: d["request"].update(prompt=None), "request.prompt"),
    (lambda d: d.update(job_id="../../etc/passwd"), "job_id"),
    (lambda d: d.update(job_id=JOB.upper()), "job_id"),
    (lambda d: d["request"]["controls"][0].update(params={"k": [1, 2]}),
     "request.controls[0].params.k"),
])
def test_bad_fields_are_named(mutate, field):
    obj = generate_dict()
    mutate(obj)
    with pytest.raises(FieldError) as info:
        decode(obj)
    err = info.value
    assert err.code == "bad_field"
    assert err.field == field
    assert field in err.message


def test_missing_field_with_default_is_fine():
    obj = generate_dict()
    obj["request"].pop("width")
    assert decode(obj).request.width == 512


def test_missing_required_field_named():
    with pytest.raises(FieldError) as info:
        decode({"type": "cancel"})
    assert info.value.field == "job_id" and "missing" in info.value.message


def test_nan_and_infinity_refused():
    text = to_json(Generate(job_id=JOB, request=GenerateRequest())).replace('"cfg":7.0',
                                                                            '"cfg":NaN')
    with pytest.raises(FieldError) as info:
        from_json(text, CLIENT_MESSAGES)
    assert info.value.field == "request.cfg"


@pytest.mark.parametrize("text", ["", "{", "[1,2]", "null", "\"hello\"", b"\xff\xfe"])
def test_malformed_json(text):
    with pytest.raises(MalformedMessage) as info:
        from_json(text, CLIENT_MESSAGES)
    assert info.value.code == "malformed"


def test_unknown_type_lists_known_ones():
    with pytest.raises(UnknownMessage) as info:
        decode({"type": "format_disk"})
    assert "generate" in info.value.message and info.value.code == "unknown_type"


def test_type_missing_or_not_string():
    for obj in ({}, {"type": 3}):
        with pytest.raises(FieldError) as info:
            decode(obj)
        assert info.value.field == "type"


def test_server_types_are_not_client_types():
    welcome = to_json(Welcome(protocol=1, server="s", engine="fake", limits=Limits(
        max_frame_bytes=1, max_text_bytes=1, max_image_side=1, max_pixels=1, max_queue=1,
        max_batch=1, max_images_per_job=1)))
    assert from_json(welcome, SERVER_MESSAGES).engine == "fake"
    with pytest.raises(UnknownMessage):
        from_json(welcome, CLIENT_MESSAGES)


def test_welcome_engine_info_is_optional_and_left_out_when_empty():
    limits = Limits(max_frame_bytes=1, max_text_bytes=1, max_image_side=1, max_pixels=1,
                    max_queue=1, max_batch=1, max_images_per_job=1)
    info = {"device": "cuda:0", "dtype": "fp16", "fuse_qkv": True, "compile": False}
    text = to_json(Welcome(protocol=1, server="s", engine="diffusers", limits=limits,
                           engine_info=info))
    assert from_json(text, SERVER_MESSAGES).engine_info == info
    plain = to_json(Welcome(protocol=1, server="s", engine="fake", limits=limits))
    assert "engine_info" not in json.loads(plain)  # what a server without info always sent
    assert from_json(plain, SERVER_MESSAGES).engine_info == {}
    with pytest.raises(FieldError) as err:
        from_json(text.replace('"fp16"', '["fp16"]'), SERVER_MESSAGES)
    assert err.value.field == "engine_info.dtype"


def test_version_mismatch_is_its_own_error():
    with pytest.raises(VersionMismatch) as info:
        decode({"type": "hello", "protocol": PROTOCOL_VERSION + 1, "token": "t",
                "future_field": 1})
    assert "update" in info.value.message and info.value.code == "version"


def test_hello_repr_hides_token():
    assert "s3cret" not in repr(Hello(protocol=1, token="s3cret"))


def test_construction_validates_too():
    with pytest.raises(FieldError):
        ControlUnit(condition="lineart", image=0, weight=-0.1)
    with pytest.raises(FieldError):
        GenerateRequest(batch=17)
    with pytest.raises(FieldError):
        Ack(job_ids=JOB)  # a string is not a list of ids


def test_slots_and_seeds():
    req = GenerateRequest(mode="inpaint", init_image=3, mask_image=1, batch=3,
                          controls=(ControlUnit(condition="depth", image=0),
                                    ControlUnit(condition="canny", image=3)))
    assert req.slots() == (0, 1, 3)
    assert req.seeds(7) == (7, 8, 9)
    assert req.seeds(MAX_SEED) == (MAX_SEED, 0, 1)


def test_preprocess_needs_both_sizes():
    with pytest.raises(FieldError):
        Preprocess(job_id=JOB, annotator="canny", width=512)
    assert Preprocess(job_id=JOB, annotator="canny", width=512, height=256).slots() == (0,)


def test_server_messages_round_trip():
    for msg in (Result(job_id=JOB, images=(ResultImage(slot=0, width=4, height=4, seed=9),),
                       elapsed=1.5, info={"model": "x"}),
                Error(code="auth", message="no", field="token"),
                Models()):
        assert from_json(to_json(msg), SERVER_MESSAGES) == msg


def test_to_dict_has_type_first():
    assert list(to_dict(Ack(job_ids=(JOB,))))[0] == "type"


def test_new_job_ids_are_valid_and_distinct():
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    for job_id in ids:
        Generate(job_id=job_id, request=GenerateRequest())


def test_train_message_checks_its_fields():
    from shared.messages import Train
    ok = {"type": "train", "job_id": JOB, "data": "/d", "base": "sd15", "out": "/o"}
    msg = decode(ok)
    assert isinstance(msg, Train) and msg.prompt_drop == 0.5 and msg.slots() == ()
    assert msg.lr_schedule == "constant" and msg.lr_warmup_steps == 0
    assert decode({**ok, "lr_schedule": "cosine"}).lr_schedule == "cosine"
    for change, field in (({"resolution": 100}, "resolution"), ({"lr": 0}, "lr"),
                          ({"lr_schedule": "step"}, "lr_schedule"),
                          ({"lr_warmup_steps": -1}, "lr_warmup_steps"),
                          ({"out": " "}, "out"), ({"prompt_drop": 1.5}, "prompt_drop"),
                          ({"mixed_precision": "fp8"}, "mixed_precision")):
        with pytest.raises(FieldError) as info:
            decode({**ok, **change})
        assert info.value.field == field


# -- input no decoder should choke on (issue 18, finding 8) -----------------------------

def test_deep_nesting_is_a_typed_error():
    """json.loads raises RecursionError past the interpreter's depth: that is malformed
    input, not a crash."""
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(MalformedMessage, match="nests"):
            from_json(text, CLIENT_MESSAGES)


def test_deep_value_in_a_field_is_a_short_field_error():
    """A value nested as deep as the parser allows, where a string belongs: the error
    names the field and shows a short excerpt (repr of the whole would recurse)."""
    deep = "[" * 900 + "]" * 900
    text = ('{"type":"generate","job_id":"%s","request":{"prompt":%s}}' % (JOB, deep))
    with pytest.raises(FieldError) as info:
        from_json(text, CLIENT_MESSAGES)
    assert info.value.field == "request.prompt" and len(info.value.message) < 300


@pytest.mark.parametrize("text, field", [
    ('{"type":"hello","protocol":1,"token":"\\ud800"}', "token"),
    ('{"type":"hello","protocol":1,"token":"ok","client":"a\\udfffb"}', "client"),
    ('{"type":"status","\\udc80bad":1}', "\\udc80bad"),
    ('{"type":"generate","job_id":"%s","request":{"prompt":"fox \\ud83d"}}' % JOB,
     "request.prompt"),
    ('{"type":"generate","job_id":"%s","request":{"\\udcff":1}}' % JOB, "request.\\udcff"),
    ('{"type":"generate","job_id":"%s","request":{"controls":[{"condition":"canny",'
     '"image":0,"params":{"\\ud800":1}}]}}' % JOB, "request.controls[0].params key"),
])
def test_lone_surrogates_are_field_errors_that_can_be_sent(text, field):
    """A JSON escape may name half a UTF-16 pair: such text could not be encoded, logged
    or echoed back, so it is refused, and the error itself is valid Unicode."""
    with pytest.raises(FieldError) as info:
        from_json(text, CLIENT_MESSAGES)
    err = info.value
    assert err.field == field
    assert "surrogate" in err.message or "not a field" in err.message
    to_json(Error(code=err.code, message=err.message, field=err.field)).encode("utf-8")


def test_a_surrogate_token_cannot_be_built_either():
    with pytest.raises(FieldError, match="surrogate"):
        Hello(protocol=PROTOCOL_VERSION, token="\udc80")


def test_a_client_skips_fields_a_newer_server_added_and_the_server_stays_strict():
    """Forward compatibility: a plug-in of this release reads a welcome / models message
    from a newer server that carries fields it does not know (nested ones too), and keeps
    everything it does know; the server still refuses unknown fields from clients."""
    limits = Limits(max_frame_bytes=10, max_text_bytes=10, max_image_side=10, max_pixels=10,
                    max_queue=1, max_batch=1, max_images_per_job=1)
    welcome = json.loads(to_json(Welcome(protocol=PROTOCOL_VERSION, server="s", engine="e",
                                         limits=limits)))
    welcome["future_field"] = {"x": 1}
    welcome["limits"]["future_limit"] = 7
    decoded = from_json(json.dumps(welcome), SERVER_MESSAGES)
    assert isinstance(decoded, Welcome) and decoded.engine == "e"
    assert decoded.limits == limits
    with pytest.raises(FieldError, match="future_field"):  # a client message stays strict
        from_json(json.dumps({"type": "status", "future_field": 1}), CLIENT_MESSAGES)
    # and the leniency does not leak into the next decode
    with pytest.raises(FieldError):
        from_json(json.dumps({"type": "ack", "job_ids": [], "x": 1}), CLIENT_MESSAGES)


# -- LoRAs (added within protocol 1) ----------------------------------------------

def test_loras_round_trip_and_are_left_out_when_empty():
    from shared.messages import LoraInfo, LoraRef

    msg = Generate(job_id=JOB, request=GenerateRequest(
        loras=(LoraRef("ink style", 0.8), LoraRef("paper.safetensors", -1.5))))
    back = from_json(to_json(msg), CLIENT_MESSAGES)
    assert back == msg
    assert [(l.name, l.strength) for l in back.request.loras] == [("ink style", 0.8),
                                                                  ("paper", -1.5)]
    # A request without LoRAs is the JSON a server that predates them takes...
    assert "loras" not in to_dict(Generate(job_id=JOB, request=GenerateRequest()))["request"]
    # ...and such a server's clients send none: still a valid request.
    assert decode(generate_dict()).request.loras == ()
    models = Models(loras=(LoraInfo(name="ink", family="sd15", size=1234),))
    assert from_json(to_json(models), SERVER_MESSAGES) == models
    assert "loras" not in to_dict(Models())
    assert LoraRef("ink").strength == 1.0


@pytest.mark.parametrize("loras, field", [
    ([{"name": "../ink"}], "request.loras[0].name"),
    ([{"name": "loras/ink"}], "request.loras[0].name"),
    ([{"name": "..\\ink"}], "request.loras[0].name"),
    ([{"name": "C:ink"}], "request.loras[0].name"),
    ([{"name": "a..b"}], "request.loras[0].name"),
    ([{"name": ""}], "request.loras[0].name"),
    ([{"name": ".hidden"}], "request.loras[0].name"),
    ([{"name": "tab\tname"}], "request.loras[0].name"),
    ([{"name": "x" * 201}], "request.loras[0].name"),
    ([{"name": 3}], "request.loras[0].name"),
    ([{"strength": 1.0}], "request.loras[0].name"),
    ([{"name": "ink", "strength": 2.5}], "request.loras[0].strength"),
    ([{"name": "ink", "strength": "1"}], "request.loras[0].strength"),
    ([{"name": "ink", "weight": 1}], "request.loras[0].weight"),
    ([{"name": "ink"}, {"name": "ink.safetensors"}], "request.loras[1].name"),
    ([{"name": f"l{i}"} for i in range(9)], "request.loras"),
    ({"name": "ink"}, "request.loras"),
])
def test_bad_loras_are_named(loras, field):
    with pytest.raises(FieldError) as info:
        decode(generate_dict(loras=loras))
    assert info.value.field == field
    assert field in info.value.message


def test_eight_loras_fit():
    request = decode(generate_dict(loras=[{"name": f"l{i}", "strength": 0} for i in range(8)]))
    assert len(request.request.loras) == 8
