"""The pose skeleton as a GIMP path: one stroke per limb, keypoints in and out.

Everything else about OpenPose-18 skeletons (joint order, limbs, colours, the default
figure, mirroring, OpenPose JSON, rendering and parsing) lives in ``shared.pose``,
which the server uses too.

In GIMP the skeleton is a path with **one stroke per limb** (two anchors: the
limb's joints), so joints move with the Paths tool.  Several strokes share a
joint (the neck ends five limbs); when reading the path back, the anchor that
moved furthest from where the plug-in wrote it wins, so dragging any one copy of
a joint moves the joint.  What the plug-in wrote is kept with the path (a
parasite holding :func:`path_meta`), which also records which stroke is which limb.

Coordinates are layer pixels with pixel-centre coordinates (the first pixel's
centre is 0.0), as in ``shared.pose``; GIMP puts that centre at 0.5, so
:func:`layer_to_path` / :func:`path_to_layer` convert.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

from shared.pose import (N_KEYPOINTS, Joints, Point, PoseError, check_joints, limbs_present,
                         transformed)

from .problems import UsageError

META_FORMAT = "controlcanvas-pose"
PARASITE_NAME = "controlcanvas-pose"
PATH_NAME = "Pose skeleton"
MOVE_TOLERANCE = 0.01  # pixels: a joint closer than this to where it was written has not moved


def layer_to_path(keypoints: Sequence[Optional[Point]], x: int, y: int) -> Joints:
    """Layer pixel-centre coordinates → GIMP image coordinates (pixel centres at +0.5)."""
    return transformed(keypoints, dx=x + 0.5, dy=y + 0.5)


def path_to_layer(keypoints: Sequence[Optional[Point]], x: int, y: int) -> Joints:
    return transformed(keypoints, dx=-(x + 0.5), dy=-(y + 0.5))


# -- strokes ----------------------------------------------------------------------------

def stroke_points(a: Point, b: Point) -> List[float]:
    """A straight two-anchor Bezier stroke: control/anchor/control triples, as GIMP wants."""
    return [a[0], a[1]] * 3 + [b[0], b[1]] * 3


def to_strokes(keypoints: Sequence[Optional[Point]]) -> List[List[float]]:
    """One stroke per limb whose two joints are visible, in ``shared.pose.LIMBS`` order."""
    kps = check_joints(keypoints)
    return [stroke_points(kps[a], kps[b]) for a, b in limbs_present(kps)]


def anchors(points: Sequence[float]) -> List[Point]:
    """The anchors of a Bezier stroke's control/anchor/control point list."""
    if len(points) % 6:
        raise UsageError("A path stroke has a malformed point list.")
    return [(float(points[i + 2]), float(points[i + 3])) for i in range(0, len(points), 6)]


def path_meta(keypoints: Sequence[Optional[Point]]) -> str:
    """What is stored with a skeleton path: which stroke is which limb, and the joints."""
    kps = check_joints(keypoints)
    return json.dumps({"format": META_FORMAT, "version": 1,
                       "limbs": [list(limb) for limb in limbs_present(kps)],
                       "keypoints": [None if p is None else [p[0], p[1]] for p in kps]},
                      separators=(",", ":"))


def _parse_meta(meta: str) -> Tuple[Tuple[Tuple[int, int], ...], Joints]:
    try:
        data = json.loads(meta)
        if data.get("format") != META_FORMAT:
            raise ValueError("not a skeleton")
        limbs = tuple((int(a), int(b)) for a, b in data["limbs"])
        written = check_joints([None if p is None else (p[0], p[1]) for p in data["keypoints"]])
        if any(not (0 <= a < N_KEYPOINTS and 0 <= b < N_KEYPOINTS) for a, b in limbs):
            raise ValueError("bad limb")
    except (ValueError, KeyError, TypeError, AttributeError, PoseError):
        raise UsageError("The skeleton path's stored data is damaged; delete the path and run "
                         "the filter again to start from a new skeleton.") from None
    return limbs, written


def from_strokes(strokes: Sequence[Sequence[float]], meta: str,
                 path_name: str = PATH_NAME) -> Joints:
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
