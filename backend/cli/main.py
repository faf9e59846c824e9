"""``controlcanvas`` command line.

serve · generate · train · demo · models [download] · preprocess · pose · doctor ·
install-plugin · setup · bench.  Every command that fails prints one line saying what to
do (and its error code), never a traceback: :func:`main` turns our typed errors, bad
settings and OS errors (a full disk, a folder that cannot be written) into that line;
``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from shared import loopback
from shared.messages import CONDITIONS
from shared.errors import ConfigError, ControlCanvasError, LimitError

from ..bench import main as bench
from ..engines.base import engine_info, info_line
from ..engines.catalogue import (EDIT_FAMILIES, UNION_MODELS, Catalogue, ModelConfig,
                                 download_command)
from ..engines.factory import ENGINES, create_engine
from ..imaging import load_input_image, size_problem
from ..server.config import (DEFAULT_HOST, DEFAULT_PORT, build_config, default_token_file,
                             is_loopback_host, server_token)
from ..server.local import ServerThread
from ..server.scale import serving_engine
from ..server.websocket import run_server
from . import doctor, install
from . import setup as setup_extras
from .demo import run_demo
from .preprocess import add_parsers as add_preprocess_parsers
from .preprocess import parse_size, write_result

log = logging.getLogger("controlcanvas")


def _server_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    overrides = {
        "host": args.host, "port": args.port, "token_file": args.token_file,
        "engine": args.engine, "max_image_side": args.max_image_side,
        "max_pixels": args.max_pixels, "max_queue": args.max_queue,
        "step_seconds": args.step_seconds, "store_dir": args.store_dir,
        "devices": args.devices, "ray": True if args.ray else None,
        "ray_address": args.ray_address,
    }
    engine_options = {"device": args.device, "dtype": args.dtype,
                      "offload": True if args.offload else None,
                      "cpu_threads": args.cpu_threads,
                      "fast_path": False if args.no_fast_path else None,
                      "compile": True if args.compile else None,
                      "vae_precision": args.vae_precision, "sdxl_vae": args.sdxl_vae,
                      "lora_dir": args.lora_dir,
                      "config_file": args.config}
    overrides["engine_options"] = {k: v for k, v in engine_options.items() if v is not None}
    if args.host is not None and not is_loopback_host(args.host):
        overrides["allow_remote"] = True
    return overrides


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; any other "
                        "value makes the server reachable from the network)")
    parser.add_argument("--port", type=int, help="port (default 7351; 0 picks a free one)")
    parser.add_argument("--token-file", type=Path, help="where the access token lives "
                        "(default: token in the user config folder)")
    parser.add_argument("--engine", choices=ENGINES, help="diffusers (default): your models; "
                        "demo: the embedded trained demo model (a coloured shape from its "
                        "outline); tiny: random-weight tiny models (tests); fake: test pixels "
                        "without torch")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--devices", help="several GPUs: one worker per device, e.g. "
                        "cuda:0,cuda:1, or all (docs/remote.md#several-gpus)")
    parser.add_argument("--ray", action="store_true", help="generate on a Ray Serve "
                        "deployment (the scale extra; docs/remote.md#several-hosts)")
    parser.add_argument("--ray-address", help="Ray cluster to join (auto: the one this "
                        "machine belongs to; default: start Ray here)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                        help="weights precision (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--offload", action="store_true",
                        help="model CPU offload: less VRAM, slower (CUDA only)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="CUDA: leave attention, QKV fusion and memory format as diffusers "
                        "sets them (the fast path is on by default on CUDA, off on the CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and ControlNets (CUDA): faster steps, but "
                        "the first image at each new size waits about a minute")
    parser.add_argument("--vae-precision", choices=["auto", "fp32", "model"],
                        help="VAE in fp32 (no black images) or in the model's dtype; auto "
                        "(default): fp32 where fp16 overflows (SDXL)")
    parser.add_argument("--sdxl-vae", metavar="PATH_OR_ID",
                        help="an fp16-fix SDXL VAE (e.g. madebyollin/sdxl-vae-fp16-fix) used "
                        "instead of the model's own")
    parser.add_argument("--cpu-threads", type=_positive_int,
                        help="torch CPU threads (default: one per core; fewer keeps a CPU "
                        "server responsive when the machine is busy)")
    parser.add_argument("--lora-dir", type=Path, help="folder of LoRA .safetensors files "
                        "(default: [models] lora_dir in config.toml, else models/loras in the "
                        "data folder; `controlcanvas models` shows it)")
    parser.add_argument("--max-image-side", type=int, help="largest image side accepted")
    parser.add_argument("--max-pixels", type=int, help="largest pixel count accepted")
    parser.add_argument("--max-queue", type=int, help="most jobs waiting at once")
    parser.add_argument("--step-seconds", type=float, help="fake engine: seconds per step")
    parser.add_argument("--store-dir", help="folder where queued jobs and uncollected results "
                        "survive a restart or crash (default: jobs in the user cache folder; "
                        "'none' keeps them in memory only)")
    parser.add_argument("--config", type=Path, help="TOML config file ([server] table)")


def cmd_serve(args: argparse.Namespace) -> int:

    config = build_config(_server_overrides(args), args.config)
    token, created = server_token(config)
    engine = serving_engine(config)
    _warn_without_cuda(engine)

    def ready(server) -> None:
        print(f"ControlCanvas server listening on {server.url} (engine: {engine.name})",
              flush=True)
        info = engine_info(engine)
        if info:
            print(f"Engine settings: {info_line(info)}", flush=True)
        print(f"Token file: {config.token_file}", flush=True)
        if created:  # shown once; later starts only name the file
            print(f"New access token (also in the token file): {token}", flush=True)
        if config.remote_allowed:
            print("Reachable from other machines: clients need the token in the token file.",
                  flush=True)

    try:
        asyncio.run(_serve_until_stopped(run_server(config, engine, token, ready=ready)))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        print(f"controlcanvas: cannot listen on {config.host}:{config.port}: {err}. Is another "
              f"server running? Choose another --port.", file=sys.stderr)
        return 2
    return 0


async def _serve_until_stopped(serving) -> None:
    """Run ``serving`` until SIGINT (Ctrl+C) or SIGTERM (a service manager, ``kill``), then
    close the server properly: jobs checkpointed, clients told. The handlers are set
    explicitly because a server started in the background of a script inherits SIGINT
    ignored, and SIGTERM would otherwise end it without closing anything."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(serving)
    stop = {}

    def on_signal(sig: int) -> None:
        stop.setdefault("sig", sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, not main thread
            pass
    try:
        await task
    except asyncio.CancelledError:
        if "sig" not in stop:
            raise
        log.info("stopping on %s", signal.Signals(stop["sig"]).name)


def _warn_without_cuda(engine) -> None:
    if getattr(engine, "name", "") == "demo":  # 64-pixel model: quick on any CPU
        return
    device = getattr(engine, "device", None)
    if device is not None and getattr(device, "type", "") != "cuda":
        print("No CUDA GPU in use: running on the CPU, which takes minutes per image at "
              "SD1.5 size. With an NVIDIA GPU, install the CUDA build of torch (see README).",
              file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), engine=args.engine)


