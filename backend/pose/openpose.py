"""OpenPose body (and hand) detection with controlnet-aux's networks, keypoints only.

We build the networks ourselves and load their weights safely (:mod:`backend.weights`);
the skeleton is drawn by our own renderer (:func:`shared.pose.render`).
"""

from __future__ import annotations

import numpy as np

from .. import weights
from shared.pose import Person, Pose

BODY_FILES = ("body_pose_model.pth",)
HAND_FILE = "hand_pose_model.pth"  # optional companion of body_pose_model.pth


def build(paths):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model
    from controlnet_aux.open_pose import util

    def make(cls, net_cls, path):
        obj = cls.__new__(cls)
        obj.model = net_cls()
        if path is not None:
            obj.model.load_state_dict(util.transfer(obj.model, weights.load_weights(path)))
        obj.model.float().eval()
        return obj

    # the hand network is optional: built when its file is here (or for random weights)
    hand = None
    if weights.using_random_weights():
        hand = make(Hand, handpose_model, None)
    else:
        hand_path = weights.find_weight(HAND_FILE)
        if hand_path is not None:
            hand = make(Hand, handpose_model, str(hand_path))
    return OpenposeDetector(make(Body, bodypose_model, paths[0]), hand, None)


def detect_with(det, rgb: np.ndarray, hands: bool = False):
    """controlnet-aux OpenPose body (and hand) detection -> :class:`Pose`."""
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
        people.append(Person(
            body=triples(r.body.keypoints, 18),
            left_hand=triples(r.left_hand, 21) if r.left_hand else None,
            right_hand=triples(r.right_hand, 21) if r.right_hand else None))
    return Pose(width=w, height=h, people=tuple(people))


def ready() -> bool:
    """controlnet-aux is installed and the body weights are here (or random weights are on)."""
    return weights.aux_installed() and (weights.using_random_weights() or
                                        weights.weights_present(BODY_FILES))


def detector():
    """The cached controlnet-aux OpenPose detector (body + hand weights)."""
    return weights.cached_detector("openpose", BODY_FILES, build)
