"""What each Filters ▸ ControlNet procedure does, written against :class:`host.Host`.

Shape of every action: read what is needed from the editor (main thread), talk
to the server on a worker thread (:mod:`worker`), then change the image in one
undo group (main thread).  Nothing in the image changes unless the job succeeded.

:func:`run` is the single entry point; it turns every failure into
:class:`Failed`, whose message is the sentence GIMP shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from shared import doc_history, geometry, naming
from shared import pose as openpose
from shared.client import Client
from shared.messages import (CONDITIONS, MAX_EDIT_REFERENCES, GenerateRequest, Progress,
                             Queued)
from shared.offers import Offers, family_label, format_loras

from . import generation, pose, procedures, settings, worker
from .generation import GenerateOptions
from .host import Host, NewLayer
from .problems import PoseUnavailable, UsageError, describe
from .procedures import ProcedureSpec
from .settings import Connection

CONNECT_TIMEOUT = 10.0
REFERENCE_SIDE = 512  # a reference layer is sent at most this big (the CLIP encoder reads 224)
POSE_ANNOTATOR = "pose_from_photo"  # backend.preprocess: photo → rendered OpenPose skeleton
# The history record keeps every argument of a generating procedure under "arg.NAME", so
# Repeat last can run it again; never these (the connection, and what the entry has).
ARG_PREFIX = "arg."
NOT_KEPT = ("server-url", "token", "prompt", "negative-prompt", "seed")
# Settings kept by records older than the "arg." keys: the argument each one was.
SUMMARY_ARGS = {"condition": "condition", "steps": "steps", "cfg": "cfg",
                "sampler": "sampler", "batch": "batch", "base_model": "base-model",
                "control_weight": "control-weight", "size": "size", "strength": "strength"}

Connect = Callable[[Connection, str], Client]


def default_connect(conn: Connection, client_name: str) -> Client:
    return Client.connect(conn.url, conn.token, client=client_name, timeout=CONNECT_TIMEOUT)


@dataclass
class Outcome:
    """What a procedure returns to GIMP (and to tests)."""

    seed: int = -1
    seeds: Tuple[Optional[int], ...] = ()
    layer: Any = None  # the first new layer, or the new group
    path: Any = None
    report: str = ""
    request: Optional[GenerateRequest] = None


class Failed(Exception):
    """A procedure failed; ``message`` says what happened and what to do."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause

    @property
    def is_bug(self) -> bool:
        """True when the cause is not an error the plug-in expects (log its traceback)."""
        from shared.errors import ControlCanvasError
        return not isinstance(self.cause, (ControlCanvasError, OSError, TimeoutError))


@dataclass
class _Run:
    spec: ProcedureSpec
    host: Host
    values: Dict[str, Any]
    connect: Connect
    conn: Optional[Connection] = None
    doing: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    note: str = ""  # said with the result: the base emulates its control units (Offers)

    def connection(self) -> Connection:
        saved = settings.load_saved(self.host.settings_path())
        self.conn = settings.resolve(self.values, saved)
        return self.conn

    def open(self) -> Client:
        return self.connect(self.conn, self.host.client_name())


def run(spec: ProcedureSpec, host: Host, values: Mapping[str, Any],
        connect: Connect = default_connect) -> Outcome:
    """Run procedure ``spec`` with argument ``values``; raises :class:`Failed`."""
    ctx = _Run(spec, host, {}, connect)
    try:
        ctx.values = procedures.check_values(spec, values)
        return ACTIONS[spec.action](ctx)
    except Exception as err:
        conn = ctx.conn
        raise Failed(describe(err, url=conn.url if conn else "",
                              token_source=conn.token_source if conn else "",
                              action=ctx.doing), err) from err


