"""``torch.compile`` for the UNet and the ControlNets, with a fixed-shape cache and a clean
fall back to eager.

:func:`compile_module` replaces a module's ``forward`` with a :class:`CompiledForward`:

* The module is compiled with ``dynamic=False`` (one specialised graph per input
  shape: the fastest code, and no symbolic-shape surprises).  At most ``shapes``
  distinct input signatures (shapes, dtypes, devices, and the values of plain Python
  arguments) get a compiled graph; a call with yet another signature runs eager, so a
  user who keeps changing the canvas size does not pay a compilation (tens of seconds
  on a GPU) every time.  The first call of each signature includes its compilation:
  its seconds are added to ``stats["compile_s"]``.
* If compiling or running the compiled graph fails for any reason but running out of
  memory (no C compiler, no Triton, an unsupported operator, a CUDA-graph problem...),
  the failure is logged once, the module runs eager from then on
  (``stats["compile_fallbacks"]``) and the call that failed is run again eagerly, so
  the job it belongs to still succeeds.  Out-of-memory errors are raised as they are:
  the engine's own retry handles them.
* :func:`uncompile` restores the module's own ``forward`` (model CPU offload wraps
  ``forward`` itself, so the engine uncompiles before turning offload on).

Cancel checks inside a compiled module are not possible (a Python hook in the middle of
a graph would break it), so :func:`is_compiled` tells ``pipelines.cancel_points`` to skip
its blocks: with compile on, a cancel lands at the end of the current step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, MutableMapping, Optional, Tuple

import torch

from .cache import is_out_of_memory

log = logging.getLogger(__name__)

_MARK = "_controlcanvas_compiled"


def _signature(value: Any) -> Any:
    """What a compiled graph is specialised on: tensor shapes/dtypes/devices, and the values
    of plain Python scalars (``dynamic=False`` guards on them too)."""
    if torch.is_tensor(value):
        return ("T", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, dict):
        return ("D", tuple(sorted((k, _signature(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("L", tuple(_signature(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


class CompiledForward:
    """A module's ``forward``: compiled per input signature (at most ``shapes`` of them),
    eager beyond that and after a failure.  See the module docstring."""

    def __init__(self, module: torch.nn.Module, label: str, *, mode: str = "default",
                 backend: str = "inductor", shapes: int = 4,
                 stats: Optional[MutableMapping[str, float]] = None,
                 compiler: Callable = torch.compile) -> None:
        self.eager = module.forward  # the module's own bound forward
        self.label = label
        self.limit = max(0, int(shapes))
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("compile_s", 0.0)
        self.stats.setdefault("compile_fallbacks", 0)
        self.seen: Dict[Tuple, float] = {}  # signature -> seconds of its first (compiling) call
        self.failed: Optional[str] = None
        self._full_noted = False
        try:
            options = {"backend": backend, "dynamic": False}
            if backend == "inductor":
                options["mode"] = mode
            self.compiled = compiler(self.eager, **options)
        except Exception as err:  # noqa: BLE001 - a bad mode/backend: serve eager
            self.compiled = None
            self._fail(err)

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            key = _signature((args, kwargs))
            if key in self.seen:
                return self._run_compiled(args, kwargs)
            if len(self.seen) < self.limit:
                return self._first_call(key, args, kwargs)
            if not self._full_noted:
                self._full_noted = True
                log.info("%s: %d input shapes compiled already; other shapes run eager",
                         self.label, self.limit)
        return self.eager(*args, **kwargs)

    def _first_call(self, key, args, kwargs):
        start = time.perf_counter()
        out = self._run_compiled(args, kwargs)
        if self.failed is None:
            seconds = time.perf_counter() - start
            self.seen[key] = seconds
            self.stats["compile_s"] = self.stats.get("compile_s", 0.0) + seconds
            log.info("%s: compiled for a new input shape in %.1f s", self.label, seconds)
        return out

    def _run_compiled(self, args, kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:
            if is_out_of_memory(err):
                raise
            self._fail(err)
        return self.eager(*args, **kwargs)  # the call that failed, eagerly

    def _fail(self, err: BaseException) -> None:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        self.failed = f"{type(err).__name__}: {first}"
        self.stats["compile_fallbacks"] = self.stats.get("compile_fallbacks", 0) + 1
        log.warning("torch.compile failed for the %s (%s); it runs eager from now on. Turn "
                    "compile off in config.toml ([engine] compile = false) to skip the "
                    "attempt.", self.label, self.failed)


def compile_module(module: torch.nn.Module, label: str, **options) -> CompiledForward:
    """Compile ``module`` in place (idempotent); returns its :class:`CompiledForward`."""
    current = module.__dict__.get("forward")
    if isinstance(current, CompiledForward):
        return current
    wrapper = CompiledForward(module, label, **options)
    module.forward = wrapper  # an instance attribute: nn.Module.__call__ uses it
    setattr(module, _MARK, True)
    return wrapper


def uncompile(module: torch.nn.Module) -> None:
    """Back to the module's own forward (no-op when it was not compiled)."""
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        del module.__dict__["forward"]
    module.__dict__.pop(_MARK, None)


def compiled_forward(module: Any) -> Optional[CompiledForward]:
    found = getattr(module, "__dict__", {}).get("forward")
    return found if isinstance(found, CompiledForward) else None


def is_compiled(module: Any) -> bool:
    """True while ``module`` runs through a compiled graph (not after a fallback)."""
    found = compiled_forward(module)
    return found is not None and found.failed is None
