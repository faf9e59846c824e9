"""``controlcanvas doctor``: one line per thing that must be right, and what to do.

Exit code 1 when something blocks generation (Python too old, torch or diffusers
unusable, the default base model missing, the token file unsafe); warnings (no
CUDA, port taken, plug-ins not installed, ControlNets not downloaded) keep it 0.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from shared.errors import ConfigError, ControlCanvasError

from ..engines.catalogue import DEFAULT_BASES, Catalogue, ModelConfig, download_command
from ..engines.requirements import DIFFUSERS_FLOOR, TORCH_FLOOR, floor_text, release
from .install import installed_plugins

OK, WARN, FAIL = "ok", "warn", "fail"
_MARKS = {OK: ("✓", "32"), WARN: ("!", "33"), FAIL: ("✗", "31")}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def line(self, colour: bool) -> str:
        mark, code = _MARKS[self.status]
        if colour:
            mark = f"\033[{code}m{mark}\033[0m"
        return f"{mark} {self.name}: {self.detail}"


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 10):
        return Check("python", FAIL, f"{version}; ControlCanvas needs Python 3.10 or newer")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch() -> List[Check]:
    try:
        import torch
    except Exception as err:  # broken installs raise more than ImportError
        return [Check("torch", FAIL, f"cannot import torch ({err}); install the CUDA build "
                      f"from pytorch.org first, then `pip install controlcanvas`")]
    if release(torch.__version__) < TORCH_FLOOR:
        return [Check("torch", FAIL, f"{torch.__version__} is too old; need "
                      f"{floor_text(TORCH_FLOOR)} or newer: install a newer build from "
                      f"pytorch.org")]
    checks = [Check("torch", OK, f"{torch.__version__}")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        vram = props.total_memory / 2**30
        status = OK if vram >= 5.5 else WARN
        hint = "" if status == OK else " (under 6 GiB: use --offload and smaller canvases)"
        checks.append(Check("cuda", status, f"{props.name}, {vram:.1f} GiB VRAM, CUDA "
                            f"{torch.version.cuda}{hint}"))
    elif torch.version.cuda is None:
        checks.append(Check("cuda", WARN, "this torch is a CPU-only build: generation runs on "
                            "the CPU and is very slow. With an NVIDIA GPU install the CUDA "
                            "build of torch (see the README)"))
    else:
        checks.append(Check("cuda", WARN, f"torch was built for CUDA {torch.version.cuda} but "
                            f"no GPU is usable (driver missing or too old?): CPU only, slow"))
    return checks


def check_diffusers() -> Check:
    try:
        import diffusers
    except Exception as err:
        return Check("diffusers", FAIL, f"cannot import diffusers ({err}); "
                     f"`pip install -U diffusers`")
    if release(diffusers.__version__) < DIFFUSERS_FLOOR:
        return Check("diffusers", FAIL, f"{diffusers.__version__} is too old; need "
                     f"{floor_text(DIFFUSERS_FLOOR)} or newer: `pip install -U diffusers`")
    return Check("diffusers", OK, diffusers.__version__)


def check_models() -> List[Check]:

    try:
        catalogue = Catalogue(ModelConfig.from_toml())
        entries = catalogue.entries()
    except Exception as err:
        return [Check("models", FAIL, f"the model configuration is invalid: {err}")]
    default = catalogue.default_base
    base = next((e for e in entries if e.kind == "base" and e.name == default), None)
    checks = []
    if base is not None and base.present:
        checks.append(Check("base model", OK, f"{default} ({base.source})"))
    elif configured_engine() != "diffusers":  # the demo (or a test engine) needs no base
        checks.append(Check("base model", WARN, f"optional with the configured "
                            f"{configured_engine()} engine: {default} is not on this machine; "
                            f"for your own prompts at full size: `{download_command(default)}`"))
    else:
        checks.append(Check("base model", FAIL, f"{default} is not on this machine, which "
                            f"blocks generating with the diffusers engine (the server's "
                            f"default): `{download_command(default)}` (or set [models] base in "
                            f"config.toml to a local file or folder). The embedded demo needs "
                            f"none: `controlcanvas serve --engine demo`"))
    nets = [e for e in entries if e.kind == "controlnet" and e.family == (base.family
                                                                           if base else "sd15")]
    present = [e for e in nets if e.present]
    missing = [e for e in nets if not e.present]
    if not missing:
        checks.append(Check("controlnets", OK, f"all {len(nets)} present"))
    else:
        first = [e for e in missing if e.condition in ("lineart", "openpose", "scribble")] \
            or missing
        checks.append(Check("controlnets", WARN, (
            f"{len(present)} of {len(nets)} present; missing e.g. {first[0].condition}: "
            f"`{download_command(first[0].name)}`")))
    return checks


def check_fast_path() -> Check:
    """Device, precision and the fast-path choices ``serve`` would apply (config.toml's
    ``[engine]`` table), and whether the optional preview/VAE models are here."""
    from ..engines.base import info_line
    from ..server.config import build_config

    try:
        config = build_config({})
    except Exception as err:  # noqa: BLE001 - a broken config file
        return Check("fast path", FAIL, f"config.toml cannot be read: {err}")
    if config.engine == "fake":
        return Check("fast path", OK, "the fake engine runs no model")
    from ..engines.diffusers.acceleration import TAESD_REPOS, planned_settings

    try:
        info = planned_settings(config.engine_options)
    except ValueError as err:
        return Check("fast path", FAIL, f"config.toml [engine]: {err}")
    notes = []
    if info["previews"] == "taesd":
        catalogue = Catalogue(ModelConfig.from_toml())
        missing = [repo for family, repo in TAESD_REPOS.items()
                   if not config.engine_options.get(f"taesd_{family}")
                   and catalogue.cached_snapshot(repo, "controlnet") is None]
        if missing:
            notes.append(f"no TAESD for {', '.join(missing)} (previews use the latent "
                         f"approximation; for sharper ones: `{download_command(missing[0])}`)")
    if not str(info["device"]).startswith("cuda"):
        notes.append("the fast path is for CUDA GPUs")
    detail = info_line(info) + ("; " + "; ".join(notes) if notes else "")
    return Check("fast path", OK, detail)


def check_fit() -> Check:
    """How the default base would be loaded (backend/engines/fit.py): all on the GPU, model
    or sequential CPU offload, or that it does not fit (and the variant that would)."""
    from ..engines import fit
    from ..server.config import build_config

    config = build_config({})
    if config.engine != "diffusers":
        return Check("loading", OK, f"the {config.engine} engine loads no large model")
    from ..engines.diffusers.acceleration import choose_device, choose_dtype, dtype_name
    from ..engines.diffusers.devices import available_ram, free_bytes

    options = config.engine_options
    device = choose_device(options.get("device"))
    if device.type != "cuda":
        return Check("loading", OK, f"on {device}: the whole model in RAM")
    setting = options.get("offload", "auto")
    if setting is not None and setting != "auto":
        return Check("loading", OK, f"offload = {str(setting).lower()} in [engine] (no plan)")
    catalogue = Catalogue(ModelConfig.from_toml())
    name, path = catalogue.default_base, ""
    family = next((f for f, n in DEFAULT_BASES.items() if n == name), "sd15")
    try:
        resolved = catalogue.resolve_base()
        family, path = resolved.family, resolved.path
    except ControlCanvasError:  # not downloaded: its family's real size ("base model" says)
        pass
    dtype = dtype_name(choose_dtype(options.get("dtype"), True))
    try:
        plan = fit.plan_base(name, family, path, dtype, free_bytes(str(device)),
                             available_ram(), quantize=_quantized(options, device.type))
    except ControlCanvasError as err:
        return Check("loading", FAIL, err.message)
    status = WARN if plan.choice == "sequential" else OK
    return Check("loading", status, f"{name}: {plan.line()}")


def check_quantize() -> Check:
    """``[engine] quantize`` (backend/engines/quantize.py): what the engine will do with
    it here; a warning when it is asked but cannot apply (no CUDA, package missing)."""
    from ..engines import quantize
    from ..server.config import build_config

    config = build_config({})
    if config.engine != "diffusers":
        return Check("quantize", OK, f"the {config.engine} engine loads no large model")
    from ..engines.diffusers.acceleration import choose_device

    options = config.engine_options
    try:
        choice = quantize.choose(options.get("quantize"),
                                 choose_device(options.get("device")).type)
    except ConfigError as err:
        return Check("quantize", FAIL, err.message)
    if choice.reason:
        return Check("quantize", WARN, f"[engine] quantize = {choice.setting!r}: "
                     f"{choice.reason}")
    detail = choice.label() + ("" if choice.active else " (the denoiser as stored; GGUF "
                               "files stay quantized)")
    return Check("quantize", OK, detail)


def configured_engine() -> str:
    """The engine ``controlcanvas serve`` would use with this machine's config and env."""
    from ..server.config import build_config
    try:
        return build_config({}).engine
    except Exception:  # noqa: BLE001 - a broken config file is reported by serve itself
        return "diffusers"