class Reporter:
    """Server events → GIMP's progress bar (called on the main thread).

    The text names the stage and, while denoising, starts with "Step N/M" and, once
    two steps have come in, about how long is left.  There are no picture previews: a
    preview layer would be written into the artist's image at every update (undo
    history, a dirty image), and it would stay there when Cancel on the progress bar
    ends the plug-in process, which runs no clean-up.  So the plug-in does not ask
    the server for previews either.
    """

    def __init__(self, host: Host, what: str, clock: Callable[[], float] = time.monotonic):
        self.host, self.what, self.clock = host, what, clock
        self.first: Optional[Tuple[float, int]] = None  # (time, step) of the first step seen

    def __call__(self, event: Any) -> None:
        host, what = self.host, self.what
        if isinstance(event, Queued):
            host.progress(text=f"ControlCanvas: waiting in the server's queue "
                               f"(position {event.position})")
        elif isinstance(event, Progress):
            if event.stage == "preprocess":
                host.progress(text="ControlCanvas: preparing the control image…")
            elif event.total > 0:
                # the step first: GIMP's status bar shows only the start of a long text
                host.progress(text=f"Step {event.step}/{event.total}"
                                   f"{self._time_left(event.step, event.total)} · {what} "
                                   f"(ControlCanvas)",
                              fraction=min(1.0, event.step / event.total))
            else:
                host.progress(text=f"ControlCanvas: {what}…", fraction=0.0)

    def _time_left(self, step: int, total: int) -> str:
        now = self.clock()
        if self.first is None or step < self.first[1]:
            self.first = (now, step)
            return ""
        then, first_step = self.first
        if step == first_step or step >= total:
            return ""
        left = (now - then) / (step - first_step) * (total - step)
        return f", ~{max(1, round(left))} s left" if left < 90 else \
            f", ~{round(left / 60)} min left"


# -- the actions --------------------------------------------------------------------

def generate(ctx: _Run) -> Outcome:
    """Generate from layer / Colourise line art / Figure from pose."""
    opts = GenerateOptions.from_values(ctx.values)
    host = ctx.host
    layer = host.active_layer()
    new_skeleton = skeleton = None
    if opts.condition == "openpose" and ctx.values.get("pose-source") == "path":
        found = host.find_skeleton()
        if found is None:  # start from a default figure filling the layer
            local = openpose.default_person(layer.width, layer.height)
            new_skeleton = pose.layer_to_path(local, layer.x, layer.y)
        else:
            local = pose.path_to_layer(pose.from_strokes(found.strokes, found.meta, found.name),
                                       layer.x, layer.y)
        # The keypoints themselves: the server draws them at the size it generates at.
        skeleton = openpose.to_message((local,), layer.width, layer.height)
        images = {}
    else:
        images = {0: host.read_pixels(layer)}
    request, result = _run_job(ctx, opts, (layer.width, layer.height), images, "generating",
                               pose=skeleton)
    return _add_results(ctx, layer, (0, 0, layer.width, layer.height), request, result,
                        new_skeleton=new_skeleton)


def inpaint(ctx: _Run) -> Outcome:
    """Regenerate selection: repaint the selected pixels of the layer, nothing else."""
    opts = GenerateOptions.from_values(ctx.values)
    host = ctx.host
    layer = host.active_layer()
    bounds = host.selection_bounds(layer)
    if bounds is None:
        raise UsageError(f"Select the part of {layer.name!r} to regenerate first (any "
                         f"selection tool), then run Regenerate selection again: only the "
                         f"selected pixels change.")
    box = geometry.context_box(bounds, layer.width, layer.height)
    coverage = host.read_selection(layer, box)
    images = {0: host.read_pixels(layer, box), 1: generation.mask_image(box[2], box[3],
                                                                        coverage)}
    request, result = _run_job(ctx, opts, box[2:], images, "regenerating the selection",
                               inpaint_strength=ctx.values["strength"])
    return _add_results(ctx, layer, box, request, result, mask=coverage)


def edit(ctx: _Run) -> Outcome:
    """Edit with instruction: the layer (or its selection) changed as the instruction says,
    as a new layer; outside a selection nothing changes."""
    host, values = ctx.host, ctx.values
    layer = host.active_layer()
    bounds = host.selection_bounds(layer)
    coverage = None
    if bounds is None:
        box = (0, 0, layer.width, layer.height)
        images = {0: host.read_pixels(layer)}
    else:
        box = geometry.context_box(bounds, layer.width, layer.height)
        coverage = host.read_selection(layer, box)
        images = {0: host.read_pixels(layer, box),
                  1: generation.mask_image(box[2], box[3], coverage)}
    slots = _edit_references(host, values["reference-layers"], images)
    seed = generation.choose_seed(_last_seed(host) if values["seed"] == generation.SAME_SEED
                                  else values["seed"], values["batch"])
    conn = ctx.connection()
    host.progress(text=f"ControlCanvas: connecting to {conn.url}", fraction=0.0)
    ctx.doing = "while editing"

    def work(emit):
        with ctx.open() as client:
            request = generation.build_edit_request(
                values, box[2], box[3], seed=seed, masked=coverage is not None,
                reference_slots=slots, models=client.models(), limits=client.welcome.limits)
            job = client.submit(request, images, cancel_on_disconnect=True)
            return request, client.wait(job, on_event=emit)

    request, result = worker.run(work, Reporter(host, "editing"))
    return _add_results(ctx, layer, box, request, result, mask=coverage)


