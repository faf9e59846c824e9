"""The GIMP plug-in's logic, without GIMP: procedures, requests, poses, errors, threading.

Actions run against an in-memory host (tests/gimp_support/fake_host.py, the same
interface canvas.py implements over GIMP) and a real server with the fake engine
on 127.0.0.1; expected pixels come from running FakeEngine directly.  The real
GIMP tier is tests/test_gimp_real.py.
"""

from __future__ import annotations

import json
import math
import stat
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin_gimp"))

from backend.server.config import ServerConfig, config_dir as backend_config_dir  # noqa: E402
from backend.engines.fake import FakeEngine  # noqa: E402
from backend.server.local import ServerThread  # noqa: E402
from controlcanvas_gimp import (actions, generation, pose, problems, procedures,  # noqa: E402
                                settings, worker)
from controlcanvas_gimp.generation import GenerateOptions  # noqa: E402
from gimp_support import expect  # noqa: E402
from controlcanvas_gimp.host import LayerInfo  # noqa: E402
from gimp_support.fake_host import FakeHost, FakeLayer, resize_nearest  # noqa: E402
from tiny_fixtures import lora_engine, tiny_lora_dir, tiny_root, torch_threads  # noqa: E402,F401
from shared import doc_history, naming  # noqa: E402
from shared import pose as openpose  # noqa: E402
from shared.client import Client  # noqa: E402
from shared.errors import (AuthError, Cancelled, ModelMissing, OutOfMemory,  # noqa: E402
                           ServerUnavailable, TokenNeeded)
from shared.images import Image  # noqa: E402
from shared.messages import (AnnotatorInfo, ControlUnit, GenerateRequest, Limits,  # noqa: E402
                             ModelInfo, Models)

TOKEN = "gimp-test-token"


def spec(short_name: str) -> procedures.ProcedureSpec:
    return procedures.BY_NAME[procedures.PREFIX + short_name]


def line_art(width: int = 64, height: int = 48) -> Image:
    """Dark lines on transparent paper: a frame and a diagonal."""
    data = bytearray(width * height * 4)
    for y in range(height):
        for x in range(width):
            if x in (4, width - 5) or y in (4, height - 5) or abs(x * height - y * width) < width:
                i = (y * width + x) * 4
                data[i:i + 4] = b"\x10\x10\x10\xff"
    return Image(width, height, bytes(data))


def flat(keypoints):
    """Keypoints as one flat list (None as NaN pairs), for pytest.approx."""
    return [v for p in keypoints for v in ((math.nan, math.nan) if p is None else p)]


def fake_pixels(request: GenerateRequest, control: Image):
    """What the server (fake engine) makes of ``request`` with ``control`` in slot 0."""
    return expect.generated(request, {0: control})


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with ServerThread(expect.NoPoseEngine(), ServerConfig(port=0), token=TOKEN) as running:
        yield running


