"""The annotators this backend offers: the built-in ones and the controlnet-aux wrappers,
registered explicitly into one :class:`~.registry.Registry` on first use."""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

from shared.images import Image
from shared.messages import AnnotatorInfo, Preprocess

from . import aux, builtin
from .registry import Annotated, Annotator, Registry, Size


@functools.lru_cache(maxsize=None)
def registry() -> Registry:
    """The registry, filled on first use: weight-free annotators, then controlnet-aux ones
    (registering imports nothing heavy)."""
    reg = Registry()
    builtin.register_all(reg.register)
    aux.register_all(reg.register)
    return reg


def get(name: str) -> Annotator:
    return registry().get(name)


def list_annotators() -> Tuple[AnnotatorInfo, ...]:
    """Every annotator, weight-free ones first, as the protocol lists them."""
    return registry().infos()


def run_with_info(name: str, image: Image, params: Optional[Mapping[str, Any]] = None,
                  size: Optional[Size] = None) -> Tuple[Image, Dict[str, Any]]:
    """:meth:`Registry.run_with_info` on this backend's annotators."""
    return registry().run_with_info(name, image, params, size)


def run(name: str, image: Image, params: Optional[Mapping[str, Any]] = None,
        size: Optional[Size] = None) -> Image:
    """Run annotator ``name`` on ``image``; the result is ``size`` (default: the image's)."""
    return run_with_info(name, image, params, size)[0]


def annotate(message: Preprocess, image: Image, ctx) -> Annotated:
    """A ``preprocess`` job for any engine: the annotator at the requested size (or the
    layer's); ``none`` without a size hands the layer back untouched."""
    ctx.progress(0, 1, stage="preprocess")
    size = (message.width, message.height) if message.width else None
    if message.annotator == "none" and size is None:
        out, info = image, {}
    else:
        out, info = run_with_info(message.annotator, image, message.params, size)
    ctx.progress(1, 1, stage="preprocess")
    return Annotated(out, info)