def _quantized(options, device_type: str) -> str:
    """The ``[engine] quantize`` the engine would apply ("none" when it cannot)."""
    from ..engines import quantize

    try:
        choice = quantize.choose(options.get("quantize"), device_type)
    except ConfigError:
        return "none"  # check_quantize says what is wrong
    return choice.setting if choice.active else "none"


def check_token(path: Path) -> Check:
    """The token file as the server would read it (server.config's rules: no link, not
    readable by others, long enough)."""
    from shared.errors import ConfigError, TokenFileError
    from shared.paths import load_token_file

    from ..server.config import check_token_strength, loose_permissions

    if not os.path.lexists(path):
        return Check("token", OK, f"none yet; `controlcanvas serve` creates {path}")
    try:
        token = load_token_file(path)
        check_token_strength(token, f"in {path}")
    except (TokenFileError, ConfigError) as err:
        return Check("token", FAIL, err.message)
    mode = loose_permissions(path)
    if mode:
        return Check("token", FAIL, f"{path} is readable by others (mode {mode:o}); "
                     f"`chmod 600 {path}`")
    return Check("token", OK, f"{path} (mode {stat.S_IMODE(path.stat().st_mode):o})")


def check_port(host: str, port: int) -> Check:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            return Check("port", WARN, f"{host}:{port} is in use ({err.strerror}): a server may "
                         f"already run there, or choose another --port")
    return Check("port", OK, f"{host}:{port} is free")


