"""Weight-based annotators: controlnet-aux models behind our typed registry.

controlnet-aux (the optional ``annotators`` extra) holds the network code of
lllyasviel's annotators.  We use its model classes and its detectors' ``__call__``
but never its ``from_pretrained``: we build each network ourselves and load its
weights with ``torch.load(..., weights_only=True)`` from a file we resolved, so

* nothing is downloaded at run time (the hubs may be unreachable);
* a missing file is a :class:`~shared.errors.ModelMissing` that says which file
  and how to fetch it (``hf download lllyasviel/Annotators FILE``) or where to
  put it (the folder named by ``CONTROLCANVAS_ANNOTATORS_DIR``);
* tests can build every network with random weights (:func:`random_weights`),
  offline, and drive the very same wrapper code.

Importing this module imports neither torch nor controlnet_aux: ``available`` is
a ``find_spec`` probe; the heavy imports happen on first use.  Built detectors
are cached per (annotator, weight files), and only used from the engine's worker
thread.

The OpenPose wrapper returns keypoints only; the skeleton is drawn by our own
renderer (:func:`backend.pose.render`), not controlnet-aux's drawing code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from shared.errors import EngineError, ModelMissing
from shared.messages import ParamInfo

log = logging.getLogger(__name__)

HUB_REPO = "lllyasviel/Annotators"
DIR_ENV = "CONTROLCANVAS_ANNOTATORS_DIR"
HAND_FILE = "hand_pose_model.pth"  # optional companion of body_pose_model.pth
INSTALL_HINT = ("install the optional extra: pip install 'controlcanvas[annotators]' with "
                "torch==2.14.1 torchvision==0.29.1 (see tests/annotators_env.sh).")

_random_weights = False
_cache: Dict[Tuple[str, Tuple[Optional[str], ...]], Any] = {}


@functools.lru_cache(maxsize=1)
def aux_installed() -> bool:
    """Whether controlnet_aux (and torch) can be imported, without importing them."""
    return all(importlib.util.find_spec(m) is not None for m in ("controlnet_aux", "torch"))


@contextlib.contextmanager
def random_weights(seed: int = 0) -> Iterator[None]:
    """Build detectors with random weights instead of files (tests; offline)."""
    global _random_weights
    import torch
    torch.manual_seed(seed)
    previous, _random_weights = _random_weights, True
    _cache.clear()
    try:
        yield
    finally:
        _random_weights = previous
        _cache.clear()


# -----------------------------------------------------------------------------
# Weight files
# -----------------------------------------------------------------------------

def _annotators_dir() -> Optional[Path]:
    value = os.environ.get(DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def find_weight(filename: str) -> Optional[Path]:
    """Local path of one ``lllyasviel/Annotators`` file, or None (never downloads)."""
    folder = _annotators_dir()
    if folder is not None and (folder / filename).is_file():
        return folder / filename
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return None
    found = try_to_load_from_cache(HUB_REPO, filename)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def missing_message(name: str, filenames) -> str:
    files = " ".join(filenames)
    where = f" or copy them into the folder named by {DIR_ENV}"
    folder = _annotators_dir()
    if folder is not None:
        where = f" or copy them into {folder} ({DIR_ENV})"
    return (f"The {name} annotator needs {files} from the Hugging Face repo {HUB_REPO}, and "
            f"they are not on this machine. Fetch them once (online): "
            f"`hf download {HUB_REPO} {files}` (they go to the Hugging Face cache){where}.")


def resolve_weights(name: str, filenames: Tuple[str, ...]) -> Tuple[Optional[str], ...]:
    if _random_weights:
        return tuple(None for _ in filenames)
    paths = [find_weight(f) for f in filenames]
    missing = [f for f, p in zip(filenames, paths) if p is None]
    if missing:
        raise ModelMissing(missing_message(name, missing), field="annotator")
    return tuple(str(p) for p in paths)


def weights_present(filenames: Tuple[str, ...]) -> bool:
    return all(find_weight(f) is not None for f in filenames)


def load_weights(path: str):
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never code."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise EngineError(
            f"{path} could not be read as plain weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). ControlCanvas only loads tensor "
            f"files (weights_only); delete the file and fetch it again from {HUB_REPO}.",
            field="annotator") from None


def _load(path: Optional[str], key: Optional[str] = None, strip: str = "module.") -> Optional[dict]:
    """State dict from a checkpoint, tensors only (``weights_only=True``)."""
    if path is None:
        return None
    state = load_weights(path)
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    return {(k[len(strip):] if strip and k.startswith(strip) else k): v for k, v in state.items()}


def _ready(module, state: Optional[dict], strict: bool = True):
    if state is not None:
        module.load_state_dict(state, strict=strict)
    return module.float().eval()


# -----------------------------------------------------------------------------
# Builders: (paths, random) -> detector.  A None path = random weights.
# -----------------------------------------------------------------------------

def _build_hed(paths):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    return HEDdetector(_ready(ControlNetHED_Apache2(), _load(paths[0])))


def _build_pidinet(paths):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet
    return PidiNetDetector(_ready(pidinet(), _load(paths[0], "state_dict")))


def _build_mlsd(paths):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    return MLSDdetector(_ready(MobileV2_MLSD_Large(), _load(paths[0])))


def _build_lineart(paths):
    from controlnet_aux.lineart import Generator, LineartDetector
    return LineartDetector(_ready(Generator(3, 1, 3), _load(paths[0])),
                           _ready(Generator(3, 1, 3), _load(paths[1])))


def _build_lineart_anime(paths):
    import torch.nn as nn
    from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    return LineartAnimeDetector(_ready(net, _load(paths[0])))


def _build_zoe(paths):
    from controlnet_aux.zoe import ZoeDetector
    from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth
    from controlnet_aux.zoe.zoedepth.utils.config import get_config
    conf = get_config("zoedepth", "infer")
    conf["pretrained_resource"] = None  # never let the builder fetch anything
    model = ZoeDepth.build_from_config(conf)
    return ZoeDetector(_ready(model, _load(paths[0], "model", strip=""), strict=False))


def _build_midas(paths):
    import torch.nn as nn
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.api import MiDaSInference, disabled_train
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    state = _load(paths[0], "model") if paths[0] else None
    if state is not None and "optimizer" in state:  # pragma: no cover - training checkpoints
        state = state["model"]
    _ready(net, state)
    inference = MiDaSInference.__new__(MiDaSInference)
    nn.Module.__init__(inference)
    inference.model = net
    inference.model.train = disabled_train
    return MidasDetector(inference.eval())


def _build_normal_bae(paths):
    import types
    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                 sampling_ratio=0.4, importance_ratio=0.7)
    return NormalBaeDetector(_ready(NNET(args), _load(paths[0], "model")))


def _build_openpose(paths):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model
    from controlnet_aux.open_pose import util

    def make(cls, net_cls, path):
        obj = cls.__new__(cls)
        obj.model = net_cls()
        if path is not None:
            obj.model.load_state_dict(util.transfer(obj.model, load_weights(path)))
        obj.model.float().eval()
        return obj

    # the hand network is optional: built when its file is here (or for random weights)
    hand = None
    if _random_weights:
        hand = make(Hand, handpose_model, None)
    else:
        hand_path = find_weight(HAND_FILE)
        if hand_path is not None:
            hand = make(Hand, handpose_model, str(hand_path))
    return OpenposeDetector(make(Body, bodypose_model, paths[0]), hand, None)


# -----------------------------------------------------------------------------
# Calls: (detector, rgb at the output size, size, params) -> HxWx3 uint8 at size
# -----------------------------------------------------------------------------

def _as_array(out) -> np.ndarray:
    out = np.asarray(out)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return out.astype(np.uint8, copy=False)


def _detect_res(size, p) -> int:
    """Pixel perfect: detect at the output's short side unless a resolution is asked for."""
    return int(p.get("detect_resolution") or min(size))


