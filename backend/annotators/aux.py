"""Weight-based annotators: controlnet-aux models behind our typed registry.

controlnet-aux (the optional ``annotators`` extra) holds the network code of
lllyasviel's annotators.  We use its model classes and its detectors' ``__call__``
but never its ``from_pretrained``: we build each network ourselves and load its
weights with ``torch.load(..., weights_only=True)`` from a file we resolved, so

* nothing is downloaded at run time (the hubs may be unreachable);
* a missing file is a :class:`~shared.errors.ModelMissing` that says which file
  and how to fetch it (``hf download lllyasviel/Annotators FILE``) or where to
  put it (the folder named by ``CONTROLCANVAS_ANNOTATORS_DIR``);
* tests can build every network with random weights (:func:`backend.weights.random_weights`),
  offline, and drive the very same wrapper code.

Importing this module imports neither torch nor controlnet_aux: ``available`` is
a ``find_spec`` probe; the heavy imports happen on first use.  Built detectors
are cached per (annotator, weight files), and only used from the engine's worker
thread.

The OpenPose wrapper returns keypoints only; the skeleton is drawn by our own
renderer (:func:`shared.pose.render`), not controlnet-aux's drawing code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from shared.errors import ModelMissing
from shared.messages import ParamInfo
from shared import pose as shared_pose

from .. import weights
from ..imaging import to_array, over, resize_plane, resize_rgba
from ..pose import openpose
from .registry import Annotator

# -----------------------------------------------------------------------------
# Builders: (paths, random) -> detector.  A None path = random weights.
# -----------------------------------------------------------------------------

def _build_hed(paths):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    return HEDdetector(weights.ready(ControlNetHED_Apache2(), weights.load_state(paths[0])))


def _build_pidinet(paths):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet
    return PidiNetDetector(weights.ready(pidinet(), weights.load_state(paths[0], "state_dict")))


def _build_mlsd(paths):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    return MLSDdetector(weights.ready(MobileV2_MLSD_Large(), weights.load_state(paths[0])))


def _build_lineart(paths):
    from controlnet_aux.lineart import Generator, LineartDetector
    return LineartDetector(weights.ready(Generator(3, 1, 3), weights.load_state(paths[0])),
                           weights.ready(Generator(3, 1, 3), weights.load_state(paths[1])))


def _build_lineart_anime(paths):
    import torch.nn as nn
    from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    return LineartAnimeDetector(weights.ready(net, weights.load_state(paths[0])))


def _build_zoe(paths):
    from controlnet_aux.zoe import ZoeDetector
    from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth
    from controlnet_aux.zoe.zoedepth.utils.config import get_config
    conf = get_config("zoedepth", "infer")
    conf["pretrained_resource"] = None  # never let the builder fetch anything
    model = ZoeDepth.build_from_config(conf)
    state = weights.load_state(paths[0], "model", strip="")
    return ZoeDetector(weights.ready(model, state, strict=False))


def _build_midas(paths):
    import torch.nn as nn
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.api import MiDaSInference, disabled_train
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    state = weights.load_state(paths[0], "model") if paths[0] else None
    if state is not None and "optimizer" in state:  # pragma: no cover - training checkpoints
        state = state["model"]
    weights.ready(net, state)
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
    return NormalBaeDetector(weights.ready(NNET(args), weights.load_state(paths[0], "model")))


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
    if p["hands"] and det.hand_estimation is None:
        raise ModelMissing(weights.missing_message("OpenPose hand", [openpose.HAND_FILE]),
                           field="annotator")
    found = openpose.detect_with(det, rgb, hands=p["hands"])
    return to_array(shared_pose.render(found.resized(*size)))[..., :3]


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
    AuxSpec("openpose", "openpose", openpose.BODY_FILES,
            openpose.build, _call_openpose,
            (_P("hands", "bool", False, help="also detect hands"),),
            "OpenPose body (and hand) detection, drawn as the standard skeleton."),
)}


def _detector(spec: AuxSpec):
    return weights.cached_detector(spec.name, spec.files, spec.build)


def make_runner(spec: AuxSpec):
    def run(rgba: np.ndarray, size, p) -> np.ndarray:
        rgb = over(resize_rgba(rgba, size), spec.background)
        det = _detector(spec)
        out = _as_array(spec.call(det, rgb, size, p))
        if out.shape[:2] != (size[1], size[0]):
            out = resize_plane(out, size)
        return np.ascontiguousarray(out[..., :3])
    return run


def register_all(register) -> None:
    for spec in SPECS.values():
        register(Annotator(spec.name, spec.condition, make_runner(spec), params=spec.params,
                           help=spec.help, needs_weights=True, is_available=weights.aux_installed,
                           unavailable_hint=weights.INSTALL_HINT, refuse_empty=spec.refuse_empty))
