"""OpenPose-18 skeletons in pure Python: SVG for Krita vector layers, back to keypoints,
and the coloured skeleton image the openpose ControlNets read.

Keypoint order (COCO-18, as the OpenPose ControlNets were trained): 0 nose, 1 neck,
2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right
hip/knee/ankle, 11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left
ear ("right" is the person's right).  A pose is a tuple of people; a person is 18
entries, each an ``(x, y)`` in document pixels or ``None`` (not visible).

In Krita the skeleton is a vector layer: one circle per joint with the SVG id
``cc-p<person>-j<index>-<name>`` and one line per limb ``cc-p<person>-l<a>-<b>``
(limbs under joints).  Krita turns the ids into shape names, so the artist moves
joint circles with the shape tools and :func:`keypoints_from_shapes` (shape names
and bounding boxes) or :func:`keypoints_from_svg` (the layer's ``toSvg()``) read
the pose back.  Only joints count when reading; limbs are redrawn from them.

SVG units: Krita reads ``width="Wpt"`` with ``viewBox="0 0 W H"`` as points, so
pixel coordinates are written as ``px * 72 / resolution``.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Point = Tuple[float, float]
Person = Tuple[Optional[Point], ...]
Pose = Tuple[Person, ...]

KEYPOINT_NAMES: Tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
N_KEYPOINTS = len(KEYPOINT_NAMES)
# The 17 limbs of an OpenPose image, in drawing (and colour) order.
LIMBS: Tuple[Tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
MIRROR: Tuple[int, ...] = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
LAYER_NAME = "Pose skeleton (ControlCanvas)"
_ID = re.compile(r"cc-p(\d+)-j(\d+)(?:-[a-z_]+)?\Z")


class PoseError(ValueError):
    """The skeleton cannot be read; the message says what to do."""


def _hue_wheel(n: int) -> Tuple[Tuple[int, int, int], ...]:
    out = []
    for i in range(n):
        h = i * 6.0 / n
        x = int(round(255 * (1 - abs(h % 2 - 1))))
        sextant = [(255, x, 0), (x, 255, 0), (0, 255, x), (0, x, 255), (x, 0, 255), (255, 0, x)]
        out.append(sextant[int(h) % 6])
    return tuple(out)


COLOURS = _hue_wheel(N_KEYPOINTS)

# A standing figure facing the viewer, 1 unit tall, x centred on 0, y down.
_DEFAULT_UNIT: Tuple[Point, ...] = (
    (0.0, 0.10), (0.0, 0.20),
    (-0.11, 0.21), (-0.15, 0.37), (-0.16, 0.52),
    (0.11, 0.21), (0.15, 0.37), (0.16, 0.52),
    (-0.07, 0.53), (-0.08, 0.75), (-0.08, 0.96),
    (0.07, 0.53), (0.08, 0.75), (0.08, 0.96),
    (-0.025, 0.08), (0.025, 0.08), (-0.05, 0.09), (0.05, 0.09),
)


def default_pose(width: int, height: int) -> Pose:
    """One standing figure filling ~90 % of the height, centred."""
    size = 0.9 * height
    left = width / 2.0
    top = (height - size) / 2.0
    return ((tuple((round(left + x * size, 2), round(top + y * size, 2))
                   for x, y in _DEFAULT_UNIT),))


def check_pose(pose: Sequence[Sequence[Optional[Point]]]) -> Pose:
    people = []
    for i, person in enumerate(pose):
        if len(person) != N_KEYPOINTS:
            raise PoseError(f"Person {i} has {len(person)} keypoints; OpenPose-18 needs "
                            f"{N_KEYPOINTS}.")
        people.append(tuple(None if p is None else (float(p[0]), float(p[1])) for p in person))
    return tuple(people)


def mirror(pose: Pose, width: int) -> Pose:
    """Flip left/right about the vertical centre line (names swap sides too)."""
    out = []
    for person in pose:
        flipped = [None if p is None else (width - p[0], p[1]) for p in person]
        out.append(tuple(flipped[MIRROR[i]] for i in range(N_KEYPOINTS)))
    return tuple(out)


def scale(pose: Pose, factor_x: float, factor_y: float) -> Pose:
    return tuple(tuple(None if p is None else (p[0] * factor_x, p[1] * factor_y) for p in person)
                 for person in pose)


def joint_id(person: int, index: int) -> str:
    return f"cc-p{person}-j{index:02d}-{KEYPOINT_NAMES[index]}"


def limb_id(person: int, a: int, b: int) -> str:
    return f"cc-p{person}-l{a:02d}-{b:02d}"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _num(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def to_svg(pose: Pose, width: int, height: int, resolution: float = 72.0) -> str:
    """An SVG document for ``VectorLayer.addShapesFromSvg`` (coordinates in points)."""
    pose = check_pose(pose)
    k = 72.0 / float(resolution or 72.0)
    w_pt, h_pt = width * k, height * k
    radius = max(2.0, 0.008 * max(width, height)) * k
    stroke = max(1.5, 0.006 * max(width, height)) * k
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(w_pt)}pt" '
             f'height="{_num(h_pt)}pt" viewBox="0 0 {_num(w_pt)} {_num(h_pt)}">']
    for n, person in enumerate(pose):
        for i, (a, b) in enumerate(LIMBS):
            pa, pb = person[a], person[b]
            if pa is None or pb is None:
                continue
            parts.append(f'<path id="{limb_id(n, a, b)}" d="M {_num(pa[0] * k)} {_num(pa[1] * k)} '
                         f'L {_num(pb[0] * k)} {_num(pb[1] * k)}" fill="none" '
                         f'stroke="{_hex(COLOURS[i])}" stroke-width="{_num(stroke)}" '
                         f'stroke-opacity="0.6"/>')
        for i, p in enumerate(person):
            if p is None:
                continue
            parts.append(f'<circle id="{joint_id(n, i)}" cx="{_num(p[0] * k)}" '
                         f'cy="{_num(p[1] * k)}" r="{_num(radius)}" fill="{_hex(COLOURS[i])}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def parse_joint_name(name: str) -> Optional[Tuple[int, int]]:
    """(person, keypoint index) for a joint shape name, None for anything else."""
    match = _ID.match(name.strip())
    if not match:
        return None
    person, index = int(match.group(1)), int(match.group(2))
    if index >= N_KEYPOINTS:
        return None
    return person, index


def _assemble(found: Dict[Tuple[int, int], Point]) -> Pose:
    if not found:
        raise PoseError("This layer has no ControlCanvas skeleton joints (shapes named "
                        "cc-p0-j00-nose ...); insert a pose skeleton first.")
    count = max(person for person, _ in found) + 1
    return tuple(tuple(found.get((n, i)) for i in range(N_KEYPOINTS)) for n in range(count)
                 if any((n, i) in found for i in range(N_KEYPOINTS)))


def keypoints_from_shapes(shapes: Iterable[Tuple[str, Tuple[float, float, float, float]]],
                          resolution: float = 72.0) -> Pose:
    """Keypoints (pixels) from (shape name, bounding box x, y, w, h in points)."""
    k = float(resolution or 72.0) / 72.0
    found: Dict[Tuple[int, int], Point] = {}
    for name, (x, y, w, h) in shapes:
        key = parse_joint_name(name)
        if key is not None:
            found[key] = ((x + w / 2.0) * k, (y + h / 2.0) * k)
    return _assemble(found)


# -- reading an SVG document (Krita's VectorLayer.toSvg()) ------------------------

Matrix = Tuple[float, float, float, float, float, float]  # a b c d e f
IDENTITY: Matrix = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
_TRANSFORM = re.compile(r"(matrix|translate|scale|rotate|skewX|skewY)\s*\(([^)]*)\)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _mul(m: Matrix, n: Matrix) -> Matrix:
    a, b, c, d, e, f = m
    a2, b2, c2, d2, e2, f2 = n
    return (a * a2 + c * b2, b * a2 + d * b2, a * c2 + c * d2, b * c2 + d * d2,
            a * e2 + c * f2 + e, b * e2 + d * f2 + f)


def parse_transform(text: str) -> Matrix:
    """An SVG ``transform`` attribute as one affine matrix."""
    m = IDENTITY
    for kind, args in _TRANSFORM.findall(text or ""):
        v = [float(x) for x in _NUMBER.findall(args)]
        if kind == "matrix" and len(v) == 6:
            t = tuple(v)
        elif kind == "translate" and v:
            t = (1.0, 0.0, 0.0, 1.0, v[0], v[1] if len(v) > 1 else 0.0)
        elif kind == "scale" and v:
            t = (v[0], 0.0, 0.0, v[1] if len(v) > 1 else v[0], 0.0, 0.0)
        elif kind == "rotate" and v:
            r = math.radians(v[0])
            t = (math.cos(r), math.sin(r), -math.sin(r), math.cos(r), 0.0, 0.0)
            if len(v) == 3:
                t = _mul(_mul((1.0, 0.0, 0.0, 1.0, v[1], v[2]), t),
                         (1.0, 0.0, 0.0, 1.0, -v[1], -v[2]))
        elif kind == "skewX" and v:
            t = (1.0, 0.0, math.tan(math.radians(v[0])), 1.0, 0.0, 0.0)
        elif kind == "skewY" and v:
            t = (1.0, math.tan(math.radians(v[0])), 0.0, 1.0, 0.0, 0.0)
        else:
            continue
        m = _mul(m, t)
    return m


def _apply(m: Matrix, x: float, y: float) -> Point:
    a, b, c, d, e, f = m
    return (a * x + c * y + e, b * x + d * y + f)


def _length(value: Optional[str]) -> float:
    if not value:
        return 0.0
    match = _NUMBER.match(value.strip())
    return float(match.group(0)) if match else 0.0


def _local_centre(el: ET.Element) -> Optional[Point]:
    tag = el.tag.rsplit("}", 1)[-1]
    g = el.get
    if tag in ("circle", "ellipse"):
        return (_length(g("cx")), _length(g("cy")))
    if tag == "rect":
        return (_length(g("x")) + _length(g("width")) / 2,
                _length(g("y")) + _length(g("height")) / 2)
    if tag == "path":
        nums = [float(x) for x in _NUMBER.findall(g("d") or "")]
        xs, ys = nums[0::2], nums[1::2]
        if not xs or not ys:
            return None
        # Krita writes circles as absolute cubic paths (M/C ... Z): the centre of the
        # control points' box is the circle's centre.
        return ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
    return None


def _viewbox_matrix(root: ET.Element, resolution: float) -> Matrix:
    """Map SVG user units to document pixels."""
    px_per_pt = float(resolution or 72.0) / 72.0
    width, height = root.get("width", ""), root.get("height", "")
    box = [float(x) for x in _NUMBER.findall(root.get("viewBox", ""))]
    if len(box) == 4 and box[2] > 0 and box[3] > 0 and width.endswith("pt"):
        sx = _length(width) / box[2] * px_per_pt
        sy = _length(height) / box[3] * px_per_pt
        return (sx, 0.0, 0.0, sy, -box[0] * sx, -box[1] * sy)
    return (px_per_pt, 0.0, 0.0, px_per_pt, 0.0, 0.0)


def keypoints_from_svg(svg: str, resolution: float = 72.0) -> Pose:
    """Keypoints (pixels) from an SVG document holding the skeleton's joint shapes."""
    try:
        root = ET.fromstring(svg.encode("utf-8") if isinstance(svg, str) else svg)
    except ET.ParseError as err:
        raise PoseError(f"The skeleton layer's SVG cannot be read ({err}).") from None
    found: Dict[Tuple[int, int], Point] = {}

    def walk(el: ET.Element, m: Matrix) -> None:
        m = _mul(m, parse_transform(el.get("transform", "")))
        key = parse_joint_name(el.get("id", ""))
        if key is not None:
            centre = _local_centre(el)
            if centre is not None:
                found[key] = _apply(m, *centre)
        for child in el:
            walk(child, m)

    walk_root = _viewbox_matrix(root, resolution)
    for child in root:
        walk(child, walk_root)
    return _assemble(found)


