"""Pose detection from photos: OpenPose via controlnet-aux's networks (openpose) or
MediaPipe (detect).  The pose model itself (people, OpenPose JSON, geometry, rendering,
parsing) is the protocol's, :mod:`shared.pose`, shared with the plug-ins."""
