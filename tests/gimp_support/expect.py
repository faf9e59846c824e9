"""What the server makes of a request, computed in-process: the expectations of the GIMP tests.

``generated`` mirrors backend.server.jobs (annotate the control units at the generation size,
then the engine); ``annotated`` is a preprocess job.  NoPoseEngine is a fake engine on a
server that cannot detect poses; PoseEngine one whose pose detector answers with the
default skeleton, as picture and as OpenPose JSON keypoints in the result's info, like
backend.annotators.builtin's pose_from_photo (the real detector needs MediaPipe).
"""

from __future__ import annotations

from dataclasses import replace

from backend.annotators.registry import Annotated
from backend.engines.base import NullContext
from backend.engines.fake import FakeEngine
from backend.annotators.controls import prepare_controls
from shared import pose as openpose
from shared.messages import Preprocess, new_job_id


def generated(request, images, engine=None):
    engine = engine or FakeEngine()
    if any(u.preprocessor != "none" or u.pose is not None for u in request.controls):
        size_of = getattr(engine, "control_size", None)
        request, images = prepare_controls(request, images,
                                           size_of(request) if size_of else None)
    return [g.image for g in engine.generate(request, images, NullContext())]


def annotated(annotator, image, **params):
    message = Preprocess(job_id=new_job_id(), annotator=annotator, image=0, params=params)
    return FakeEngine().preprocess(message, image, NullContext()).image


class NoPoseEngine(FakeEngine):
    def models(self):
        base = super().models()
        return replace(base, annotators=tuple(a for a in base.annotators
                                              if a.condition != "openpose"))


class PoseEngine(FakeEngine):
    def models(self):
        base = super().models()
        return replace(base, annotators=tuple(
            replace(a, available=True) if a.name == "pose_from_photo" else a
            for a in base.annotators))

    def preprocess(self, message, image, ctx):
        if message.annotator != "pose_from_photo":
            return super().preprocess(message, image, ctx)
        w, h = (message.width, message.height) if message.width else image.size
        person = openpose.default_person(w, h)
        found = openpose.Pose.from_people((person,), w, h)
        return Annotated(openpose.render_people((person,), w, h), {"keypoints": found.to_json()})