# -- rendering the OpenPose image ------------------------------------------------

def _span(cx: float, cy: float, r: float, y: float) -> Optional[Tuple[float, float]]:
    dy = y - cy
    if abs(dy) > r:
        return None
    dx = math.sqrt(max(0.0, r * r - dy * dy))
    return (cx - dx, cx + dx)


def _capsule_span(a: Point, b: Point, r: float, y: float) -> Optional[Tuple[float, float]]:
    """x-interval of row y inside the capsule (segment a-b, radius r); it is convex."""
    spans = [s for s in (_span(a[0], a[1], r, y), _span(b[0], b[1], r, y)) if s]
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy)
    if length > 1e-9:
        ux, uy = dx / length, dy / length
        # points with 0 <= (p-a).u <= length and |(p-a) x u| <= r
        lo, hi = -math.inf, math.inf
        ok = True
        for coef, const, low, high in ((ux, (y - a[1]) * uy, 0.0, length),
                                       (-uy, (y - a[1]) * ux, -r, r)):
            # coef * (x - ax) + const in [low, high]
            if abs(coef) < 1e-12:
                if not (low <= const <= high):
                    ok = False
                continue
            x1 = (low - const) / coef + a[0]
            x2 = (high - const) / coef + a[0]
            lo, hi = max(lo, min(x1, x2)), min(hi, max(x1, x2))
        if ok and lo <= hi and lo != -math.inf:
            spans.append((lo, hi))
    if not spans:
        return None
    return (min(s[0] for s in spans), max(s[1] for s in spans))


