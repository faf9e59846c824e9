"""``[engine] quantize``: the denoiser (a DiT's transformer, else the UNet) stored in fewer
bits while it loads, through diffusers' quantization back-ends:

* ``"nf4"``: bitsandbytes 4-bit NF4 (``BitsAndBytesConfig(load_in_4bit=True)``);
* ``"int8"``: bitsandbytes 8-bit (LLM.int8);
* ``"fp8"``: torchao float8 weight-only (``TorchAoConfig(Float8WeightOnlyConfig())``);
* ``"none"`` (the default): as stored.

Only on CUDA, with the back-end's package installed, and for bases diffusers reads from a
folder (a hub snapshot, a local diffusers folder): :func:`choose` says whether it applies
and, when not, why, which the engine logs and ``doctor`` warns about; generation then goes
on unquantized, never fails for it.  A GGUF file is quantized already (``GGUF_NOTE``).
:mod:`.fit` sizes the denoiser at the chosen bytes per parameter.

No torch here: the choice is logic over a device type and which packages are importable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from shared.errors import ConfigError

CHOICES = ("none", "nf4", "int8", "fp8")
BACKEND = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "fp8": "torchao"}
GGUF_NOTE = "a GGUF file is quantized already"


def quantize_setting(value: Any) -> str:
    """The ``[engine] quantize`` value, checked: ConfigError naming the choices."""
    if value is None:
        return "none"
    if not isinstance(value, str) or value.lower() not in CHOICES:
        raise ConfigError(f"[engine] quantize must be one of "
                          f"{', '.join(repr(c) for c in CHOICES)}; got {value!r}.")
    return value.lower()


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Quantize:
    """What the engine does with ``[engine] quantize``."""
    setting: str          # one of CHOICES: what config.toml asks
    active: bool = False  # the denoiser does load quantized
    reason: str = ""      # why not, when asked but not active

    @property
    def backend(self) -> str:
        return BACKEND.get(self.setting, "")

    def label(self) -> str:
        """For ``doctor`` and ``engine_info``: ``nf4 (bitsandbytes)``, ``none``, or
        ``nf4 asked, off: <reason>``."""
        if self.active:
            return f"{self.setting} ({self.backend})"
        if self.setting == "none":
            return "none"
        return f"{self.setting} asked, off: {self.reason}"


def choose(setting: str, device_type: str,
           has_package: Callable[[str], bool] = package_available) -> Quantize:
    """Whether ``setting`` applies on a ``device_type`` device ("cuda", "cpu", "mps")."""
    setting = quantize_setting(setting)
    if setting == "none":
        return Quantize(setting)
    if device_type != "cuda":
        return Quantize(setting, reason=f"{BACKEND[setting]} quantization needs a CUDA GPU "
                                        f"(this engine runs on {device_type}); loading as "
                                        f"stored")
    if not has_package(BACKEND[setting]):
        return Quantize(setting, reason=f"the {BACKEND[setting]} package is not installed "
                                        f"(pip install {BACKEND[setting]}); loading as stored")
    return Quantize(setting, active=True)


def denoiser(family_is_dit: bool) -> str:
    """The component quantized: a DiT family's transformer, else the UNet."""
    return "transformer" if family_is_dit else "unet"
