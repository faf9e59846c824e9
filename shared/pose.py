"""OpenPose-18 poses, once for everyone: the data model, OpenPose JSON, geometry,
rendering and parsing that the server and both editor plug-ins share.

**Keypoints.**  A :class:`Person` has 18 body keypoints in the COCO-18 order the
openpose ControlNets were trained on (:data:`KEYPOINT_NAMES`): 0 nose, 1 neck, 2-4
right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle,
11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left ear.  "Right" is
the person's right: on a figure facing the viewer it is on the image's left.
Optional hands (21 points each, OpenPose hand order) and face (70 points).  Every
keypoint is ``(x, y, confidence)``; confidence 0 means "missing".  A :class:`Pose`
is people on a ``width`` x ``height`` canvas.

**Coordinates** are canvas pixels with pixel-centre coordinates (the first pixel's
centre is 0.0), as in :class:`shared.messages.Pose`.  Editors that put a pixel's
centre at +0.5 (GIMP paths, Krita vector shapes) convert at their own edge.

**Joints** (:data:`Joints`, :data:`People`) are the editors' light view of the same
model: one person's 18 body joints as ``(x, y)`` or ``None``.  The functions below
the model (:func:`default_person`, :func:`mirrored`, :func:`to_message`, ...) take
and give joints and are built on the model, so the maths exists once.

**JSON** is OpenPose's own layout (``people[].pose_keypoints_2d`` flat ``[x, y, c,
...]``, ``hand_left_keypoints_2d``, ``hand_right_keypoints_2d``,
``face_keypoints_2d``) plus ``canvas_width``/``canvas_height`` as the ControlNet pose
editors write them.  OpenPose BODY_25 files are read too (converted to COCO-18), and
coordinates that are all in 0..1 are read as fractions of the canvas.

**Rendering** (:func:`render`) draws the convention of the openpose ControlNets:
black canvas; the 17 limbs (:data:`LIMBS`) as ellipses of half-width
:func:`stick_width` (4 px at a 512-px short side) in their reference colours at 60 %
(:data:`LIMB_DIM`); then the joints as discs in full colour (:data:`COLOURS`); hands
as bones in hue-wheel colours with blue joints, the face as white dots.  Only the
colour table and the limb order are the reference's, as they must be; the drawing is
our own (exact spans of pixel centres inside each ellipse).

**Parsing** (:func:`parse`) reads such a picture back, including one edited by hand
with nearly the same colours: each joint is found by its colour (joint colours have a
255 channel, limb colours at most 153), people are the separate connected figures,
and a joint partly covered by a later one is recovered as the centre of the circle
enclosing its visible part.

Standard library only, Python >= 3.10: this module is bundled into the editors.
Detection from photos is the server's (``backend.pose``).
"""

from __future__ import annotations

import colorsys
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import FieldError
from .images import Image
from .messages import Pose as PoseMessage

Point = Tuple[float, float]
Joints = Tuple[Optional[Point], ...]  # N_KEYPOINTS entries, None = not visible
People = Tuple[Joints, ...]
Triple = Tuple[float, float, float]
Points = Tuple[Triple, ...]
MISSING: Triple = (0.0, 0.0, 0.0)

KEYPOINT_NAMES: Tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
BODY = KEYPOINT_NAMES
N_KEYPOINTS = len(KEYPOINT_NAMES)
N_BODY, N_HAND, N_FACE = N_KEYPOINTS, 21, 70
# The 17 limbs of an OpenPose image in the reference drawing order; limb i has colour i.
LIMBS: Tuple[Tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# MIRROR[i]: the joint that takes joint i's place when the figure is flipped left/right.
MIRROR: Tuple[int, ...] = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
# The reference colour of joint i (and of limb i, drawn at LIMB_DIM), RGB: the hue wheel
# from red in 18 steps.
COLOURS: Tuple[Tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
LIMB_DIM = 0.6
EDGE = 0.5  # the reference's fills take in the boundary pixels: ~half a pixel more all round
HAND_EDGES: Tuple[Tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19),
    (19, 20))
HAND_COLOURS: Tuple[Tuple[int, int, int], ...] = tuple(
    tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES)))
