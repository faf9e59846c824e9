"""ControlNet training: datasets, the trainer, the tiny demo model and its metrics.

``import backend.training`` is cheap; torch and diffusers load when a trainer is
used.  Public names:

* :class:`TrainConfig`, :func:`train_controlnet`, :class:`TrainProgress`
  (:mod:`.controlnet`) — train a ControlNet on a dataset folder;
* :func:`find_pairs`, :class:`DatasetError` (:mod:`.dataset`, :mod:`.errors`);
* :mod:`.shapes` — the synthetic shapes dataset; :mod:`.tiny_base` — the
  from-scratch tiny base; :mod:`.demo_model` — the committed demo model's recipe;
  :mod:`.fidelity` and :mod:`.cost` — what ``bench fidelity`` / ``bench train-cost`` run.
"""

from __future__ import annotations

from typing import Any

from .dataset import Pair, find_pairs
from .errors import DatasetError, Problem, TrainingError

_LAZY = {"TrainConfig": "controlnet", "TrainProgress": "controlnet",
         "train_controlnet": "controlnet", "TinyBaseConfig": "tiny_base",
         "train_tiny_base": "tiny_base"}

__all__ = ["DatasetError", "Pair", "Problem", "TrainingError", "find_pairs", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
