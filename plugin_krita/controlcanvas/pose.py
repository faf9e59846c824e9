"""The pose skeleton as a Krita vector layer: SVG shapes in, keypoints out.

Everything else about OpenPose-18 skeletons (joint order, limbs, colours, the default
figure, mirroring, OpenPose JSON, rendering and parsing) lives in ``shared.pose``
(reached through :mod:`proto`), which the server uses too.  A pose here is a
``shared.pose.People``: a tuple of people, each 18 entries ``(x, y)`` or ``None``,
in document pixels with pixel-centre coordinates (the first pixel's centre is 0.0).

In Krita the skeleton is a vector layer: one circle per joint with the SVG id
``cc-p<person>-j<index>-<name>`` and one line per limb ``cc-p<person>-l<a>-<b>``
(limbs under joints).  Krita turns the ids into shape names, so the artist moves
joint circles with the shape tools and :func:`keypoints_from_shapes` (shape names
and bounding boxes) or :func:`keypoints_from_svg` (the layer's ``toSvg()``) read
the pose back.  Only joints count when reading; limbs are redrawn from them.

Units: Krita's shape coordinates put a pixel's centre at +0.5 (:data:`CENTRE`), and
Krita reads ``width="Wpt"`` with ``viewBox="0 0 W H"`` as points, so pixel
coordinates are written as ``(px + 0.5) * 72 / resolution``.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, Optional, Tuple

from .proto import pose as openpose

Point = openpose.Point
People = openpose.People
PoseError = openpose.PoseError
COLOURS = openpose.COLOURS
KEYPOINT_NAMES = openpose.KEYPOINT_NAMES
N_KEYPOINTS = openpose.N_KEYPOINTS
LIMBS = openpose.LIMBS

LAYER_NAME = "Pose skeleton (ControlCanvas)"
CENTRE = 0.5  # where Krita's shape coordinates put a pixel's centre
_ID = re.compile(r"cc-p(\d+)-j(\d+)(?:-[a-z_]+)?\Z")


def default_pose(width: int, height: int) -> People:
    """One standing figure centred on the document."""
    return (openpose.default_person(width, height),)


def joint_id(person: int, index: int) -> str:
    return f"cc-p{person}-j{index:02d}-{KEYPOINT_NAMES[index]}"


def limb_id(person: int, a: int, b: int) -> str:
    return f"cc-p{person}-l{a:02d}-{b:02d}"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _num(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def to_svg(pose: People, width: int, height: int, resolution: float = 72.0) -> str:
    """An SVG document for ``VectorLayer.addShapesFromSvg`` (coordinates in points)."""
    pose = openpose.check_people(pose)
    k = 72.0 / float(resolution or 72.0)
    w_pt, h_pt = width * k, height * k
    radius = max(2.0, 0.008 * max(width, height)) * k
    stroke = max(1.5, 0.006 * max(width, height)) * k

    def pt(value: float) -> str:
        return _num((value + CENTRE) * k)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(w_pt)}pt" '
             f'height="{_num(h_pt)}pt" viewBox="0 0 {_num(w_pt)} {_num(h_pt)}">']
    for n, person in enumerate(pose):
        for a, b in openpose.limbs_present(person):
            pa, pb = person[a], person[b]
            parts.append(f'<path id="{limb_id(n, a, b)}" d="M {pt(pa[0])} {pt(pa[1])} '
                         f'L {pt(pb[0])} {pt(pb[1])}" fill="none" '
                         f'stroke="{_hex(COLOURS[LIMBS.index((a, b))])}" '
                         f'stroke-width="{_num(stroke)}" stroke-opacity="0.6"/>')
        for i, p in enumerate(person):
            if p is None:
                continue
            parts.append(f'<circle id="{joint_id(n, i)}" cx="{pt(p[0])}" cy="{pt(p[1])}" '
                         f'r="{_num(radius)}" fill="{_hex(COLOURS[i])}"/>')
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


def _assemble(found: Dict[Tuple[int, int], Point]) -> People:
    """People from joint centres in Krita's units (pixels, centres at +0.5)."""
    if not found:
        raise PoseError("This layer has no ControlCanvas skeleton joints (shapes named "
                        "cc-p0-j00-nose ...); insert a pose skeleton first.")
    found = {key: (x - CENTRE, y - CENTRE) for key, (x, y) in found.items()}
    count = max(person for person, _ in found) + 1
    return tuple(tuple(found.get((n, i)) for i in range(N_KEYPOINTS)) for n in range(count)
                 if any((n, i) in found for i in range(N_KEYPOINTS)))


def keypoints_from_shapes(shapes: Iterable[Tuple[str, Tuple[float, float, float, float]]],
                          resolution: float = 72.0) -> People:
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


def keypoints_from_svg(svg: str, resolution: float = 72.0) -> People:
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
