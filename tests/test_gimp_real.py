"""The real GIMP tier: the packaged plug-in inside GIMP 3.0 (Debian trixie) and 3.2 (sid),
driven in batch mode.

Builds the bundle with packaging/build.py, unzips its release zip into the GIMP chroot built
(once, cached) by tests/editors/setup_gimp.sh, starts a real server with the fake
engine on 127.0.0.1 and a token file the plug-in finds by itself, then runs
gimp-console-3 once with tests/gimp_support/gimp_batch.py: every case loads a
PNG, runs one Filters ▸ ControlNet procedure non-interactively, and records what
GIMP ended up with.  The tests below assert on that record: pixels equal to what
FakeEngine makes for the same request, offsets, stacking, paths, messages.  Two more cases
run issue 15's flow against a second server, the tiny diffusers engine over
tests/artist_stack.py (an SDXL single file, the union ControlNet, a LoRA, the IP-Adapter),
with a hidden layer of the image as the style reference; and issue 23's Edit with
instruction against a third, the tiny engine whose blank edit model is tiny FLUX.1 Kontext
(tests/artist_stack.start_edit_server): a selection and that hidden reference layer, then
the dialog's defaults.

Every GIMP run goes through tests/editors/jail.sh (bubblewrap: nothing is mounted on the
host). Skips (with the reason) only where the chroot cannot be built or used: not Linux,
not root, or setup_gimp.sh failing (no debootstrap, no mirror); with
CONTROLCANVAS_REQUIRE_EDITORS=1 (CI) those fail instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin_gimp"))

from backend.server.config import ServerConfig  # noqa: E402
from backend.server.local import ServerThread  # noqa: E402
from controlcanvas_gimp import pose  # noqa: E402
from tests import artist_stack  # noqa: E402
from tests.editor_jail import editor_root, jail, unavailable  # noqa: E402
from gimp_support import expect  # noqa: E402
from gimp_support.packaging_build import load_build  # noqa: E402
from shared import pose as openpose  # noqa: E402
from shared.geometry import NATIVE_SIDE  # noqa: E402
from shared.images import Image  # noqa: E402
from shared.messages import ControlUnit, GenerateRequest  # noqa: E402

# The first test also pays for building the chroot when it is not cached (~2 min).
pytestmark = [pytest.mark.editor, pytest.mark.slow, pytest.mark.timeout(1800)]

BATCH = ROOT / "tests" / "gimp_support" / "gimp_batch.py"
GUI = ROOT / "tests" / "gimp_support" / "gui_dialog.sh"
TOKEN = "real-gimp-test-token"
PREFIX = "python-fu-controlcanvas-"
PROMPT = "girl in a red coat"
SIZE = (64, 48)
OFFSETS = (13, 7)
CANVAS = (96, 72)
SELECTED = (30, 20, 12, 10)  # image pixels: x, y, width, height


def line_art(width: int, height: int) -> Image:
    data = bytearray(width * height * 4)
    for y in range(height):
        for x in range(width):
            if x in (4, width - 5) or y in (4, height - 5) or abs(x * height - y * width) < width:
                data[(y * width + x) * 4:(y * width + x) * 4 + 4] = b"\x20\x18\x10\xff"
            elif (x + y) % 11 == 0:
                data[(y * width + x) * 4:(y * width + x) * 4 + 4] = b"\x80\x80\x80\x80"
    return Image(width, height, bytes(data))


# Debian suite -> the GIMP it ships (its user folder is ~/.config/GIMP/<major.minor>).
SUITES = {"trixie": "3.0", "sid": "3.2"}


def chroot_root(suite: str) -> Path:
    """The GIMP chroot, built or reused; skipped (failed in CI) when it cannot be."""
    return editor_root("setup_gimp.sh", "--suite", suite)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_zip(archive: Path, plug_ins: Path) -> None:
    """Unpack the release zip into GIMP's plug-ins folder as a user would (modes kept)."""
    if shutil.which("unzip"):
        subprocess.run(["unzip", "-q", "-o", str(archive), "-d", str(plug_ins)], check=True)
        return
    import zipfile
    with zipfile.ZipFile(archive) as z:  # zipfile drops modes: restore them like unzip
        for info in z.infolist():
            z.extract(info, plug_ins)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                (plug_ins / info.filename).chmod(mode)