def _parse_control(text: str):
    """CONDITION=FILE[:WEIGHT][@PREPROCESSOR] -> (condition, path, weight, preprocessor)."""
    if "=" not in text:
        raise ValueError(f"--control {text!r}: use CONDITION=FILE[:WEIGHT][@ANNOTATOR], e.g. "
                         f"lineart=sketch.png:0.8@lineart_from_drawing")
    condition, rest = text.split("=", 1)
    preprocessor = "none"
    if "@" in rest:
        rest, preprocessor = rest.rsplit("@", 1)
    weight = 1.0
    head, _, tail = rest.rpartition(":")
    if head and not Path(rest).exists():
        try:
            weight = float(tail)
            rest = head
        except ValueError:
            pass
    return condition, Path(rest), weight, preprocessor


def _parse_lora(text: str):
    """NAME[:STRENGTH] -> (name, strength); strength 1 when not given."""
    name, sep, strength = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(strength)
    except ValueError:
        raise ValueError(f"--lora {text!r}: use NAME[:STRENGTH], e.g. ink_style:0.8 (NAME as "
                         f"`controlcanvas models` lists it)") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """One generation through the same request object and socket path as the plug-ins."""
    from shared.client import Client
    from shared.messages import ControlUnit, GenerateRequest, LoraRef, Progress


    size = parse_size(args.size) if args.size else None
    if size and size_problem(*size):
        raise LimitError(f"--size {size[0]}x{size[1]} is {size_problem(*size)}; choose a "
                         f"smaller size.", field="size")
    images = {}
    controls = []
    for text in args.control or []:
        condition, path, weight, preprocessor = _parse_control(text)
        slot = len(images)
        images[slot] = load_input_image(path, size)  # size limits checked from the header
        controls.append(ControlUnit(condition=condition, image=slot, weight=weight,
                                    preprocessor=preprocessor))
    init = mask = None
    if args.init:
        init = len(images)
        images[init] = load_input_image(args.init, size)
    if args.mask:
        mask = len(images)
        images[mask] = load_input_image(args.mask, size)
    if size:
        width, height = size
    elif init is not None or images:
        width, height = images[init if init is not None else 0].size
    else:
        width = height = 512
    mode = "inpaint" if mask is not None else "img2img" if init is not None else "txt2img"
    request = GenerateRequest(
        width=width, height=height, mode=mode, prompt=args.prompt,
        negative_prompt=args.negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
        sampler=args.sampler, strength=args.strength, batch=args.batch,
        base_model=args.base or "", init_image=init, mask_image=mask,
        controls=tuple(controls), hires=args.hires,
        loras=tuple(LoraRef(name, strength) for name, strength in map(_parse_lora,
                                                                       args.lora or [])))

    def show(event) -> None:
        if isinstance(event, Progress) and event.total:
            sys.stderr.write(f"\r{event.stage} {event.step}/{event.total}")
            sys.stderr.flush()

    def run(client) -> None:
        result = client.wait(client.submit(request, images), on_event=show)
        sys.stderr.write("\n")
        out = Path(args.output)
        for i, (meta, image) in enumerate(result.images):
            if out.is_dir() or args.output.endswith(("/", os.sep)):
                path = out / f"generated-seed{meta.seed}.png"
            else:
                path = out if len(result.images) == 1 else \
                    out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
            path = write_result(path, image)
            print(f"{path} seed {meta.seed} ({image.width}x{image.height})")

    if args.url:
        with Client.connect(args.url, _token_for(args), client="controlcanvas-generate") as client:
            run(client)
        return 0
    # the in-process server serves only this command: --base may be any path of yours
    engine = create_engine(args.engine, device=args.device, config_file=args.config,
                           trust_request_paths=True, lora_dir=args.lora_dir)
    _warn_without_cuda(engine)
    with ServerThread(engine) as server, \
            Client.connect(server.url, server.token, client="controlcanvas-generate") as client:
        run(client)
    return 0


