"""The OpenPose-18 skeleton, in pure Python: defaults, paths ↔ keypoints, rendering.

Layout (the COCO-18 order OpenPose ControlNets were trained on): 0 nose, 1 neck,
2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right
hip/knee/ankle, 11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left
ear.  "Right" is the person's right: on a figure facing the viewer it is on the
image's left.

In GIMP the skeleton is a path with **one stroke per limb** (two anchors: the
limb's joints), so joints move with the Paths tool.  Several strokes share a
joint (the neck ends five limbs); when reading the path back, the anchor that
moved furthest from where the plug-in wrote it wins, so dragging any one copy of
a joint moves the joint.  What the plug-in wrote is kept with the path (a
parasite holding :func:`path_meta`), which also records which stroke is which limb.

Coordinates are canvas pixels with pixel-centre coordinates (the first pixel's
centre is 0.0), as in ``shared.messages.Pose`` and ``backend.pose``; GIMP puts
that centre at 0.5, so :func:`layer_to_path` / :func:`path_to_layer` convert.

:func:`render` draws what ``backend.pose.render`` draws (the convention of the
openpose ControlNets): black canvas, the 17 limbs as ellipses in their colours at
60 % intensity, then the joints as discs in full colour.  :func:`parse` reads a
rendered image back (joints by their full-intensity colours), for servers that
send a detected pose only as a picture.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

from shared.images import Image

from .problems import UsageError

Point = Tuple[float, float]
Keypoints = Tuple[Optional[Point], ...]  # 18 entries, None = not visible

KEYPOINT_NAMES: Tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
N_KEYPOINTS = len(KEYPOINT_NAMES)
# The 17 limbs drawn in an OpenPose image, in drawing (and colour) order.
LIMBS: Tuple[Tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
MIRROR: Tuple[int, ...] = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
META_FORMAT = "controlcanvas-pose"
PARASITE_NAME = "controlcanvas-pose"
PATH_NAME = "Pose skeleton"
MOVE_TOLERANCE = 0.01  # pixels: a joint closer than this to where it was written has not moved


def _hue_wheel(n: int) -> Tuple[Tuple[int, int, int], ...]:
    """n fully saturated colours from red round the wheel, 360/n degrees apart."""
    out = []
    for i in range(n):
        h = i * 6.0 / n  # sextant position
        x = int(round(255 * (1 - abs(h % 2 - 1))))
        rgb = [(255, x, 0), (x, 255, 0), (0, 255, x), (0, x, 255), (x, 0, 255), (255, 0, x)]
        out.append(rgb[int(h) % 6])
    return tuple(out)


COLOURS = _hue_wheel(N_KEYPOINTS)  # (255,0,0), (255,85,0), (255,170,0), (255,255,0), ...

# A standing figure facing the viewer, 1 unit tall, x centred on 0, y down.
_DEFAULT_UNIT: Tuple[Point, ...] = (
    (0.0, 0.10), (0.0, 0.20),
    (-0.11, 0.21), (-0.15, 0.37), (-0.16, 0.52),
    (0.11, 0.21), (0.15, 0.37), (0.16, 0.52),
    (-0.07, 0.53), (-0.08, 0.75), (-0.08, 0.96),
    (0.07, 0.53), (0.08, 0.75), (0.08, 0.96),
    (-0.025, 0.08), (0.025, 0.08), (-0.05, 0.09), (0.05, 0.09),
)


def _check(keypoints: Sequence[Optional[Point]]) -> Keypoints:
    if len(keypoints) != N_KEYPOINTS:
        raise UsageError(f"An OpenPose-18 skeleton has {N_KEYPOINTS} keypoints, not "
                         f"{len(keypoints)}.")
    return tuple(None if p is None else (float(p[0]), float(p[1])) for p in keypoints)


def default_pose(width: float, height: float, x: float = 0.0, y: float = 0.0) -> Keypoints:
    """A standing figure fitted into the box (x, y, width, height), 90 % of its height."""
    scale = min(0.9 * height, 0.9 * width / 0.4)
    top = y + (height - scale) / 2.0
    return tuple((x + width / 2.0 + ux * scale, top + uy * scale) for ux, uy in _DEFAULT_UNIT)


def mirrored(keypoints: Sequence[Optional[Point]], axis_x: float) -> Keypoints:
    """Flip left/right about the vertical line x = axis_x (labels swap too)."""
    kps = _check(keypoints)
    flipped = [None if p is None else (2 * axis_x - p[0], p[1]) for p in kps]
    return tuple(flipped[MIRROR[i]] for i in range(N_KEYPOINTS))


def transformed(keypoints: Sequence[Optional[Point]], scale: float = 1.0,
                dx: float = 0.0, dy: float = 0.0, origin: Point = (0.0, 0.0)) -> Keypoints:
    """Scale about ``origin``, then translate by (dx, dy)."""
    ox, oy = origin
    return tuple(None if p is None else (ox + (p[0] - ox) * scale + dx,
                                         oy + (p[1] - oy) * scale + dy)
                 for p in _check(keypoints))


def resized(keypoints: Sequence[Optional[Point]], old_size: Tuple[int, int],
            new_size: Tuple[int, int]) -> Keypoints:
    """The same pose on a canvas of another size (pixel centres stay pixel centres)."""
    sx, sy = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return tuple(None if p is None else ((p[0] + 0.5) * sx - 0.5, (p[1] + 0.5) * sy - 0.5)
                 for p in _check(keypoints))


def layer_to_path(keypoints: Sequence[Optional[Point]], x: int, y: int) -> Keypoints:
    """Layer pixel-centre coordinates → GIMP image coordinates (pixel centres at +0.5)."""
    return transformed(keypoints, dx=x + 0.5, dy=y + 0.5)


def path_to_layer(keypoints: Sequence[Optional[Point]], x: int, y: int) -> Keypoints:
    return transformed(keypoints, dx=-(x + 0.5), dy=-(y + 0.5))


# -- paths ----------------------------------------------------------------------

def limbs_present(keypoints: Sequence[Optional[Point]]) -> Tuple[Tuple[int, int], ...]:
    kps = _check(keypoints)
    return tuple((a, b) for a, b in LIMBS if kps[a] is not None and kps[b] is not None)


def stroke_points(a: Point, b: Point) -> List[float]:
    """A straight two-anchor Bezier stroke: control/anchor/control triples, as GIMP wants."""
    return [a[0], a[1]] * 3 + [b[0], b[1]] * 3


def to_strokes(keypoints: Sequence[Optional[Point]]) -> List[List[float]]:
    """One stroke per limb whose two joints are visible, in :data:`LIMBS` order."""
    kps = _check(keypoints)
    return [stroke_points(kps[a], kps[b]) for a, b in limbs_present(kps)]


def anchors(points: Sequence[float]) -> List[Point]:
    """The anchors of a Bezier stroke's control/anchor/control point list."""
    if len(points) % 6:
        raise UsageError("A path stroke has a malformed point list.")
    return [(float(points[i + 2]), float(points[i + 3])) for i in range(0, len(points), 6)]