@pytest.fixture
def token_dir(tmp_path, monkeypatch):
    """The backend's config folder with its token file, as `controlcanvas serve` leaves it."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def host(tmp_path, token_dir):
    source = FakeLayer("lines", line_art(), x=13, y=7)
    paper = FakeLayer("paper", Image.filled(96, 72, (255, 255, 255, 255)))
    return FakeHost([source, paper], selected=source,
                    settings_file=str(tmp_path / "gimp" / "controlcanvas.json"))


def values(server, **kw):
    out = {"server-url": server.url, "prompt": "girl in a red coat", "seed": 1234,
           "steps": 6, "size": "layer"}
    out.update(kw)
    return out


# -- procedures: the menu and the scripting interface --------------------------------

def test_nine_procedures_under_filters_controlnet():
    labels = {s.name: s.label for s in procedures.PROCEDURES}
    assert labels == {
        "python-fu-controlcanvas-generate": "Generate from layer…",
        "python-fu-controlcanvas-inpaint": "Regenerate selection…",
        "python-fu-controlcanvas-edit": "Edit with instruction…",
        "python-fu-controlcanvas-colourise": "Colourise line art…",
        "python-fu-controlcanvas-figure-from-pose": "Figure from pose…",
        "python-fu-controlcanvas-control-image": "Make control image…",
        "python-fu-controlcanvas-pose-from-photo": "Pose from photo…",
        "python-fu-controlcanvas-repeat-last": "Repeat last",
        "python-fu-controlcanvas-settings": "Settings / connection test…",
    }
    assert procedures.MENU_PATH == "<Image>/Filters/ControlNet"
    for s in procedures.PROCEDURES:
        names = [a.name for a in s.args]
        assert len(names) == len(set(names)), s.name
        assert {"server-url", "token"} <= set(names), "every procedure can name its server"
        for arg in s.args:  # GIMP would refuse a default outside its own range
            assert arg.check(arg.default) == arg.default, (s.name, arg.name)
            if arg.kind == "int":
                assert -2**31 <= arg.minimum <= arg.maximum <= generation.GINT_MAX


def test_dialog_labels_have_mnemonics():
    for s in procedures.PROCEDURES:
        labels = procedures.mnemonic_labels(s)
        for name, label in labels.items():
            assert label.count("_") == 1 and label.replace("_", "") == s.arg(name).label
        keys = [label[label.index("_") + 1].lower() for name, label in labels.items()
                if s.arg(name).in_dialog]
        assert "o" not in keys and "c" not in keys, "OK and Cancel keep Alt+O / Alt+C"
    assert procedures.mnemonic_labels(spec("generate"))["prompt"] == "_Prompt"


def test_connection_arguments_stay_out_of_dialogs_except_settings():
    assert "server-url" not in spec("generate").dialog_args
    assert spec("settings").dialog_args == ("server-url", "token")


def test_check_values_fills_defaults_and_rejects_mistakes():
    got = procedures.check_values(spec("colourise"), {"prompt": "x", "condition": "depth"})
    assert got["condition"] == "lineart", "the preset decides the condition"
    assert got["seed"] == -1 and got["steps"] == 20 and got["cfg"] == 7.0
    with pytest.raises(problems.UsageError, match="'steps'"):
        procedures.check_values(spec("generate"), {"steps": 0})
    with pytest.raises(problems.UsageError, match="one of"):
        procedures.check_values(spec("generate"), {"condition": "smell"})
    with pytest.raises(problems.UsageError, match="no argument"):
        procedures.check_values(spec("generate"), {"denoise": 0.5})
    assert spec("generate").arg("cfg").check(7) == 7.0
    assert spec("generate").arg("token").check(None) == "", "GIMP passes unset text as NULL"


# -- settings: address and token --------------------------------------------------------

@pytest.mark.parametrize("env", [
    {"CONTROLCANVAS_CONFIG_DIR": "/somewhere/cc"},
    {"XDG_CONFIG_HOME": "/xdg"},
    {},
])
def test_token_file_is_where_the_backend_writes_it(env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CONTROLCANVAS_CONFIG_DIR", "XDG_CONFIG_HOME", "APPDATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert settings.config_dir() == backend_config_dir()
    assert settings.token_file() == backend_config_dir() / "token"


def test_token_file_on_windows_and_macos():
    env = {"HOME": "/home/u", "APPDATA": r"C:\Users\u\AppData\Roaming"}
    assert settings.config_dir(env, "win32") == Path(env["APPDATA"]) / "controlcanvas"
    assert settings.config_dir({"HOME": "/Users/u"}, "darwin") == \
        Path("/Users/u/Library/Application Support/controlcanvas")


def test_connection_order_argument_then_saved_then_token_file(token_dir, tmp_path):
    conn = settings.resolve({}, {})
    assert (conn.url, conn.token) == ("ws://127.0.0.1:7351", TOKEN)
    assert str(token_dir / "token") in conn.token_source
    assert TOKEN not in repr(conn)
    saved = {"server-url": "ws://gpu-box:7351", "token": "saved"}
    conn = settings.resolve({}, saved)
    assert (conn.url, conn.token, conn.token_source) == ("ws://gpu-box:7351", "saved",
                                                         "the token saved in Settings")
    conn = settings.resolve({"server-url": " ws://x:1 ", "token": "arg"}, saved)
    assert (conn.url, conn.token) == ("ws://x:1", "arg")
    (token_dir / "token").unlink()
    conn = settings.resolve({}, {})
    assert conn.token == "" and "no token file" in conn.token_source


def test_a_symlinked_token_file_is_refused_and_the_message_says_why(token_dir, tmp_path):
    """Issue 18: the link's target is not sent, and a refusal names the link, not a
    missing file."""
    (tmp_path / "elsewhere").write_text("NOT-THE-TOKEN\n")
    (token_dir / "token").unlink()
    (token_dir / "token").symlink_to(tmp_path / "elsewhere")
    conn = settings.resolve({}, {})
    assert conn.token == ""
    assert conn.token_source == f"no token (the token file {token_dir / 'token'} is a " \
        f"symbolic link)"
    text = problems.describe(AuthError(), url=conn.url, token_source=conn.token_source)
    assert "is a symbolic link" in text and "NOT-THE-TOKEN" not in text


@pytest.mark.parametrize("url", ["ws://127.attacker.example:7351", "ws://gpu-box:7351",
                                 "ws://127.0.0.1@evil.example:7351", "ws://2130706433:7351"])
def test_a_server_elsewhere_never_gets_the_token_file(url, token_dir):
    for given, saved in (({"server-url": url}, {}), ({}, {"server-url": url}),
                         ({"server-url": url, "token": " "}, {"token": "for-the-default"})):
        with pytest.raises(TokenNeeded) as info:
            settings.resolve(given, saved)
        text = problems.describe(info.value, url=url)
        assert f"The server at {url} is not on this computer" in text
        assert f"Enter its token in {problems.SETTINGS_MENU}" in text
    conn = settings.resolve({"server-url": url, "token": "theirs"}, {})
    assert (conn.url, conn.token, conn.token_source) == (url, "theirs",
                                                         "the token given to the filter")
    conn = settings.resolve({}, {"server-url": url, "token": "saved"})
    assert (conn.url, conn.token) == (url, "saved")


def test_a_saved_token_stays_with_its_server(token_dir):
    saved = {"server-url": "ws://gpu-box:7351", "token": "for-gpu-box"}
    with pytest.raises(TokenNeeded):  # a script naming another server: not gpu-box's token
        settings.resolve({"server-url": "ws://other-box:7351"}, saved)
    conn = settings.resolve({"server-url": "ws://127.0.0.1:7351"}, saved)
    assert (conn.token, conn.token_source) == (TOKEN, f"the token file {token_dir / 'token'}")


def test_saved_settings_are_private_and_blank_values_dropped(tmp_path):
    path = tmp_path / "gimp" / "controlcanvas.json"
    settings.save(path, "ws://gpu:7351", "")
    assert settings.load_saved(path) == {"server-url": "ws://gpu:7351"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("not json")
    assert settings.load_saved(path) == {}
    assert settings.load_saved(None) == {}


# -- generation: request building ---------------------------------------------------------

@pytest.mark.parametrize("size,mode,native,expected", [
    ((64, 48), "layer", 512, (64, 48)),
    ((61, 47), "layer", 512, (64, 48)),
    ((3, 2), "layer", 512, (8, 8)),
    ((4000, 3000), "model", 512, (592, 440)),
    ((512, 512), "model", 512, (512, 512)),
    ((100, 100), "model", 1024, (1024, 1024)),
    ((1920, 1080), "model", 1024, (1368, 768)),
])
def test_generation_size(size, mode, native, expected):
    got = generation.generation_size(*size, mode, native)
    assert got == expected
    assert got[0] % 8 == 0 and got[1] % 8 == 0
    if mode == "model":  # the layer's aspect ratio within rounding, at about native² pixels
        assert abs(got[0] / got[1] - size[0] / size[1]) < 0.03
        assert abs(math.sqrt(got[0] * got[1]) - native) < 16


def test_generation_size_respects_server_limits():
    limits = Limits(max_frame_bytes=1 << 30, max_text_bytes=1 << 20, max_image_side=1000,
                    max_pixels=500_000, max_queue=4, max_batch=4, max_images_per_job=4)
    w, h = generation.generation_size(4000, 2000, "layer", 512, limits)
    assert w <= 1000 and w * h <= 500_000 and w % 8 == 0 and h % 8 == 0


def test_native_size_and_default_annotator_come_from_the_server():
    models = Models(models=(ModelInfo(name="xl", kind="base", family="sdxl", present=True),
                            ModelInfo(name="v15", kind="base", family="sd15", present=True)),
                    annotators=(AnnotatorInfo(name="canny_cv", condition="canny", available=False),
                                AnnotatorInfo(name="canny", condition="canny")),
                    default_base="xl")
    assert generation.native_side(models) == 1024
    assert generation.native_side(models, "v15") == 512
    assert generation.native_side(None) == 512
    assert generation.default_annotator(models, "canny") == "canny"
    assert generation.default_annotator(models, "depth") is None


def options(**kw) -> GenerateOptions:
    base = procedures.check_values(spec("generate"), kw)
    return GenerateOptions.from_values(base)


def test_build_request_maps_every_dialog_value():
    opts = options(condition="depth", annotate=False, prompt=" a cat ", **{
        "negative-prompt": "blur", "steps": 12, "cfg": 5.5, "sampler": "unipc", "batch": 2,
        "control-weight": 1.5, "control-start": 0.1, "control-end": 0.8,
        "control-mode": "control", "base-model": "anime", "size": "layer"})
    request = generation.build_request(opts, 61, 47, seed=99)
    assert request == GenerateRequest(
        width=64, height=48, prompt="a cat", negative_prompt="blur", seed=99, steps=12,
        cfg=5.5, sampler="unipc", batch=2, base_model="anime",
        controls=(ControlUnit(condition="depth", image=0, preprocessor="none", weight=1.5,
                              start=0.1, end=0.8, control_mode="control",
                              resize_mode="just_resize"),))


def test_annotate_without_a_server_annotator_says_what_to_do():
    with pytest.raises(problems.UsageError, match="switch 'Annotate the layer first' off"):
        generation.build_request(options(condition="scribble", annotate=True), 64, 48, seed=1,
                                 models=Models())
    with pytest.raises(problems.UsageError, match="smaller than"):
        options(**{"control-start": 0.5, "control-end": 0.5})


def test_random_seeds_can_be_typed_back_into_gimp():
    import random
    rng = random.Random(5)
    for batch in (1, 16):
        seed = generation.choose_seed(-1, batch, rng)
        assert 0 <= seed and seed + batch - 1 <= generation.GINT_MAX
    assert generation.choose_seed(42, 3) == 42


def test_layer_names_show_prompt_and_seed():
    assert naming.layer_name("girl in a red coat", 7) == "girl in a red coat · seed 7"
    long = naming.layer_name("a " * 40, 3)
    assert long.endswith("… · seed 3") and len(long) < 60
    assert naming.layer_name("", 1) == "ControlCanvas · seed 1"
    assert naming.group_name("cat", [5, 6, 7]) == "cat · seeds 5–7"


# -- pose: the skeleton as a GIMP path (the rest is shared.pose, tests/test_pose.py) ---------

def test_skeleton_path_round_trip_and_moving_a_shared_joint():
    kps = openpose.default_person(300, 300, 10, 20)
    strokes = pose.to_strokes(kps)
    meta = pose.path_meta(kps)
    assert len(strokes) == 17 and all(len(s) == 12 for s in strokes)
    assert pose.from_strokes(strokes, meta) == kps
    # The neck ends five strokes; the artist drags it in one of them (the third neck stroke).
    neck_strokes = [i for i, limb in enumerate(openpose.LIMBS) if 1 in limb]
    moved = [list(s) for s in strokes]
    i = neck_strokes[2]
    a, b = openpose.LIMBS[i]
    at = 0 if a == 1 else 6
    moved[i][at:at + 6] = [150.0, 40.0] * 3
    got = pose.from_strokes(moved, meta)
    assert got[1] == (150.0, 40.0)
    assert got[0] == kps[0] and got[2] == kps[2], "other joints stay put"
    # Saved as XCF, path points become 32-bit floats: that is not a move.
    import struct
    rounded = [[struct.unpack("f", struct.pack("f", v))[0] for v in s] for s in strokes]
    assert rounded != strokes and pose.from_strokes(rounded, meta) == kps


def test_skeleton_with_hidden_joints_and_damaged_paths():
    kps = list(openpose.default_person(100, 100))
    kps[16] = kps[17] = None  # ears not visible
    strokes = pose.to_strokes(kps)
    assert len(strokes) == 15
    assert pose.from_strokes(strokes, pose.path_meta(kps)) == tuple(kps)
    with pytest.raises(problems.UsageError, match="one per limb"):
        pose.from_strokes(strokes[:-1], pose.path_meta(kps))
    with pytest.raises(problems.UsageError, match="damaged"):
        pose.from_strokes(strokes, "{}")


def test_path_coordinates_put_pixel_centres_at_one_half():
    kps = openpose.default_person(64, 48)
    on_image = pose.layer_to_path(kps, 13, 7)
    assert on_image[1] == (kps[1][0] + 13.5, kps[1][1] + 7.5)
    assert flat(pose.path_to_layer(on_image, 13, 7)) == pytest.approx(flat(kps))


# -- worker: network off the main thread ------------------------------------------------------

def test_worker_hands_events_to_the_calling_thread():
    main = threading.get_ident()
    seen = []

    def work(emit):
        assert threading.get_ident() != main
        for i in range(5):
            emit(i)
        return "done"

    assert worker.run(work, lambda e: seen.append((e, threading.get_ident()))) == "done"
    assert seen == [(i, main) for i in range(5)]

    def broken(emit):
        emit("before")
        raise ServerUnavailable("down")

    with pytest.raises(ServerUnavailable):
        worker.run(broken, seen.append)


# -- problems: every failure as a sentence --------------------------------------------------

@pytest.mark.parametrize("err,expected", [
    (ServerUnavailable("x"), "controlcanvas serve"),
    (AuthError(), "refused the access token"),
    (ModelMissing("ControlNet 'lineart' is not downloaded: run `controlcanvas models "
                  "download lineart`."), "models download lineart"),
    (OutOfMemory(), "native size"),
    (Cancelled(), "cancelled"),
    (problems.PoseUnavailable(), "Figure from pose"),
    (TimeoutError("slow"), "did not answer in time"),
    (KeyError("oops"), "bug in the plug-in"),
])
def test_describe_says_what_to_do(err, expected):
    text = problems.describe(err, url="ws://127.0.0.1:7351", token_source="the token file x")
    assert expected in text
    assert text.startswith("ControlCanvas")
    assert "Traceback" not in text and "File \"" not in text


# -- actions against a real server (fake engine) -------------------------------------------

def test_generate_adds_the_servers_pixels_above_the_layer(server, host):
    source = host.selected
    before = source.image
    outcome = actions.run(spec("generate"), host, values(server))
    # Exactly one layer, directly above the source, in one undo group, at the same offsets.
    assert host.names() == ["girl in a red coat · seed 1234", "lines", "paper"]
    new = host.layers[0]
    assert (new.x, new.y, new.width, new.height) == (13, 7, 64, 48)
    assert new.undo_group == 1 and host.undo_groups == 1
    assert source.image is before and source.image == line_art(), "the source is untouched"
    # The request the plug-in built, and the pixels the fake engine makes for it.
    request = outcome.request
    assert (request.width, request.height, request.seed, request.steps) == (64, 48, 1234, 6)
    assert request.controls[0].preprocessor == "lineart_from_drawing", \
        "the line-art annotator this server has (it lacks controlnet-aux's 'lineart')"
    assert new.image == fake_pixels(request, before)[0]
    assert outcome.seed == 1234 and outcome.layer is new
    # Progress reached the progress bar (from the main thread: FakeHost checks).
    fractions = [f for _, f in host.progress_log if f is not None]
    assert fractions[-1] == 1.0 and any(0 < f < 1 for f in fractions)
    assert any(t and t.startswith("Step 6/6 · generating") for t, _ in host.progress_log)


def test_progress_text_says_the_step_and_the_time_left(host):
    from shared.messages import Progress, Queued
    now = [100.0]
    report = actions.Reporter(host, "generating", clock=lambda: now[0])
    report(Queued(job_id="0" * 32, position=2))
    report(Progress(job_id="0" * 32, step=0, total=1, stage="preprocess"))
    for step in range(1, 21):
        report(Progress(job_id="0" * 32, step=step, total=20))
        now[0] += 0.5  # half a second a step
    texts = [t for t, _ in host.progress_log]
    assert texts[:3] == ["ControlCanvas: waiting in the server's queue (position 2)",
                         "ControlCanvas: preparing the control image…",
                         "Step 1/20 · generating (ControlCanvas)"]
    assert texts[3] == "Step 2/20, ~9 s left · generating (ControlCanvas)"
    assert texts[-2] == "Step 19/20, ~1 s left · generating (ControlCanvas)"
    assert texts[-1] == "Step 20/20 · generating (ControlCanvas)"
    assert [f for _, f in host.progress_log][-1] == 1.0
    slow = actions.Reporter(host, "generating", clock=lambda: now[0])
    slow(Progress(job_id="0" * 32, step=1, total=150))
    now[0] += 3.0
    slow(Progress(job_id="0" * 32, step=2, total=150))
    assert host.progress_log[-1][0] == "Step 2/150, ~7 min left · generating (ControlCanvas)"


def test_random_seed_is_reported_and_reproducible(server, host):
    outcome = actions.run(spec("generate"), host, values(server, seed=-1))
    assert 0 <= outcome.seed <= generation.GINT_MAX
    assert host.layers[0].name.endswith(f"seed {outcome.seed}")
    again = FakeHost([FakeLayer("lines", line_art(), 13, 7)], settings_file=host.settings_file)
    again.selected = again.layers[0]
    actions.run(spec("generate"), again, values(server, seed=outcome.seed))
    assert again.layers[0].image == host.layers[0].image


def reopened(host):
    """The same image saved as .xcf and opened again: its persistent parasites, no memory."""
    again = FakeHost([FakeLayer("lines", line_art(), 13, 7)], settings_file=host.settings_file)
    again.selected = again.layers[0]
    again.parasites = dict(host.parasites)
    return again


def test_history_is_kept_in_the_image_and_seed_minus_2_repeats_it_after_reopening(server,
                                                                                   host):
    outcome = actions.run(spec("generate"), host, values(server, seed=-1,
                                                         **{"negative-prompt": "blurry"}))
    entries, problem = doc_history.decode(host.parasites[doc_history.NAME])
    assert not problem and len(entries) == 1
    first = entries[0]
    assert (first.prompt, first.negative, first.seeds) == ("girl in a red coat", "blurry",
                                                           (outcome.seed,))
    assert first.layers == (("", f"girl in a red coat · seed {outcome.seed}"),)
    assert first.settings["steps"] == 6 and first.settings["condition"] == "lineart"
    assert first.settings["procedure"] == spec("generate").name
    assert host.undo_groups == 1  # the record is written in the result's undo step
    assert "token" not in host.parasites[doc_history.NAME].decode()

    again = reopened(host)
    repeat = actions.run(spec("generate"), again, values(server, seed=generation.SAME_SEED))
    assert repeat.seed == outcome.seed and again.layers[0].image == host.layers[0].image
    assert len(doc_history.decode(again.parasites[doc_history.NAME])[0]) == 2
    report = actions.run(spec("settings"), reopened(again),
                         {"server-url": server.url, "token": ""}).report
    assert f"last result: 'girl in a red coat', seed {outcome.seed}" in report
    assert "seed -2 repeats it" in report


def test_seed_minus_2_without_a_stored_result_says_what_to_do(server, host):
    with pytest.raises(actions.Failed) as err:
        actions.run(spec("generate"), host, values(server, seed=-2))
    assert "has none stored" in err.value.message and "-1" in err.value.message
    assert host.added() == []


def test_damaged_image_history_is_ignored_with_a_message(server, host):
    host.parasites[doc_history.NAME] = b"\x00\x01 someone else's parasite"
    with pytest.raises(actions.Failed):
        actions.run(spec("generate"), host, values(server, seed=-2))
    assert any("ignored" in m for m in host.messages), host.messages
    host.select_rectangle(20, 15, 8, 8)
    outcome = actions.run(spec("inpaint"), host, values(server, seed=3))
    entries, problem = doc_history.decode(host.parasites[doc_history.NAME])
    assert not problem and [e.seeds for e in entries] == [(3,)] and outcome.seed == 3
    assert entries[0].settings["strength"] == 0.75


def test_odd_sized_layer_comes_back_at_its_exact_size(server, host):
    host.selected.image = line_art(61, 47)
    outcome = actions.run(spec("generate"), host, values(server, size="model"))
    assert (outcome.request.width, outcome.request.height) == (584, 448)
    new = host.layers[0]
    assert new.generated_size == (584, 448)
    assert (new.width, new.height, new.x, new.y) == (61, 47, 13, 7)


def test_variants_arrive_in_a_group_with_consecutive_seeds(server, host):
    outcome = actions.run(spec("generate"), host, values(server, batch=3, seed=40))
    group = host.layers[0]
    assert group.name == "girl in a red coat · seeds 40–42"
    assert [c.name for c in group.children] == [f"girl in a red coat · seed {s}"
                                                 for s in (40, 41, 42)]
    assert outcome.seeds == (40, 41, 42) and outcome.layer is group
    assert host.undo_groups == 1 and all(c.undo_group == 1 for c in group.children)


def test_colourise_puts_the_colours_below_the_line_art(server, host):
    outcome = actions.run(spec("colourise"), host, values(server))
    assert host.names() == ["lines", "girl in a red coat · seed 1234", "paper"]
    unit = outcome.request.controls[0]
    assert (unit.condition, unit.preprocessor) == ("lineart", "lineart_from_drawing")


def test_figure_from_pose_adds_a_skeleton_path_and_regenerates_from_it(server, host):
    layer = host.selected
    first = actions.run(spec("figure-from-pose"), host, values(server, seed=7))
    (path,) = host.paths
    assert path.name == pose.PATH_NAME and len(path.strokes) == 17
    assert path.undo_group == host.layers[0].undo_group == 1, "path + layer: one undo step"
    default = openpose.default_person(layer.width, layer.height)
    on_image = pose.from_strokes(path.strokes, path.meta)
    assert on_image == pose.layer_to_path(default, layer.x, layer.y)
    assert on_image[1] == (layer.x + 0.5 + default[1][0], layer.y + 0.5 + default[1][1]), \
        "GIMP's pixel centres are at +0.5"
    unit = first.request.controls[0]
    assert (unit.condition, unit.preprocessor, unit.image) == ("openpose", "none", None)
    assert unit.pose == openpose.to_message((default,), 64, 48), \
        "the keypoints travel, on the layer's canvas"
    assert first.request.slots() == (), "no picture is sent: the server draws the pose"
    assert host.layers[0].image == expect.generated(first.request, {})[0]
    # The artist drags the right wrist with the Paths tool and runs it again, same seed.
    wrist_stroke = openpose.LIMBS.index((3, 4))
    path.strokes[wrist_stroke][6:12] = [layer.x + 2.5, layer.y + 3.5] * 3
    second = actions.run(spec("figure-from-pose"), host, values(server, seed=7))
    assert len(host.paths) == 1, "the existing skeleton is reused"
    moved = list(default)
    moved[4] = (2.0, 3.0)
    sent = second.request.controls[0].pose
    assert (sent.width, sent.height) == (64, 48)
    assert [v for k in sent.keypoints for v in k] == pytest.approx(
        [v for k in openpose.to_message((moved,), 64, 48).keypoints for v in k])
    newest = host.layers[1]
    assert newest.undo_group == 2, "directly above the source, under the first result"
    assert newest.image == expect.generated(second.request, {})[0]
    assert newest.image != host.layers[0].image, "the figure follows the moved wrist"
    assert second.request.seed == first.request.seed


def test_figure_from_pose_is_drawn_by_the_server_at_its_working_size(server, host):
    outcome = actions.run(spec("figure-from-pose"), host, values(server, seed=3, size="model"))
    request = outcome.request
    assert (request.width, request.height) == (592, 440)
    pose_sent = request.controls[0].pose
    assert (pose_sent.width, pose_sent.height) == (64, 48)
    new = host.layers[0]
    assert new.generated_size == (592, 440) and (new.width, new.height) == (64, 48)
    assert new.image == resize_nearest(expect.generated(request, {})[0], 64, 48)


def test_figure_from_an_openpose_layer(server, host):
    host.selected.image = openpose.render_people((openpose.default_person(64, 48),), 64, 48)
    outcome = actions.run(spec("figure-from-pose"), host,
                          values(server, **{"pose-source": "layer"}))
    assert host.paths == []
    assert host.layers[0].image == fake_pixels(outcome.request, host.selected.image)[0]


def big_host(tmp_path, canvas=(240, 180)):
    """A 200 x 150 line-art layer at (13, 7) on a bigger canvas, over white paper."""
    source = FakeLayer("lines", line_art(200, 150), x=13, y=7)
    paper = FakeLayer("paper", Image.filled(*canvas, (255, 255, 255, 255)))
    return FakeHost([source, paper], selected=source, canvas=canvas,
                    settings_file=str(tmp_path / "gimp" / "controlcanvas.json"))


def seen(host, x, y):
    """The colour at image pixel (x, y) as GIMP shows it (layers over each other, layer
    masks applied; the fake engine's results and the paper are opaque)."""
    def walk(stack):
        for layer in stack:
            if layer.children is not None:
                found = walk(layer.children)
                if found is not None:
                    return found
                continue
            lx, ly = x - layer.x, y - layer.y
            if not (0 <= lx < layer.width and 0 <= ly < layer.height):
                continue
            alpha = layer.image.pixel(lx, ly)[3]
            if layer.mask is not None:
                alpha = alpha * layer.mask[ly * layer.width + lx] // 255
            if alpha == 255:
                return layer.image.pixel(lx, ly)
            assert alpha == 0, "these tests composite hard edges only"
        return None
    return walk(host.layers)


def test_regenerate_selection_changes_only_the_selected_pixels(server, tmp_path, token_dir):
    host = big_host(tmp_path)
    host.select_rectangle(100, 90, 20, 10)  # image pixels: layer pixels (87, 83)
    host.select_rectangle(120, 90, 4, 10, value=128)  # a feathered edge on the right
    before = {(x, y): seen(host, x, y) for x in range(240) for y in range(180)}
    outcome = actions.run(spec("inpaint"), host, values(server, prompt="sky", seed=5))
    request = outcome.request
    assert (request.mode, request.init_image, request.mask_image, request.controls) == \
        ("inpaint", 0, 1, ()), "no ControlNet unless one is chosen"
    assert request.strength == 0.75
    # The selection's box plus 64 px of context, inside the layer, was sent ...
    box = (87 - 64, 83 - 64, (87 + 24 + 64) - (87 - 64), 150 - (83 - 64))  # (150: the edge)
    assert (request.width, request.height) == generation.generation_size(*box[2:], "layer",
                                                                         512)
    sent_init = host.layers[1].image.crop(*box)
    coverage = host.read_selection(LayerInfo("lines", 200, 150, 13, 7), box)
    sent = {0: sent_init, 1: generation.mask_image(box[2], box[3], coverage)}
    # ... and came back as one layer over that box, masked by the selection.
    assert host.names() == ["sky · seed 5", "lines", "paper"] and host.undo_groups == 1
    new = host.layers[0]
    assert (new.x, new.y, new.width, new.height) == (13 + box[0], 7 + box[1], *box[2:])
    assert new.image == resize_nearest(expect.generated(request, sent)[0], *box[2:])
    assert new.mask == coverage
    assert new.mask[(90 - 26) * box[2] + (100 - 36)] == 255
    assert new.mask[(90 - 26) * box[2] + (121 - 36)] == 128, "soft edges stay soft"
    # What the artist sees: outside the selection, exactly the image as it was.
    changed = {xy for xy, colour in before.items()
               if coverage_at(host, *xy) == 0 and seen(host, *xy) != colour}
    assert changed == set()
    inside = seen(host, 105, 95)
    assert inside == new.image.pixel(105 - new.x, 95 - new.y) and inside != before[(105, 95)]
    assert host.layers[1].image == line_art(200, 150), "the source layer is untouched"


def coverage_at(host, x, y):
    return host.selection[y * host.canvas[0] + x]


def test_edit_with_an_instruction_and_reference_layers(server, host):
    layer_before = host.layers[0].image
    outcome = actions.run(spec("edit"), host, values(server, prompt="make the coat red",
                                                     **{"reference-layers": " paper "}))
    request = outcome.request
    assert (request.mode, request.prompt, request.init_image, request.mask_image,
            request.edit_references, request.controls) == \
        ("edit", "make the coat red", 0, None, (1,), ())
    assert host.names() == ["make the coat red · seed 1234", "lines", "paper"]
    assert host.undo_groups == 1
    new = host.layers[0]
    assert (new.x, new.y, new.width, new.height) == (13, 7, 64, 48)
    expected = expect.generated(request, {0: layer_before, 1: host.layers[2].image})[0]
    assert new.image == resize_nearest(expected, 64, 48)


def test_edit_within_a_selection_changes_only_the_selected_pixels(server, tmp_path, token_dir):
    host = big_host(tmp_path)
    host.select_rectangle(100, 90, 20, 10)
    before = {(x, y): seen(host, x, y) for x in range(240) for y in range(180)}
    outcome = actions.run(spec("edit"), host, values(server, prompt="make it red", seed=5))
    assert (outcome.request.mode, outcome.request.mask_image) == ("edit", 1)
    changed = {xy for xy, colour in before.items()
               if coverage_at(host, *xy) == 0 and seen(host, *xy) != colour}
    assert changed == set()
    assert seen(host, 105, 95) != before[(105, 95)]


def test_a_blank_edit_model_sizes_the_edit_for_the_servers_edit_model():
    """'Work at: model' with a blank Edit model: the size the server's edit model works at
    (FLUX.1 Kontext: 1024 px), not its default base's (SD 1.5: 512 px), which the real GIMP
    run with the dialog's defaults sent."""
    models = Models(models=(ModelInfo(name="v15", kind="base", family="sd15", present=True),
                            ModelInfo(name="kontext", kind="base", family="flux", present=True,
                                      edit=True)),
                    default_base="v15", default_edit_base="kontext")
    edit_values = {"base-model": "", "size": "model", "prompt": "make it red", "steps": 4,
                   "cfg": 2.5, "batch": 1}
    request = generation.build_edit_request(edit_values, 64, 64, seed=1, masked=False,
                                            reference_slots=(), models=models)
    assert (request.width, request.height, request.base_model) == (1024, 1024, "")
    older = Models(models=models.models, default_base="v15")  # a server that does not say
    request = generation.build_edit_request(edit_values, 64, 64, seed=1, masked=False,
                                            reference_slots=(), models=older)
    assert (request.width, request.height) == (512, 512)


@pytest.mark.parametrize("refs, words", [("paper, lines, paper, lines", "at most 3"),
                                         ("sky", "no layer called 'sky'")])
def test_edit_reference_layer_mistakes_say_what_to_do(server, host, refs, words):
    with pytest.raises(actions.Failed) as err:
        actions.run(spec("edit"), host, values(server, **{"reference-layers": refs}))
    assert words in err.value.message and host.names() == ["lines", "paper"]


def test_regenerate_selection_steered_by_a_controlnet_in_variants(server, tmp_path, token_dir):
    host = big_host(tmp_path)
    host.select_rectangle(0, 0, 40, 30)  # partly outside the layer (it starts at 13, 7)
    outcome = actions.run(spec("inpaint"), host, values(server, condition="lineart", batch=2,
                                                        strength=1.0))
    (unit,) = outcome.request.controls
    assert (unit.condition, unit.image, unit.preprocessor) == \
        ("lineart", 0, "lineart_from_drawing"), "the ControlNet reads the same pixels"
    assert outcome.request.slots() == (0, 1)
    group = host.layers[0]
    assert [c.name for c in group.children] == ["girl in a red coat · seed 1234",
                                                "girl in a red coat · seed 1235"]
    box = (0, 0, 27 + 64, 23 + 64)  # the selection covers layer pixels (0, 0)-(27, 23)
    for child in group.children:
        assert (child.x, child.y, child.width, child.height) == (13, 7, *box[2:])
        assert child.mask[:27] == b"\xff" * 27 and child.mask[27] == 0


def test_regenerate_selection_needs_a_selection_on_the_layer(server, tmp_path, token_dir):
    host = big_host(tmp_path)
    with pytest.raises(actions.Failed, match="Select the part of 'lines' to regenerate"):
        actions.run(spec("inpaint"), host, values(server))
    host.select_rectangle(220, 160, 10, 10)  # on the paper only
    with pytest.raises(actions.Failed, match="only the selected pixels change"):
        actions.run(spec("inpaint"), host, values(server))
    assert_unchanged(host)


def test_make_control_image_uses_the_servers_annotator(server, host):
    actions.run(spec("control-image"), host, {"server-url": server.url})
    new = host.layers[0]
    assert new.name == "Control image · lineart (lineart_from_drawing)"
    assert new.image == expect.annotated("lineart_from_drawing", line_art())
    assert new.image != line_art() and (new.x, new.y) == (13, 7)


def test_pose_from_photo_says_the_server_cannot_detect_poses(server, host):
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("pose-from-photo"), host, {"server-url": server.url})
    assert "cannot detect poses" in info.value.message
    assert "Figure from pose" in info.value.message
    assert host.added() == [] and host.paths == [] and host.undo_groups == 0