def _common(det, rgb, size, p, **kw):
    return det(rgb, detect_resolution=_detect_res(size, p), image_resolution=min(size),
               output_type="np", **kw)


def _call_hed(det, rgb, size, p):
    return _common(det, rgb, size, p, safe=p["safe"], scribble=p["scribble"])


def _call_pidinet(det, rgb, size, p):
    return _common(det, rgb, size, p, safe=p["safe"], scribble=p["scribble"])


def _call_mlsd(det, rgb, size, p):
    return _common(det, rgb, size, p, thr_v=p["score"], thr_d=p["distance"])


def _call_lineart(det, rgb, size, p):
    return _common(det, rgb, size, p, coarse=p["coarse"])


def _call_plain(det, rgb, size, p):
    return _common(det, rgb, size, p)


def _call_midas(det, rgb, size, p):
    out = _common(det, rgb, size, p)
    return out[0] if isinstance(out, tuple) else out


def _call_openpose(det, rgb, size, p):
    from . import pose as pose_mod
    if p["hands"] and det.hand_estimation is None:
        raise ModelMissing(missing_message("OpenPose hand", [HAND_FILE]), field="annotator")
    found = detect_openpose_with(det, rgb, hands=p["hands"])
    return pose_mod.render(found.resized(*size))


def detect_openpose_with(det, rgb: np.ndarray, hands: bool = False):
    """controlnet-aux OpenPose body (and hand) detection -> :class:`backend.pose.Pose`."""
    from . import pose as pose_mod
    h, w = rgb.shape[:2]
    results = det.detect_poses(np.ascontiguousarray(rgb), include_hand=hands and
                               det.hand_estimation is not None)

    def triples(points, count):
        out = []
        for i in range(count):
            kp = points[i] if points is not None and i < len(points) else None
            if kp is None or kp.x < 0 or kp.y < 0:
                out.append((0.0, 0.0, 0.0))
            else:
                out.append((float(kp.x) * w, float(kp.y) * h, float(min(1.0, kp.score))))
        return tuple(out)

    people = []
    for r in results:
        people.append(pose_mod.Person(
            body=triples(r.body.keypoints, 18),
            left_hand=triples(r.left_hand, 21) if r.left_hand else None,
            right_hand=triples(r.right_hand, 21) if r.right_hand else None))
    return pose_mod.Pose(width=w, height=h, people=tuple(people))