def _edit_references(host: Host, names: str, images) -> Tuple[int, ...]:
    """The 'Reference layers' argument (comma-separated names): each layer's picture in
    the next free image slot; their slots."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if len(wanted) > MAX_EDIT_REFERENCES:
        raise UsageError(f"'Reference layers' names {len(wanted)} layers; an edit takes at "
                         f"most {MAX_EDIT_REFERENCES}. Remove {len(wanted) - MAX_EDIT_REFERENCES}.",
                         field="reference-layers")
    slots = []
    for name in wanted:
        layer = host.find_layer(name)
        if layer is None:
            raise UsageError(f"There is no layer called {name!r} in this image for 'Reference "
                             f"layers'; type the names of layers that hold the pictures, "
                             f"separated by commas, or leave it blank.", field="reference-layers")
        slot = max(images, default=-1) + 1
        images[slot] = host.read_scaled(layer, REFERENCE_SIDE)
        slots.append(slot)
    return tuple(slots)


def _run_job(ctx: _Run, opts: GenerateOptions, size, images, what: str, **extra):
    """Connect, build the request for a region of ``size`` with the server's models and
    limits, send it with ``images`` and wait, progress on GIMP's bar; (request, result)."""
    if opts.seed == generation.SAME_SEED:
        opts = replace(opts, seed=_last_seed(ctx.host))
    seed = generation.choose_seed(opts.seed, opts.batch)
    reference = _reference(ctx.host, opts, images)
    if reference is not None:
        extra["reference_slot"] = reference
    conn = ctx.connection()
    ctx.host.progress(text=f"ControlCanvas: connecting to {conn.url}", fraction=0.0)
    ctx.doing = f"while {what}"

    def work(emit):
        with ctx.open() as client:
            models = client.models()
            request = generation.build_request(opts, size[0], size[1], seed=seed,
                                               models=models,
                                               limits=client.welcome.limits, **extra)
            job = client.submit(request, images, cancel_on_disconnect=True)
            note = Offers(models).control_note(opts.base_model) if request.controls else ""
            return request, client.wait(job, on_event=emit), note

    request, result, ctx.note = worker.run(work, Reporter(ctx.host, what))
    return request, result


def _reference(host: Host, opts: GenerateOptions, images) -> Optional[int]:
    """The 'Reference layer' argument: that layer's picture in the next free image slot
    (its slot), or None without one (or at weight 0)."""
    name = opts.reference_layer
    if not name or opts.reference_weight <= 0:
        return None
    layer = host.find_layer(name)
    if layer is None:
        raise UsageError(f"There is no layer called {name!r} in this image for 'Reference "
                         f"layer'; type the name of the layer that holds the reference "
                         f"picture, or leave it blank.", field="reference-layer")
    image = host.read_scaled(layer, REFERENCE_SIDE)
    if image.is_transparent():
        raise UsageError(f"The reference layer {name!r} is empty; paste the reference picture "
                         f"into it, or name another layer.", field="reference-layer")
    slot = max(images, default=-1) + 1
    images[slot] = image
    return slot


def stored_history(host: Host) -> list:
    """The image's history entries (newest first); a damaged or foreign record is
    ignored with a message in GIMP, never an error."""
    try:
        entries, problem = doc_history.decode(host.read_history())
    except Exception as err:  # GIMP refused the parasite
        entries, problem = [], f"The image's ControlCanvas history could not be read ({err})."
    if problem:
        host.message(problem)
    return entries


def _last_seed(host: Host) -> int:
    entries = stored_history(host)
    seed = entries[0].seed if entries else None
    if seed is None:
        raise UsageError("Seed -2 repeats the seed of this image's last ControlCanvas result, "
                         "but the image has none stored; use -1 for a random seed or type "
                         "one.", field="seed")
    return seed


def _store_history(ctx: _Run, request: GenerateRequest, seeds, names) -> None:
    """Add this result to the record kept in the image (a parasite saved in the .xcf)."""
    host, values = ctx.host, ctx.values
    summary = {"procedure": ctx.spec.name, "condition": values.get("condition", ""),
               "steps": request.steps, "cfg": request.cfg, "sampler": request.sampler,
               "batch": len(seeds), "base_model": request.base_model,
               "control_weight": values.get("control-weight"), "size": values.get("size"),
               "loras": format_loras(request.loras)}
    if request.mode != "txt2img":
        summary["strength"] = request.strength
    summary.update({ARG_PREFIX + arg.name: values[arg.name] for arg in ctx.spec.args
                    if arg.name not in NOT_KEPT and arg.name in values})
    entry = doc_history.Entry(request.prompt, request.negative_prompt, tuple(seeds), summary,
                              tuple(("", name) for name in names), time.time())
    try:
        data, problem = doc_history.add(host.read_history(), entry)
        if data:
            host.write_history(data)
    except Exception as err:
        problem = f"The result's history could not be kept in the image ({err})."
    if problem:
        host.message(problem)