class _PoseClient:
    """A server that detects poses (the fake engine cannot): answers pose_from_photo with a
    rendered skeleton, with or without the keypoints in the result's info."""

    def __init__(self, detected, size, keypoints_json=None, available=True):
        self.detected, self.size = detected, size
        self.info = {"keypoints": keypoints_json} if keypoints_json else {}
        self.available = available

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def models(self):
        return Models(annotators=(AnnotatorInfo(
            name="pose_from_photo", condition="openpose", available=self.available,
            help="It needs MediaPipe (see tests/annotators_env.sh)."),))

    def preprocess(self, annotator, image, **kw):
        assert annotator == "pose_from_photo" and kw["cancel_on_disconnect"] is True
        return "job"

    def wait(self, job, on_event=None):
        from shared.messages import ResultImage
        from shared.session import ResultReady
        w, h = self.size
        picture = openpose.render_people((self.detected,), w, h)
        return ResultReady(job, ((ResultImage(slot=0, width=w, height=h), picture),),
                           info=self.info)


def test_pose_from_photo_reads_the_skeleton_picture_into_a_path(host):
    detected = openpose.default_person(256, 192)  # the server answered at 4x the layer's size
    outcome = actions.run(spec("pose-from-photo"), host, {},
                          connect=lambda conn, name: _PoseClient(detected, (256, 192)))
    (path,) = host.paths
    expected = pose.layer_to_path(openpose.resized(detected, (256, 192), (64, 48)), 13, 7)
    got = pose.from_strokes(path.strokes, path.meta)
    assert flat(got) == pytest.approx(flat(expected), abs=1.0)
    assert host.layers[0].name == "Pose (OpenPose)" and outcome.path is path
    assert (host.layers[0].width, host.layers[0].height) == (64, 48)
    assert host.undo_groups == 1


