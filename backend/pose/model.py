"""OpenPose-18 poses: data model, JSON, geometry, rendering, parsing.

**Keypoints.**  A :class:`Person` has 18 body keypoints in the OpenPose/COCO-18
order of the openpose ControlNets (:data:`BODY`): nose, neck, right shoulder,
elbow, wrist, left shoulder, elbow, wrist, right hip, knee, ankle, left hip,
knee, ankle, right eye, left eye, right ear, left ear - "right" is the person's
right, which is on the image's left for a person facing the viewer.  Optional
hands (21 points each, OpenPose hand order) and face (70 points).  Every
keypoint is ``(x, y, confidence)`` in canvas pixels with pixel-centre
coordinates (the first pixel's centre is 0.0); confidence 0 means "missing".

**JSON** is OpenPose's own layout (``people[].pose_keypoints_2d`` flat
``[x, y, c, ...]``, ``hand_left_keypoints_2d``, ``hand_right_keypoints_2d``,
``face_keypoints_2d``) plus ``canvas_width``/``canvas_height`` as the ControlNet
pose editors write them.  OpenPose BODY_25 files (25 points) are read too and
converted to COCO-18.

**Rendering** (:func:`render`) draws the standard skeleton the openpose
ControlNets were trained on: black background; the 17 limbs in the reference
order as filled ellipses of half-width 4 px at a 512-px short side, each limb in
its reference colour at 60 % intensity; then every joint as a disc of radius
4 px in its full reference colour; hands as HSV-coloured bones with blue joints,
the face as white dots.  The drawing code is our own (OpenCV polygons and
circles with sub-pixel precision); only the colour table and limb order are the
reference's, as they must be.

**Parsing** (:func:`parse`) reads such a picture back - including one edited by
hand with the same colours: each joint is found by its colour (joint colours
have a 255 channel, limb colours at most 153), people are the separate
connected figures, and a joint partly covered by a later one is recovered as
the centre of the circle enclosing its visible part.

**Detection** from photos lives in :mod:`backend.pose.detect`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from shared.errors import FieldError
from shared.images import Image

from ..imaging import load_image
from shared.pose import COLOURS, KEYPOINT_NAMES, LIMB_DIM, LIMBS, MIRROR, N_KEYPOINTS

Triple = Tuple[float, float, float]
Points = Tuple[Triple, ...]
MISSING: Triple = (0.0, 0.0, 0.0)

# The body keypoints, limbs (limb i has colour i), reference colours and left/right swap
# are the protocol's (shared.pose, which the plug-ins render with too).
BODY: Tuple[str, ...] = KEYPOINT_NAMES
N_BODY, N_HAND, N_FACE = N_KEYPOINTS, 21, 70
HAND_EDGES: Tuple[Tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19),
    (19, 20))

_BODY_MIRROR = MIRROR


def _face_mirror() -> Tuple[int, ...]:
    perm = list(range(N_FACE))
    pairs = [(i, 16 - i) for i in range(8)]                       # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]                 # eyebrows
    pairs += [(31, 35), (32, 34)]                                 # nose
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]   # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]                       # inner lips
    pairs += [(68, 69)]                                           # pupils
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


_FACE_MIRROR = _face_mirror()
# BODY_25 -> COCO-18 (drop mid-hip and the feet)
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def _hand_colours() -> Tuple[Tuple[int, int, int], ...]:
    import colorsys
    out = []
    for i in range(len(HAND_EDGES)):
        r, g, b = colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(out)


HAND_COLOURS = _hand_colours()


# -----------------------------------------------------------------------------
# Data model
# -----------------------------------------------------------------------------

def _points(values, count: int, what: str) -> Points:
    pts = tuple(tuple(float(v) for v in p) for p in values)
    if len(pts) != count or any(len(p) != 3 for p in pts):
        raise FieldError(f"{what} must be {count} (x, y, confidence) triples; got {len(pts)}.",
                         field=what)
    for p in pts:
        if not all(math.isfinite(v) for v in p) or not 0.0 <= p[2] <= 1.0:
            raise FieldError(f"{what}: every x, y must be finite and every confidence in 0..1; "
                             f"got {p}.", field=what)
    return tuple(p if p[2] > 0 else MISSING for p in pts)


@dataclass(frozen=True)
class Person:
    body: Points
    left_hand: Optional[Points] = None
    right_hand: Optional[Points] = None
    face: Optional[Points] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", _points(self.body, N_BODY, "pose_keypoints_2d"))
        for name, count in (("left_hand", N_HAND), ("right_hand", N_HAND), ("face", N_FACE)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _points(value, count, name))

    def parts(self) -> Dict[str, Optional[Points]]:
        return {"body": self.body, "left_hand": self.left_hand, "right_hand": self.right_hand,
                "face": self.face}

    def map_points(self, fn) -> "Person":
        """Apply ``fn(x, y) -> (x, y)`` to every present keypoint."""
        def conv(pts):
            if pts is None:
                return None
            return tuple(((*fn(x, y), c) if c > 0 else MISSING) for x, y, c in pts)
        return Person(conv(self.body), conv(self.left_hand), conv(self.right_hand),
                      conv(self.face))

    def joint(self, name: str) -> Optional[Tuple[float, float]]:
        x, y, c = self.body[BODY.index(name)]
        return (x, y) if c > 0 else None


def _flat(pts: Optional[Points]) -> List[float]:
    return [round(v, 3) for p in pts for v in p] if pts else []


def _triples(flat: Sequence[Any], what: str) -> Points:
    if not isinstance(flat, (list, tuple)) or len(flat) % 3:
        raise FieldError(f"{what} must be a flat list [x, y, confidence, ...].", field=what)
    for v in flat:
        if type(v) not in (int, float):
            raise FieldError(f"{what} must hold numbers only; got {v!r}.", field=what)
    return tuple((float(flat[i]), float(flat[i + 1]), float(flat[i + 2]))
                 for i in range(0, len(flat), 3))


@dataclass(frozen=True)
class Pose:
    """People on a canvas of ``width`` x ``height`` pixels."""

    width: int
    height: int
    people: Tuple[Person, ...] = ()

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise FieldError(f"canvas_{name} must be a positive whole number; got {v!r}.",
                                 field=f"canvas_{name}")
        object.__setattr__(self, "people", tuple(self.people))

    # -- JSON ------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": 1.3,
            "canvas_width": self.width,
            "canvas_height": self.height,
            "people": [{
                "person_id": [-1],
                "pose_keypoints_2d": _flat(p.body),
                "face_keypoints_2d": _flat(p.face),
                "hand_left_keypoints_2d": _flat(p.left_hand),
                "hand_right_keypoints_2d": _flat(p.right_hand),
            } for p in self.people],
        }

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], width: Optional[int] = None,
                  height: Optional[int] = None) -> "Pose":
        if not isinstance(data, dict) or not isinstance(data.get("people", []), list):
            raise FieldError("A pose file is a JSON object with a \"people\" list (OpenPose "
                             "layout).", field="people")
        width = data.get("canvas_width", width)
        height = data.get("canvas_height", height)
        if width is None or height is None:
            raise FieldError("The pose has no canvas_width/canvas_height (plain OpenPose "
                             "output): give the canvas size of the image it was made from.",
                             field="canvas_width")
        people = []
        for i, raw in enumerate(data.get("people", [])):
            where = f"people[{i}]"
            if not isinstance(raw, dict):
                raise FieldError(f"{where} must be an object.", field=where)
            body = _triples(raw.get("pose_keypoints_2d", []), f"{where}.pose_keypoints_2d")
            if len(body) == 25:
                body = tuple(body[j] for j in _BODY25_TO_18)
            if len(body) != N_BODY:
                raise FieldError(f"{where}.pose_keypoints_2d has {len(body)} keypoints; expected "
                                 f"18 (COCO) or 25 (BODY_25).", field=f"{where}.pose_keypoints_2d")
            parts = {}
            for key, name in (("hand_left_keypoints_2d", "left_hand"),
                              ("hand_right_keypoints_2d", "right_hand"),
                              ("face_keypoints_2d", "face")):
                pts = _triples(raw.get(key) or [], f"{where}.{key}")
                parts[name] = pts if pts else None
            people.append(Person(body, **parts))
        return cls(width, height, tuple(people))

    @classmethod
    def from_json(cls, text: Union[str, bytes], width: Optional[int] = None,
                  height: Optional[int] = None) -> "Pose":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise FieldError(f"The pose is not valid JSON: {err}.", field="pose") from None
        return cls.from_dict(data, width, height)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json(indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path], width: Optional[int] = None,
             height: Optional[int] = None) -> "Pose":
        return cls.from_json(Path(path).read_text(encoding="utf-8"), width, height)

    # -- protocol ----------------------------------------------------------------

    def to_message(self):
        """The protocol's :class:`shared.messages.Pose` (bodies only)."""
        from shared.messages import Pose as PoseMessage
        return PoseMessage(width=self.width, height=self.height,
                           keypoints=tuple(kp for p in self.people for kp in p.body))

    @classmethod
    def from_message(cls, message) -> "Pose":
        kps = tuple(tuple(k) for k in message.keypoints)
        people = tuple(Person(kps[i:i + N_BODY]) for i in range(0, len(kps), N_BODY))
        return cls(message.width, message.height, people)

    # -- geometry ----------------------------------------------------------------

    def map_points(self, fn, width: Optional[int] = None, height: Optional[int] = None) -> "Pose":
        return Pose(width or self.width, height or self.height,
                    tuple(p.map_points(fn) for p in self.people))

    def mirrored(self) -> "Pose":
        """Flip left-right: x -> (width - 1) - x, and left/right joints and hands swap.

        Rendering the mirrored pose gives the rendered image flipped horizontally.
        """
        w1 = self.width - 1

        def flip(pts, perm):
            if pts is None:
                return None
            return tuple((w1 - pts[j][0], pts[j][1], pts[j][2]) if pts[j][2] > 0 else MISSING
                         for j in perm)

        people = tuple(Person(flip(p.body, _BODY_MIRROR),
                              left_hand=flip(p.right_hand, range(N_HAND)),
                              right_hand=flip(p.left_hand, range(N_HAND)),
                              face=flip(p.face, _FACE_MIRROR)) for p in self.people)
        return Pose(self.width, self.height, people)

    def scaled(self, factor: float, center: Optional[Tuple[float, float]] = None) -> "Pose":
        """Scale about ``center`` (default the canvas centre); the canvas stays."""
        cx, cy = center if center is not None else ((self.width - 1) / 2.0,
                                                   (self.height - 1) / 2.0)
        return self.map_points(lambda x, y: (cx + (x - cx) * factor, cy + (y - cy) * factor))

    def translated(self, dx: float, dy: float) -> "Pose":
        return self.map_points(lambda x, y: (x + dx, y + dy))

    def resized(self, width: int, height: int) -> "Pose":
        """The same pose on a canvas resized to ``width`` x ``height`` (stretching)."""
        sx, sy = width / float(self.width), height / float(self.height)
        return self.map_points(lambda x, y: ((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5),
                               width, height)

    def fitted(self, width: int, height: int, mode: str = "just_resize") -> "Pose":
        """Map onto a ``width`` x ``height`` frame with a control unit's resize mode."""
        if mode == "just_resize" or (width, height) == (self.width, self.height):
            return self.resized(width, height)
        if mode == "crop_and_resize":
            s = max(width / float(self.width), height / float(self.height))
        elif mode == "resize_and_fill":
            s = min(width / float(self.width), height / float(self.height))
        else:
            raise FieldError(f"Unknown resize mode {mode!r}.", field="resize_mode")
        ox, oy = (width - self.width * s) / 2.0, (height - self.height * s) / 2.0
        return self.map_points(lambda x, y: ((x + 0.5) * s + ox - 0.5, (y + 0.5) * s + oy - 0.5),
                               width, height)

    def bounds(self) -> Optional[Tuple[float, float, float, float]]:
        pts = [(x, y) for p in self.people for part in p.parts().values() if part
               for x, y, c in part if c > 0]
        if not pts:
            return None
        xs, ys = zip(*pts)
        return min(xs), min(ys), max(xs), max(ys)


def interpolate(a: Pose, b: Pose, t: float) -> Pose:
    """The pose a fraction ``t`` (0..1) of the way from ``a`` to ``b`` (on ``a``'s canvas).

    People are paired by index (extra people are dropped); a keypoint present in
    both is interpolated (position and confidence); one present in only one pose
    comes from ``a`` before the midpoint and from ``b`` after it.
    """
    if not 0.0 <= t <= 1.0:
        raise FieldError(f"t must be between 0 and 1; got {t}.", field="t")
    if (b.width, b.height) != (a.width, a.height):
        b = b.resized(a.width, a.height)

    def mix(pa, pb):
        if pa is None or pb is None:
            return pa if t < 0.5 else pb
        out = []
        for (xa, ya, ca), (xb, yb, cb) in zip(pa, pb):
            if ca > 0 and cb > 0:
                out.append((xa + (xb - xa) * t, ya + (yb - ya) * t, ca + (cb - ca) * t))
            else:
                out.append((xa, ya, ca) if t < 0.5 else (xb, yb, cb))
        return tuple(out)

    people = tuple(Person(mix(p.body, q.body), mix(p.left_hand, q.left_hand),
                          mix(p.right_hand, q.right_hand), mix(p.face, q.face))
                   for p, q in zip(a.people, b.people))
    return Pose(a.width, a.height, people)


# A front-facing standing figure, in units of its height (x centred on 0.5).
_STANDING = (
    (0.500, 0.100), (0.500, 0.200), (0.400, 0.210), (0.370, 0.360), (0.350, 0.500),
    (0.600, 0.210), (0.630, 0.360), (0.650, 0.500), (0.440, 0.520), (0.430, 0.720),
    (0.430, 0.920), (0.560, 0.520), (0.570, 0.720), (0.570, 0.920), (0.480, 0.085),
    (0.520, 0.085), (0.460, 0.100), (0.540, 0.100))


def default_pose(width: int = 512, height: int = 512) -> Pose:
    """One person standing, facing the viewer, centred, about 80 % of the canvas high."""
    fh = min(0.86 * height, 2.6 * width)
    top = (height - fh * 0.95) / 2.0 - 0.04 * fh
    body = tuple((width / 2.0 + (nx - 0.5) * fh, top + ny * fh, 1.0) for nx, ny in _STANDING)
    return Pose(width, height, (Person(body),))


# -----------------------------------------------------------------------------
# Rendering
# -----------------------------------------------------------------------------

_SHIFT = 4
_ONE = 1 << _SHIFT


def _fixed(x: float, y: float) -> Tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def stick_width(width: int, height: int) -> float:
    """Limb half-width / joint radius: 4 px at a 512-px short side, as in the reference."""
    return max(1.5, 4.0 * min(width, height) / 512.0)


def _limb(canvas, a, b, half_width: float, colour) -> None:
    import cv2
    (x0, y0), (x1, y1) = a, b
    mx, my = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    length = math.hypot(x1 - x0, y1 - y0)
    angle = math.atan2(y1 - y0, x1 - x0)
    ca, sa = math.cos(angle), math.sin(angle)
    t = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
    ex, ey = (length / 2.0) * np.cos(t), half_width * np.sin(t)
    px = mx + ex * ca - ey * sa
    py = my + ex * sa + ey * ca
    poly = np.rint(np.stack([px, py], axis=1) * _ONE).astype(np.int32)
    cv2.fillConvexPoly(canvas, poly, colour, lineType=cv2.LINE_8, shift=_SHIFT)


def _disc(canvas, x: float, y: float, radius: float, colour) -> None:
    import cv2
    cv2.circle(canvas, _fixed(x, y), int(round(radius * _ONE)), colour, thickness=-1,
               lineType=cv2.LINE_8, shift=_SHIFT)


def render(pose: Pose, *, hands: bool = True, face: bool = True,
           width: Optional[float] = None) -> np.ndarray:
    """The OpenPose skeleton image (H x W x 3 RGB uint8) of ``pose`` on its canvas."""
    import cv2
    canvas = np.zeros((pose.height, pose.width, 3), dtype=np.uint8)
    stick = width or stick_width(pose.width, pose.height)
    for person in pose.people:
        body = person.body
        for i, (a, b) in enumerate(LIMBS):
            if body[a][2] > 0 and body[b][2] > 0:
                colour = tuple(int(c * LIMB_DIM) for c in COLOURS[i])
                _limb(canvas, body[a][:2], body[b][:2], stick, colour)
        for i, (x, y, c) in enumerate(body):
            if c > 0:
                _disc(canvas, x, y, stick, COLOURS[i])
        if hands:
            line = max(1, int(round(stick / 2)))
            for pts in (person.left_hand, person.right_hand):
                if not pts:
                    continue
                for e, (a, b) in enumerate(HAND_EDGES):
                    if pts[a][2] > 0 and pts[b][2] > 0:
                        cv2.line(canvas, _fixed(*pts[a][:2]), _fixed(*pts[b][:2]),
                                 HAND_COLOURS[e], line, cv2.LINE_AA, _SHIFT)
                for x, y, c in pts:
                    if c > 0:
                        _disc(canvas, x, y, stick, (0, 0, 255))
        if face and person.face:
            for x, y, c in person.face:
                if c > 0:
                    _disc(canvas, x, y, max(1.0, stick * 0.75), (255, 255, 255))
    return canvas


def render_image(pose: Pose, **kw) -> Image:
    rgb = render(pose, **kw)
    rgba = np.empty(rgb.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return Image(pose.width, pose.height, rgba.tobytes())


def render_message_pose(message, size: Tuple[int, int], resize_mode: str = "just_resize") -> Image:
    """Render a protocol :class:`shared.messages.Pose` into a control image of ``size``."""
    return render_image(Pose.from_message(message).fitted(size[0], size[1], resize_mode))


# -----------------------------------------------------------------------------
# Parsing a skeleton image
# -----------------------------------------------------------------------------

def _as_rgb(image: Union[Image, np.ndarray]) -> np.ndarray:
    if isinstance(image, Image):
        arr = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 4)
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise FieldError("A skeleton image must be RGB or RGBA, 8 bits per channel.",
                         field="image")
    if arr.shape[2] == 4:  # transparent = black background
        alpha = arr[..., 3:4].astype(np.uint16)
        arr = ((arr[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _near(rgb: np.ndarray, colour, tol: int) -> np.ndarray:
    diff = np.abs(rgb.astype(np.int16) - np.array(colour, dtype=np.int16)[None, None, :])
    return (diff.max(axis=2) <= tol)


def _centre(mask: np.ndarray) -> Tuple[float, float]:
    import cv2
    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()), float(ys.mean())
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    (ex, ey), r = cv2.minEnclosingCircle(pts)
    # a whole disc: the centroid is exact; a disc partly covered by a later joint: the
    # circle through its visible rim is (at least half of it must show)
    if len(xs) >= 0.8 * math.pi * max(r, 0.5) ** 2:
        return cx, cy
    return float(ex), float(ey)


def parse(image: Union[Image, np.ndarray], tolerance: int = 40, min_area: int = 3) -> Pose:
    """Read OpenPose-18 bodies back from a rendered (or hand-edited) skeleton image."""
    import cv2
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    figure = (rgb.max(axis=2) > 40).astype(np.uint8)
    n_fig, fig_labels = cv2.connectedComponents(figure, connectivity=8)
    limb_masks = [_near(rgb, tuple(int(c * LIMB_DIM) for c in COLOURS[i]), tolerance // 2)
                  for i in range(len(LIMBS))]
    incident = {j: [i for i, (a, b) in enumerate(LIMBS) if j in (a, b)] for j in range(N_BODY)}
    # candidates[fig] = {joint: (score, (x, y))}
    found: Dict[int, Dict[int, Tuple[Tuple[int, int], Tuple[float, float]]]] = {}
    for j, colour in enumerate(COLOURS):
        mask = _near(rgb, colour, tolerance).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for k in range(1, n):
            area = int(stats[k, cv2.CC_STAT_AREA])
            if area < min_area:
                continue
            blob = labels == k
            ys, xs = np.nonzero(blob)
            fig = int(fig_labels[ys[0], xs[0]])
            x0, y0 = max(0, xs.min() - 6), max(0, ys.min() - 6)
            x1, y1 = min(w, xs.max() + 7), min(h, ys.max() + 7)
            ring = cv2.dilate(blob[y0:y1, x0:x1].astype(np.uint8), np.ones((7, 7), np.uint8))
            touch = sum(int((limb_masks[i][y0:y1, x0:x1] & (ring > 0)).sum())
                        for i in incident[j])
            score = (touch, area)
            best = found.setdefault(fig, {}).get(j)
            if best is None or score > best[0]:
                found[fig][j] = (score, _centre(blob))
    people = []
    for fig in sorted(found, key=lambda f: min((xy[0] for _, xy in found[f].values()))):
        joints = found[fig]
        if len(joints) < 2:
            continue
        body = tuple((joints[j][1][0], joints[j][1][1], 1.0) if j in joints else MISSING
                     for j in range(N_BODY))
        people.append(Person(body))
    return Pose(w, h, tuple(people))


def load_any(path: Union[str, Path], width: Optional[int] = None,
             height: Optional[int] = None) -> Pose:
    """A pose from a JSON file, or parsed from a skeleton PNG."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return Pose.load(path, width, height)
    return parse(load_image(path))


__all__ = ["BODY", "COLOURS", "LIMBS", "Person", "Pose", "default_pose",
           "interpolate", "parse", "render",
           "render_image", "render_message_pose"]


