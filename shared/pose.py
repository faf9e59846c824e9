"""OpenPose-18 skeletons in pure Python: what the server and both editor plug-ins agree on.

**Keypoints.**  A :data:`Person` is 18 entries in the COCO-18 order the openpose
ControlNets were trained on (:data:`KEYPOINT_NAMES`): 0 nose, 1 neck, 2-4 right
shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle,
11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left ear.  "Right" is
the person's right: on a figure facing the viewer it is on the image's left.  Each
entry is an ``(x, y)`` or ``None`` (not visible).  :data:`People` is a tuple of them.

**Coordinates** are canvas pixels with pixel-centre coordinates (the first pixel's
centre is 0.0), as in :class:`shared.messages.Pose` and ``backend.pose``.  Editors
that put a pixel's centre at +0.5 (GIMP paths, Krita vector shapes) convert at
their own edge.

**Rendering** (:func:`render`) draws what ``backend.pose.render`` draws, the
convention of the openpose ControlNets: black canvas; the 17 limbs (:data:`LIMBS`)
as ellipses of half-width :func:`stick_width` in their reference colours at 60 %
(:data:`LIMB_DIM`); then the joints as discs in full colour (:data:`COLOURS`).
:func:`parse` reads such a picture back (joints by their full-intensity colours).
Plug-ins normally send the keypoints themselves (:func:`to_message`) and the server
renders them at the size it generates at; the pure-Python renderer is for previews
and for servers that send a detected pose only as a picture.

Standard library only, Python >= 3.10: this module is bundled into the editors.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ControlCanvasError
from .images import Image
from .messages import Pose as PoseMessage

Point = Tuple[float, float]
Person = Tuple[Optional[Point], ...]  # N_KEYPOINTS entries, None = not visible
People = Tuple[Person, ...]

KEYPOINT_NAMES: Tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
N_KEYPOINTS = len(KEYPOINT_NAMES)
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
EDGE = 0.5  # OpenCV's fills take in the boundary pixels: ~half a pixel more all round

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


class PoseError(ControlCanvasError, ValueError):
    """A skeleton cannot be used as it is; the message says what to do."""

    code = "bad_pose"
    default_message = "The pose skeleton cannot be read; insert a new skeleton."


# -- checking -----------------------------------------------------------------------------

def check_person(points: Sequence[Optional[Sequence[float]]]) -> Person:
    """``points`` as a :data:`Person` (18 entries of (x, y) floats or None)."""
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
    return tuple(check_person(person) for person in people)


def visible(person: Sequence[Optional[Point]]) -> int:
    """How many joints of ``person`` are visible."""
    return sum(p is not None for p in person)


def limbs_present(person: Sequence[Optional[Point]]) -> Tuple[Tuple[int, int], ...]:
    """The limbs (in :data:`LIMBS` order) whose two joints are both visible."""
    kps = check_person(person)
    return tuple((a, b) for a, b in LIMBS if kps[a] is not None and kps[b] is not None)


# -- the default skeleton -----------------------------------------------------------------

def default_person(width: float, height: float, x: float = 0.0, y: float = 0.0) -> Person:
    """A standing figure centred in the box of pixels (x, y, width, height), 90 % of its
    height (or narrower boxes: 90 % of its width with the arms)."""
    scale = min(0.9 * height, 0.9 * width / DEFAULT_WIDTH)
    centre = x + (width - 1) / 2.0
    top = y - 0.5 + (height - scale) / 2.0
    return tuple((centre + ux * scale, top + uy * scale) for ux, uy in DEFAULT_FIGURE)


# -- geometry -----------------------------------------------------------------------------

def mirrored(person: Sequence[Optional[Point]], axis_x: float) -> Person:
    """Flip left/right about the vertical line x = ``axis_x``; left and right joints swap
    names too.  The axis of a canvas ``width`` pixels wide is ``(width - 1) / 2``."""
    kps = check_person(person)
    flipped = [None if p is None else (2 * axis_x - p[0], p[1]) for p in kps]
    return tuple(flipped[MIRROR[i]] for i in range(N_KEYPOINTS))


def transformed(person: Sequence[Optional[Point]], scale: float = 1.0, dx: float = 0.0,
                dy: float = 0.0, origin: Point = (0.0, 0.0)) -> Person:
    """Scale about ``origin``, then translate by (dx, dy)."""
    ox, oy = origin
    return tuple(None if p is None else (ox + (p[0] - ox) * scale + dx,
                                         oy + (p[1] - oy) * scale + dy)
                 for p in check_person(person))


def resized(person: Sequence[Optional[Point]], old_size: Tuple[float, float],
            new_size: Tuple[float, float]) -> Person:
    """The same pose on a canvas stretched from ``old_size`` to ``new_size`` (pixel
    centres stay pixel centres)."""
    sx, sy = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return tuple(None if p is None else ((p[0] + 0.5) * sx - 0.5, (p[1] + 0.5) * sy - 0.5)
                 for p in check_person(person))


# -- the protocol's Pose ------------------------------------------------------------------

def to_message(people: Sequence[Sequence[Optional[Point]]], width: int,
               height: int) -> PoseMessage:
    """The :class:`shared.messages.Pose` a control unit sends instead of an image.

    People without a visible joint are left out; missing joints travel with
    confidence 0.
    """
    kept = [p for p in check_people(people) if visible(p)]
    if not kept:
        raise PoseError("The skeleton has no visible joints; insert a new skeleton.")
    triples = tuple((0.0, 0.0, 0.0) if p is None else (p[0], p[1], 1.0)
                    for person in kept for p in person)
    return PoseMessage(width=width, height=height, keypoints=triples)


def from_message(message: PoseMessage) -> People:
    """The people of a :class:`shared.messages.Pose` (joints with confidence 0 are None)."""
    kps = message.keypoints
    return tuple(tuple(None if k[2] <= 0 else (k[0], k[1]) for k in kps[i:i + N_KEYPOINTS])
                 for i in range(0, len(kps), N_KEYPOINTS))


# -- OpenPose JSON ------------------------------------------------------------------------

def to_openpose_json(people: Sequence[Sequence[Optional[Point]]], width: int,
                     height: int) -> str:
    """The OpenPose JSON that pose editors exchange (and the server sends)."""
    out = []
    for person in check_people(people):
        flat: List[float] = []
        for p in person:
            flat.extend((0.0, 0.0, 0.0) if p is None else (p[0], p[1], 1.0))
        out.append({"pose_keypoints_2d": flat})
    return json.dumps({"people": out, "canvas_width": width, "canvas_height": height})


def from_openpose_json(text: str, width: int, height: int) -> List[Person]:
    """Every person of an OpenPose JSON document, on a ``width`` x ``height`` canvas.

    Coordinates are pixels of ``canvas_width`` x ``canvas_height`` when given
    (stretched to this canvas as :func:`resized` does), else pixels of this canvas,
    or fractions of it when every coordinate is at most 1.  Only the 18 body
    keypoints are read (hands and face are ignored).
    """
    try:
        data = json.loads(text)
        people = data["people"]
        cw = float(data.get("canvas_width") or 0)
        ch = float(data.get("canvas_height") or 0)
        flats = [[float(v) for v in person["pose_keypoints_2d"]] for person in people]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PoseError("The pose keypoints are not OpenPose JSON (an object with a "
                        "\"people\" list); update the server.") from None
    out = []
    for flat in flats:
        if len(flat) != 3 * N_KEYPOINTS:
            raise PoseError(f"A person has {len(flat) // 3} keypoints; OpenPose-18 has "
                            f"{N_KEYPOINTS}. Update the server.")
        person = tuple(None if flat[3 * i + 2] <= 0 else (flat[3 * i], flat[3 * i + 1])
                       for i in range(N_KEYPOINTS))
        if cw and ch:
            person = resized(person, (cw, ch), (width, height))
        elif all(abs(v) <= 1.0 for v in flat):
            person = tuple(None if p is None else (p[0] * width, p[1] * height)
                           for p in person)
        out.append(person)
    return out


def main_person(people: Sequence[Person]) -> Optional[Person]:
    """The person with the largest bounding box (the subject), or None."""
    def area(kps: Person) -> float:
        pts = [p for p in kps if p is not None]
        if len(pts) < 2:
            return 0.0
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return (max(xs) - min(xs)) * (max(ys) - min(ys)) + len(pts)
    return max(people, key=area) if people else None


# -- rendering and parsing ------------------------------------------------------------------

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


def _fill(buf: bytearray, width: int, spans, colour: bytes) -> None:
    for y, x0, x1 in spans:
        start = (y * width + x0) * 4
        buf[start:start + (x1 - x0) * 4] = colour * (x1 - x0)


def render(people: Sequence[Sequence[Optional[Point]]], width: int, height: int) -> Image:
    """The OpenPose control image of ``people`` on a ``width`` x ``height`` black canvas."""
    everyone = check_people(people)
    buf = bytearray(b"\x00\x00\x00\xff" * (width * height))
    stick = stick_width(width, height)
    for kps in everyone:
        for index, (a, b) in enumerate(LIMBS):
            pa, pb = kps[a], kps[b]
            if pa is None or pb is None:
                continue
            length = math.hypot(pb[0] - pa[0], pb[1] - pa[1])
            angle = math.atan2(pb[1] - pa[1], pb[0] - pa[0])
            colour = bytes(int(c * LIMB_DIM) for c in COLOURS[index]) + b"\xff"
            _fill(buf, width, _ellipse_rows((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2,
                                            length / 2 + EDGE, stick + EDGE, angle, width,
                                            height), colour)
        for index, p in enumerate(kps):
            if p is not None:
                _fill(buf, width, _ellipse_rows(p[0], p[1], stick + EDGE, stick + EDGE, 0.0,
                                                width, height), bytes(COLOURS[index]) + b"\xff")
    return Image(width, height, bytes(buf))


def parse(image: Image, tolerance: int = 40) -> Person:
    """The joints of one skeleton in a rendered OpenPose image (None where not found).

    A joint is the largest connected patch of its full-intensity colour (limbs are
    drawn at 60 %, so they never match); its position is the patch's centroid.
    With several people, each joint comes from the biggest figure's patch, so the
    result describes one person.
    """
    width, height, data = image.width, image.height, image.data
    threshold = 255 - tolerance
    bright = bytearray(data.translate(bytes(1 if v >= threshold else 0 for v in range(256))))
    bright[3::4] = bytes(len(bright) // 4)  # alpha does not count
    pixels: Dict[int, List[int]] = {}
    pos = bright.find(1)
    while pos != -1:
        pixel = pos // 4
        i = pixel * 4
        r, g, b = data[i], data[i + 1], data[i + 2]
        for index, (cr, cg, cb) in enumerate(COLOURS):
            if abs(r - cr) <= tolerance and abs(g - cg) <= tolerance and abs(b - cb) <= tolerance:
                pixels.setdefault(index, []).append(pixel)
                break
        pos = bright.find(1, i + 4)
    out: List[Optional[Point]] = [None] * N_KEYPOINTS
    for index, members in pixels.items():
        todo = set(members)
        best: List[int] = []
        while todo:  # connected patches (8-neighbourhood); keep the largest
            seed = todo.pop()
            patch, stack = [seed], [seed]
            while stack:
                p = stack.pop()
                px, py = p % width, p // width
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        q = p + dy * width + dx
                        if q in todo and 0 <= px + dx < width and 0 <= py + dy < height:
                            todo.discard(q)
                            patch.append(q)
                            stack.append(q)
            if len(patch) > len(best):
                best = patch
        out[index] = (sum(p % width for p in best) / len(best),
                      sum(p // width for p in best) / len(best))
    return tuple(out)