def test_pose_from_photo_prefers_keypoints_the_server_sends(host):
    detected = openpose.default_person(64, 48)
    text = openpose.to_openpose_json([detected], 64, 48)
    elsewhere = openpose.transformed(detected, 0.5)  # the picture says otherwise: not used
    actions.run(spec("pose-from-photo"), host, {},
                connect=lambda conn, name: _PoseClient(elsewhere, (64, 48), text))
    got = pose.from_strokes(host.paths[0].strokes, host.paths[0].meta)
    assert flat(got) == pytest.approx(flat(pose.layer_to_path(detected, 13, 7)))


def test_pose_from_photo_when_detection_is_unavailable(host):
    with pytest.raises(actions.Failed, match="needs MediaPipe"):
        actions.run(spec("pose-from-photo"), host, {},
                    connect=lambda c, n: _PoseClient(None, (1, 1), available=False))
    empty = (None,) * 18
    with pytest.raises(actions.Failed, match="No person"):
        actions.run(spec("pose-from-photo"), host, {},
                    connect=lambda c, n: _PoseClient(empty, (64, 48)))
    assert_unchanged(host)


def test_settings_saves_and_reports_the_server(server, host, tmp_path):
    outcome = actions.run(spec("settings"), host, {"server-url": server.url, "token": ""})
    assert "engine fake" in outcome.report and server.url in outcome.report
    assert "token file" in outcome.report and host.messages == [outcome.report]
    assert settings.load_saved(Path(host.settings_file)) == {"server-url": server.url}
    # Other filters now find the server without being told.
    actions.run(spec("generate"), host, {"prompt": "x", "seed": 1, "steps": 2})
    assert host.layers[0].name == "x · seed 1"


