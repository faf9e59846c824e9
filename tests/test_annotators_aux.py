"""The controlnet-aux annotators behind our registry, built with random weights offline.

They need the optional ``annotators`` extra (controlnet-aux + torch 2.14.1 /
torchvision 0.29.1), which lives in its own venv: run ``tests/annotators_env.sh``.
Where controlnet_aux is not installed these tests skip - unless
CONTROLCANVAS_REQUIRE_ANNOTATORS is set (the annotators CI step), where they fail.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend import weights
from backend.annotators import aux, library, registry
from backend.pose import openpose
from backend.imaging import to_array
from shared.errors import EngineError, ModelMissing
from shared.images import Image

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = bool(os.environ.get("CONTROLCANVAS_REQUIRE_ANNOTATORS"))

needs_aux = pytest.mark.skipif(
    not weights.aux_installed() and not REQUIRED,
    reason="controlnet_aux is not installed here (optional 'annotators' extra; run "
           "tests/annotators_env.sh to test it in .venv-annotators)")


def picture(w=128, h=96):
    """Something with edges, lines and shading: a lit box and a pole on a gradient."""
    a = np.zeros((h, w, 4), np.uint8)
    a[..., :3] = np.linspace(60, 200, w, dtype=np.uint8)[None, :, None]
    a[..., 3] = 255
    cv2.rectangle(a, (w // 5, h // 4), (w // 2, h * 3 // 4), (230, 120, 40, 255), -1)
    cv2.line(a, (w * 3 // 4, 5), (w * 3 // 4, h - 5), (10, 10, 10, 255), 3)
    return Image(w, h, a.tobytes())


def test_annotators_are_available_exactly_when_controlnet_aux_imports():
    infos = {i.name: i for i in library.list_annotators()}
    for name in aux.SPECS:
        assert infos[name].needs_weights and infos[name].available == weights.aux_installed()
    if REQUIRED:
        assert weights.aux_installed(), "the annotators environment must have controlnet_aux"


def test_no_torch_load_without_weights_only_in_our_code():
    """STYLE.md: never unpickle code; every torch.load we write passes weights_only=True."""
    for path in (ROOT / "backend").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in match.group(1), f"{path.name}: {match.group(0)}"


def test_importing_the_registry_does_not_import_torch_or_controlnet_aux():
    import subprocess
    import sys
    code = ("import sys; import backend.annotators.library, backend.pose.detect; "
            "print(any(m in sys.modules for m in ('torch', 'controlnet_aux')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_openpose_results_become_our_pose_model():
    """controlnet-aux's PoseResult (normalised, None = missing) -> canvas pixels."""
    Kp = namedtuple("Kp", "x y score id", defaults=(1.0, -1))
    Body = namedtuple("Body", "keypoints total_score total_parts")
    Res = namedtuple("Res", "body left_hand right_hand face")

    class Stub:
        hand_estimation = None

        def detect_poses(self, rgb, include_hand=False, include_face=False):
            kps = [Kp(0.5, 0.25)] + [None] * 16 + [Kp(0.25, 0.75)]
            hand = [Kp(0.1, 0.2)] * 20 + [Kp(-1, -1)]
            return [Res(Body(kps, 10.0, 2), hand, None, None)]

    pose = openpose.detect_with(Stub(), np.zeros((100, 200, 3), np.uint8))
    person = pose.people[0]
    assert (pose.width, pose.height) == (200, 100)
    assert person.body[0] == (100.0, 25.0, 1.0) and person.body[17] == (50.0, 75.0, 1.0)
    assert person.body[1] == (0.0, 0.0, 0.0)
    assert person.left_hand[0] == (20.0, 20.0, 1.0) and person.left_hand[20][2] == 0
    assert person.right_hand is None


def test_missing_weights_say_which_file_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(weights, "find_weight", lambda f: (tmp_path / f) if (tmp_path / f).is_file()
                        else None)
    with pytest.raises(ModelMissing) as info:
        weights.resolve_weights("lineart", aux.SPECS["lineart"].files)
    msg = info.value.message
    assert "sk_model.pth sk_model2.pth" in msg and "hf download lllyasviel/Annotators" in msg
    assert str(tmp_path) in msg and info.value.code == "model_missing"


