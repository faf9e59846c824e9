"""Poses in the backend: the OpenPose-18 model with hands and face, its JSON, rendering and
parsing (model); detection from photos (detect: OpenPose via controlnet-aux in openpose, or
MediaPipe)."""