@contextlib.contextmanager
def locked(path: Path):
    """One test run at a time installs into and drives the shared chroot."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Issue 15's flow: an Illustrious single file + the union ControlNet (lineart) + a style LoRA
# + another layer of the image as a style reference, on the tiny engine (tests/artist_stack).
ARTIST_SEED = 1515
REFERENCE = {"name": "reference photo", "group": "references", "offsets": [-20, -10]}
REFERENCE_SIZE = (640, 420)  # sent at most 512 px: 512 x 336


def artist_cases(artist_url: str, reference_png: str):
    flow = {"server-url": artist_url, "prompt": PROMPT, "steps": 4, "size": "layer",
            "seed": ARTIST_SEED, "base-model": artist_stack.BASE_NAME, "condition": "lineart"}
    reference = dict(REFERENCE, png=reference_png)
    return [
        {"id": "artist", "proc": PREFIX + "generate", "reference": reference,
         "args": dict(flow, loras=f"{artist_stack.LORA_NAME}:0.8",
                      **{"reference-layer": REFERENCE["name"], "reference-weight": 0.9,
                         "reference-mode": "style"})},
        {"id": "artist-plain", "proc": PREFIX + "generate", "reference": reference,
         "args": flow},
    ]


# Issue 23's Edit mode: an instruction for the selected part of the layer, with the hidden
# reference layer of the issue-15 flow, on the tiny engine's built-in edit model (blank Edit
# model: the tiny FLUX.1 Kontext stack, tests/artist_stack.start_edit_server).
EDIT_SEED = 2323
INSTRUCTION = "make the coat red like the sunset"


def edit_cases(edit_url: str, reference_png: str):
    return [{"id": "edit", "proc": PREFIX + "edit", "select": list(SELECTED),
             "reference": dict(REFERENCE, png=reference_png),
             "args": {"server-url": edit_url, "prompt": INSTRUCTION, "steps": 3,
                      "seed": EDIT_SEED, "size": "layer", "base-model": "",
                      "reference-layers": REFERENCE["name"]}},
            # the dialog's defaults (Work at: the model's size, blank Edit model), 1 step
            {"id": "edit-defaults", "proc": PREFIX + "edit",
             "args": {"server-url": edit_url, "prompt": INSTRUCTION, "steps": 1,
                      "seed": EDIT_SEED + 1}},
            # issue 23's "done when": Klein edit with a reference layer ...
            {"id": "edit-klein", "proc": PREFIX + "edit", "select": list(SELECTED),
             "reference": dict(REFERENCE, png=reference_png),
             "args": {"server-url": edit_url, "prompt": INSTRUCTION, "steps": 2,
                      "seed": EDIT_SEED + 2, "size": "layer", "base-model": "tiny-klein",
                      "reference-layers": REFERENCE["name"]}},
            # ... and Z-Image with its union ControlNet (the line art as the control)
            {"id": "zimage", "proc": PREFIX + "generate",
             "args": {"server-url": edit_url, "prompt": PROMPT, "steps": 3, "size": "layer",
                      "seed": EDIT_SEED + 3, "base-model": "tiny-zimage",
                      "condition": "lineart"}}]


def cases(server_url: str, down_url: str, pose_url: str):
    base = {"server-url": server_url, "prompt": PROMPT, "steps": 8, "size": "layer"}

    def case(cid, proc, save=False, select=None, rerun=None, **args):
        merged = dict(base) if proc != "control-image" else {"server-url": server_url}
        merged.update(args)
        return {"id": cid, "proc": PREFIX + proc, "args": merged, "save": save,
                "select": select, "rerun": rerun}

    return [
        case("generate", "generate", save=True, seed=12345, rerun={"seed": -2}),
        case("generate-selection-elsewhere", "generate", select=list(SELECTED), seed=12345),
        case("colourise", "colourise", seed=5),
        case("random-seed", "generate", seed=-1),
        case("model-size", "generate", seed=3, size="model"),
        case("variants", "generate", seed=40, batch=2),
        case("control-image", "control-image"),
        case("figure-from-pose", "figure-from-pose", save=True, seed=7),
        case("inpaint", "inpaint", save=True, select=list(SELECTED), seed=21),
        case("inpaint-nothing-selected", "inpaint", seed=21),
        case("server-down", "generate", **{"server-url": down_url}),
        case("wrong-token", "generate", token="not-the-token"),
        {"id": "pose-from-photo", "proc": PREFIX + "pose-from-photo",
         "args": {"server-url": server_url}},
        {"id": "pose-detected", "proc": PREFIX + "pose-from-photo",
         "args": {"server-url": pose_url}, "save": True},
        {"id": "settings", "proc": PREFIX + "settings", "args": {"server-url": server_url}},
    ]


class GimpRun:
    def __init__(self, results: dict, work: Path, stderr: str, returncode: int,
                 source: Image, settings_saved: str, artist_calls: list,
                 edit_calls: list) -> None:
        self.edit_calls = edit_calls  # (request, images, pictures) the edit server ran
        self.artist_calls = artist_calls  # (request, images, pictures) the artist server ran
        self.results = results
        self.work = work
        self.stderr = stderr
        self.returncode = returncode
        self.source = source
        self.settings_saved = settings_saved

    def case(self, cid: str) -> dict:
        c = self.results["cases"][cid]
        assert "exception" not in c, c["exception"]
        return c

    def pixels(self, name: str, width: int, height: int) -> Image:
        return Image(width, height, (self.work / name).read_bytes())

    def layer_image(self, node: dict) -> Image:
        return self.pixels(node["pixels"], node["w"], node["h"])


@pytest.fixture(scope="module")
def artist_server(tmp_path_factory):
    """The tiny engine over issue 15's stack (tests/artist_stack.py), token TOKEN."""
    server, engine = artist_stack.start_server(tmp_path_factory.mktemp("artist"), TOKEN)
    try:
        yield server, engine
    finally:
        server.stop()


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    """The tiny engine whose blank edit model is tiny FLUX.1 Kontext, token TOKEN."""
    server, engine = artist_stack.start_edit_server(tmp_path_factory.mktemp("edit"), TOKEN)
    try:
        yield server, engine
    finally:
        server.stop()