def check_plugins() -> Check:

    found = installed_plugins()
    if not found:
        return Check("plug-ins", WARN, "none installed: `controlcanvas install-plugin krita` "
                     "or `controlcanvas install-plugin gimp`")
    broken = [f for f in found if f.next_steps]
    if broken:
        return Check("plug-ins", FAIL, f"{broken[0].path}: {broken[0].next_steps}; run "
                     f"`controlcanvas install-plugin {broken[0].editor}` again")
    return Check("plug-ins", OK, ", ".join(f"{f.editor} in {f.path}" for f in found))


def check_annotators() -> Check:
    from importlib import metadata
    try:
        version = metadata.version("controlnet-aux")
    except metadata.PackageNotFoundError:
        return Check("annotators", WARN, "the controlnet-aux extra is not installed (HED, "
                     "depth, normals... unavailable): `controlcanvas setup annotators`")
    return Check("annotators", OK, f"controlnet-aux {version}")


def check_loras() -> Check:
    """The LoRA folder and what it holds; LoRAs need peft (diffusers' LoRA backend)."""
    from importlib import metadata
    try:
        folder = Catalogue(ModelConfig.from_toml()).loras
    except Exception as err:
        return Check("loras", FAIL, f"the model configuration is invalid: {err}")
    loras = folder.scan()
    try:
        metadata.version("peft")
    except metadata.PackageNotFoundError:
        return Check("loras", WARN if loras else OK,
                     f"{len(loras)} in {folder.folder}; using them needs peft: "
                     f"`pip install peft`")
    if not loras:
        return Check("loras", OK, f"none; put LoRA .safetensors files in {folder.folder}")
    counts: dict = {}
    for lora in loras:
        counts[lora.family] = counts.get(lora.family, 0) + 1
    kinds = ", ".join(f"{n} {family}" for family, n in sorted(counts.items()))
    return Check("loras", OK, f"{len(loras)} in {folder.folder} ({kinds})")


def check_pose_helper() -> Check:
    from ..pose.detect import mediapipe_python
    python = mediapipe_python()
    if python is None:
        return Check("pose helper", WARN, "MediaPipe not set up (pose from photo needs it "
                     "without the OpenPose weights): `controlcanvas setup pose`")
    return Check("pose helper", OK, f"MediaPipe python {python}")


def run_checks(token_file: Path, host: str, port: int) -> List[Check]:
    checks: List[Check] = [check_python()]
    for run in (check_torch, check_diffusers, check_models, check_fast_path, check_fit,
                check_quantize):
        result = _guard(run)
        checks.extend(result if isinstance(result, list) else [result])
    checks.append(check_token(token_file))
    checks.append(check_port(host, port))
    checks.append(check_plugins())
    checks.extend(_guard(run) for run in (check_loras, check_annotators, check_pose_helper))
    return checks


def _guard(run: Callable):
    try:
        return run()
    except Exception as err:  # a check must never crash the doctor
        return Check(run.__name__.replace("check_", ""), FAIL, f"check failed: {err}")


def main(token_file: Path, host: str, port: int, colour: Optional[bool] = None) -> int:
    colour = sys.stdout.isatty() if colour is None else colour
    checks = run_checks(token_file, host, port)
    for check in checks:
        print(check.line(colour))
    blocking = [c for c in checks if c.status == FAIL]
    print(f"{len(blocking)} blocking problem(s)" if blocking else "ready")
    return 1 if blocking else 0