HAND_JOINT = (0, 0, 255)
FACE_DOT = (255, 255, 255)


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


FACE_MIRROR = _face_mirror()
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# The default skeleton: a standing figure facing the viewer, 1 unit tall, x centred on
# 0, y down (0.4 units wide with the arms).
DEFAULT_FIGURE: Tuple[Point, ...] = (
    (0.0, 0.10), (0.0, 0.20),
    (-0.11, 0.21), (-0.15, 0.37), (-0.16, 0.52),
    (0.11, 0.21), (0.15, 0.37), (0.16, 0.52),
    (-0.07, 0.53), (-0.08, 0.75), (-0.08, 0.96),
    (0.07, 0.53), (0.08, 0.75), (0.08, 0.96),
    (-0.025, 0.08), (0.025, 0.08), (-0.05, 0.09), (0.05, 0.09),
)
DEFAULT_WIDTH = 0.4  # of DEFAULT_FIGURE, in units of its height


class PoseError(FieldError):
    """A skeleton cannot be used as it is; the message says what to do."""

    code = "bad_pose"
    default_message = "The pose skeleton cannot be read; insert a new skeleton."


# -- the data model -----------------------------------------------------------------------

def _points(values, count: int, what: str) -> Points:
    try:
        pts = tuple(tuple(float(v) for v in p) for p in values)
    except (TypeError, ValueError):
        raise PoseError(f"{what} must be {count} (x, y, confidence) triples of numbers.",
                        field=what) from None
    if len(pts) != count or any(len(p) != 3 for p in pts):
        raise PoseError(f"{what} must be {count} (x, y, confidence) triples; got {len(pts)}.",
                        field=what)
    for p in pts:
        if not all(math.isfinite(v) for v in p) or not 0.0 <= p[2] <= 1.0:
            raise PoseError(f"{what}: every x, y must be finite and every confidence in 0..1; "
                            f"got {p}.", field=what)
    return tuple(p if p[2] > 0 else MISSING for p in pts)


def _mapped(pts: Optional[Points], fn: Callable[[float, float], Point]) -> Optional[Points]:
    if pts is None:
        return None
    return tuple(((*fn(x, y), c) if c > 0 else MISSING) for x, y, c in pts)


def _flipped(pts: Optional[Points], perm: Sequence[int], axis_x: float) -> Optional[Points]:
    """``pts`` reflected about x = ``axis_x``, point i taking point perm[i]'s place."""
    if pts is None:
        return None
    return tuple((2 * axis_x - pts[j][0], pts[j][1], pts[j][2]) if pts[j][2] > 0 else MISSING
                 for j in perm)