def _fill(buf: bytearray, width: int, height: int, spans_for_row, y0: float, y1: float,
          rgba: bytes) -> None:
    for y in range(max(0, int(math.floor(y0))), min(height, int(math.ceil(y1)) + 1)):
        span = spans_for_row(y + 0.5)
        if span is None:
            continue
        x0 = max(0, int(math.ceil(span[0] - 0.5)))
        x1 = min(width - 1, int(math.floor(span[1] - 0.5)))
        if x1 < x0:
            continue
        start = (y * width + x0) * 4
        buf[start:start + (x1 - x0 + 1) * 4] = rgba * (x1 - x0 + 1)


def render(pose: Pose, width: int, height: int) -> bytes:
    """The OpenPose control image (opaque RGBA8 bytes): black, limbs at 60 %, joints."""
    pose = check_pose(pose)
    buf = bytearray(b"\x00\x00\x00\xff" * (width * height))
    unit = max(width, height) / 512.0
    limb_r = max(1.0, 4.0 * unit)
    joint_r = max(1.5, 4.0 * unit)
    for person in pose:
        for i, (a, b) in enumerate(LIMBS):
            pa, pb = person[a], person[b]
            if pa is None or pb is None:
                continue
            colour = bytes(int(round(c * 0.6)) for c in COLOURS[i]) + b"\xff"
            _fill(buf, width, height, lambda y, pa=pa, pb=pb: _capsule_span(pa, pb, limb_r, y),
                  min(pa[1], pb[1]) - limb_r, max(pa[1], pb[1]) + limb_r, colour)
        for i, p in enumerate(person):
            if p is None:
                continue
            colour = bytes(COLOURS[i]) + b"\xff"
            _fill(buf, width, height, lambda y, p=p: _span(p[0], p[1], joint_r, y),
                  p[1] - joint_r, p[1] + joint_r, colour)
    return bytes(buf)