def test_weight_files_are_found_in_the_annotators_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.DIR_ENV, str(tmp_path))
    (tmp_path / "netG.pth").write_bytes(b"x")
    assert weights.find_weight("netG.pth") == tmp_path / "netG.pth"
    assert weights.weights_present(("netG.pth",))


@needs_aux
def test_a_pickle_with_code_is_refused(tmp_path):
    import torch
    torch.save({"weights": torch.zeros(2), "evil": namedtuple_factory()}, tmp_path / "bad.pth")
    with pytest.raises(EngineError, match="plain weights"):
        weights.load_weights(str(tmp_path / "bad.pth"))


def namedtuple_factory():
    return Path("/")  # any non-tensor object: weights_only refuses to rebuild it


@needs_aux
def test_weights_load_from_a_file_and_match_the_network(tmp_path, monkeypatch):
    """The real loading path: our own weights_only load into controlnet-aux's MLSD net."""
    import torch
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    torch.manual_seed(3)
    net = MobileV2_MLSD_Large()
    torch.save(net.state_dict(), tmp_path / "mlsd_large_512_fp32.pth")
    monkeypatch.setenv(weights.DIR_ENV, str(tmp_path))
    weights._cache.clear()
    det = aux._detector(aux.SPECS["mlsd"])
    for key, value in net.state_dict().items():
        assert torch.equal(det.model.state_dict()[key], value), key
    out = library.run("mlsd", picture(), size=(96, 72))
    assert out.size == (96, 72)
    weights._cache.clear()


RUNS = [("hed", {}), ("hed", {"safe": True, "scribble": True}), ("pidinet", {}),
        ("mlsd", {}), ("lineart", {}), ("lineart", {"coarse": True}), ("lineart_anime", {}),
        ("midas", {}), ("normal_bae", {}), ("openpose", {}),
        pytest.param("zoe", {}, marks=pytest.mark.slow)]  # ZoeDepth (BEiT-L): ~1-2 min on CPU
HEAVY = {"zoe", "midas"}


@needs_aux
@pytest.mark.parametrize("name, params", RUNS)
def test_every_aux_annotator_runs_pixel_perfect_with_random_weights(name, params):
    size = (100, 76)  # deliberately not a multiple of 64: controlnet-aux rounds, we must not
    with weights.random_weights(seed=0):
        out = library.run(name, picture(), params, size=size)
        again = out if name in HEAVY else library.run(name, picture(), params, size=size)
    a = to_array(out)
    assert out.size == size and a.shape == (76, 100, 4)
    assert (a[..., 3] == 255).all()
    assert np.array_equal(a, to_array(again))  # deterministic once built


@needs_aux
def test_aux_annotators_refuse_an_empty_layer_before_loading_anything():
    with pytest.raises(registry.EmptyLayer):
        library.run("hed", Image.filled(32, 32))
    with pytest.raises(registry.EmptyLayer):
        library.run("midas", Image.filled(32, 32))


@needs_aux
def test_hed_detect_resolution_parameter_is_checked_and_used():
    with pytest.raises(Exception, match="params.detect_resolution"):
        library.run("hed", picture(), {"detect_resolution": 5000})
    with weights.random_weights(seed=0):
        out = library.run("hed", picture(), {"detect_resolution": 256}, size=(64, 48))
    assert out.size == (64, 48)


@needs_aux
def test_pose_from_photo_uses_openpose_when_its_weights_are_present():
    from backend.pose import detect as pose_detect
    with weights.random_weights(seed=0):
        assert openpose.ready()
        found = pose_detect.detect(picture(), method="openpose")
    assert (found.width, found.height) == (128, 96)  # random weights: maybe nobody, but a Pose


def test_openpose_hands_without_the_hand_file_is_a_clear_error():
    class BodyOnly:
        hand_estimation = None

    with pytest.raises(ModelMissing, match="hand_pose_model.pth"):
        aux._call_openpose(BodyOnly(), np.zeros((8, 8, 3), np.uint8), (8, 8), {"hands": True})