def _add_results(ctx: _Run, layer, box, request: GenerateRequest, result, *,
                 new_skeleton=None, mask: Optional[bytes] = None) -> Outcome:
    """The results as new layers over ``box`` of ``layer`` (a group for several), with the
    new skeleton path if any, in one undo step."""
    host, prompt = ctx.host, request.prompt
    x, y, w, h = box
    seeds = result.seeds
    new = [NewLayer(naming.layer_name(prompt, s), image, w, h, layer.x + x, layer.y + y,
                    mask) for (_, image), s in zip(result.images, seeds)]
    group = naming.group_name(prompt, seeds) if len(new) > 1 else None
    path = None
    with host.undo_group():
        if new_skeleton is not None:
            path = host.add_skeleton(pose.PATH_NAME, pose.to_strokes(new_skeleton),
                                     pose.path_meta(new_skeleton))
        handles = host.insert_layers(layer, new, below=ctx.spec.below, group=group)
        _store_history(ctx, request, seeds, [n.name for n in new])
    host.progress(text=f"ControlCanvas: done, seed {seeds[0]}", fraction=1.0)
    if ctx.note:  # GIMP's procedures are one-shot: the result is where to say it
        host.message(f"ControlCanvas: {ctx.note}")
    return Outcome(seed=seeds[0] if seeds[0] is not None else -1, seeds=seeds,
                   layer=handles[0] if handles else None, path=path, report=ctx.note,
                   request=request)


def control_image(ctx: _Run) -> Outcome:
    """Make control image: run an annotator, add its output as a layer above."""
    host = ctx.host
    condition = ctx.values["condition"]
    annotator = ctx.values["annotator"].strip()
    layer = host.active_layer()
    pixels = host.read_pixels(layer)
    ctx.connection()
    ctx.doing = "while annotating"

    def work(emit):
        with ctx.open() as client:
            name = annotator or generation.default_annotator(client.models(), condition)
            if not name:
                raise UsageError(f"The server has no annotator for {condition!r}; name one in "
                                 f"'Annotator'.", field="annotator")
            job = client.preprocess(name, pixels, cancel_on_disconnect=True)
            return name, client.wait(job, on_event=emit)

    name, result = worker.run(work, Reporter(host, "annotating"))
    (_, image), = result.images
    new = NewLayer(f"Control image · {condition} ({name})", image, layer.width, layer.height,
                   layer.x, layer.y)
    with host.undo_group():
        handles = host.insert_layers(layer, [new], below=False)
    host.progress(text="ControlCanvas: done", fraction=1.0)
    return Outcome(layer=handles[0])


def pose_from_photo(ctx: _Run) -> Outcome:
    """Pose from photo: detect the skeleton, add it as a path and an OpenPose layer."""
    host = ctx.host
    layer = host.active_layer()
    photo = host.read_pixels(layer)
    ctx.connection()
    ctx.doing = "while detecting the pose"

    def work(emit):
        with ctx.open() as client:
            models = client.models()
            info = next((a for a in models.annotators if a.name == POSE_ANNOTATOR), None)
            if info is None:
                raise PoseUnavailable()
            if not info.available:
                raise PoseUnavailable(
                    f"the server cannot detect poses right now. {info.help} Meanwhile, "
                    f"Filters ▸ ControlNet ▸ Figure from pose… starts from a default skeleton.")
            job = client.preprocess(POSE_ANNOTATOR, photo, cancel_on_disconnect=True)
            return client.wait(job, on_event=emit)

    result = worker.run(work, Reporter(host, "detecting the pose"))
    (_, image), = result.images
    text = result.info.get("keypoints")
    if isinstance(text, str) and text:  # a server that sends the keypoints themselves
        person = openpose.main_person(openpose.from_openpose_json(text, layer.width,
                                                                 layer.height))
    else:  # read them back from the skeleton picture
        found = openpose.parse(image).resized(layer.width, layer.height).main()
        person = None if found is None else found.joints()
    if person is None:
        raise UsageError("No person was found in the layer; try a photo where the whole body "
                         "is visible, or use Figure from pose with the default skeleton.")
    keypoints = pose.layer_to_path(person, layer.x, layer.y)
    with host.undo_group():
        path = host.add_skeleton(pose.PATH_NAME, pose.to_strokes(keypoints),
                                 pose.path_meta(keypoints))
        handles = host.insert_layers(layer, [NewLayer("Pose (OpenPose)", image, layer.width,
                                                      layer.height, layer.x, layer.y)],
                                     below=False)
    return Outcome(layer=handles[0], path=path)