# -- failures: a message that says what to do, and the image unchanged ---------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_unchanged(host):
    assert host.added() == [] and host.undo_groups == 0 and host.paths == []


def test_server_down(host):
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {"server-url": url})
    text = info.value.message
    assert text.startswith(f"ControlCanvas: no server answers at {url}.")
    assert "`controlcanvas serve`" in text and "Settings" in text
    assert not info.value.is_bug
    assert_unchanged(host)


def test_wrong_token(server, host):
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {"server-url": server.url, "token": "nope"})
    assert "refused the access token" in info.value.message
    assert "the token given to the filter" in info.value.message
    assert_unchanged(host)


def test_a_remote_looking_address_gets_only_the_given_token(host, token_dir):
    # A real server reached at 127.1: the OS takes it for 127.0.0.1, the plug-in does not
    # (not a loopback address as written), so it is treated like a server elsewhere; the
    # token file holds that server's token, which it would accept.
    connected = []

    def connect(conn, name):
        connected.append(conn.token)
        return actions.default_connect(conn, name)

    config = ServerConfig(port=0, allow_remote=True)
    with ServerThread(FakeEngine(), config, token=TOKEN) as running:
        remote = running.url.replace("127.0.0.1", "127.1")
        with pytest.raises(actions.Failed) as info:
            actions.run(spec("generate"), host, values(running, **{"server-url": remote}),
                        connect=connect)
        assert connected == [], "no connection: the token file goes nowhere"
        assert f"ControlCanvas: The server at {remote} is not on this computer" in \
            info.value.message and problems.SETTINGS_MENU in info.value.message
        assert not info.value.is_bug
        assert_unchanged(host)
        (token_dir / "token").write_text("LOCAL-SECRET\n")
        actions.run(spec("generate"), host, values(running, **{"server-url": remote,
                                                               "token": TOKEN}),
                    connect=connect)
    assert connected == [TOKEN] and host.layers[0].name == "girl in a red coat · seed 1234"