def keypoints_from_image(data: bytes, width: int, height: int, tolerance: int = 24) -> Pose:
    """Read one person's joints back from a rendered OpenPose image (joint colours).

    Each joint is the centroid of the pixels within ``tolerance`` of its colour; a
    limb is drawn at 60 % brightness, so it does not match a joint colour.
    """
    sums: List[List[float]] = [[0.0, 0.0, 0.0] for _ in range(N_KEYPOINTS)]
    lookup: Dict[bytes, int] = {}
    targets = [bytes(c) for c in COLOURS]
    mv = memoryview(data)
    for y in range(height):
        row = mv[y * width * 4:(y + 1) * width * 4]
        for x in range(width):
            px = bytes(row[x * 4:x * 4 + 3])
            if px == b"\x00\x00\x00":
                continue
            index = lookup.get(px)
            if index is None:
                index = -1
                for j, t in enumerate(targets):
                    if max(abs(px[0] - t[0]), abs(px[1] - t[1]), abs(px[2] - t[2])) <= tolerance:
                        index = j
                        break
                lookup[px] = index
            if index >= 0:
                s = sums[index]
                s[0] += x + 0.5
                s[1] += y + 0.5
                s[2] += 1
    person = tuple((s[0] / s[2], s[1] / s[2]) if s[2] else None for s in sums)
    if all(p is None for p in person):
        raise PoseError("No skeleton was found in the detected pose image.")
    return (person,)
