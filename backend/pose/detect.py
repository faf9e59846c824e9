"""Pose detection from a photo: controlnet-aux's OpenPose network when its weights are
on this machine (:mod:`.openpose`), otherwise MediaPipe Pose (33 landmarks, mapped by
:func:`mediapipe_to_openpose`).  MediaPipe 0.10.21 - the last wheel that ships its
model - pins numpy<2, so it never runs in this process: a small worker runs in its own
interpreter: ``CONTROLCANVAS_MEDIAPIPE_PYTHON``, else the one ``controlcanvas setup pose``
recorded in the pointer file (:func:`pointer_file`), else ``.venv-mediapipe`` beside the
project (``tests/annotators_env.sh``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from shared.errors import EngineError, FieldError, ModelMissing
from shared.paths import config_dir
from shared.images import Image

from .. import weights
from ..imaging import on_white
from . import openpose
from shared.pose import MISSING, Person, Points, Pose, Triple

MEDIAPIPE_ENV = "CONTROLCANVAS_MEDIAPIPE_PYTHON"
POINTER_NAME = "mediapipe-python.txt"  # one line: the python of the MediaPipe venv

# MediaPipe Pose landmark index for each OpenPose-18 joint (neck = shoulder midpoint).
MEDIAPIPE_TO_OPENPOSE: Tuple[Optional[int], ...] = (
    0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)

_MEDIAPIPE_WORKER = r'''
import json, sys
import numpy as np
import mediapipe as mp
w, h, want_hands = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
rgb = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(h, w, 3)
out = {"version": mp.__version__, "pose": [], "hands": []}
with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as detector:
    found = detector.process(rgb)
    if found.pose_landmarks:
        out["pose"] = [[p.x, p.y, p.z, p.visibility] for p in found.pose_landmarks.landmark]
if want_hands:
    with mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2) as detector:
        found = detector.process(rgb)
        for marks, handed in zip(found.multi_hand_landmarks or [],
                                 found.multi_handedness or []):
            out["hands"].append({"score": handed.classification[0].score,
                                 "points": [[p.x, p.y, p.z] for p in marks.landmark]})
sys.stdout.write(json.dumps(out))
'''


def pointer_file() -> Path:
    """Where ``controlcanvas setup pose`` records the MediaPipe interpreter (config folder)."""
    return config_dir() / POINTER_NAME


def read_pointer(path: Optional[Path] = None) -> Optional[str]:
    """The interpreter named in the pointer file, when the file and that interpreter exist."""
    try:
        value = (path or pointer_file()).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if value and Path(value).is_file() else None


def mediapipe_python() -> Optional[str]:
    """The interpreter that has MediaPipe: $CONTROLCANVAS_MEDIAPIPE_PYTHON, else the one
    recorded by ``controlcanvas setup pose``, else the project's ``.venv-mediapipe``;
    None when none exists."""
    value = os.environ.get(MEDIAPIPE_ENV, "").strip()
    if value:
        return value if Path(value).is_file() else None
    recorded = read_pointer()
    if recorded:
        return recorded
    root = Path(__file__).resolve().parents[2] / ".venv-mediapipe"
    for candidate in (root / "bin" / "python", root / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    return None


def mediapipe_landmarks(rgb: np.ndarray, hands: bool = False,
                        timeout: float = 120.0) -> Dict[str, Any]:
    """Run MediaPipe Pose (and Hands) on an RGB array in the MediaPipe interpreter."""
    python = mediapipe_python()
    if python is None:
        raise ModelMissing(
            "Pose detection needs MediaPipe (mediapipe==0.10.21 ships its pose model) in an "
            "interpreter of its own, because it pins numpy<2: run `controlcanvas setup pose` "
            f"(creates that venv and records it) or set {MEDIAPIPE_ENV} to a python that has it.",
            field="annotator")
    h, w = rgb.shape[:2]
    try:
        done = subprocess.run([python, "-c", _MEDIAPIPE_WORKER, str(w), str(h),
                               "1" if hands else "0"],
                              input=np.ascontiguousarray(rgb).tobytes(), capture_output=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EngineError(f"MediaPipe did not run ({type(err).__name__}: {err}).") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise EngineError("MediaPipe pose detection failed: " + " | ".join(tail))
    return json.loads(done.stdout.decode("utf-8"))


def mediapipe_to_openpose(landmarks: Sequence[Sequence[float]], width: int, height: int,
                          min_confidence: float = 0.5) -> Points:
    """33 MediaPipe pose landmarks (normalised x, y, z, visibility) -> OpenPose-18 triples.

    A joint whose visibility is below ``min_confidence`` or that lies outside the
    image is missing; the neck is the shoulders' midpoint (when both are present).
    """
    if len(landmarks) != 33:
        raise FieldError(f"MediaPipe pose has 33 landmarks; got {len(landmarks)}.",
                         field="landmarks")

    def point(i: int) -> Triple:
        x, y, _z, vis = landmarks[i][:4]
        px, py = float(x) * width - 0.5, float(y) * height - 0.5
        inside = -0.5 <= px <= width - 0.5 and -0.5 <= py <= height - 0.5
        if vis < min_confidence or not inside:
            return MISSING
        return (px, py, float(min(1.0, max(0.0, vis))))

    body = [point(i) if i is not None else MISSING for i in MEDIAPIPE_TO_OPENPOSE]
    rs, ls = body[2], body[5]
    if rs[2] > 0 and ls[2] > 0:
        body[1] = ((rs[0] + ls[0]) / 2.0, (rs[1] + ls[1]) / 2.0, min(rs[2], ls[2]))
    return tuple(body)


def _hands_to_person(hands: List[Dict[str, Any]], body: Points, width: int,
                     height: int) -> Dict[str, Optional[Points]]:
    """Give each detected hand to the body wrist nearest its own wrist point."""
    out: Dict[str, Optional[Points]] = {"left_hand": None, "right_hand": None}
    wrists = {"right_hand": body[4], "left_hand": body[7]}
    for hand in sorted(hands, key=lambda hd: -hd.get("score", 0.0)):
        pts = tuple((float(x) * width - 0.5, float(y) * height - 0.5, float(hand.get("score", 1)))
                    for x, y, _z in hand["points"])
        hx, hy = pts[0][:2]
        free = [k for k in out if out[k] is None]
        if not free:
            break
        side = min(free, key=lambda k: math.hypot(wrists[k][0] - hx, wrists[k][1] - hy)
                   if wrists[k][2] > 0 else float("inf"))
        out[side] = pts
    return out


def detector_available() -> bool:
    try:
        return openpose.ready() or mediapipe_python() is not None
    except Exception:
        return mediapipe_python() is not None


def detect(image: Image, hands: bool = False, min_confidence: float = 0.5,
           method: str = "auto") -> Pose:
    """Detect people in a photo layer: OpenPose (controlnet-aux) if its weights are here,
    else MediaPipe (one person).  ``method``: "auto", "openpose" or "mediapipe"."""
    rgba = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 4)
    rgb = on_white(rgba)
    if method not in ("auto", "openpose", "mediapipe"):
        raise FieldError(f"method must be auto, openpose or mediapipe; got {method!r}.",
                         field="method")
    if method == "openpose" or (method == "auto" and openpose.ready()):
        detector = openpose.detector()
        if hands and detector.hand_estimation is None:
            raise ModelMissing(weights.missing_message("OpenPose hand", [openpose.HAND_FILE]),
                               field="annotator")
        pose = openpose.detect_with(detector, rgb, hands=hands)
        people = tuple(Person(tuple(p if p[2] >= min_confidence else MISSING for p in person.body),
                              person.left_hand, person.right_hand) for person in pose.people)
        return Pose(pose.width, pose.height, people)
    found = mediapipe_landmarks(rgb, hands=hands)
    if not found.get("pose"):
        return Pose(image.width, image.height, ())
    body = mediapipe_to_openpose(found["pose"], image.width, image.height, min_confidence)
    parts = _hands_to_person(found.get("hands", []), body, image.width, image.height) \
        if hands else {}
    return Pose(image.width, image.height, (Person(body, **parts),))
