"""The Krita plug-in in the real Krita 5.1, 5.2, 5.3 (PyQt5) and 6.0 (PyQt6) of Debian
bookworm, trixie, sid and experimental (chroots, see tests/editors/setup_krita.sh), installed from the packaged zip by Krita's own
"Import Python Plugin" code, talking to a real fake-engine server on 127.0.0.1.

* bundle: the zip's layout, and the plug-in importing with the standard library only;
* kritarunner (no window): open a line-art PNG, run the plug-in's generate path (the
  code behind the docker's Generate button), check the new layer holds exactly the
  engine's pixels, sits under the line art, and the line art is untouched;
* issue 15's flow on the tiny engine (tests/artist_stack.py: an SDXL single file as a named
  base, the union ControlNet, a style LoRA, the SDXL IP-Adapter): through the controller
  (kritarunner) and through the docker's Model list, + LoRA and + Reference rows (GUI),
  with what Krita keeps of those settings;
* issue 23's Edit on the tiny engine's built-in edit model (tiny FLUX.1 Kontext): a
  rectangular selection of the line art and a hidden reference layer, through the
  controller (kritarunner) and through the docker's Edit section + one Krita Undo (GUI);
* the full Krita under Xvfb: the real docker's buttons, then one ``edit_undo``
  removes the result (and a whole batch group) in one step; a pose skeleton as an
  editable vector layer; a screenshot of the window (docs/img/krita-real.png).

Skipped, with the reason, only where the chroot cannot be built or used (not root,
or debootstrap cannot be installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.editor_jail import editor_root, jail

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "krita_support"
HOME_REL = "var/lib/cc-krita-plugin-home"  # persistent: a fresh Krita home costs ~8 s
W, H = 96, 64

pytestmark = [pytest.mark.editor, pytest.mark.slow]


def load_build():
    spec = importlib.util.spec_from_file_location("cc_packaging_build",
                                                  ROOT / "packaging" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def krita_zip(tmp_path_factory):
    build = load_build()
    out = tmp_path_factory.mktemp("dist")
    _, archive = build.build_krita(out, build.default_cache())
    return archive


# -- the bundle (no chroot needed) ---------------------------------------------------------------

def test_zip_layout_is_what_krita_imports(krita_zip):
    with zipfile.ZipFile(krita_zip) as zf:
        names = zf.namelist()
        build = json.loads(zf.read("controlcanvas/BUILD.json"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"controlcanvas", "controlcanvas.desktop"}  # nothing else claimed
    assert "controlcanvas/" in names  # Krita's importer looks for the folder entry
    assert "controlcanvas/_vendor/shared/messages.py" in names
    assert "controlcanvas/_vendor/websockets/sync/client.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c", ".pyc"))]
    assert build["bundled"]["websockets"] == "16.0" and build["name"] == "controlcanvas-krita"


def test_bundle_imports_with_the_standard_library_only(krita_zip, tmp_path, make_server):
    """A clean interpreter (-I -S: no site-packages, no repo on the path) imports the
    plug-in from the unzipped bundle and talks to a server with the bundled client."""
    with zipfile.ZipFile(krita_zip) as zf:
        zf.extractall(tmp_path / "pykrita")
    server = make_server()
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import controlcanvas, websockets\n"
        "from controlcanvas import proto\n"
        "assert proto.BUNDLED and not controlcanvas.REGISTERED\n"
        "assert 'shared' not in sys.modules, 'a top-level shared was imported'\n"
        "assert websockets.__file__.startswith(sys.argv[1]), websockets.__file__\n"
        "assert sys.argv[1] not in sys.path[1:], 'the vendor path must not stay on sys.path'\n"
        "with proto.Client.connect(sys.argv[2], sys.argv[3]) as c:\n"
        "    print('OK', websockets.__version__, c.welcome.engine)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(tmp_path / "pykrita"),
                           server.url, server.token], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", "16.0", "fake"]


def test_plugin_sources_run_on_python_310():
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    done = subprocess.run([str(vermin), "-t=3.10-", "--no-tips", "--violations",
                           str(ROOT / "plugin_krita")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the real Krita ------------------------------------------------------------------------------

# Debian suite -> (the Krita it ships, the PyQt that Krita embeds)
SUITES = {"bookworm": ("5.1", "PyQt5"), "trixie": ("5.2", "PyQt5"), "sid": ("5.3", "PyQt5"),
          "experimental": ("6.0", "PyQt6")}


def chroot_root(suite: str) -> Path:
    return editor_root("setup_krita.sh", "--suite", suite)


def line_art_png(path: Path) -> None:
    """Dark lines on a transparent layer, the way line art is drawn."""
    from PIL import Image as PILImage, ImageDraw
    img = PILImage.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 8, 60, 48), outline=(20, 20, 30, 255), width=2)
    draw.line((10, 56, 86, 56), fill=(20, 20, 30, 255), width=2)
    draw.line((70, 6, 88, 40), fill=(20, 20, 30, 200), width=1)
    img.save(path)


def big_line_art_png(path: Path) -> None:
    """A house under a tree, for the screenshot."""
    from PIL import Image as PILImage, ImageDraw
    img = PILImage.new("RGBA", (640, 420), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    ink = dict(fill=(25, 25, 35, 255), width=4)
    d.line((20, 380, 620, 380), **ink)  # ground
    d.rectangle((90, 220, 330, 380), outline=ink["fill"], width=4)  # house
    d.line((70, 230, 210, 110, 350, 230), **ink)  # roof
    d.rectangle((185, 290, 235, 380), outline=ink["fill"], width=4)  # door
    d.rectangle((115, 250, 165, 295), outline=ink["fill"], width=4)  # windows
    d.rectangle((255, 250, 305, 295), outline=ink["fill"], width=4)
    d.line((470, 380, 470, 250), **ink)  # trunk
    d.line((500, 380, 500, 250), **ink)
    d.ellipse((400, 120, 570, 270), outline=ink["fill"], width=4)  # crown
    d.ellipse((520, 30, 590, 100), outline=ink["fill"], width=4)  # sun
    img.save(path)


def run_in_chroot(root: Path, home: str, env: dict, command: list, timeout: int = 300):
    settings = [f"HOME=/{home}", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"]
    settings += [f"{k}={v}" for k, v in env.items()]
    return subprocess.run(jail(root, *settings, *command), capture_output=True, text=True,
                          timeout=timeout)


def results(output: str) -> dict:
    found = {}
    for line in output.splitlines():
        if line.startswith("CC_RESULT "):
            _, name, value = line.split(" ", 2)
            found[name] = json.loads(value)
    return found


TOKEN = "real-krita-test-token"


@pytest.fixture(scope="module")
def artist_server(tmp_path_factory):
    """The tiny engine over issue 15's stack (tests/artist_stack.py)."""
    from tests import artist_stack

    server, engine = artist_stack.start_server(tmp_path_factory.mktemp("artist"), TOKEN)
    try:
        yield server, engine
    finally:
        server.stop()


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    """The tiny engine whose blank edit model is tiny FLUX.1 Kontext (issue 23)."""
    from tests import artist_stack

    server, engine = artist_stack.start_edit_server(tmp_path_factory.mktemp("edit"), TOKEN)
    try:
        yield server, engine
    finally:
        server.stop()