def _stretch(old: Tuple[float, float], new: Tuple[float, float]
             ) -> Callable[[float, float], Point]:
    """Pixel-centre coordinates of a canvas ``old`` stretched to ``new`` (w, h)."""
    sx, sy = new[0] / float(old[0]), new[1] / float(old[1])
    return lambda x, y: ((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5)


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

    @classmethod
    def from_joints(cls, joints: Sequence[Optional[Sequence[float]]],
                    confidence: float = 1.0) -> "Person":
        kps = check_joints(joints)
        return cls(tuple(MISSING if p is None else (p[0], p[1], confidence) for p in kps))

    def joints(self) -> Joints:
        """The 18 body joints as ``(x, y)`` or None: the editors' view."""
        return tuple((x, y) if c > 0 else None for x, y, c in self.body)

    def parts(self) -> Dict[str, Optional[Points]]:
        return {"body": self.body, "left_hand": self.left_hand, "right_hand": self.right_hand,
                "face": self.face}

    def visible(self) -> int:
        return sum(c > 0 for _, _, c in self.body)

    def map_points(self, fn: Callable[[float, float], Point]) -> "Person":
        """Apply ``fn(x, y) -> (x, y)`` to every present keypoint."""
        return Person(_mapped(self.body, fn), _mapped(self.left_hand, fn),
                      _mapped(self.right_hand, fn), _mapped(self.face, fn))

    def mirrored(self, axis_x: float) -> "Person":
        """Flipped about x = ``axis_x``: left and right joints and hands swap."""
        return Person(_flipped(self.body, MIRROR, axis_x),
                      left_hand=_flipped(self.right_hand, range(N_HAND), axis_x),
                      right_hand=_flipped(self.left_hand, range(N_HAND), axis_x),
                      face=_flipped(self.face, FACE_MIRROR, axis_x))

    def joint(self, name: str) -> Optional[Point]:
        x, y, c = self.body[BODY.index(name)]
        return (x, y) if c > 0 else None

    def bounds(self) -> Optional[Tuple[float, float, float, float]]:
        pts = [(x, y) for part in self.parts().values() if part for x, y, c in part if c > 0]
        if not pts:
            return None
        xs, ys = zip(*pts)
        return min(xs), min(ys), max(xs), max(ys)


def _flat(pts: Optional[Points]) -> List[float]:
    return [round(v, 6) for p in pts for v in p] if pts else []


def _triples(flat: Any, what: str) -> Points:
    if not isinstance(flat, (list, tuple)) or len(flat) % 3:
        raise PoseError(f"{what} must be a flat list [x, y, confidence, ...].", field=what)
    for v in flat:
        if type(v) not in (int, float):
            raise PoseError(f"{what} must hold numbers only; got {v!r}.", field=what)
    return tuple((float(flat[i]), float(flat[i + 1]), float(flat[i + 2]))
                 for i in range(0, len(flat), 3))


def _size(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 < value <= 1 << 20:
        raise PoseError(f"canvas_{name} must be a positive whole number; got {value!r}.",
                        field=f"canvas_{name}")
    return value


def _person_from_dict(raw: Any, where: str) -> Person:
    if not isinstance(raw, dict):
        raise PoseError(f"{where} must be an object.", field=where)
    body = _triples(raw.get("pose_keypoints_2d", []), f"{where}.pose_keypoints_2d")
    if len(body) == 25:
        body = tuple(body[j] for j in _BODY25_TO_18)
    if len(body) != N_BODY:
        raise PoseError(f"{where}.pose_keypoints_2d has {len(body)} keypoints; expected 18 "
                        f"(COCO) or 25 (BODY_25).", field=f"{where}.pose_keypoints_2d")
    parts = {}
    for key, name in (("hand_left_keypoints_2d", "left_hand"),
                      ("hand_right_keypoints_2d", "right_hand"), ("face_keypoints_2d", "face")):
        pts = _triples(raw.get(key) or [], f"{where}.{key}")
        parts[name] = pts if pts else None
    return Person(body, **parts)


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
                raise PoseError(f"canvas_{name} must be a positive whole number; got {v!r}.",
                                field=f"canvas_{name}")
        object.__setattr__(self, "people", tuple(self.people))

    @classmethod
    def from_people(cls, people: Sequence[Sequence[Optional[Sequence[float]]]], width: int,
                    height: int, confidence: float = 1.0) -> "Pose":
        """A pose from the editors' joints (one sequence of 18 per person)."""
        return cls(width, height, tuple(Person.from_joints(p, confidence) for p in people))

    def joints(self) -> People:
        return tuple(p.joints() for p in self.people)

    # -- JSON ----------------------------------------------------------------------------

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
    def from_dict(cls, data: Any, width: Optional[int] = None,
                  height: Optional[int] = None) -> "Pose":
        """A pose from OpenPose JSON data.  Without ``canvas_width``/``canvas_height``
        (plain OpenPose output) the canvas is ``width`` x ``height``, and coordinates
        that are all in 0..1 are fractions of it."""
        if not isinstance(data, dict) or not isinstance(data.get("people", []), list):
            raise PoseError("A pose is a JSON object with a \"people\" list (OpenPose "
                            "layout).", field="people")
        given = data.get("canvas_width") is not None and data.get("canvas_height") is not None
        width = data.get("canvas_width") if given else width
        height = data.get("canvas_height") if given else height
        if width is None or height is None:
            raise PoseError("The pose has no canvas_width/canvas_height (plain OpenPose "
                            "output): give the canvas size of the image it was made from.",
                            field="canvas_width")
        width, height = _size(width, "width"), _size(height, "height")
        people = tuple(_person_from_dict(raw, f"people[{i}]")
                       for i, raw in enumerate(data.get("people", [])))
        pose = cls(width, height, people)
        coords = [v for p in people for part in p.parts().values() if part
                  for x, y, c in part if c > 0 for v in (x, y)]
        if not given and coords and all(abs(v) <= 1.0 for v in coords):
            pose = pose.map_points(lambda x, y: (x * width, y * height))
        return pose

    @classmethod
    def from_json(cls, text: Union[str, bytes], width: Optional[int] = None,
                  height: Optional[int] = None) -> "Pose":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise PoseError(f"The pose is not valid JSON: {err}.", field="pose") from None
        return cls.from_dict(data, width, height)

    # -- protocol --------------------------------------------------------------------------

    def to_message(self) -> PoseMessage:
        """The protocol's :class:`shared.messages.Pose` (bodies only)."""
        return PoseMessage(width=self.width, height=self.height,
                           keypoints=tuple(kp for p in self.people for kp in p.body))

    @classmethod
    def from_message(cls, message: PoseMessage) -> "Pose":
        kps = tuple(tuple(k) for k in message.keypoints)
        people = tuple(Person(kps[i:i + N_BODY]) for i in range(0, len(kps), N_BODY))
        return cls(message.width, message.height, people)

    # -- geometry --------------------------------------------------------------------------

    def map_points(self, fn: Callable[[float, float], Point], width: Optional[int] = None,
                   height: Optional[int] = None) -> "Pose":
        return Pose(width or self.width, height or self.height,
                    tuple(p.map_points(fn) for p in self.people))

    def mirrored(self) -> "Pose":
        """Flip left-right: x -> (width - 1) - x, and left/right joints and hands swap.

        Rendering the mirrored pose gives the rendered image flipped horizontally.
        """
        axis = (self.width - 1) / 2.0
        return Pose(self.width, self.height, tuple(p.mirrored(axis) for p in self.people))

    def scaled(self, factor: float, center: Optional[Point] = None) -> "Pose":
        """Scale about ``center`` (default the canvas centre); the canvas stays."""
        cx, cy = center if center is not None else ((self.width - 1) / 2.0,
                                                   (self.height - 1) / 2.0)
        return self.map_points(lambda x, y: (cx + (x - cx) * factor, cy + (y - cy) * factor))

    def translated(self, dx: float, dy: float) -> "Pose":
        return self.map_points(lambda x, y: (x + dx, y + dy))

    def resized(self, width: int, height: int) -> "Pose":
        """The same pose on a canvas resized to ``width`` x ``height`` (stretching)."""
        return self.map_points(_stretch((self.width, self.height), (width, height)),
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
            raise PoseError(f"Unknown resize mode {mode!r}.", field="resize_mode")
        ox, oy = (width - self.width * s) / 2.0, (height - self.height * s) / 2.0
        return self.map_points(lambda x, y: ((x + 0.5) * s + ox - 0.5, (y + 0.5) * s + oy - 0.5),
                               width, height)

    def bounds(self) -> Optional[Tuple[float, float, float, float]]:
        boxes = [b for b in (p.bounds() for p in self.people) if b]
        if not boxes:
            return None
        return (min(b[0] for b in boxes), min(b[1] for b in boxes),
                max(b[2] for b in boxes), max(b[3] for b in boxes))

    def main(self) -> Optional[Person]:
        """The person with the largest body bounding box (the subject), or None."""
        def area(person: Person) -> float:
            pts = [(x, y) for x, y, c in person.body if c > 0]
            if len(pts) < 2:
                return 0.0
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            return (max(xs) - min(xs)) * (max(ys) - min(ys)) + len(pts)
        return max(self.people, key=area) if self.people else None


def interpolate(a: Pose, b: Pose, t: float) -> Pose:
    """The pose a fraction ``t`` (0..1) of the way from ``a`` to ``b`` (on ``a``'s canvas).

    People are paired by index (extra people are dropped); a keypoint present in both is
    interpolated (position and confidence); one present in only one pose comes from ``a``
    before the midpoint and from ``b`` after it.
    """
    if not 0.0 <= t <= 1.0:
        raise PoseError(f"t must be between 0 and 1; got {t}.", field="t")
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


def default_pose(width: int = 512, height: int = 512) -> Pose:
    """One person standing, facing the viewer, centred, 90 % of the canvas high (or of
    its width with the arms, on wide canvases)."""
    return Pose.from_people((default_person(width, height),), width, height)


# -- joints: the editors' view of the model ------------------------------------------------

def check_joints(points: Sequence[Optional[Sequence[float]]]) -> Joints:
    """``points`` as :data:`Joints` (18 entries of finite (x, y) floats or None)."""
    if len(points) != N_KEYPOINTS:
        raise PoseError(f"An OpenPose-18 skeleton has {N_KEYPOINTS} keypoints, not "
                        f"{len(points)}.")
    out = []
    for p in points:
        if p is None:
            out.append(None)
            continue
        x, y = float(p[0]), float(p[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PoseError(f"A skeleton joint is at ({x}, {y}); every joint needs finite "
                            f"coordinates.")
        out.append((x, y))
    return tuple(out)


def check_people(people: Sequence[Sequence[Optional[Sequence[float]]]]) -> People:
    return tuple(check_joints(person) for person in people)


def visible(joints: Sequence[Optional[Point]]) -> int:
    """How many of ``joints`` are visible."""
    return sum(p is not None for p in joints)


def limbs_present(joints: Sequence[Optional[Point]]) -> Tuple[Tuple[int, int], ...]:
    """The limbs (in :data:`LIMBS` order) whose two joints are both visible."""
    kps = check_joints(joints)
    return tuple((a, b) for a, b in LIMBS if kps[a] is not None and kps[b] is not None)


def default_person(width: float, height: float, x: float = 0.0, y: float = 0.0) -> Joints:
    """A standing figure centred in the box of pixels (x, y, width, height), 90 % of its
    height (or narrower boxes: 90 % of its width with the arms)."""
    scale = min(0.9 * height, 0.9 * width / DEFAULT_WIDTH)
    centre = x + (width - 1) / 2.0
    top = y - 0.5 + (height - scale) / 2.0
    return tuple((centre + ux * scale, top + uy * scale) for ux, uy in DEFAULT_FIGURE)


def mirrored(joints: Sequence[Optional[Point]], axis_x: float) -> Joints:
    """The figure flipped about the vertical line x = ``axis_x`` (left and right swap)."""
    return Person.from_joints(joints).mirrored(axis_x).joints()


def transformed(joints: Sequence[Optional[Point]], scale: float = 1.0, dx: float = 0.0,
                dy: float = 0.0, origin: Point = (0.0, 0.0)) -> Joints:
    """Scaled by ``scale`` about ``origin``, then moved by (dx, dy)."""
    ox, oy = origin
    return Person.from_joints(joints).map_points(
        lambda x, y: (ox + (x - ox) * scale + dx, oy + (y - oy) * scale + dy)).joints()


def resized(joints: Sequence[Optional[Point]], old_size: Tuple[float, float],
            new_size: Tuple[float, float]) -> Joints:
    """The joints of a canvas of ``old_size`` on the canvas stretched to ``new_size``."""
    return Person.from_joints(joints).map_points(_stretch(old_size, new_size)).joints()


def to_message(people: Sequence[Sequence[Optional[Point]]], width: int,
               height: int) -> PoseMessage:
    """The :class:`shared.messages.Pose` a control unit sends instead of an image.

    People without a visible joint are left out; missing joints travel with confidence 0.
    """
    kept = [p for p in check_people(people) if visible(p)]
    if not kept:
        raise PoseError("The skeleton has no visible joints; insert a new skeleton.")
    return Pose.from_people(kept, width, height).to_message()


def from_message(message: PoseMessage) -> People:
    """The people of a :class:`shared.messages.Pose` (joints with confidence 0 are None)."""
    return Pose.from_message(message).joints()


def to_openpose_json(people: Sequence[Sequence[Optional[Point]]], width: int,
                     height: int) -> str:
    """The OpenPose JSON that pose editors exchange (and the server sends)."""
    return Pose.from_people(people, width, height).to_json()


def from_openpose_json(text: str, width: int, height: int) -> List[Joints]:
    """Every person's body joints of an OpenPose JSON document, on a ``width`` x
    ``height`` canvas (stretched from the document's canvas when it names one)."""
    try:
        pose = Pose.from_json(text, width, height)
    except PoseError as err:
        raise PoseError(f"The pose keypoints are not OpenPose JSON ({err.message}); update "
                        f"the server.", field=err.field) from None
    if (pose.width, pose.height) != (width, height):
        pose = pose.resized(width, height)
    return list(pose.joints())


def main_person(people: Sequence[Joints]) -> Optional[Joints]:
    """The person with the largest bounding box (the subject), or None."""
    if not people:
        return None
    pose = Pose(1, 1, tuple(Person.from_joints(p) for p in people))
    return people[pose.people.index(pose.main())]


# -- rendering ------------------------------------------------------------------------------

def stick_width(width: int, height: int) -> float:
    """Limb half-width and joint radius: 4 px at a 512-px short side, as in the reference."""
    return max(1.5, 4.0 * min(width, height) / 512.0)


def _ellipse_rows(cx: float, cy: float, a: float, b: float, angle: float, width: int,
                  height: int):
    """(y, x0, x1) spans (x1 exclusive) of the pixels whose centres lie in the ellipse."""
    a, b = max(a, 0.5), max(b, 0.5)
    c, s = math.cos(angle), math.sin(angle)
    qa = c * c / (a * a) + s * s / (b * b)
    extent = max(a, b)
    for y in range(max(0, int(math.floor(cy - extent))), min(height, int(cy + extent) + 2)):
        dy = y - cy
        qb = 2 * dy * c * s * (1 / (a * a) - 1 / (b * b))
        qc = dy * dy * (s * s / (a * a) + c * c / (b * b)) - 1
        disc = qb * qb - 4 * qa * qc
        if disc < 0:
            continue
        root = math.sqrt(disc)
        x0 = max(0, int(math.ceil(cx + (-qb - root) / (2 * qa))))
        x1 = min(width, int(math.floor(cx + (-qb + root) / (2 * qa))) + 1)
        if x1 > x0:
            yield y, x0, x1


class _Canvas:
    """An RGBA8 buffer the renderer fills with spans."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.buf = bytearray(b"\x00\x00\x00\xff" * (width * height))

    def _fill(self, spans, colour: Sequence[int]) -> None:
        pixel = bytes(colour) + b"\xff"
        for y, x0, x1 in spans:
            start = (y * self.width + x0) * 4
            self.buf[start:start + (x1 - x0) * 4] = pixel * (x1 - x0)

    def bar(self, a: Sequence[float], b: Sequence[float], half_width: float,
            colour: Sequence[int]) -> None:
        length = math.hypot(b[0] - a[0], b[1] - a[1])
        angle = math.atan2(b[1] - a[1], b[0] - a[0])
        self._fill(_ellipse_rows((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, length / 2 + EDGE,
                                 half_width + EDGE, angle, self.width, self.height), colour)

    def disc(self, x: float, y: float, radius: float, colour: Sequence[int]) -> None:
        self._fill(_ellipse_rows(x, y, radius + EDGE, radius + EDGE, 0.0, self.width,
                                 self.height), colour)

    def image(self) -> Image:
        return Image(self.width, self.height, bytes(self.buf))


def render(pose: Pose, *, hands: bool = True, face: bool = True,
           stick: Optional[float] = None) -> Image:
    """The OpenPose control image of ``pose`` on its canvas (opaque RGBA)."""
    canvas = _Canvas(pose.width, pose.height)
    stick = stick or stick_width(pose.width, pose.height)
    for person in pose.people:
        body = person.body
        for index, (a, b) in enumerate(LIMBS):
            if body[a][2] > 0 and body[b][2] > 0:
                canvas.bar(body[a], body[b], stick,
                           tuple(int(c * LIMB_DIM) for c in COLOURS[index]))
        for index, (x, y, c) in enumerate(body):
            if c > 0:
                canvas.disc(x, y, stick, COLOURS[index])
        for pts in (person.left_hand, person.right_hand) if hands else ():
            if not pts:
                continue
            for index, (a, b) in enumerate(HAND_EDGES):
                if pts[a][2] > 0 and pts[b][2] > 0:
                    canvas.bar(pts[a], pts[b], max(0.5, stick / 4), HAND_COLOURS[index])
            for x, y, c in pts:
                if c > 0:
                    canvas.disc(x, y, stick, HAND_JOINT)
        if face and person.face:
            for x, y, c in person.face:
                if c > 0:
                    canvas.disc(x, y, max(1.0, stick * 0.75), FACE_DOT)
    return canvas.image()


def render_people(people: Sequence[Sequence[Optional[Point]]], width: int,
                  height: int) -> Image:
    """The OpenPose control image of the editors' joints on a ``width`` x ``height`` canvas."""
    return render(Pose.from_people(people, width, height))


def render_message(message: PoseMessage, size: Tuple[int, int],
                   resize_mode: str = "just_resize") -> Image:
    """A protocol :class:`shared.messages.Pose` drawn as a control image of ``size``."""
    return render(Pose.from_message(message).fitted(size[0], size[1], resize_mode))


# -- parsing ----------------------------------------------------------------------------------

_NEIGHBOURS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dx or dy)


def _classify(image: Image, tolerance: int) -> Tuple[Dict[int, int], Dict[int, int]]:
    """{pixel: joint index} and {pixel: limb index} of the figure's pixels (alpha taken
    as coverage over black: a transparent layer reads as black paper)."""
    data, lit = image.data, 40
    limb_colours = [tuple(int(c * LIMB_DIM) for c in colour) for colour in COLOURS[:len(LIMBS)]]
    cache: Dict[bytes, Tuple[int, int]] = {}
    joints: Dict[int, int] = {}
    limbs: Dict[int, int] = {}
    high = bytes(1 if v > lit else 0 for v in range(256))
    marks = bytearray(data.translate(high))
    marks[3::4] = bytes(len(marks) // 4)  # alpha alone does not make a figure
    pos = marks.find(1)
    while pos != -1:
        pixel = pos // 4
        i = pixel * 4
        key = data[i:i + 4]
        kind = cache.get(key)
        if kind is None:
            a = key[3]
            r, g, b = ((v * a + 127) // 255 for v in key[:3])
            kind = (-1, -1)
            if max(r, g, b) > lit:
                for index, (cr, cg, cb) in enumerate(COLOURS):
                    if max(abs(r - cr), abs(g - cg), abs(b - cb)) <= tolerance:
                        kind = (index, -1)
                        break
                else:
                    half = tolerance // 2
                    for index, (cr, cg, cb) in enumerate(limb_colours):
                        if max(abs(r - cr), abs(g - cg), abs(b - cb)) <= half:
                            kind = (-2, index)
                            break
                    else:
                        kind = (-2, -1)
            cache[key] = kind
        if kind[0] != -1:
            if kind[0] >= 0:
                joints[pixel] = kind[0]
            elif kind[1] >= 0:
                limbs[pixel] = kind[1]
            else:
                limbs.setdefault(pixel, -1)
        pos = marks.find(1, i + 4)
    return joints, limbs


def _components(pixels, width: int, height: int) -> List[List[int]]:
    """The 8-connected components of a set of pixel indices."""
    todo = set(pixels)
    out = []
    while todo:
        seed = todo.pop()
        patch, stack = [seed], [seed]
        while stack:
            p = stack.pop()
            px, py = p % width, p // width
            for dx, dy in _NEIGHBOURS:
                x, y = px + dx, py + dy
                q = y * width + x
                if 0 <= x < width and 0 <= y < height and q in todo:
                    todo.discard(q)
                    patch.append(q)
                    stack.append(q)
        out.append(patch)
    return out


def _circle(points: List[Point]) -> Tuple[float, float, float]:
    """The smallest circle (cx, cy, r) enclosing ``points`` (Welzl, iterative)."""
    pts = points[:]
    random.Random(0).shuffle(pts)

    def two(a, b):
        cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        return cx, cy, math.hypot(a[0] - cx, a[1] - cy)

    def three(a, b, c):
        d = 2 * (a[0] * (b[1] - c[1]) + b[0] * (c[1] - a[1]) + c[0] * (a[1] - b[1]))
        if abs(d) < 1e-12:  # collinear: the widest pair
            return max((two(a, b), two(a, c), two(b, c)), key=lambda t: t[2])
        ux = ((a[0] ** 2 + a[1] ** 2) * (b[1] - c[1]) + (b[0] ** 2 + b[1] ** 2) * (c[1] - a[1])
              + (c[0] ** 2 + c[1] ** 2) * (a[1] - b[1])) / d
        uy = ((a[0] ** 2 + a[1] ** 2) * (c[0] - b[0]) + (b[0] ** 2 + b[1] ** 2) * (a[0] - c[0])
              + (c[0] ** 2 + c[1] ** 2) * (b[0] - a[0])) / d
        return ux, uy, math.hypot(a[0] - ux, a[1] - uy)

    def inside(circle, p):
        return math.hypot(p[0] - circle[0], p[1] - circle[1]) <= circle[2] + 1e-7

    circle = (pts[0][0], pts[0][1], 0.0)
    for i, p in enumerate(pts):
        if inside(circle, p):
            continue
        circle = (p[0], p[1], 0.0)
        for j in range(i):
            q = pts[j]
            if inside(circle, q):
                continue
            circle = two(p, q)
            for k in range(j):
                if not inside(circle, pts[k]):
                    circle = three(p, q, pts[k])
    return circle


def _centre(patch: List[int], width: int) -> Point:
    """A joint's position: the centroid of a whole disc; for a disc partly covered by a
    later joint, the centre of the circle through its visible rim (at least half of it
    must show)."""
    pts = [(float(p % width), float(p // width)) for p in patch]
    cx = sum(x for x, _ in pts) / len(pts)
    cy = sum(y for _, y in pts) / len(pts)
    ex, ey, r = _circle(pts)
    if len(pts) >= 0.8 * math.pi * max(r, 0.5) ** 2:
        return cx, cy
    return ex, ey


def _touch(patch: List[int], joint: int, limbs: Dict[int, int], width: int,
           height: int) -> int:
    """How many pixels of the limbs that meet ``joint`` lie within 3 px of ``patch``."""
    incident = {i for i, (a, b) in enumerate(LIMBS) if joint in (a, b)}
    near = set()
    for p in patch:
        px, py = p % width, p // width
        for dy in range(-3, 4):
            y = py + dy
            if 0 <= y < height:
                for dx in range(-3, 4):
                    x = px + dx
                    if 0 <= x < width:
                        near.add(y * width + x)
    return sum(1 for q in near if limbs.get(q, -1) in incident)


def parse(image: Image, tolerance: int = 40, min_area: int = 3) -> Pose:
    """Read OpenPose-18 bodies back from a rendered (or hand-edited) skeleton image.

    Each joint of each figure (a connected patch of lit pixels) is the patch of its colour
    that touches its limbs most (then the largest); people come left to right.
    """
    width, height = image.width, image.height
    joints, limbs = _classify(image, tolerance)
    figure_of: Dict[int, int] = {}
    for n, component in enumerate(_components(set(joints) | set(limbs), width, height)):
        for p in component:
            figure_of[p] = n
    by_colour: Dict[int, List[int]] = {}
    for p, j in joints.items():
        by_colour.setdefault(j, []).append(p)
    found: Dict[int, Dict[int, Tuple[Tuple[int, int], Point]]] = {}
    for j, pixels in by_colour.items():
        for patch in _components(pixels, width, height):
            if len(patch) < min_area:
                continue
            score = (_touch(patch, j, limbs, width, height), len(patch))
            best = found.setdefault(figure_of[patch[0]], {}).get(j)
            if best is None or score > best[0]:
                found[figure_of[patch[0]]][j] = (score, _centre(patch, width))
    people = []
    for fig in sorted(found, key=lambda f: min(xy[0] for _, xy in found[f].values())):
        kps = found[fig]
        if len(kps) >= 2:
            people.append(Person(tuple((kps[j][1][0], kps[j][1][1], 1.0) if j in kps
                                       else MISSING for j in range(N_BODY))))
    return Pose(width, height, tuple(people))