def path_meta(keypoints: Sequence[Optional[Point]]) -> str:
    """What is stored with a skeleton path: which stroke is which limb, and the joints."""
    kps = _check(keypoints)
    return json.dumps({"format": META_FORMAT, "version": 1,
                       "limbs": [list(limb) for limb in limbs_present(kps)],
                       "keypoints": [None if p is None else [p[0], p[1]] for p in kps]},
                      separators=(",", ":"))


def _parse_meta(meta: str) -> Tuple[Tuple[Tuple[int, int], ...], Keypoints]:
    try:
        data = json.loads(meta)
        if data.get("format") != META_FORMAT:
            raise ValueError("not a skeleton")
        limbs = tuple((int(a), int(b)) for a, b in data["limbs"])
        written = _check([None if p is None else (p[0], p[1]) for p in data["keypoints"]])
        if any(not (0 <= a < N_KEYPOINTS and 0 <= b < N_KEYPOINTS) for a, b in limbs):
            raise ValueError("bad limb")
    except (ValueError, KeyError, TypeError, AttributeError, UsageError):
        raise UsageError("The skeleton path's stored data is damaged; delete the path and run "
                         "the filter again to start from a new skeleton.") from None
    return limbs, written


def from_strokes(strokes: Sequence[Sequence[float]], meta: str,
                 path_name: str = PATH_NAME) -> Keypoints:
    """The keypoints of a skeleton path (see the module docstring for the rule)."""
    limbs, written = _parse_meta(meta)
    if len(strokes) != len(limbs):
        raise UsageError(
            f"The skeleton path {path_name!r} has {len(strokes)} strokes but was made with "
            f"{len(limbs)} (one per limb). Move joints with the Paths tool instead of adding "
            f"or deleting strokes; or delete the path to start from a new skeleton.")
    candidates: Dict[int, List[Point]] = {}
    for points, (a, b) in zip(strokes, limbs):
        ends = anchors(points)
        if not ends:
            raise UsageError(f"A stroke of the skeleton path {path_name!r} has no points.")
        candidates.setdefault(a, []).append(ends[0])
        candidates.setdefault(b, []).append(ends[-1])
    out: List[Optional[Point]] = []
    for index in range(N_KEYPOINTS):
        seen = candidates.get(index)
        if not seen:
            out.append(written[index])
            continue
        origin = written[index]
        if origin is None:
            out.append((sum(p[0] for p in seen) / len(seen), sum(p[1] for p in seen) / len(seen)))
            continue
        moved = max(seen, key=lambda p: math.hypot(p[0] - origin[0], p[1] - origin[1]))
        if math.hypot(moved[0] - origin[0], moved[1] - origin[1]) <= MOVE_TOLERANCE:
            moved = origin  # XCF keeps path points as 32-bit floats
        out.append(moved)
    return tuple(out)