def test_a_server_elsewhere_that_refuses_the_token_is_not_sent_home(server):
    text = problems.describe(AuthError(), url="ws://gpu-box:7351",
                             token_source="the token saved in Settings")
    assert "refused the access token. The plug-in used the token saved in Settings." in text
    assert "that server's token" in text and "on this computer" not in text


def test_missing_token_file_is_named(server, host, token_dir):
    (token_dir / "token").unlink()
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {"server-url": server.url})
    assert f"no token file at {token_dir / 'token'}" in info.value.message
    assert "controlcanvas serve" in info.value.message


class _FailingEngine(FakeEngine):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def generate(self, request, images, ctx):
        raise self.error


@pytest.mark.parametrize("error,expected", [
    (ModelMissing("The ControlNet for 'lineart' is not downloaded; run `controlcanvas models "
                  "download lineart`."), "controlcanvas models download lineart"),
    (OutOfMemory(), "ran out of GPU memory while generating"),
])
def test_engine_failures(error, expected, host):
    with ServerThread(_FailingEngine(error), ServerConfig(port=0), token=TOKEN) as failing:
        with pytest.raises(actions.Failed) as info:
            actions.run(spec("generate"), host, {"server-url": failing.url})
    assert expected in info.value.message
    assert_unchanged(host)


