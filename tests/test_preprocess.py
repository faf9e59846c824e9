"""backend.annotators: the annotator registry, our weight-free annotators, pixel-perfect
control images for generate requests, the fake engine's preprocess and the CLI."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.annotators import builtin, controls, library, registry
from backend.engines.base import NullContext
from backend.engines.fake import FakeEngine
from backend.imaging import to_array
from backend.cli.preprocess import main as cli_main
from backend.imaging import load_image, on_white, save_image
from shared.errors import FieldError, MissingImage, Unsupported
from shared.images import Image
from shared.messages import AnnotatorInfo, ControlUnit, GenerateRequest, Models, Preprocess

WEIGHT_FREE = ("none", "invert", "canny", "lineart_from_drawing", "scribble", "shuffle", "tile",
               "blur", "seg_passthrough", "depth_passthrough", "normal_passthrough",
               "straight_lines", "pose_from_photo")
AUX = ("hed", "pidinet", "mlsd", "lineart", "lineart_anime", "zoe", "midas", "normal_bae",
       "openpose")


def img(rgba: np.ndarray) -> Image:
    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    return Image(rgba.shape[1], rgba.shape[0], rgba.tobytes())


def arr(image: Image) -> np.ndarray:
    return to_array(image)


def drawing(w=320, h=240, transparent=True, thickness=3, colour=(0, 0, 0)):
    """Dark line art: a rectangle outline and a diagonal, on transparent (or white)."""
    a = np.zeros((h, w, 4), np.uint8)
    if not transparent:
        a[...] = 255
    c = (*colour, 255)
    cv2.rectangle(a, (w // 8, h // 6), (w // 2, h * 5 // 6), c, thickness)
    cv2.line(a, (w * 5 // 8, h // 6), (w * 7 // 8, h * 5 // 6), c, thickness)
    return a


def line_mask(w, h, thickness=1):
    """Where drawing() put its lines, at size w x h."""
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (w // 8, h // 6), (w // 2, h * 5 // 6), 255, thickness)
    cv2.line(m, (w * 5 // 8, h // 6), (w * 7 // 8, h * 5 // 6), 255, thickness)
    return m > 0


def near(mask, radius):
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0


# -- the registry -----------------------------------------------------------------------

def test_every_annotator_is_listed_with_a_valid_description():
    infos = {i.name: i for i in library.list_annotators()}
    assert set(WEIGHT_FREE) | set(AUX) <= set(infos)
    for name in WEIGHT_FREE:
        assert not infos[name].needs_weights
    for name in AUX:
        assert infos[name].needs_weights
        from backend.weights import aux_installed
        assert infos[name].available == aux_installed()
    assert infos["canny"].condition == "canny"
    assert infos["lineart_from_drawing"].condition == "lineart"
    assert {p.name: p.default for p in infos["canny"].params} == \
        {"low": 100, "high": 200, "blur": 0.0, "l2": False}
    # the list travels in the protocol's models message
    Models(annotators=library.list_annotators())
    assert all(isinstance(i, AnnotatorInfo) for i in infos.values())


@pytest.mark.parametrize("params, field, words", [
    ({"lo": 5}, "params.lo", "not a parameter of canny; it takes: low, high"),
    ({"low": "50"}, "params.low", "whole number from 1 to 255"),
    ({"low": 2.5}, "params.low", "whole number"),
    ({"low": True}, "params.low", "whole number"),
    ({"high": 300}, "params.high", "from 1 to 255; got 300"),
    ({"low": 150, "high": 100}, "params.low", "must not be above params.high"),
    ({"l2": 1}, "params.l2", "true or false"),
])
def test_bad_parameters_name_the_parameter_and_the_fix(params, field, words):
    with pytest.raises(FieldError) as info:
        library.run("canny", img(drawing()), params)
    assert info.value.field == field
    assert words in info.value.message


def test_choice_parameters_and_defaults():
    ann = library.get("lineart_from_drawing")
    assert registry.validate_params(ann, {})["mode"] == "threshold"
    assert registry.validate_params(ann, {"mode": "adaptive", "threshold": 100.0})["threshold"] == 100
    with pytest.raises(FieldError, match="one of threshold, adaptive, soft"):
        registry.validate_params(ann, {"mode": "fancy"})


def test_unknown_annotator_is_unsupported_and_lists_the_known_ones():
    with pytest.raises(Unsupported) as info:
        library.run("lasers", img(drawing()))
    assert info.value.field == "annotator" and "canny" in info.value.message


@pytest.mark.parametrize("name", ["canny", "lineart_from_drawing", "scribble", "invert",
                                  "straight_lines", "depth_passthrough"])
def test_a_transparent_layer_is_refused_as_empty(name):
    with pytest.raises(registry.EmptyLayer) as info:
        library.run(name, Image.filled(40, 30))
    assert "layer is empty" in info.value.message and info.value.field == "image"
    assert info.value.code == "bad_field"  # travels with the existing protocol codes


@pytest.mark.parametrize("name", ["canny", "lineart_from_drawing", "scribble", "straight_lines"])
def test_a_uniform_layer_is_refused_by_line_annotators(name):
    with pytest.raises(registry.EmptyLayer, match="same colour"):
        library.run(name, Image.filled(40, 30, (255, 255, 255, 255)))


def test_none_accepts_anything_and_keeps_alpha():
    empty = Image.filled(40, 30)
    assert library.run("none", empty) == empty
    assert library.run("none", empty, size=(20, 15)).size == (20, 15)


# -- weight-free annotators -------------------------------------------------------------

def test_canny_finds_the_drawn_lines_at_the_requested_size():
    out = arr(library.run("canny", img(drawing(640, 480)), size=(320, 240)))
    assert out.shape == (240, 320, 4) and (out[..., 3] == 255).all()
    edges = out[..., 0] > 0
    lines = line_mask(320, 240)
    assert edges[near(lines, 3)].sum() > 400            # edges along every drawn line
    assert not edges[~near(lines, 4)].any()             # and nowhere else
    assert (out[..., 0] == out[..., 1]).all()           # white on black


def test_canny_thresholds_matter():
    soft = np.full((120, 160, 4), 255, np.uint8)
    cv2.line(soft, (10, 60), (150, 60), (235, 235, 235, 255), 3)  # a faint line
    loose = arr(library.run("canny", img(soft), {"low": 10, "high": 20}))[..., 0]
    strict = arr(library.run("canny", img(soft), {"low": 200, "high": 250}))[..., 0]
    assert loose.sum() > 0 and strict.sum() == 0


def test_lineart_from_drawing_gives_white_lines_on_black():
    out = arr(library.run("lineart_from_drawing", img(drawing())))[..., 0]
    lines = line_mask(320, 240, 3)
    assert out[lines].mean() > 200 and out[~near(lines, 2)].max() == 0
    same = arr(library.run("lineart_from_drawing", img(drawing(transparent=False))))[..., 0]
    assert np.array_equal(out, same)  # transparent paper == white paper


def test_lineart_invert_false_keeps_dark_lines_on_white():
    out = arr(library.run("lineart_from_drawing", img(drawing()), {"invert": False}))[..., 0]
    lines = line_mask(320, 240, 3)
    assert out[lines].mean() < 50 and out[~near(lines, 2)].min() == 255


def test_thin_lines_survive_a_big_reduction():
    big = drawing(2048, 1536, thickness=1)
    out = arr(library.run("lineart_from_drawing", img(big), size=(256, 192)))[..., 0]
    lines = line_mask(256, 192)
    # every stretch of line is still clearly there, not a faint grey
    assert np.percentile(out[lines], 10) > 100
    naive = cv2.resize(255 - cv2.cvtColor(on_white(big), cv2.COLOR_RGB2GRAY), (256, 192),
                       interpolation=cv2.INTER_AREA)
    assert naive[lines].mean() < out[lines].mean() / 2  # what plain resizing would lose


def test_lineart_thickness_and_adaptive_mode():
    thin = arr(library.run("lineart_from_drawing", img(drawing(thickness=1))))[..., 0]
    thick = arr(library.run("lineart_from_drawing", img(drawing(thickness=1)), {"thickness": 2}))[..., 0]
    assert (thick > 127).sum() > 2 * (thin > 127).sum()
    # an unevenly lit scan: a dark gradient would swamp a fixed threshold
    scan = np.zeros((240, 320, 4), np.uint8)
    scan[..., :3] = np.linspace(250, 110, 320, dtype=np.uint8)[None, :, None]
    scan[..., 3] = 255
    lines = line_mask(320, 240, 2)
    scan[lines, :3] = (scan[lines, :3].astype(int) - 80).clip(0, 255)
    fixed = arr(library.run("lineart_from_drawing", img(scan), {"threshold": 192}))[..., 0]
    adaptive = arr(library.run("lineart_from_drawing", img(scan), {"mode": "adaptive"}))[..., 0]
    assert (fixed[~near(lines, 3)] > 127).mean() > 0.3        # the shadow became "ink"
    assert (adaptive[~near(lines, 3)] > 127).mean() < 0.01    # adaptive keeps only the lines
    assert (adaptive[lines] > 127).mean() > 0.8


def test_scribble_is_bold_binary_and_handles_both_polarities():
    out = arr(library.run("scribble", img(drawing(thickness=2))))[..., 0]
    assert set(np.unique(out)) <= {0, 255}
    assert (out > 0).sum() > 2 * line_mask(320, 240, 2).sum()     # dilated
    light = drawing(transparent=False, thickness=2)
    light[..., :3] = 255 - light[..., :3]                          # white strokes on black
    flipped = arr(library.run("scribble", img(light)))[..., 0]
    assert np.array_equal(flipped, out)


def test_invert_swaps_dark_and_light_and_keeps_alpha():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    out = arr(library.run("invert", img(a)))
    assert np.array_equal(out[..., :3], 255 - a[..., :3]) and np.array_equal(out[..., 3], a[..., 3])


def test_shuffle_is_seeded_and_keeps_the_colours():
    a = np.zeros((128, 128, 4), np.uint8)
    a[..., 3] = 255
    a[:, :64, :3] = (255, 0, 0)
    a[:, 64:, :3] = (0, 0, 255)
    one = arr(library.run("shuffle", img(a), {"seed": 1}))
    assert np.array_equal(one, arr(library.run("shuffle", img(a), {"seed": 1})))
    assert not np.array_equal(one, arr(library.run("shuffle", img(a), {"seed": 2})))
    assert not np.array_equal(one, a)
    assert (one[..., 1] == 0).all()  # only red and blue (and their mixes) come out


def test_tile_and_blur_remove_detail_at_the_size_asked():
    rng = np.random.default_rng(0)
    noise = np.dstack([rng.integers(0, 256, (96, 128, 3)), np.full((96, 128), 255)])
    same = arr(library.run("tile", img(noise)))[..., :3]
    assert np.array_equal(same, noise[..., :3])  # down=1, blur=0 is the layer itself
    coarse = arr(library.run("tile", img(noise), {"down": 4.0}, size=(64, 48)))
    assert coarse.shape == (48, 64, 4)
    blurred = arr(library.run("blur", img(noise)))[..., :3].astype(float)
    assert blurred.std() < noise[..., :3].std() / 3


def ade(i):
    return tuple(int(c) for c in builtin.ADE20K_PALETTE[i])


def test_seg_passthrough_snaps_brush_edges_to_palette_colours():
    a = np.zeros((60, 80, 4), np.uint8)
    a[..., 3] = 255
    a[:, :40, :3] = ade(0)    # wall
    a[:, 40:, :3] = ade(2)    # sky
    a[:, 39:41, :3] = (60, 170, 170)  # an anti-aliased brush edge (between the two)
    a[5, 5, :3] = np.array(ade(0)) + 3  # a slightly-off colour
    out = arr(library.run("seg_passthrough", img(a), size=(160, 120)))[..., :3]
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= {ade(0), ade(2)}
    assert out.shape == (120, 160, 3)


def test_seg_passthrough_refuses_a_photo_unless_told_otherwise():
    rng = np.random.default_rng(3)
    photo = np.dstack([rng.integers(0, 256, (40, 40, 3)), np.full((40, 40), 255)])
    with pytest.raises(FieldError, match="does not look like an ADE20K segmentation map") as info:
        library.run("seg_passthrough", img(photo))
    assert info.value.field == "image"
    out = arr(library.run("seg_passthrough", img(photo), {"palette": "any"}))
    assert np.array_equal(out[..., :3], photo[..., :3])


def test_depth_passthrough_normalises_inverts_and_treats_transparent_as_far():
    a = np.zeros((20, 40, 4), np.uint8)
    a[:, :20] = (100, 100, 100, 255)
    a[:, 20:30] = (150, 150, 150, 255)      # nearer
    out = arr(library.run("depth_passthrough", img(a)))[..., 0]
    assert out[0, 0] == 0 and out[0, 25] == 255 and out[0, 35] == 0
    inv = arr(library.run("depth_passthrough", img(a), {"invert": True}))[..., 0]
    assert inv[0, 0] == 255 and inv[0, 25] == 0 and inv[0, 35] == 0


def test_normal_passthrough_keeps_unit_vectors():
    a = np.zeros((20, 20, 4), np.uint8)
    a[:10] = (200, 90, 230, 255)  # a painted, not quite normalised normal
    out = arr(library.run("normal_passthrough", img(a))).astype(float)
    assert tuple(out[15, 5, :3]) == (128, 128, 255)      # transparent = facing the camera
    v = out[5, 5, :3] / 127.5 - 1
    assert abs(np.linalg.norm(v) - 1) < 0.02
    flipped = arr(library.run("normal_passthrough", img(a), {"flip_green": True, "normalize": False}))
    assert flipped[5, 5, 1] == 255 - 90


def test_straight_lines_finds_segments_and_drops_short_ones():
    a = np.full((256, 256, 4), 255, np.uint8)
    cv2.line(a, (20, 30), (230, 200), (0, 0, 0, 255), 2)
    cv2.line(a, (200, 20), (206, 26), (0, 0, 0, 255), 2)  # a short tick
    out = arr(library.run("straight_lines", img(a), {"min_length": 40}))[..., 0] > 0
    long_line = np.zeros((256, 256), np.uint8)
    cv2.line(long_line, (20, 30), (230, 200), 255, 1)
    assert out[near(long_line > 0, 3)].sum() > 150
    tick = np.zeros((256, 256), bool)
    tick[15:32, 195:212] = True
    assert not out[tick].any() and not out[~near(long_line > 0, 4) & ~tick].any()


def test_greyscale_and_semi_transparent_input():
    grey = np.dstack([drawing(transparent=False)[..., :1]] * 3 + [np.full((240, 320), 255)])
    out = arr(library.run("canny", img(grey)))
    assert out[..., 0].any()
    faint = drawing()
    faint[..., 3] //= 2  # half-transparent lines still count
    assert arr(library.run("lineart_from_drawing", img(faint), {"mode": "soft"}))[..., 0].max() == 255


@pytest.mark.parametrize("name", [n for n in WEIGHT_FREE if n != "pose_from_photo"])
@pytest.mark.parametrize("size", [(64, 48), (333, 251)])
def test_pixel_perfect_size_for_every_annotator(name, size):
    if name == "seg_passthrough":
        a = np.zeros((100, 120, 4), np.uint8)
        a[..., 3] = 255
        a[:50, :, :3] = ade(4)
        a[50:, :, :3] = ade(7)
    else:
        a = drawing(120, 100)
    out = library.run(name, img(a), size=size)
    assert out.size == size


# -- control images for a request ---------------------------------------------------------

def test_prepare_controls_annotates_units_and_renders_poses():
    from shared.pose import default_pose
    pose = default_pose(320, 240).to_message()
    request = GenerateRequest(width=320, height=240, mode="img2img", init_image=7, controls=(
        ControlUnit(condition="canny", image=0, preprocessor="canny", params={"low": 50}),
        ControlUnit(condition="lineart", image=0, preprocessor="none"),
        ControlUnit(condition="openpose", pose=pose, weight=0.5),
        ControlUnit(condition="canny", image=0, preprocessor="canny", params={"low": 50},
                    weight=1.5),
    ))
    canvas = img(drawing())
    init = Image.filled(320, 240, (9, 9, 9, 255))
    new, images = controls.prepare_controls(request, {0: canvas, 7: init}, size=(160, 120))
    u = new.controls
    assert [x.preprocessor for x in u] == ["none"] * 4 and all(x.pose is None for x in u)
    assert u[1] == request.controls[1]                      # 'none' units are untouched
    assert u[0].image == u[3].image != 0                    # one annotation, shared
    assert (u[0].weight, u[3].weight, u[2].weight) == (1.0, 1.5, 0.5)
    assert images[7] is init and set(images) == set(new.slots())
    edges = arr(images[u[0].image])
    assert edges.shape == (120, 160, 4) and edges[..., 0].any()
    skeleton = arr(images[u[2].image])
    assert skeleton.shape == (120, 160, 4) and skeleton[..., :3].max() == 255
    # every engine can use the result as is
    FakeEngine().generate(new, images, NullContext())


def test_prepare_controls_without_size_uses_the_request_size():
    request = GenerateRequest(width=96, height=64, controls=(
        ControlUnit(condition="lineart", image=3, preprocessor="lineart_from_drawing"),))
    new, images = controls.prepare_controls(request, {3: img(drawing(300, 200))})
    assert images[new.controls[0].image].size == (96, 64) and 3 not in images


def test_prepare_controls_honours_resize_modes():
    wide = np.zeros((100, 300, 4), np.uint8)
    wide[..., 3] = 255
    wide[:, :, :3] = 255
    cv2.line(wide, (10, 50), (290, 50), (0, 0, 0, 255), 3)  # a long horizontal line
    unit = dict(condition="lineart", image=0, preprocessor="lineart_from_drawing")
    for mode in ("just_resize", "crop_and_resize", "resize_and_fill"):
        request = GenerateRequest(width=128, height=128,
                                  controls=(ControlUnit(resize_mode=mode, **unit),))
        new, images = controls.prepare_controls(request, {0: img(wide)})
        out = arr(images[new.controls[0].image])
        row = out[:, :, 0].max(axis=1)
        lit = np.nonzero(out[:, :, 0].max(axis=0))[0]
        assert out.shape == (128, 128, 4)
        assert abs(int(np.argmax(row)) - 64) <= 2, mode      # the line stays in the middle
        if mode == "resize_and_fill":
            assert out[:40, :, 3].max() == 0 and out[90:, :, 3].max() == 0  # transparent bars
            assert lit.min() <= 6 and lit.max() >= 121
        if mode == "crop_and_resize":
            assert lit.min() == 0 and lit.max() == 127       # cropped at both ends


def test_prepare_controls_errors_name_the_unit():
    request = GenerateRequest(width=64, height=64, controls=(
        ControlUnit(condition="lineart", image=0, preprocessor="none"),
        ControlUnit(condition="canny", image=0, preprocessor="canny", params={"low": 0})))
    with pytest.raises(FieldError) as info:
        controls.prepare_controls(request, {0: img(drawing(64, 64))})
    assert info.value.field == "controls[1].params.low"
    with pytest.raises(registry.EmptyLayer) as info:
        controls.prepare_controls(request.__class__(width=64, height=64, controls=(
            ControlUnit(condition="canny", image=0, preprocessor="canny"),)),
            {0: Image.filled(64, 64)})
    assert info.value.field == "controls[0].image" and "empty" in info.value.message
    with pytest.raises(MissingImage):
        controls.prepare_controls(request, {})
    bad = GenerateRequest(width=64, height=64, controls=(
        ControlUnit(condition="canny", image=0, preprocessor="nope"),))
    with pytest.raises(Unsupported) as info:
        controls.prepare_controls(bad, {0: img(drawing(64, 64))})
    assert info.value.field == "controls[0].preprocessor"


# -- the fake engine and the server ----------------------------------------------------------


def test_fake_engine_preprocess_uses_the_registry():
    engine = FakeEngine()
    image = img(drawing())
    msg = Preprocess(job_id="0" * 32, annotator="canny", params={"low": 50}, width=160,
                     height=120)
    out = engine.preprocess(msg, image, NullContext()).image
    assert out.size == (160, 120) and arr(out)[..., 0].any()
    none = Preprocess(job_id="0" * 32, annotator="none")
    assert engine.preprocess(none, image, NullContext()).image is image
    with pytest.raises(Unsupported):
        engine.preprocess(Preprocess(job_id="0" * 32, annotator="lasers"), image, NullContext())


def test_preprocess_over_the_real_server(fake_server):
    from shared.client import Client
    with Client.connect(fake_server.url, fake_server.token) as client:
        result = client.wait(client.preprocess("lineart_from_drawing", img(drawing()),
                                               width=160, height=120))
        (meta, out), = result.images
        assert (meta.width, meta.height) == (160, 120)
        assert arr(out)[..., 0][line_mask(160, 120)].mean() > 150
        with pytest.raises(FieldError) as info:
            client.wait(client.preprocess("canny", img(drawing()), params={"low": 999}))
        assert info.value.field == "params.low"
        with pytest.raises(FieldError, match="layer is empty"):
            client.wait(client.preprocess("canny", Image.filled(32, 32)))


# -- files and the command line --------------------------------------------------------------

def test_loader_handles_16_bit_grey_and_grey_alpha(tmp_path):
    grey16 = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    a = arr(load_image(tmp_path / "g16.png"))
    assert a.shape == (32, 64, 4) and a[0, 0, 0] == 0 and a[-1, -1, 0] == 255
    assert (a[..., 0] == a[..., 2]).all() and (a[..., 3] == 255).all()
    ga = np.zeros((10, 10, 2), np.uint8)
    ga[..., 0], ga[..., 1] = 50, 128
    from PIL import Image as PILImage
    PILImage.fromarray(ga, "LA").save(tmp_path / "la.png")
    b = arr(load_image(tmp_path / "la.png"))
    assert tuple(b[0, 0]) == (50, 50, 50, 128)
    with pytest.raises(FieldError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_cli_preprocess_writes_the_control_image(tmp_path, capsys):
    save_image(tmp_path / "in.png", img(drawing()))
    rc = cli_main(["preprocess", "canny", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"),
                   "--param", "low=50", "--param", "l2=true", "--size", "160x120"])
    assert rc == 0
    out = arr(load_image(tmp_path / "o.png"))
    assert out.shape == (120, 160, 4) and out[..., 0].any()
    assert cli_main(["preprocess", "canny", str(tmp_path / "in.png"), "-o",
                     str(tmp_path / "x.png"), "--param", "low=abc"]) == 1
    assert "params.low of canny must be a whole number" in capsys.readouterr().err
    assert cli_main(["preprocess", "--list"]) == 0
    assert "lineart_from_drawing" in capsys.readouterr().out