# -- OpenPose JSON ----------------------------------------------------------------

def to_openpose_json(people: Sequence[Sequence[Optional[Point]]], width: int,
                     height: int) -> str:
    """The OpenPose JSON format that pose editors exchange (pixel coordinates)."""
    out = []
    for keypoints in people:
        flat: List[float] = []
        for p in _check(keypoints):
            flat.extend((0.0, 0.0, 0.0) if p is None else (p[0], p[1], 1.0))
        out.append({"pose_keypoints_2d": flat})
    return json.dumps({"people": out, "canvas_width": width, "canvas_height": height})


def from_openpose_json(text: str, width: int, height: int) -> List[Keypoints]:
    """Every person in an OpenPose JSON document, scaled to a width x height canvas.

    Coordinates are pixels of ``canvas_width`` x ``canvas_height`` when given, or
    normalised 0..1 when every coordinate is at most 1 and no canvas size is given.
    """
    try:
        data = json.loads(text)
        people = data["people"]
        cw = float(data.get("canvas_width") or 0)
        ch = float(data.get("canvas_height") or 0)
        flats = [[float(v) for v in person["pose_keypoints_2d"]] for person in people]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError("The server sent pose keypoints that are not OpenPose JSON; update "
                         "the server.") from None
    normalised = not (cw and ch) and all(v <= 1.0 for f in flats for v in f)
    sx = width if normalised else (width / cw if cw else 1.0)
    sy = height if normalised else (height / ch if ch else 1.0)
    out = []
    for flat in flats:
        if len(flat) != 3 * N_KEYPOINTS:
            raise UsageError(f"A person has {len(flat) // 3} keypoints; OpenPose-18 has "
                             f"{N_KEYPOINTS}. Update the server.")
        out.append(tuple(None if flat[3 * i + 2] <= 0 else
                         (flat[3 * i] * sx, flat[3 * i + 1] * sy) for i in range(N_KEYPOINTS)))
    return out


def main_person(people: Sequence[Keypoints]) -> Optional[Keypoints]:
    """The person with the largest bounding box (the subject), or None."""
    def area(kps: Keypoints) -> float:
        pts = [p for p in kps if p is not None]
        if len(pts) < 2:
            return 0.0
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return (max(xs) - min(xs)) * (max(ys) - min(ys)) + len(pts)
    return max(people, key=area) if people else None


# -- rendering and parsing -----------------------------------------------------------

LIMB_DIM = 0.6
EDGE = 0.5  # OpenCV's fills take in the boundary pixels: ~half a pixel more all round


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


def render(keypoints: Sequence[Optional[Point]], width: int, height: int) -> Image:
    """The OpenPose control image of one skeleton on a width x height black canvas."""
    kps = _check(keypoints)
    buf = bytearray(b"\x00\x00\x00\xff" * (width * height))
    stick = stick_width(width, height)
    for index, (a, b) in enumerate(LIMBS):
        pa, pb = kps[a], kps[b]
        if pa is None or pb is None:
            continue
        length = math.hypot(pb[0] - pa[0], pb[1] - pa[1])
        angle = math.atan2(pb[1] - pa[1], pb[0] - pa[0])
        colour = bytes(int(c * LIMB_DIM) for c in COLOURS[index]) + b"\xff"
        _fill(buf, width, _ellipse_rows((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2,
                                        length / 2 + EDGE, stick + EDGE, angle, width, height),
              colour)
    for index, p in enumerate(kps):
        if p is not None:
            _fill(buf, width, _ellipse_rows(p[0], p[1], stick + EDGE, stick + EDGE, 0.0, width,
                                            height), bytes(COLOURS[index]) + b"\xff")
    return Image(width, height, bytes(buf))


def parse(image: Image, tolerance: int = 40) -> Keypoints:
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