def test_usage_problems(server, host):
    host.selected = None
    with pytest.raises(actions.Failed, match="Select exactly one layer"):
        actions.run(spec("generate"), host, {"server-url": server.url})
    with pytest.raises(actions.Failed, match="'steps' must be a number from 1 to 150"):
        actions.run(spec("generate"), host, {"steps": 500})


def test_a_bug_becomes_a_message_not_a_traceback(host):
    def broken(conn, name):
        raise KeyError("surprise")
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {}, connect=broken)
    assert info.value.is_bug and "bug in the plug-in" in info.value.message
    assert "Traceback" not in info.value.message


class _CountingEngine(FakeEngine):
    def __init__(self):
        super().__init__(step_seconds=0.02)
        self.steps = 0
        self.stopped = threading.Event()

    def generate(self, request, images, ctx):
        try:
            def counted(step, total, stage="denoise"):
                self.steps += 1
                real(step, total, stage)
            real = ctx.progress
            ctx.progress = counted
            return super().generate(request, images, ctx)
        except Cancelled:
            self.stopped.set()
            raise


def test_gimp_cancel_kills_the_plugin_and_the_server_stops_the_job(host):
    """GIMP's Cancel ends the plug-in process; the dropped socket cancels the job."""
    engine = _CountingEngine()
    clients = []

    def connect(conn, name):
        clients.append(Client.connect(conn.url, conn.token, client=name))
        return clients[0]

    class Killed(Exception):
        pass

    def progress(text=None, fraction=None):
        if fraction and fraction > 0:
            clients[0]._ws.socket.close()  # the process dies: no goodbye, no cancel message
            raise Killed()

    host.progress = progress
    with ServerThread(engine, ServerConfig(port=0), token=TOKEN) as slow:
        with pytest.raises(actions.Failed) as info:
            actions.run(spec("generate"), host, {"server-url": slow.url, "steps": 100},
                        connect=connect)
        assert isinstance(info.value.cause, Killed)
        assert engine.stopped.wait(5), "the server did not cancel the orphaned job"
    assert engine.steps < 20
    assert_unchanged(host)


# -- the packaged plug-in (packaging/build.py) ------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from gimp_support.packaging_build import load_build
    build = load_build()
    folder, archive = build.build_gimp(tmp_path_factory.mktemp("dist"), build.default_cache())
    return build, folder, archive


def test_bundle_is_a_gimp_plugin_folder(bundle):
    build, folder, _ = bundle
    assert folder.name == "controlcanvas" and (folder / "controlcanvas.py").is_file()
    assert (folder / "controlcanvas.py").stat().st_mode & 0o111, "GIMP runs only executables"
    assert (folder / "controlcanvas.py").read_text().startswith("#!/usr/bin/env python3\n")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    plugin = {"controlcanvas_gimp/" + p.name
              for p in (ROOT / "plugin_gimp" / "controlcanvas_gimp").glob("*.py")}
    shared = {"shared/" + p.name for p in (ROOT / "shared").glob("*.py")}
    assert plugin | shared <= files
    assert {"websockets/__init__.py", "websockets/sync/client.py", "websockets/LICENSE",
            "BUILD.json"} <= files
    compiled = [f for f in files if f.endswith(build.COMPILED_SUFFIXES) or "__pycache__" in f]
    assert compiled == [], "bundles are pure Python"
    stamp = json.loads((folder / "BUILD.json").read_text())
    assert stamp["version"] == "0.1.0" and stamp["protocol"] == 1
    assert stamp["bundled"]["websockets"] == "16.0"


def test_bundle_zip_is_reproducible_and_keeps_the_exec_bit(bundle, tmp_path):
    import zipfile
    build, _, archive = bundle
    _, again = build.build_gimp(tmp_path / "again", build.default_cache())
    assert build.sha256_of(again) == build.sha256_of(archive)
    with zipfile.ZipFile(archive) as z:
        infos = {i.filename: i for i in z.infolist()}
    assert all(name.startswith("controlcanvas/") for name in infos)
    assert (infos["controlcanvas/controlcanvas.py"].external_attr >> 16) & 0o777 == 0o755
    assert (infos["controlcanvas/shared/client.py"].external_attr >> 16) & 0o777 == 0o644


def test_bundle_runs_on_the_standard_library_alone(bundle, server):
    """A clean interpreter (no site-packages) talks to the server with the bundled files."""
    import subprocess
    _, folder, _ = bundle
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "assert not any('site-packages' in p for p in sys.path), sys.path\n"
        "import controlcanvas_gimp.actions, websockets, shared\n"
        "from shared.client import Client\n"
        "for m in (controlcanvas_gimp, websockets, shared):\n"
        "    assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "with Client.connect(sys.argv[2], sys.argv[3], client='bundle-test') as c:\n"
        "    print(c.welcome.engine, c.status().queue_length)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(folder), server.url,
                           TOKEN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fake", "0"]


# -- LoRAs and the conditions each base serves (the server's lists) -------------------------------

@pytest.fixture(scope="module")
def offering():
    """A server that lists LoRAs and says which conditions each base serves."""
    from tests.offers_support import OfferingEngine
    with ServerThread(OfferingEngine(), ServerConfig(port=0), token=TOKEN) as running:
        yield running


def test_the_loras_argument_is_part_of_every_generating_dialog():
    for name in ("generate", "colourise", "figure-from-pose", "inpaint"):
        arg = spec(name).arg("loras")
        assert arg.kind == "string" and arg.in_dialog and arg.default == ""
        assert '"ink:0.8, watercolour"' in arg.help and "-2 to 2" in arg.help
        assert "Settings / connection test" in arg.help


def test_loras_reach_the_request_and_the_images_history(offering, host):
    outcome = actions.run(spec("generate"), host, values(offering, loras=" ink:0.8, watercolour "))
    assert [(l.name, l.strength) for l in outcome.request.loras] == [("ink", 0.8),
                                                                     ("watercolour", 1.0)]
    assert host.names()[0] == "girl in a red coat · seed 1234"
    entry, = actions.stored_history(host)
    assert entry.settings["loras"] == "ink:0.8, watercolour:1"
    assert "ink:0.8, watercolour:1" in doc_history.summary(entry.settings)
    plain = actions.run(spec("generate"), host, values(offering))
    assert plain.request.loras == ()