def _token_for(args: argparse.Namespace) -> str:
    """With --url: --token, else the local token file, and that only for a server on this
    computer (``shared.loopback``); TokenNeeded for a server elsewhere without --token,
    TokenFileError (missing, a link, ...: shared.paths' rule) when the file cannot be used."""
    choice = loopback.choose_token(args.url, args.token or "", entered_source="--token",
                                   enter_it="pass its token with --token")
    if choice.problem is not None:
        raise choice.problem
    return choice.token_or_raise()


def cmd_train(args: argparse.Namespace) -> int:
    """Train a ControlNet: in this process, or as a job of a running server (--url).

    In this process --data, --base and --out may be any paths of the user's (it is their
    shell); as a server job they are names inside the server's training folders and its
    models (backend.training.folders), as for every client. Either way --out must be new,
    empty, or (with --resume) a run this trainer made."""
    fields = dict(data=str(args.data), base=args.base, out=str(args.out), steps=args.steps,
                  batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule,
                  lr_warmup_steps=args.lr_warmup_steps, resolution=args.resolution,
                  prompt_drop=args.prompt_drop, mixed_precision=args.mixed_precision,
                  gradient_checkpointing=args.grad_checkpointing, resume=args.resume)
    if args.url:
        from shared.client import Client
        from shared.messages import Progress

        token = _token_for(args)

        def show(event) -> None:
            if isinstance(event, Progress) and event.total:
                sys.stderr.write(f"\r{event.stage} {event.step}/{event.total}")
                sys.stderr.flush()

        with Client.connect(args.url, token, client="controlcanvas-train") as client:
            result = client.wait(client.train(**fields), on_event=show)
        sys.stderr.write("\n")
        print(f"trained ControlNet: {result.info.get('out')}")
        return 0
    from ..training.controlnet import ConsoleProgress, TrainConfig, train_controlnet
    config = TrainConfig(**{**fields, "resume": "latest" if args.resume else None},
                         validation_every=args.validation_every, seed=args.seed,
                         checkpoint_every=args.checkpoint_every)
    out = train_controlnet(config, progress=ConsoleProgress())
    print(f"trained ControlNet: {out} (use it with [controlnets] CONDITION = \"{out}\" in "
          f"config.toml, or as a control unit's model)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:

    catalogue = Catalogue(ModelConfig.from_toml(args.config))
    if args.action == "download":
        return _download(catalogue, args)
    sizes, unreachable = catalogue.download_sizes() if args.sizes else ({}, "")
    entries = catalogue.entries()
    for entry in entries:
        where = entry.source if entry.present else f"missing: {download_command(entry.name)}"
        if entry.name in sizes:
            where += f"; {sizes[entry.name]}"
        served = entry.conditions or tuple(c for c in entry.condition.split(",") if c)
        several = len(served) > 1 and entry.kind == "controlnet"  # a union or shared model
        what = "base (edit)" if entry.edit else "controlnet union" \
            if several and entry.name in UNION_MODELS else entry.kind \
            if several or not entry.condition else f"{entry.kind} {entry.condition}"
        print(f"{'✓' if entry.present else '✗'} {entry.family:6} {what:22} {entry.name}  "
              f"({where})")
        edit_only = entry.edit and entry.family not in EDIT_FAMILIES  # Kontext, Qwen-Image-Edit
        if entry.kind == "base" and served and not edit_only or several:
            print(f"{'':31}{'serves' if several else 'controls'}: {_conditions_text(served)}")
        if entry.edit:
            print(f"{'':31}edit mode: an instruction applied to a layer, with references")
    if not args.sizes and any(not e.present and e.source == "hub" for e in entries):
        print("Download sizes: `controlcanvas models --sizes` asks the hub.")
    if unreachable:
        print(f"Download sizes unknown: {unreachable}")
    _print_loras(catalogue)
    _print_presets(catalogue)
    _print_references(catalogue)
    return 0


def _print_references(catalogue: Catalogue) -> None:
    """The IP-Adapters for reference units: downloaded, or the command that fetches them."""
    from ..engines.references import download_command as fetch, listing

    print("IP-Adapters (reference units; the tiny bases have built-in ones):")
    for name, family, present, modes in listing(catalogue.config.cache_dir):
        where = "ready" if present else f"missing: {fetch(name)}"
        kind = "ip-adapter face" if modes == "face" else "ip-adapter"
        print(f"{'✓' if present else '✗'} {family:5} {kind:22} {name}  ({where}; {modes})")


def _print_presets(catalogue: Catalogue) -> None:
    """The few-step presets (live painting): ready, or the command that fetches them."""
    print("Few-step presets (live painting, docs/live.md):")
    for info in catalogue.models_message().presets:
        where = "ready" if info.present else f"missing: {info.download}"
        licence = "" if info.commercial else ", non-commercial"
        steps = f"preset {info.steps} step{'' if info.steps == 1 else 's'}"
        print(f"{'✓' if info.present else '✗'} {info.family:5} {steps:22} {info.name}  "
              f"({where}{licence})")


def _conditions_text(conditions) -> str:
    """``every condition``, ``every condition but shuffle`` or the list."""
    missing = [c for c in CONDITIONS if c not in conditions]
    if not missing:
        return "every condition"
    if len(missing) <= 3:
        return f"every condition but {', '.join(missing)}"
    return ", ".join(conditions)


def _download(catalogue: Catalogue, args: argparse.Namespace) -> int:
    """``models download NAME``: what it fetches and how big, then the transfer with
    huggingface_hub's progress bars (``--dry-run``: only say it)."""
    if not args.name:
        raise ValueError("controlcanvas models download NAME: name a hub id, sd15, sdxl, "
                         "a condition (lineart), sdxl:CONDITION or a preset (lcm-sd15)")
    if args.dry_run:
        print(f"would download {catalogue.download_plan(args.name).describe()}")
        return 0
    path = catalogue.download(args.name, on_plan=lambda plan: print(
        f"downloading {plan.describe()}", flush=True))
    print(f"{args.name}: ready in {path}")
    return 0


def _print_loras(catalogue: Catalogue) -> None:
    """The LoRA folder's files: family (from the file's tensors) and size."""
    loras = catalogue.loras.scan()
    print(f"LoRAs in {catalogue.loras.folder}"
          f"{'' if catalogue.loras.folder.is_dir() else ' (no such folder yet)'}:")
    if not loras:
        print("  none: put LoRA .safetensors files there (or set [models] lora_dir in "
              "config.toml, or serve --lora-dir)")
    for lora in loras:
        print(f"✓ {lora.family:5} {'lora ' + _size(lora.size):22} {lora.name}")


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    if nbytes < 1_000_000:
        return f"{nbytes / 1e3:.1f} KB"
    return f"{nbytes / 1e6:.1f} MB"


def cmd_bench(args: argparse.Namespace) -> int:
    result = bench.run(args.name, args)
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return doctor.main(args.token_file or default_token_file(), args.host or DEFAULT_HOST,
                       args.port or DEFAULT_PORT)


def _build_bundle(editor: str, out: Path) -> Path:
    """Build the plug-in bundle from this source checkout (packaging/build.py)."""
    import importlib.util
    script = Path(__file__).resolve().parents[2] / "packaging" / "build.py"
    if not script.is_file():
        raise SystemExit("controlcanvas: this installation has no packaging/build.py; download "
                         "the plug-in zip from the release page and pass it with --from ZIP.")
    spec = importlib.util.spec_from_file_location("controlcanvas_packaging_build", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    try:
        folder, _archive = module.BUILDERS[editor](out, module.default_cache())
    except module.BuildError as err:
        raise SystemExit(f"controlcanvas: cannot build the {editor} plug-in: {err}") from None
    return folder


def cmd_install_plugin(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.source or _build_bundle(args.editor, Path(tmp))
        installer = install.install_krita if args.editor == "krita" else install.install_gimp
        for done in installer(Path(bundle), args.profile_dir):
            print(f"Installed the {done.editor} plug-in in {done.path}")
            print(f"Next: {done.next_steps}")
    return 0


def _add_generate(sub) -> None:
    """``controlcanvas generate``: one image."""
    p = sub.add_parser("generate", help="one image from the command line (same path as the "
                       "plug-ins)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative", default="")
    p.add_argument("--control", action="append", metavar="COND=FILE[:W][@ANNOTATOR]",
                   help="a control unit, e.g. lineart=sketch.png:0.8@lineart_from_drawing "
                   "(repeat for several)")
    p.add_argument("--init", type=Path, help="img2img: the canvas image")
    p.add_argument("--mask", type=Path, help="inpaint: the selection mask (white = change)")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--size", help="WxH (default: the first image's size)")
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="dpmpp_2m_karras")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--base", help="base model: hub id, folder, single file, tiny-sd15")
    p.add_argument("--hires", action="store_true", help="add a full-size detail pass")
    p.add_argument("--lora", action="append", metavar="NAME[:STRENGTH]",
                   help="a LoRA of the server's LoRA folder, e.g. ink_style:0.8 (repeat for "
                   "several; `controlcanvas models` lists them)")
    p.add_argument("--engine", default="diffusers", choices=ENGINES)
    p.add_argument("--device")
    p.add_argument("--lora-dir", type=Path, help="without --url: the LoRA folder")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--url", help="use a running server (ws://...) instead of one in-process")
    p.add_argument("--token", help="with --url: the server's token (default, for a server "
                   "on this computer only: its token file)")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_generate)


def _add_train(sub) -> None:
    """``controlcanvas train``: a ControlNet on your pairs."""
    p = sub.add_parser("train", help="train a ControlNet on your own (condition, target) pairs")
    p.add_argument("--data", type=Path, required=True, help="dataset folder: source/, target/ "
                   "and prompt.json lines (fill50k layout), or pairs by file name (with "
                   "--url: a folder inside the server's training data folder)")
    p.add_argument("--base", required=True, help="base model: folder, single file or name "
                   "(with --url: one the server offers)")
    p.add_argument("--out", type=Path, required=True, help="output folder: new or empty, or "
                   "the run to continue with --resume (with --url: a name inside the "
                   "server's training output folder)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant, or a cosine decay to 0 at the last step")
    p.add_argument("--lr-warmup-steps", type=int, default=0,
                   help="linear warm-up from 0 over this many steps")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--prompt-drop", type=float, default=0.5,
                   help="share of prompts replaced by \"\" (the paper: 0.5)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--validation-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="run as a job of a running server (ws://...)")
    p.add_argument("--token", help="with --url: the server's token (default, for a server "
                   "on this computer only: its token file)")
    p.set_defaults(func=cmd_train)


def _add_tools(sub) -> None:
    """``doctor``, ``install-plugin`` and ``bench``."""
    p = sub.add_parser("doctor", help="check the installation, one line per item")
    p.add_argument("--token-file", type=Path)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install-plugin", help="install the Krita or GIMP plug-in")
    p.add_argument("editor", choices=["krita", "gimp"])
    p.add_argument("--profile-dir", type=Path, help="the editor's resource/config folder "
                   "(Krita: the folder holding pykrita/; GIMP: e.g. ~/.config/GIMP/3.0); "
                   "default: every one found")
    p.add_argument("--from", dest="source", type=Path,
                   help="a built bundle (folder or zip) instead of building from source")
    p.set_defaults(func=cmd_install_plugin)

    p = sub.add_parser("bench", help="print one benchmark's figures as JSON")
    p.add_argument("name", choices=list(bench.BENCHES))
    p.add_argument("--repeats", type=int, default=15, help="transport: timed rounds")
    p.add_argument("--side", type=int, default=2048, help="transport: image side")
    p.add_argument("--cases", type=int, default=10_000, help="soak: fuzz cases")
    p.add_argument("--crashes", type=int, default=100,
                   help="soak: times the server is killed and restarted (crash_restart)")
    p.add_argument("--clients", type=int, default=100, help="soak: disconnecting clients")
    p.add_argument("--dry-run", action="store_true", help="gpu: the same code on the CPU "
                   "with the tiny models, in seconds (automatic without CUDA)")
    p.add_argument("--groups", default="sd15,sdxl", help="gpu: which of sd15, sdxl, compiled "
                   "(comma-separated; compiled adds torch.compile's first-image cost)")
    p.add_argument("--deadline", type=float, default=420.0, help="gpu: seconds after which "
                   "the remaining cases are skipped (and listed as skipped)")
    p.add_argument("--compile-mode", default="default", help="gpu: torch.compile mode of "
                   "the compiled group (default, reduce-overhead, max-autotune...)")
    p.add_argument("--out", help="gpu: also write the JSON here after each group")
    p.add_argument("--work-dir", help="gpu: where the built models go (kept, and reused by "
                   "a later run; default: a temporary folder)")
    p.add_argument("--seconds", type=float, default=30.0, help="live: seconds the scripted "
                   "artist draws per engine")
    p.add_argument("--rate", type=float, default=10.0, help="live: edits per second")
    p.add_argument("--engines", default="tiny,demo", help="live: which engines (tiny, demo; "
                   "comma-separated)")
    p.add_argument("--no-contention", action="store_true", help="live: skip the part with "
                   "another client's long job")
    p.add_argument("--workers", default="1,2,4", help="scale: worker counts to compare")
    p.add_argument("--clients-at-once", type=int, default=6, help="scale: clients")
    p.add_argument("--jobs", type=int, default=8, help="scale: jobs per client")
    p.add_argument("--steps", type=int, default=10, help="scale: steps per job")
    p.add_argument("--step-seconds", type=float, default=0.02,
                   help="scale: the fake engine's seconds per step")
    p.add_argument("--scale-engine", choices=["fake", "tiny"], default="fake",
                   help="scale: fake (fixed step time) or tiny (CPU-bound steps)")
    p.add_argument("--no-ray", action="store_true",
                   help="scale: skip the Ray Serve comparison")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlcanvas",
                                     description="ControlNet for the editors you paint in.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the "
                        "libraries' warnings (quiet by default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the websocket server the plug-ins talk to")
    _add_server_options(p)
    p.set_defaults(func=cmd_serve)

    _add_generate(sub)
    _add_train(sub)

    p = sub.add_parser("demo", help="the whole editor path on the embedded default model")
    p.add_argument("--out", default="out/demo", help="folder for the canvas and result PNGs")
    p.add_argument("--engine", default="demo", choices=ENGINES)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list configured models, or download one")
    p.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--sizes", action="store_true",
                   help="list: ask the hub how big each missing model's download is")
    p.add_argument("--dry-run", action="store_true",
                   help="download: say which files and how big, fetch nothing")
    p.set_defaults(func=cmd_models)

    add_preprocess_parsers(sub)

    _add_tools(sub)
    setup_extras.add_parser(sub)
    return parser


_CHATTY_LIBRARIES = ("transformers", "diffusers", "websockets", "huggingface_hub", "PIL",
                     "urllib3", "httpx", "accelerate")


def quiet_libraries(verbose: bool) -> None:
    """Library warnings and info off by default (errors still show); ``-v`` shows them all.
    Python warnings are filtered for the CLI process only."""
    import warnings

    if verbose:
        return
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # read at their import
        os.environ.setdefault(name, "error")
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_libraries(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become a user's line
        line, code = failure_line(err)
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"controlcanvas: {line}", file=sys.stderr)
        return code


def failure_line(err: BaseException) -> tuple:
    """(one line for the user, exit code) for an error that ends a command: 2 for a bad
    setting, 1 for anything else. Tracebacks are for ``-v`` only."""
    if isinstance(err, ConfigError):
        return f"{err.message} [{err.code}]", 2
    if isinstance(err, ControlCanvasError):
        return f"{err.message} [{err.code}]", 1
    if isinstance(err, OSError):
        what = (err.strerror or type(err).__name__).rstrip(".")
        where = f": {err.filename}" if err.filename else ""
        return (f"{what}{where}. Check that the path exists and that you may write there "
                f"(and that the disk is not full); -v shows the details."), 1
    if isinstance(err, ValueError):  # a bad value given on the command line
        return f"{err}", 2
    return (f"unexpected error ({type(err).__name__}: {err}). This is a bug; run the command "
            f"again with -v for the details and report them."), 1


if __name__ == "__main__":
    sys.exit(main())