@pytest.fixture(scope="module", params=list(SUITES))
def krita_env(request, krita_zip, tmp_path_factory, artist_server, edit_server):
    """Chroot ready, zip imported by Krita's importer, token file in place, server up."""
    from backend.server.config import ServerConfig
    from backend.server.local import ServerThread
    from tests.krita_support.engines import RecordingEngine

    suite = request.param
    root = chroot_root(suite)
    home = root / HOME_REL
    rel = f"tmp/cc_krita_plugin.{os.getpid()}"
    work = root / rel
    for stale in (root / "tmp").glob("cc_krita_plugin.*"):  # left by a killed run
        if not Path(f"/proc/{stale.suffix[1:]}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "mod").mkdir(parents=True)
    shutil.copy(krita_zip, work / krita_zip.name)
    shutil.copy(SUPPORT / "krita_real_runner.py", work / "mod")
    line_art_png(work / "lineart.png")
    from tests import artist_stack
    artist_stack.reference_png(work / "reference.png", W, H)
    big_line_art_png(work / "lineart_big.png")
    pykrita = home / ".local/share/krita/pykrita"
    pykrita.mkdir(parents=True, exist_ok=True)
    for stale in ("controlcanvas", "controlcanvas.desktop", "cc_test_driver",
                  "cc_test_driver.desktop"):
        target = pykrita / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else \
            target.unlink(missing_ok=True)
    t0 = time.monotonic()
    # Krita's own importer, from its command line; Krita 6's expects the i18n that Krita
    # puts into builtins for its Python.
    imported = run_in_chroot(root, HOME_REL, {}, [
        "python3", "-c", "import builtins, runpy, sys; builtins.i18n = str; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        "/usr/share/krita/pykrita/plugin_importer/plugin_importer.py",
        f"/{rel}/{krita_zip.name}", f"/{HOME_REL}/.local/share/krita"])
    assert "Imported plugin: ControlCanvas" in imported.stdout, imported.stdout + \
        imported.stderr
    shutil.copytree(SUPPORT / "pykrita" / "cc_test_driver", pykrita / "cc_test_driver")
    shutil.copy(SUPPORT / "pykrita" / "cc_test_driver.desktop", pykrita)
    (home / ".config").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "kritarc").write_text(
        "[python]\nenable_controlcanvas=true\nenable_cc_test_driver=true\n")
    engine = RecordingEngine(step_seconds=0.002)
    server = ServerThread(engine, ServerConfig(port=0), token=TOKEN).start()
    token_file = home / ".config" / "controlcanvas" / "token"  # where the backend puts it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(server.token + "\n")
    token_file.chmod(0o600)
    artist_server[1].calls.clear()
    edit_server[1].calls.clear()
    env = dict(artist=artist_server, editor=edit_server, suite=suite, krita=SUITES[suite][0],
               qt=SUITES[suite][1], root=root, home=HOME_REL, rel=rel, work=work, server=server, engine=engine,
               install_seconds=round(time.monotonic() - t0, 2))
    try:
        yield env
    finally:
        server.stop()
        if os.environ.get("CC_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


def engine_output(engine, seed: int) -> bytes:
    for request, _, outputs in engine.calls:
        if request.seed == seed:
            return outputs[0].image.to_bgra()
    raise AssertionError(f"the engine never generated seed {seed}")


def test_generate_path_in_kritarunner(krita_env):
    env = krita_env
    t0 = time.monotonic()
    done = run_in_chroot(env["root"], env["home"], {
        "QT_QPA_PLATFORM": "offscreen",
        "PYTHONPATH": f"/{env['home']}/.local/share/krita/pykrita:/{env['rel']}/mod"},
        ["timeout", "240", "kritarunner", "-s", "krita_real_runner", "-f", "main",
         f"/{env['rel']}", env["server"].url, env["artist"][0].url, env["editor"][0].url])
    seconds = time.monotonic() - t0
    out = done.stdout + done.stderr
    found = results(out)
    assert "CC_END" in out and "exception" not in found, out[-4000:]
    plugin = found["plugin"]
    assert plugin["krita"].startswith(env["krita"] + "."), plugin["krita"]
    assert plugin["bundled"] and plugin["qt"] == env["qt"] and not plugin["shared_top_level"]
    assert plugin["websockets"][0] == "16.0" and "/controlcanvas/_vendor/" in \
        plugin["websockets"][1]
    assert found["connect"]["online"] and "Token read from" in found["connect"]["token_note"]
    work = env["work"]

    below = found["colourise_below"]
    assert below["done"] and below["units"][0][0] == "lineart", below
    assert below["tree"] == ["Background", "flat colours, girl in a red coat · seed 1234",
                             "lineart"], below["tree"]
    assert (work / "result_below.bgra").read_bytes() == engine_output(env["engine"], 1234)
    assert below["lines_after"] == below["lines_before"]  # the source is untouched

    kept = found["history_reopened"]  # saved as .kra, reopened: the history is there
    assert kept["saved"] and "controlcanvas.history" in kept["types"], kept
    (entry,) = json.loads(kept["record"])["entries"]
    assert entry["prompt"] == "flat colours, girl in a red coat" and entry["seeds"] == [1234]
    assert entry["layers"][0][1] == "flat colours, girl in a red coat · seed 1234"
    assert kept["bound"] and kept["labels"] == [
        "flat colours, girl in a red coat · seed 1234 (saved)"], kept
    assert kept["reuse_seed"] == 1234

    bare = found["colourise_bare_png"]
    assert bare["done"] and len(bare["tree"]) == 2 and bare["top_blending"] == "multiply"
    assert "Multiply" in bare["message"]
    assert (work / "result_bare.bgra").read_bytes() == engine_output(env["engine"], 99)
    assert bare["lines_after"] == bare["lines_before"]

    pose = found["pose_without_view"]
    assert pose["layer"] is None and "open in a window" in pose["message"]

    live = found["live"]  # frames replaced in place in one layer, Keep, off
    assert live["started"] and live["first"] >= 1 and live["second"] >= 2, live
    assert live["seed"] == 5555 and live["locked"], live
    assert live["tree_live"] == ["Background", "ControlCanvas live", "lineart"], live
    frames = [o[0].image.to_bgra() for r, _, o in env["engine"].calls if r.seed == 5555]
    assert (work / "live_second.bgra").read_bytes() == frames[-1]
    assert live["first_sha"] != live["second_sha"]  # the stroke changed the frame
    name = "flat colours, girl in a red coat · seed 5555"
    assert live["kept"] and live["tree_kept"] == ["Background", "ControlCanvas live", name,
                                                  "lineart"], live
    assert live["tree_off"] == [n for n in live["tree_kept"] if n != "ControlCanvas live"]
    print(f"kritarunner tier: {seconds:.1f} s (install {env['install_seconds']} s)")
    check_artist_flow(env, found["artist"])
    check_edit(env, found["edit"], "edit", 2323)
    check_edit(env, found["edit-klein"], "edit-klein", 2525, model="tiny-klein")


EDIT_INSTRUCTION = "make the coat red like the sunset"
EDIT_BOX = (30, 20, 24, 16)  # krita_real_runner's selection


def check_edit(env, found, key, seed, model=""):
    """Issue 23's Edit in Krita: the instruction for a rectangular selection of the line art,
    the hidden reference layer picked, a blank Edit model: one new layer right above the line
    art; the server got an edit with the instruction, the reference and the selection as its
    mask; outside the selection the composite is bit-identical."""
    from PIL import Image as PILImage

    assert found["done"], json.dumps(found)
    name = f"{EDIT_INSTRUCTION} · seed {seed}"
    assert found["result"] == name and found["tree"] == [
        "Background", "lineart", name, "reference photo"], found
    assert found["old_unchanged"] == {"Background": True, "lineart": True,
                                      "reference photo": True}, found
    request, images, outputs = next(call for call in env["editor"][1].calls
                                    if call[0].seed == seed)
    assert (request.mode, request.prompt, request.base_model) == ("edit", EDIT_INSTRUCTION,
                                                                  model)
    assert (request.width, request.height) == (W, H)  # the context box: the whole document
    (ref,) = request.edit_references
    assert images[ref].data == PILImage.open(env["work"] / "reference.png").convert(
        "RGBA").tobytes(), "the hidden reference layer's own pixels"
    x0, y0, bw, bh = EDIT_BOX
    inside = {(x, y) for x in range(x0, x0 + bw) for y in range(y0, y0 + bh)}
    mask = images[request.mask_image]
    assert all((mask.pixel(x, y)[0] == 255) == ((x, y) in inside)
               for x in range(W) for y in range(H)), "the mask: the selection"
    got = (env["work"] / f"{key}.bgra").read_bytes()
    want = outputs[0].image.to_bgra()
    for x, y in inside:  # inside: the edit model's pixels
        at = (y * W + x) * 4
        assert got[at:at + 4] == want[at:at + 4], (x, y)
    assert found["bounds"] == [x0, y0, bw, bh], found  # outside: nothing
    before = (env["work"] / f"{key}_looks_before.bgra").read_bytes()
    after = (env["work"] / f"{key}_looks_after.bgra").read_bytes()
    changed = {(i // 4 % W, i // 4 // W) for i in range(0, len(before), 4)
               if before[i:i + 4] != after[i:i + 4]}
    assert changed and changed <= inside, "outside the selection: bit-identical"


def check_artist_flow(env, found):
    """Issue 15's "done when" in Krita: the Illustrious single file the server lists, a
    lineart unit (served by the union ControlNet), a style LoRA and a hidden layer of the
    document as a style reference give one new layer of the document's size, and nothing
    else changes; without the LoRA and the reference the picture differs."""
    from PIL import Image as PILImage
    from tests import artist_stack

    assert artist_stack.BASE_NAME in found["models"], found["models"]
    calls = env["artist"][1].calls
    work = env["work"]
    for key in ("artist", "artist_plain"):
        run = found[key]
        assert run["done"] and run["result"] == \
            "flat colours, girl in a red coat · seed 1515", run
        assert run["bounds"] == [0, 0, W, H], run
        got = (work / f"{key}.bgra").read_bytes()
        matches = [call for call in calls if call[2][0].image.to_bgra() == got]
        assert matches, f"{key}: the new layer holds none of the pictures the server made"
        request, images, _ = matches[0]
        assert request.base_model == artist_stack.BASE_NAME and request.seed == 1515
        (unit,) = request.controls
        assert unit.condition == "lineart" and unit.model == ""  # the default: the union
        if key == "artist_plain":
            assert request.loras == () and request.references == ()
            continue
        assert [(lora.name, lora.strength) for lora in request.loras] == \
            [(artist_stack.LORA_NAME, pytest.approx(0.8))]
        (ref,) = request.references
        assert (ref.mode, ref.weight) == ("style", pytest.approx(0.9))
        want = PILImage.open(work / "reference.png").convert("RGBA").tobytes()
        assert images[ref.image].data == want, "the hidden reference layer's own pixels"
    assert found["artist"]["tree"] == ["Background", found["artist"]["result"], "lineart",
                                       "reference photo"], found["artist"]["tree"]
    assert (work / "artist.bgra").read_bytes() != (work / "artist_plain.bgra").read_bytes()
    assert found["old_unchanged"] == {"Background": True, "lineart": True,
                                      "reference photo": True}, found
    assert found["reference_visible"] is False


def test_docker_undo_and_pose_in_the_gui(krita_env):
    env = krita_env
    shot = f"/{env['rel']}/krita-real.png"
    t0 = time.monotonic()
    for attempt in range(2):
        done = run_in_chroot(env["root"], env["home"], {
            "CC_DRIVER_WORK": f"/{env['rel']}", "CC_DRIVER_MODDIR": f"/{env['rel']}/mod",
            "CC_DRIVER_URL": env["server"].url, "CC_DRIVER_SCREENSHOT": shot,
            "CC_DRIVER_ARTIST_URL": env["artist"][0].url,
            "CC_DRIVER_EDIT_URL": env["editor"][0].url},
            ["timeout", "300", "xvfb-run", "-a", "-s", "-screen 0 1280x800x24",
             "krita", "--nosplash"])
        out = done.stdout + done.stderr
        # xvfb-run can start Krita before its Xvfb listens on a loaded machine: that is the
        # harness, not the plug-in, so it gets one more try (Krita never started: no CC_ line)
        if "could not connect to display" not in out or "CC_" in out:
            break
    seconds = time.monotonic() - t0
    found = results(out)
    assert "CC_END" in out and "exception" not in found, out[-4000:]
    assert found["gui_dockers"]["count"] >= 1
    assert found["gui_connect"]["online"], found["gui_connect"]

    gen = found["gui_generate_undo"]
    name = "flat colours, girl in a red coat · seed 4321"
    assert gen["done"] and gen["with_result"] == ["Background", name, "lineart"], json.dumps(gen)
    assert (env["work"] / "gui_result.bgra").read_bytes() == engine_output(env["engine"], 4321)
    assert gen["after_one_undo"] == ["Background", "lineart"], gen  # ONE undo step

    batch = found["gui_variants_undo"]
    group = batch["with_group"][1]
    assert batch["done"] and isinstance(group, list) and len(group[1]) == 4, batch
    assert batch["after_one_undo"] == ["Background", "lineart"], batch

    pose = found["gui_pose"]
    assert pose["layer"] == "vectorlayer" and pose["shapes"] == 18 + 17, pose
    assert pose["max_error_px"] < 0.5, pose
    assert found["gui_pose_generate"]["done"], found["gui_pose_generate"]
    # the first call with the figure's prompt is Figure from pose (live frames reuse it later)
    request, images = next((r, i) for r, i, _ in env["engine"].calls
                           if r.prompt == "knight in armour, full body")
    assert request.controls[0].pose is not None and images == {}, \
        "the skeleton travels as keypoints, not as a picture"

    live = found["gui_live"]  # the docker's Live toggle, a scripted stroke, Keep, off
    assert live["first"] and live["second"] and live["screenshot"], live
    assert live["button"] == "Keep frame" and "ControlCanvas live" in live["tree_live"], live
    frames = [o[0].image.to_bgra() for r, _, o in env["engine"].calls
              if r.seed == live["seed"] and r.batch == 1]
    assert (env["work"] / "gui_live.bgra").read_bytes() == frames[-1]
    assert len(live["tree_kept"]) == len(live["tree_live"]) + 1, live  # Keep: one layer
    assert live["after_undo"] == live["tree_live"], live  # ... and one undo step
    assert "ControlCanvas live" not in live["tree_off"], live
    assert (env["work"] / "krita-real-live.png").stat().st_size > 10_000

    assert found["gui_screenshot"]["saved"]
    png = env["work"] / "krita-real.png"
    assert png.stat().st_size > 10_000
    docs_name = {"bookworm": "krita-real.png", "experimental": "krita6-real.png"}
    if os.environ.get("CONTROLCANVAS_UPDATE_SCREENSHOTS") and env["suite"] in docs_name:
        shutil.copy(png, ROOT / "docs" / "img" / docs_name[env["suite"]])
    print(f"GUI tier: {seconds:.1f} s")
    check_gui_artist(env, found["gui_artist"])
    check_gui_edit(env, found["gui_edit"])


def check_gui_edit(env, gui_edit):
    """Issue 23 through the docker's Edit section (instruction, the first reference picker,
    Edit layer), then one Krita Undo removes the new layer."""
    assert gui_edit["online"], gui_edit
    if not gui_edit["settled"]:
        # Krita 5.2 under Xvfb (no window manager) reports no active node for a script-made
        # view (see check_gui_artist): Edit then says what to do, and sends nothing
        assert env["krita"] == "5.2", gui_edit
        assert gui_edit["message"].startswith("Select the layer to edit first"), gui_edit
        assert gui_edit["tree"] == ["Background", "lineart", "reference photo"], gui_edit
        assert not [call for call in env["editor"][1].calls if call[0].seed == 2424]
        return
    check_edit(env, gui_edit, "gui_edit", 2424)
    assert gui_edit["after_one_undo"] == ["Background", "lineart", "reference photo"], gui_edit
    assert gui_edit["looks_undone"], "one undo: the composite as before"


def check_gui_artist(env, found):
    """Issue 15 through the docker: the Model list, + LoRA, + Reference and the row's layer
    list reach the server; Krita keeps them and the docker shows them again."""
    from tests import artist_stack

    assert found["online"] and found["done"], json.dumps(found)
    assert found["unit_layer"] == "lineart", found
    # + Reference starts on the active layer; Krita 5.2 under Xvfb (no window manager)
    # reports no active node for a script-made view, and the row starts on the first layer
    assert found["first_pick"] == ("lineart" if found["settled"] else "reference photo"), found
    assert found["settled"] or env["krita"] == "5.2", found
    request, images, outputs = next(call for call in env["artist"][1].calls
                                    if call[0].seed == 1616)
    assert (env["work"] / "gui_artist.bgra").read_bytes() == outputs[0].image.to_bgra()
    assert request.base_model == artist_stack.BASE_NAME
    assert [(lora.name, lora.strength) for lora in request.loras] == \
        [(artist_stack.LORA_NAME, pytest.approx(0.8))]
    (ref,) = request.references
    assert (ref.mode, ref.weight) == ("style", pytest.approx(0.9))
    (unit,) = request.controls
    assert unit.condition == "lineart" and images[unit.image].data != images[ref.image].data
    from PIL import Image as PILImage
    assert images[ref.image].data == PILImage.open(env["work"] / "reference.png") \
        .convert("RGBA").tobytes(), "the picked layer's pixels, not the active one's"
    assert found["kept"] == {"base_model": artist_stack.BASE_NAME,
                             "loras": [[artist_stack.LORA_NAME, pytest.approx(0.8)]],
                             "references": [[True, "style", pytest.approx(0.9)]]}, found
    assert found["reloaded"] == {"layers": ["reference photo"], "modes": ["style"],
                                 "weights": [pytest.approx(0.9)],
                                 "model": artist_stack.BASE_NAME}, found