@pytest.mark.parametrize("loras, says", [
    ("ink:strong", "in 'ink:strong' the strength after ':' must be a number from -2 to 2"),
    ("ink:3", "in 'ink:3' the strength after ':' must be a number from -2 to 2"),
    ("ink, ink:0.5", "'ink' is named twice"),
    ("../ink", "never by a path"),
])
def test_a_malformed_loras_argument_is_refused_before_connecting(host, loras, says):
    def never(conn, name):
        raise AssertionError("no connection for a malformed argument")
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, {"loras": loras}, connect=never)
    assert says in info.value.message and "Example: \"ink:0.8, watercolour\"" in \
        info.value.message
    assert isinstance(info.value.cause, problems.UsageError)
    assert info.value.cause.field == "loras"
    assert_unchanged(host)


def test_an_unknown_lora_names_the_ones_the_server_has(offering, host):
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, values(offering, loras="inky:0.5"))
    assert info.value.message == (
        "ControlCanvas: a model is missing on the server. The server has no LoRA named "
        "'inky'. LoRAs for this base model: homemade, ink (SD1.5), watercolour (SD1.5).")
    assert isinstance(info.value.cause, ModelMissing) and not info.value.is_bug
    assert_unchanged(host)


def test_a_lora_of_another_family_than_the_base_is_refused(offering, host):
    with pytest.raises(actions.Failed) as info:
        actions.run(spec("generate"), host, values(offering, condition="canny", loras="ink",
                                                   **{"base-model": "anime-xl"}))
    assert "'ink' was made for SD1.5 base models, and 'anime-xl' is SDXL" in \
        info.value.message
    assert "(homemade, xl_ink (SDXL))" in info.value.message
    assert info.value.cause.code == "lora_mismatch"
    outcome = actions.run(spec("generate"), host, values(
        offering, condition="canny", loras="xl_ink:-1", **{"base-model": "anime-xl"}))
    assert outcome.request.loras[0].strength == -1.0


@pytest.mark.parametrize("procedure, condition", [("generate", "lineart"),
                                                  ("colourise", "depth"),
                                                  ("inpaint", "shuffle")])
def test_a_condition_the_base_cannot_serve_names_the_bases_that_can(offering, host, procedure,
                                                                    condition):
    from tests.offers_support import OfferingEngine
    label = {"lineart": "line art", "depth": "line art", "shuffle": "shuffle"}[condition]
    host.select_rectangle(20, 10, 8, 8)
    with pytest.raises(actions.Failed) as info:
        actions.run(spec(procedure), host, values(offering, condition=condition,
                                                  **{"base-model": "anime-xl"}))
    text = info.value.message
    assert f"The base model 'anime-xl' (SDXL) has no ControlNet for {label}" in text
    assert "bases that serve it: fake" in text
    assert "canny edges, depth, pose, scribble, tile" in text.lower()
    assert_unchanged(host)
    assert set(OfferingEngine.XL_CONDITIONS) == {"canny", "depth", "openpose", "scribble",
                                                 "tile"}


def test_a_server_that_predates_the_lists_still_generates(server, host):
    """No conditions per base and no LoRAs in its models message: every condition goes to
    the server (it answers for itself), and a LoRA is refused with why."""
    outcome = actions.run(spec("generate"), host, values(server, condition="shuffle",
                                                         **{"base-model": "somewhere-xl"}))
    assert outcome.request.controls[0].condition == "shuffle"
    with pytest.raises(actions.Failed, match="The server lists no LoRAs, so it has no 'ink'"):
        actions.run(spec("generate"), host, values(server, loras="ink"))


def test_settings_report_lists_each_bases_conditions_and_the_loras(offering, host):
    outcome = actions.run(spec("settings"), host, {"server-url": offering.url, "token": ""})
    assert "Base 'anime-xl' (SDXL) serves: canny, depth, openpose, scribble, tile." in \
        outcome.report
    assert ("LoRAs (for the 'LoRAs' argument, e.g. \"name:0.8\"): ink (SD1.5), watercolour "
            "(SD1.5), xl_ink (SDXL), homemade (an unknown family).") in outcome.report


@pytest.fixture(scope="module")
def klein_offering():
    """The same server with a Flux.2 Klein base (its control units emulated)."""
    from tests.offers_support import KleinOfferingEngine
    with ServerThread(KleinOfferingEngine(), ServerConfig(port=0), token=TOKEN) as running:
        yield running


KLEIN_SAYS = ("ControlCanvas: Flux.2 Klein has no ControlNet: each control layer is given to "
              "the model as a reference image with an instruction to follow it")


@pytest.mark.parametrize("procedure", ["generate", "colourise", "inpaint"])
def test_a_base_that_emulates_control_says_so_with_the_result(klein_offering, host,
                                                               procedure):
    host.select_rectangle(20, 10, 8, 8)
    outcome = actions.run(spec(procedure), host, values(
        klein_offering, condition="lineart", **{"base-model": "klein-4b"}))
    assert outcome.request.controls[0].condition == "lineart", "the unit is still sent"
    assert outcome.layer is not None
    said, = [m for m in host.messages if "ControlNet" in m]
    assert said.startswith(KLEIN_SAYS) and "start and end are not used" in said
    assert outcome.report == said[len("ControlCanvas: "):]


@pytest.mark.parametrize("procedure, condition, base", [
    ("generate", "canny", "anime-xl"), ("generate", "lineart", ""),
    ("inpaint", "none", "klein-4b")])
def test_no_word_of_emulation_for_a_controlnet_or_without_a_unit(klein_offering, host,
                                                                 procedure, condition, base):
    host.select_rectangle(20, 10, 8, 8)
    outcome = actions.run(spec(procedure), host, values(
        klein_offering, condition=condition, **{"base-model": base}))
    assert outcome.layer is not None and outcome.report == ""
    assert not any("ControlNet" in m for m in host.messages), host.messages


def test_settings_report_says_which_bases_emulate_control(klein_offering, host):
    report = actions.run(spec("settings"), host, {"server-url": klein_offering.url,
                                                  "token": ""}).report
    assert "Base 'klein-4b' (Flux.2 Klein) serves: canny, lineart" in report
    assert report.count("Flux.2 Klein has no ControlNet: each control layer") == 1


def test_loras_and_conditions_with_the_tiny_engine(lora_engine, host):
    """A real server (the tiny diffusers engine, a LoRA folder): the LoRAs argument changes
    the picture (strength 0 = none), an unknown one names the server's, and a condition the
    catalogue has no ControlNet for on the base is refused naming the bases that serve it."""
    with ServerThread(lora_engine, ServerConfig(port=0), token=TOKEN) as tiny:
        def picture(**kw):
            outcome = actions.run(spec("generate"), host, values(
                tiny, steps=2, seed=3, **{"base-model": "tiny-sd15"}, **kw))
            return outcome.layer.image

        plain, inked, zero = picture(), picture(loras="ink:1"), picture(loras="ink:0")
        assert inked != plain and zero == plain
        with pytest.raises(actions.Failed) as info:
            picture(loras="nope")
        assert "The server has no LoRA named 'nope'. LoRAs for this base model: " in \
            info.value.message and "ink" in info.value.message
        with pytest.raises(actions.Failed, match="'sdxl_size' was made for SDXL base models, "
                                                 "and 'tiny-sd15' is SD1.5"):
            picture(loras="sdxl_size")
        with pytest.raises(actions.Failed) as info:
            actions.run(spec("generate"), host, values(tiny, condition="depth",
                                                       **{"base-model": "shapes-demo"}))
        assert "The base model 'shapes-demo' (SD1.5) has no ControlNet for depth" in \
            info.value.message and "bases that serve it: " in info.value.message