@pytest.fixture(scope="module", params=sorted(SUITES))
def gimp(request, tmp_path_factory, artist_server, edit_server):
    root = chroot_root(request.param)
    build = load_build()
    out = tmp_path_factory.mktemp("bundle")
    _, archive = build.build_gimp(out, build.default_cache())
    gimp_dir = root / "root" / ".config" / "GIMP" / SUITES[request.param]
    plugin = gimp_dir / "plug-ins" / "controlcanvas"
    saved_settings = gimp_dir / "controlcanvas.json"
    inside = f"/tmp/cc-gimp-test-{uuid.uuid4().hex[:12]}"
    work = root / inside.lstrip("/")
    source = line_art(*SIZE)
    with locked(root.with_name(root.name + ".controlcanvas-plugin.lock")):
        try:
            # A run killed before its own clean-up left its folder (we hold the lock: any
            # other cc-gimp-test folder is stale).
            for stale in (root / "tmp").glob("cc-gimp-test-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if plugin.exists():
                shutil.rmtree(plugin)
            plugin.parent.mkdir(parents=True, exist_ok=True)
            install_zip(archive, plugin.parent)
            assert os.access(plugin / "controlcanvas.py", os.X_OK), "the zip lost the exec bit"
            # GIMP re-queries a plug-in only when its entry file's mtime changes (pluginrc),
            # and the reproducible zip dates every file 1980-01-01: without this an upgrade
            # keeps the previous release's procedures and arguments.
            (plugin / "controlcanvas.py").touch()
            saved_settings.unlink(missing_ok=True)
            (work / "config").mkdir(parents=True)
            (work / "config" / "token").write_text(TOKEN + "\n")
            from PIL import Image as PILImage
            PILImage.frombytes("RGBA", source.size, source.data).save(work / "lines.png")
            artist_stack.reference_png(work / "reference.png", *REFERENCE_SIZE)
            artist, artist_engine = artist_server
            artist_engine.calls.clear()
            editor, edit_engine = edit_server
            edit_engine.calls.clear()
            shutil.copy(BATCH, work / "gimp_batch.py")
            with ServerThread(expect.NoPoseEngine(), ServerConfig(port=0),
                              token=TOKEN) as server, \
                    ServerThread(expect.PoseEngine(), ServerConfig(port=0), token=TOKEN) as poser:
                params = {"work": inside, "input": f"{inside}/lines.png",
                          "offsets": list(OFFSETS), "canvas": list(CANVAS),
                          "cases": cases(server.url, f"ws://127.0.0.1:{free_port()}",
                                         poser.url)
                          + artist_cases(artist.url, f"{inside}/reference.png")
                          + edit_cases(editor.url, f"{inside}/reference.png")}
                (work / "params.json").write_text(json.dumps(params))
                command = (f"p='{inside}/gimp_batch.py'; exec(compile(open(p).read(), p, "
                           f"'exec'), {{'PARAMS': '{inside}/params.json'}})")
                done = subprocess.run(
                    jail(root, f"CONTROLCANVAS_CONFIG_DIR={inside}/config",
                         "gimp-console-3", "-i", "--batch-interpreter=python-fu-eval",
                         "-b", command, "--quit"),
                    capture_output=True, text=True, timeout=600)
            results_file = work / "results.json"
            assert results_file.exists(), f"GIMP wrote no results (exit {done.returncode}):\n" \
                                          f"{done.stderr[-3000:]}"
            saved = saved_settings.read_text() if saved_settings.exists() else ""
            yield GimpRun(json.loads(results_file.read_text()), work, done.stderr,
                          done.returncode, source, saved, list(artist_engine.calls),
                          list(edit_engine.calls))
        finally:
            saved_settings.unlink(missing_ok=True)
            shutil.rmtree(plugin, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


def expected(control, seed: int, *, condition="lineart", width=SIZE[0], height=SIZE[1],
             batch=1):
    """What the server returns for the request the plug-in should have sent: line art is
    annotated with 'lineart_from_drawing' (the server has no controlnet-aux 'lineart');
    a pose (a shared.messages.Pose as ``control``) travels as keypoints and is drawn by
    the server."""
    if condition == "openpose":
        source, images = dict(pose=control, preprocessor="none"), {}
    else:
        source, images = dict(image=0, preprocessor="lineart_from_drawing"), {0: control}
    request = GenerateRequest(
        width=width, height=height, prompt=PROMPT, seed=seed, steps=8, batch=batch,
        controls=(ControlUnit(condition=condition, resize_mode="just_resize", **source),))
    return expect.generated(request, images)


def names(layers):
    return [layer["name"] for layer in layers]


# -- the menu -----------------------------------------------------------------------------

def test_gimp_ran_cleanly(gimp):
    assert gimp.returncode == 0, gimp.stderr[-3000:]
    assert "Traceback" not in gimp.stderr, "a Python traceback reached GIMP's output"
    assert "batch command executed successfully" in gimp.stderr


def test_every_procedure_is_in_filters_controlnet(gimp):
    procs = gimp.results["procedures"]
    assert {name: p["label"] for name, p in procs.items()} == {
        PREFIX + "generate": "Generate from layer…",
        PREFIX + "inpaint": "Regenerate selection…",
        PREFIX + "colourise": "Colourise line art…",
        PREFIX + "figure-from-pose": "Figure from pose…",
        PREFIX + "control-image": "Make control image…",
        PREFIX + "pose-from-photo": "Pose from photo…",
        PREFIX + "settings": "Settings / connection test…",
        PREFIX + "repeat-last": "Repeat last",
        PREFIX + "edit": "Edit with instruction…",
    }
    for name, p in procs.items():
        assert p["menu_paths"] == ["<Image>/Filters/ControlNet"], name
        assert p["arguments"][:3] == ["run-mode", "image", "drawables"]
    assert procs[PREFIX + "generate"]["return_values"] == ["seed", "layer"]


# -- generating -------------------------------------------------------------------------------

def test_generate_adds_exactly_the_servers_pixels_above_the_source(gimp):
    c = gimp.case("generate")
    assert c["status"] == "success", c.get("error")
    read = gimp.pixels(c["source_before"], *SIZE)
    assert read == gimp.source, "GIMP read the PNG's pixels exactly"
    assert names(c["layers"]) == [f"{PROMPT} · seed 12345", "lines", "paper"]
    new = c["layers"][0]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    assert gimp.layer_image(new) == expected(read, 12345)[0]
    assert c["source_unchanged"] and c["source_offsets"] == list(OFFSETS)
    assert c["returned"] == {"seed": 12345, "layer": f"{PROMPT} · seed 12345"}


def test_a_selection_does_not_clip_a_generated_layer(gimp):
    """Whatever the artist has selected, Generate adds the whole result."""
    c = gimp.case("generate-selection-elsewhere")
    assert c["status"] == "success", c.get("error")
    assert gimp.layer_image(c["layers"][0]) == expected(gimp.source, 12345)[0]


def test_saved_xcf_keeps_the_result(gimp):
    c = gimp.case("generate")
    assert c["saved"] is True
    assert names(c["reloaded"]) == names(c["layers"])
    assert gimp.layer_image(c["reloaded"][0]) == gimp.layer_image(c["layers"][0])


def test_saved_xcf_keeps_the_history_and_seed_minus_2_repeats_it(gimp):
    c = gimp.case("generate")
    assert c["reloaded_history"], gimp.stderr[-3000:]
    record = json.loads(c["reloaded_history"])  # the parasite came back from the .xcf
    assert record["format"] == "controlcanvas.history" and record["version"] == 1
    (entry,) = record["entries"]
    assert entry["prompt"] == PROMPT and entry["seeds"] == [12345]
    assert entry["layers"] == [["", f"{PROMPT} · seed 12345"]] and entry["settings"]["steps"] == 8
    rerun = c["rerun"]  # seed -2 on the reopened image: the stored seed, the same pixels
    assert rerun["status"] == "success", rerun["error"]
    assert rerun["seed"] == 12345
    # (GIMP keeps layer names unique: the second is "... · seed 12345 #1")
    again = [n for n in rerun["layers"] if n["name"].startswith(f"{PROMPT} · seed 12345")]
    assert len(again) == 2 and all(gimp.layer_image(n) == gimp.layer_image(c["layers"][0])
                                   for n in again)


def test_colourise_puts_the_result_below_the_line_art(gimp):
    c = gimp.case("colourise")
    assert c["status"] == "success", c.get("error")
    assert names(c["layers"]) == ["lines", f"{PROMPT} · seed 5", "paper"]
    assert gimp.layer_image(c["layers"][1]) == expected(gimp.source, 5)[0]


def test_random_seed_is_reported_and_reproducible(gimp):
    c = gimp.case("random-seed")
    seed = c["returned"]["seed"]
    assert 0 <= seed < 2**31
    assert c["layers"][0]["name"] == f"{PROMPT} · seed {seed}"
    assert gimp.layer_image(c["layers"][0]) == expected(gimp.source, seed)[0]


def test_model_size_result_is_scaled_back_to_the_layer(gimp):
    c = gimp.case("model-size")
    new = c["layers"][0]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    assert new["name"] == f"{PROMPT} · seed 3"
    # Generated at 592x440 and scaled by GIMP: on average the fake engine's colours.
    big = expected(gimp.source, 3, width=592, height=440)[0]
    got = gimp.layer_image(new)
    for channel in range(3):
        mean_got = sum(got.data[channel::4]) / (SIZE[0] * SIZE[1])
        mean_big = sum(big.data[channel::4]) / (592 * 440)
        assert abs(mean_got - mean_big) < 6, channel


def test_variants_arrive_in_a_layer_group(gimp):
    c = gimp.case("variants")
    group = c["layers"][0]
    assert group["group"] and group["name"] == f"{PROMPT} · seeds 40–41"
    assert names(group["children"]) == [f"{PROMPT} · seed 40", f"{PROMPT} · seed 41"]
    want = expected(gimp.source, 40, batch=2)
    assert [gimp.layer_image(child) for child in group["children"]] == want
    assert names(c["layers"])[1:] == ["lines", "paper"]


def test_make_control_image(gimp):
    c = gimp.case("control-image")
    new = c["layers"][0]
    assert new["name"] == "Control image · lineart (lineart_from_drawing)"
    assert gimp.layer_image(new) == expect.annotated("lineart_from_drawing", gimp.source)
    assert (new["x"], new["y"]) == OFFSETS


def test_figure_from_pose_adds_an_editable_skeleton_path(gimp):
    c = gimp.case("figure-from-pose")
    assert c["status"] == "success", c.get("error")
    (path,) = c["paths"]
    assert path["name"] == pose.PATH_NAME and len(path["strokes"]) == 17
    default = openpose.default_person(*SIZE)
    on_image = pose.layer_to_path(default, *OFFSETS)
    assert pose.from_strokes(path["strokes"], path["meta"]) == on_image
    sent = openpose.to_message((default,), *SIZE)
    assert gimp.layer_image(c["layers"][0]) == expected(sent, 7, condition="openpose")[0], \
        "the keypoints went to the server, which drew them"
    (kept,) = c["reloaded_paths"]  # XCF stores path points as 32-bit floats
    assert kept["meta"] == path["meta"] and kept["name"] == path["name"]
    assert pose.from_strokes(kept["strokes"], kept["meta"]) == on_image, \
        "the skeleton and its data survive saving as XCF"


def test_regenerate_selection_changes_only_the_selected_pixels(gimp):
    """The new layer carries the selection as its layer mask: outside the selection the
    image looks exactly as before, inside it shows the server's pixels."""
    c = gimp.case("inpaint")
    assert c["status"] == "success", c.get("error")
    assert names(c["layers"]) == [f"{PROMPT} · seed 21", "lines", "paper"]
    new = c["layers"][0]
    # The selection plus 64 px of context covers this small layer: the box is the layer.
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    sx, sy, sw, sh = SELECTED[0] - OFFSETS[0], SELECTED[1] - OFFSETS[1], *SELECTED[2:]
    inside = {(x, y) for x in range(sx, sx + sw) for y in range(sy, sy + sh)}
    mask = (gimp.work / new["mask"]).read_bytes()
    assert all(mask[y * SIZE[0] + x] == (255 if (x, y) in inside else 0)
               for x in range(SIZE[0]) for y in range(SIZE[1])), "the mask is the selection"
    coverage = bytes(255 if (x, y) in inside else 0 for y in range(SIZE[1])
                     for x in range(SIZE[0]))
    from controlcanvas_gimp import generation
    request = GenerateRequest(width=SIZE[0], height=SIZE[1], mode="inpaint", prompt=PROMPT,
                              seed=21, steps=8, strength=0.75, init_image=0, mask_image=1)
    want = expect.generated(request, {0: gimp.source, 1: generation.mask_image(
        *SIZE, coverage)})[0]
    assert gimp.layer_image(new) == want
    before = gimp.pixels(c["looks_before"], *CANVAS)
    after = gimp.pixels(c["looks_after"], *CANVAS)
    changed = {(x, y) for x in range(CANVAS[0]) for y in range(CANVAS[1])
               if before.pixel(x, y) != after.pixel(x, y)}
    selected = {(x + OFFSETS[0], y + OFFSETS[1]) for x, y in inside}
    assert changed and changed <= selected, "only selected pixels change"
    assert all(after.pixel(x, y) == want.pixel(x - OFFSETS[0], y - OFFSETS[1])
               for x, y in selected), "inside: the server's pixels, no blending"
    assert c["source_unchanged"]
    assert gimp.layer_image(c["reloaded"][0]) == gimp.layer_image(new)
    assert (gimp.work / c["reloaded"][0]["mask"]).read_bytes() == mask, "XCF keeps the mask"


def test_regenerate_selection_without_a_selection_says_what_to_do(gimp):
    c = gimp.case("inpaint-nothing-selected")
    assert c["status"] == "execution-error"
    assert "Select the part of 'lines' to regenerate first" in c["error"]
    assert names(c["layers"]) == ["lines", "paper"]


# -- failing well ---------------------------------------------------------------------------

def test_server_down_is_a_clean_message(gimp):
    c = gimp.case("server-down")
    assert c["status"] == "execution-error"
    assert c["error"].startswith("ControlCanvas: no server answers at ws://127.0.0.1:")
    assert "`controlcanvas serve`" in c["error"]
    assert "Traceback" not in c["error"]
    assert names(c["layers"]) == ["lines", "paper"] and c["source_unchanged"]


def test_wrong_token_is_a_clean_message(gimp):
    c = gimp.case("wrong-token")
    assert c["status"] == "execution-error"
    assert "refused the access token" in c["error"]
    assert names(c["layers"]) == ["lines", "paper"]


def test_pose_from_photo_reports_that_the_server_cannot_detect_poses(gimp):
    c = gimp.case("pose-from-photo")
    assert c["status"] == "execution-error"
    assert "cannot detect poses" in c["error"] and "Figure from pose" in c["error"]
    assert c["paths"] == [] and names(c["layers"]) == ["lines", "paper"]


def test_pose_from_photo_adds_the_detected_skeleton_as_path_and_layer(gimp):
    c = gimp.case("pose-detected")
    assert c["status"] == "success", c.get("error")
    assert names(c["layers"]) == ["Pose (OpenPose)", "lines", "paper"]
    assert c["returned"]["layer"] == "Pose (OpenPose)"
    detected = openpose.render_people((openpose.default_person(*SIZE),), *SIZE)
    assert gimp.layer_image(c["layers"][0]) == detected
    (path,) = c["paths"]
    got = pose.path_to_layer(pose.from_strokes(path["strokes"], path["meta"]), *OFFSETS)
    flat = [v for point in got for v in point]
    assert flat == pytest.approx([v for point in openpose.default_person(*SIZE) for v in point],
                                 abs=1e-3), "the keypoints the server sent (OpenPose JSON)"
    assert [p["name"] for p in c["reloaded_paths"]] == [pose.PATH_NAME]


def test_settings_finds_the_token_file_and_saves_the_address(gimp):
    c = gimp.case("settings")
    assert c["status"] == "success", c.get("error")
    report = c["returned"]["report"]
    assert "engine fake" in report and "token file" in report
    assert json.loads(gimp.settings_saved)["server-url"].startswith("ws://127.0.0.1:")


# -- issue 15: single file + union ControlNet + LoRA + reference layer ----------------------

def artist_call(gimp, seed_case: str):
    """The request, images and pictures the artist server ran for case ``seed_case``: the
    call whose result is that case's new layer."""
    c = gimp.case(seed_case)
    assert c["status"] == "success", c.get("error")
    got = gimp.layer_image(c["layers"][1]).data
    found = [call for call in gimp.artist_calls if call[2][0].image.data == got]
    assert found, "the new layer holds none of the pictures the server made"
    return c, found[0]


def test_artist_server_lists_the_single_file_and_serves_lineart_with_the_union(artist_server):
    from backend.engines.catalogue import SDXL_UNION

    catalogue = artist_server[1].catalogue
    models = {m.name: m for m in catalogue.models_message().models}
    base = models[artist_stack.BASE_NAME]
    assert (base.kind, base.family, base.present) == ("base", "sdxl", True)
    assert "lineart" in base.conditions and models[SDXL_UNION].present
    assert catalogue.controlnet_name("lineart", "sdxl") == SDXL_UNION
    assert [lora.name for lora in catalogue.models_message().loras] == [artist_stack.LORA_NAME]


def test_artist_flow_single_file_union_lora_and_reference_layer(gimp):
    """Issue 15's "done when", in GIMP: an Illustrious single file, a lineart unit served
    by the union ControlNet, a style LoRA and another layer as a style reference give one
    new layer, at the source's place and size, and change nothing else."""
    c, (request, images, _) = artist_call(gimp, "artist")
    name = f"{PROMPT} · seed {ARTIST_SEED}"
    # (the reference layer is hidden, in a layer group: found by its name all the same)
    assert names(c["layers"]) == [REFERENCE["group"], name, "lines", "paper"]
    assert names(c["layers"][0]["children"]) == [REFERENCE["name"]]
    new = c["layers"][1]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    assert c["old_layers_unchanged"] == {REFERENCE["name"]: True, "lines": True,
                                         "paper": True}
    # what the server received: the single file by its name, the default (union)
    # ControlNet, the LoRA with its strength, the reference layer's picture in style mode
    assert request.base_model == artist_stack.BASE_NAME
    (unit,) = request.controls
    assert unit.condition == "lineart" and unit.model == ""
    assert [(lora.name, lora.strength) for lora in request.loras] == \
        [(artist_stack.LORA_NAME, pytest.approx(0.8))]
    (ref,) = request.references
    assert (ref.mode, ref.weight) == ("style", pytest.approx(0.9))
    sent = images[ref.image]
    assert (sent.width, sent.height) == (512, 336), "the layer whole, at most 512 px"
    from PIL import Image as PILImage
    want = PILImage.open(gimp.work / "reference.png").convert("RGBA").resize(
        (512, 336), PILImage.BOX).tobytes()
    diff = sum(abs(a - b) for a, b in zip(sent.data, want)) / len(want)
    assert diff < 3, f"the reference layer's own picture, scaled (mean difference {diff})"
    assert images[unit.image] == gimp.source, "the control: the selected layer"


def test_artist_flow_lora_and_reference_change_the_result(gimp):
    """The same request without the LoRA and the reference: the server got neither, and
    the picture differs - they reached the engine."""
    with_them = gimp.layer_image(artist_call(gimp, "artist")[0]["layers"][1])
    c, (request, images, _) = artist_call(gimp, "artist-plain")
    assert request.loras == () and request.references == () and len(images) == 1
    assert request.base_model == artist_stack.BASE_NAME and request.seed == ARTIST_SEED
    plain = gimp.layer_image(c["layers"][1])
    assert plain.size == with_them.size and plain != with_them


# -- issue 23: Edit with instruction ------------------------------------------------------------

def test_edit_with_a_selection_and_a_reference_layer(gimp):
    """Issue 23's Edit action in GIMP: an instruction for the selected part of the layer,
    with a hidden reference layer (in a group), on the server's built-in edit model (blank
    Edit model): one new layer above the source, at its place and size, masked by the
    selection; the server got the edit, the instruction, the reference and the mask; outside
    the selection the image is bit-identical."""
    c = gimp.case("edit")
    assert c["status"] == "success", c.get("error")
    name = f"{INSTRUCTION} · seed {EDIT_SEED}"
    assert names(c["layers"]) == [REFERENCE["group"], name, "lines", "paper"]
    assert names(c["layers"][0]["children"]) == [REFERENCE["name"]]
    new = c["layers"][1]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    assert c["returned"] == {"seed": EDIT_SEED, "layer": name}
    assert c["old_layers_unchanged"] == {REFERENCE["name"]: True, "lines": True,
                                         "paper": True}
    (request, images, pictures), = [call for call in gimp.edit_calls
                                    if call[0].seed == EDIT_SEED]
    assert (request.mode, request.prompt, request.base_model, request.seed) == \
        ("edit", INSTRUCTION, "", EDIT_SEED)
    assert (request.width, request.height) == SIZE and images[request.init_image] == gimp.source
    sx, sy, sw, sh = SELECTED[0] - OFFSETS[0], SELECTED[1] - OFFSETS[1], *SELECTED[2:]
    inside = {(x, y) for x in range(sx, sx + sw) for y in range(sy, sy + sh)}
    sent_mask = images[request.mask_image]
    assert all((sent_mask.pixel(x, y)[0] == 255) == ((x, y) in inside)
               for x in range(SIZE[0]) for y in range(SIZE[1])), "the mask: the selection"
    (ref,) = request.edit_references
    assert (images[ref].width, images[ref].height) == (512, 336), "the reference, whole"
    mask = (gimp.work / new["mask"]).read_bytes()
    assert all(mask[y * SIZE[0] + x] == (255 if (x, y) in inside else 0)
               for x in range(SIZE[0]) for y in range(SIZE[1])), "the layer mask: the selection"
    assert gimp.layer_image(new) == pictures[0].image, "the edit model's pixels"
    before = gimp.pixels(c["looks_before"], *CANVAS)
    after = gimp.pixels(c["looks_after"], *CANVAS)
    selected = {(x + OFFSETS[0], y + OFFSETS[1]) for x, y in inside}
    changed = {(x, y) for x in range(CANVAS[0]) for y in range(CANVAS[1])
               if before.pixel(x, y) != after.pixel(x, y)}
    assert changed and changed <= selected, "outside the selection: bit-identical"


def test_edit_with_the_dialogs_defaults_works_at_the_edit_models_size(gimp):
    """Work at 'model' with a blank Edit model: the size of the server's edit model (tiny
    FLUX.1 Kontext: Flux's 1024 px area), not of its default base (SD 1.5's 512 px); the
    result is scaled back onto the layer."""
    c = gimp.case("edit-defaults")
    assert c["status"] == "success", c.get("error")
    name = f"{INSTRUCTION} · seed {EDIT_SEED + 1}"
    assert names(c["layers"]) == [name, "lines", "paper"]
    new = c["layers"][0]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    (request, _, _), = [call for call in gimp.edit_calls if call[0].seed == EDIT_SEED + 1]
    from controlcanvas_gimp import generation
    assert (request.width, request.height) == generation.generation_size(
        *SIZE, "model", NATIVE_SIDE["flux"])
    assert request.mask_image is None and request.edit_references == ()


def test_klein_edit_with_a_reference_layer(gimp):
    """Issue 23's "done when" in GIMP: Flux.2 Klein edits the selected part of the layer with
    a reference layer; one new layer above the source, the server's pixels."""
    c = gimp.case("edit-klein")
    assert c["status"] == "success", c.get("error")
    name = f"{INSTRUCTION} · seed {EDIT_SEED + 2}"
    assert names(c["layers"]) == [REFERENCE["group"], name, "lines", "paper"]
    new = c["layers"][1]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    (request, images, pictures), = [call for call in gimp.edit_calls
                                    if call[0].seed == EDIT_SEED + 2]
    assert (request.mode, request.base_model) == ("edit", "tiny-klein")
    assert request.mask_image is not None and len(request.edit_references) == 1
    assert gimp.layer_image(new) == pictures[0].image, "the edit model's pixels"
    assert c["old_layers_unchanged"] == {REFERENCE["name"]: True, "lines": True,
                                         "paper": True}


def test_zimage_with_its_union_controlnet(gimp):
    """Issue 23's "done when" in GIMP: Z-Image with its union ControlNet (lineart) gives
    one new layer, the server's picture, at the source's place and size."""
    c = gimp.case("zimage")
    assert c["status"] == "success", c.get("error")
    name = f"{PROMPT} · seed {EDIT_SEED + 3}"
    assert names(c["layers"]) == [name, "lines", "paper"]
    new = c["layers"][0]
    assert (new["x"], new["y"], new["w"], new["h"]) == (*OFFSETS, *SIZE)
    (request, images, pictures), = [call for call in gimp.edit_calls
                                    if call[0].seed == EDIT_SEED + 3]
    assert request.base_model == "tiny-zimage"
    assert [(u.condition, u.model) for u in request.controls] == [("lineart", "")]
    assert images[request.controls[0].image] == gimp.source, "the control: the line art"
    assert gimp.layer_image(new) == pictures[0].image


# -- the GUI: GIMP's dialog, OK, one undo step ---------------------------------------------------

@pytest.mark.parametrize("suite", sorted(SUITES))
def test_dialog_ok_and_one_undo_in_the_gui(tmp_path, suite):
    """gimp-3 under Xvfb: the ProcedureDialog appears, OK generates, Ctrl+Z removes it all."""
    chroot_root(suite)
    done = subprocess.run(["bash", str(GUI), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "CC_GIMP_SUITE": suite})
    if done.returncode == 3:
        unavailable(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "one Ctrl+Z removes exactly the new layer      ok" in done.stdout
    assert (tmp_path / "gimp-dialog.png").stat().st_size > 10_000