def openpose_detector():
    """The cached controlnet-aux OpenPose detector (body + hand weights)."""
    return _detector(SPECS["openpose"])


# -----------------------------------------------------------------------------
# Table
# -----------------------------------------------------------------------------

def _P(name, kind, default, lo=None, hi=None, choices=(), help=""):  # noqa: N802
    return ParamInfo(name=name, kind=kind, default=default,
                     min=None if lo is None else float(lo), max=None if hi is None else float(hi),
                     choices=tuple(choices), help=help)


DETECT = _P("detect_resolution", "int", 0, 0, 2048,
            help="resolution the network sees (short side); 0 = the output size (pixel perfect)")


@dataclass(frozen=True)
class AuxSpec:
    name: str
    condition: str
    files: Tuple[str, ...]
    build: Callable[[Tuple[Optional[str], ...]], Any]
    call: Callable[[Any, np.ndarray, Tuple[int, int], Dict[str, Any]], np.ndarray]
    params: Tuple[ParamInfo, ...]
    help: str
    background: Tuple[int, int, int] = (255, 255, 255)
    refuse_empty: str = "uniform"


SPECS: Dict[str, AuxSpec] = {s.name: s for s in (
    AuxSpec("hed", "softedge", ("ControlNetHED.pth",), _build_hed, _call_hed,
            (DETECT, _P("safe", "bool", False, help="quantise for cleaner, safer edges"),
             _P("scribble", "bool", False, help="thin and binarise into a scribble")),
            "HED soft edges (controlnet-aux)."),
    AuxSpec("pidinet", "softedge", ("table5_pidinet.pth",), _build_pidinet, _call_pidinet,
            (DETECT, _P("safe", "bool", False), _P("scribble", "bool", False)),
            "PidiNet soft edges (controlnet-aux)."),
    AuxSpec("mlsd", "mlsd", ("mlsd_large_512_fp32.pth",), _build_mlsd, _call_mlsd,
            (DETECT, _P("score", "float", 0.1, 0.01, 2.0, help="line score threshold"),
             _P("distance", "float", 0.1, 0.0, 20.0, help="line distance threshold")),
            "M-LSD straight lines (controlnet-aux)."),
    AuxSpec("lineart", "lineart", ("sk_model.pth", "sk_model2.pth"), _build_lineart,
            _call_lineart, (DETECT, _P("coarse", "bool", False, help="the coarse model")),
            "Line art from a photo or painting (controlnet-aux 'realistic'/'coarse')."),
    AuxSpec("lineart_anime", "lineart_anime", ("netG.pth",), _build_lineart_anime,
            _call_plain, (DETECT,), "Anime-style line art from a picture (controlnet-aux)."),
    AuxSpec("zoe", "depth", ("ZoeD_M12_N.pt",), _build_zoe, _call_plain, (DETECT,),
            "ZoeDepth depth map, near = white (controlnet-aux).", refuse_empty="transparent"),
    AuxSpec("midas", "depth", ("dpt_hybrid-midas-501f0c75.pt",), _build_midas, _call_midas,
            (DETECT,), "MiDaS (DPT hybrid) depth map, near = white (controlnet-aux).",
            refuse_empty="transparent"),
    AuxSpec("normal_bae", "normal", ("scannet.pt",), _build_normal_bae, _call_plain, (DETECT,),
            "NormalBae surface normals (controlnet-aux).", refuse_empty="transparent"),
    AuxSpec("openpose", "openpose", ("body_pose_model.pth",),
            _build_openpose, _call_openpose,
            (_P("hands", "bool", False, help="also detect hands"),),
            "OpenPose body (and hand) detection, drawn as the standard skeleton."),
)}


def _detector(spec: AuxSpec):
    paths = resolve_weights(spec.name, spec.files)
    key = (spec.name, paths)
    det = _cache.get(key)
    if det is None:
        log.info("loading annotator %s%s", spec.name, " (random weights)" if _random_weights
                 else "")
        det = spec.build(paths)
        _cache[key] = det
    return det


def make_runner(spec: AuxSpec):
    def run(rgba: np.ndarray, size, p) -> np.ndarray:
        from .preprocess import _over, resize_plane, resize_rgba
        rgb = _over(resize_rgba(rgba, size), spec.background)
        det = _detector(spec)
        out = _as_array(spec.call(det, rgb, size, p))
        if out.shape[:2] != (size[1], size[0]):
            out = resize_plane(out, size)
        return np.ascontiguousarray(out[..., :3])
    return run


def register_all(register) -> None:
    from .preprocess import Annotator
    for spec in SPECS.values():
        register(Annotator(spec.name, spec.condition, make_runner(spec), params=spec.params,
                           help=spec.help, needs_weights=True, is_available=aux_installed,
                           unavailable_hint=INSTALL_HINT, refuse_empty=spec.refuse_empty))