def offered(models) -> str:
    """What the server offers per base model, for the Settings report: the conditions of
    each base that says, and its LoRAs with the family each fits (what the 'Condition'
    and 'LoRAs' arguments take)."""
    offer = Offers(models)
    bases = [m for m in models.models if m.kind == "base" and m.conditions]
    lines = [f"Base {m.name!r} ({family_label(m.family)}) serves: "
             f"{', '.join(c for c in m.conditions if c in CONDITIONS)}." for m in bases]
    lines += sorted({offer.control_note(m.name) for m in bases} - {""})
    loras = ", ".join(f"{info.name} ({family_label(info.family)})" for info in offer.loras)
    lines.append(f"LoRAs (for the 'LoRAs' argument, e.g. \"name:0.8\"): {loras}." if loras
                 else "The server lists no LoRAs.")
    return " ".join(lines)


def settings_action(ctx: _Run) -> Outcome:
    """Settings / connection test: save the address and token, then test them."""
    host = ctx.host
    path = host.settings_path()
    if path is not None:
        settings.save(path, ctx.values["server-url"], ctx.values["token"])
    conn = ctx.connection()
    ctx.doing = "while testing the connection"

    def work(emit):
        with ctx.open() as client:
            return client.welcome, client.status(), client.models()

    welcome, status, models = worker.run(work, lambda event: None)
    family = generation.family_of(models) or "unknown family"
    controlnets = sum(1 for m in models.models if m.kind == "controlnet" and m.present)
    annotators = sorted(a.name for a in models.annotators if a.available)
    report = (f"ControlCanvas: connected to {welcome.server} at {conn.url} (engine "
              f"{welcome.engine}, protocol {welcome.protocol}). Default model: "
              f"{models.default_base or 'none'} ({family}); {controlnets} ControlNet model(s) "
              f"present; annotators: {', '.join(annotators) or 'none'}; jobs in the queue: "
              f"{status.queue_length}. Token: {conn.token_source}. {offered(models)}")
    if path is not None:
        report += " Settings saved."
    last = stored_history(host)[:1]
    if last:
        seeds = ", ".join(str(s) for s in last[0].seeds)
        report += (f" This image's last result: {naming.short_prompt(last[0].prompt)!r}, "
                   f"seed {seeds} ({doc_history.summary(last[0].settings)}); seed -2 "
                   f"repeats it.")
    host.message(report)
    return Outcome(report=report)


def repeat_last(ctx: _Run) -> Outcome:
    """Repeat last: the image's last result's procedure again, with its arguments and seed
    (from the history kept in the image), on the selected layer as it is now."""
    entries = stored_history(ctx.host)
    if not entries:
        raise UsageError("Nothing to repeat: this image has no ControlCanvas result kept. Run "
                         "a ControlNet filter (Generate from layer…, Colourise line art…, "
                         "...) once; Repeat last then runs it again.")
    entry = entries[0]
    spec = procedures.BY_NAME.get(str(entry.settings.get("procedure", "")))
    if spec is None or spec.action not in ("generate", "inpaint"):
        raise UsageError("The image's last ControlCanvas result was made by a filter this "
                         "plug-in cannot repeat; run that filter from its menu.")
    stored = {SUMMARY_ARGS[key]: value for key, value in entry.settings.items()
              if key in SUMMARY_ARGS}
    stored.update({key[len(ARG_PREFIX):]: value for key, value in entry.settings.items()
                   if key.startswith(ARG_PREFIX)})
    known = {arg.name for arg in spec.args} - set(NOT_KEPT)
    values = {name: value for name, value in stored.items() if name in known}
    values.update({"prompt": entry.prompt, "negative-prompt": entry.negative,
                   "seed": entry.seed if entry.seed is not None else -1})
    values.update({name: ctx.values[name] for name in ("server-url", "token")})
    ctx.spec, ctx.values = spec, procedures.check_values(spec, values)
    ctx.host.progress(text=f"ControlCanvas: repeating {spec.label.rstrip('…')}, seed "
                           f"{values['seed']}", fraction=0.0)
    return ACTIONS[spec.action](ctx)


ACTIONS: Dict[str, Callable[[_Run], Outcome]] = {
    "generate": generate,
    "inpaint": inpaint,
    "edit": edit,
    "repeat_last": repeat_last,
    "control_image": control_image,
    "pose_from_photo": pose_from_photo,
    "settings": settings_action,
}
