"""What the docker's buttons do, without any widget: the plug-in's generate path.

The docker calls these methods and runs :meth:`Controller.poll` from a QTimer; a
batch script (the real-Krita tests) calls the same methods and :meth:`run_until_idle`.
Everything that touches the document happens inside ``poll`` on the caller's
(GUI) thread; the network stays on the :class:`~controlcanvas.worker.Worker` thread.
Every failure ends as a sentence in :attr:`Controller.message`, never a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

from . import live as live_mod, pixels, plan, pose as pose_mod
from .plan import CanvasPort, HistoryItem, Placement, Plan, PlanError
from .proto import WEBSOCKETS_PROBLEM, ControlCanvasError, Image, PreviewReady, ResultReady, \
    messages, pose as openpose
from .proto import doc_history, loopback, naming, offers
from .settings import Settings
from .worker import Connected, Connecting, Disconnected, JobFailed, Worker

log = logging.getLogger(__name__)
HISTORY_SIZE = 20
POSE_DETECT_SIDE = 512
SERVER_WAIT = 20.0  # seconds a job waits for a server that does not answer, then is dropped
ENTER_TOKEN = "enter its token in the docker's Server ▸ Token field"


@dataclass
class _Active:
    kind: str  # "generate" | "control-preview" | "pose-detect"
    canvas: CanvasPort
    plan: Optional[plan.Plan] = None
    name: str = ""
    anchor_id: str = ""
    box: plan.Box = (0, 0, 0, 0)
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Status:
    state: str  # "offline" | "connecting" | "online" | "error"
    message: str


class Controller:
    def __init__(self, canvas: Callable[[], Optional[CanvasPort]], *,
                 settings: Optional[Settings] = None,
                 save_settings: Optional[Callable[[str], None]] = None,
                 worker_factory=Worker) -> None:
        self._canvas = canvas
        self.settings = settings or Settings()
        self._save = save_settings
        self._worker_factory = worker_factory
        self.worker: Optional[Worker] = None
        self.status = Status("offline", "Not connected.")
        self.models: Optional[messages.Models] = None
        self.active: Dict[str, _Active] = {}
        self.progress = (0, 0)
        self.preview: Optional[Image] = None
        self.history: List[HistoryItem] = []  # the bound document's, newest first
        self._histories: Dict[str, List[HistoryItem]] = {}  # per open document (its key)
        self._doc_key: Optional[str] = None
        self.message = ""
        self.level = "info"  # "info" | "warning" | "error"
        self.listeners: List[Callable[[str], None]] = []
        self.token_note = ""
        self.pending_preset = ""  # chosen before the server listed its annotators
        self.server_wait = SERVER_WAIT
        self._offline_since = time.monotonic()
        self.live = live_mod.LiveSession(self)  # live painting (live.py)

    # -- notifications ------------------------------------------------------------------

    def _changed(self, what: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(what)
            except Exception:  # a broken view must not break the plug-in
                log.exception("listener failed")

    def notify(self, what: str) -> None:
        """Tell the views that ``what`` changed (``settings``, ``live``, ...)."""
        self._changed(what)

    def say(self, message: str, level: str = "info") -> None:
        """Show a sentence to the artist (the docker's message line)."""
        self.message, self.level = message, level
        self._changed("message")

    def canvas(self) -> Optional[CanvasPort]:
        """The active document, None when none is open."""
        return self._canvas()

    # -- the history kept in the document ------------------------------------------------

    def bind_document(self) -> bool:
        """Show the active document's history (the docker calls this when the document
        changes): the one kept in memory since it was bound, else the one stored in the
        document (a reopened .kra). True when the bound document changed."""
        canvas = self._canvas()
        key = canvas.key() if canvas is not None else ""
        if key == self._doc_key:
            return False
        if self._doc_key is not None:
            self._histories[self._doc_key] = self.history
        self._doc_key = key
        if key not in self._histories:
            self._histories[key] = self._stored_history(canvas) if canvas is not None else []
        self.history = self._histories[key]
        self._changed("history")
        return True

    def _stored_history(self, canvas: CanvasPort) -> List[HistoryItem]:
        try:
            entries, problem = doc_history.decode(canvas.read_history())
        except Exception as err:  # the editor refused to hand the annotation over
            log.exception("reading the document's history failed")
            entries, problem = [], f"The document's ControlCanvas history could not be read " \
                                   f"({err}); it was ignored."
        if problem:
            self.say(problem, "warning")
        return [HistoryItem("", e.prompt, [], Placement(), json.dumps(e.settings),
                            [layer_id for layer_id, _ in e.layers], e.seeds)
                for e in entries]

    def _history_of(self, canvas: CanvasPort) -> List[HistoryItem]:
        """The history list of the document a job ran on (maybe not the active one)."""
        if self._doc_key is None:
            self.bind_document()
        key = canvas.key()
        if key == self._doc_key:
            return self.history
        if key not in self._histories:
            self._histories[key] = self._stored_history(canvas)
        return self._histories[key]

    def _store(self, canvas: CanvasPort, item: HistoryItem, names: List[str],
               loras: Tuple[messages.LoraRef, ...] = ()) -> None:
        """Add ``item`` to the record kept in the document (saved with the file)."""
        settings = self.settings
        summary = {"mode": settings.mode, "steps": settings.steps, "cfg": settings.cfg,
                   "sampler": settings.sampler, "batch": len(item.images),
                   "base_model": settings.base_model, "hires": settings.hires,
                   "condition": "+".join(u.condition for u in settings.units if u.enabled),
                   "loras": offers.format_loras(loras)}
        if settings.mode != "txt2img":
            summary["strength"] = settings.strength
        entry = doc_history.Entry(item.prompt, settings.negative_prompt, tuple(item.seeds),
                                  summary, tuple(zip(item.layer_ids, names)), time.time())
        try:
            data, problem = doc_history.add(canvas.read_history(), entry)
            if data:
                canvas.write_history(data)
        except Exception as err:
            log.exception("storing the history in the document failed")
            problem = f"The result's history could not be stored in the document ({err})."
        if problem:
            self.say(problem, "warning")

    def active_layer_id(self) -> str:
        canvas = self._canvas()
        return canvas.info().active_id if canvas is not None else ""

    # -- connection ---------------------------------------------------------------------

    def resolve_token(self, url: str, token: str) -> loopback.TokenChoice:
        """The token for ``url``: the one typed in the docker, else the local server's
        token file, and that only for a loopback address (``shared.loopback``)."""
        choice = loopback.choose_token(url, token, entered_source="the token typed in the "
                                       "docker", enter_it=ENTER_TOKEN)
        self.token_note = choice.note
        return choice

    def connect(self, url: Optional[str] = None, token: Optional[str] = None) -> None:
        if WEBSOCKETS_PROBLEM:
            self.status = Status("error", WEBSOCKETS_PROBLEM)
            self._changed("status")
            return
        if url is not None:
            self.settings.url = url.strip()
        if token is not None:
            self.settings.token = token.strip()
        choice = self.resolve_token(self.settings.url, self.settings.token)
        if choice.needed:  # a server elsewhere, no token typed: never send the local one
            self._stop_worker()
            self.status = Status("error", choice.note)
        else:
            if self.worker is None:
                self.worker = self._worker_factory(self.settings.url, choice.token).start()
            else:
                self.worker.reconnect(self.settings.url, choice.token)
            self.status = Status("connecting", f"Connecting to {self.settings.url}…")
        self._offline_since = time.monotonic()
        self._changed("status")
        self.save()

    def _stop_worker(self) -> None:
        """No connection (to the server the worker had): its jobs cannot finish here."""
        self.live.stop("no server connection.")
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.active:
            self.active.clear()
            self.progress, self.preview = (0, 0), None
            self._changed("progress")
            self._changed("busy")

    def shutdown(self) -> None:
        self.live.stop()
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.status = Status("offline", "Not connected.")

    @property
    def online(self) -> bool:
        return self.status.state == "online"

    @property
    def busy(self) -> bool:
        return any(a.kind == "generate" for a in self.active.values())

    def annotators(self, condition: str = "") -> List[str]:
        """Annotator names the server offers (for a condition: its own and generic ones)."""
        if self.models is None:
            return ["none"]
        names = [a.name for a in self.models.annotators if a.available and
                 (not condition or a.condition in ("", condition))]
        return names if "none" in names else ["none"] + names

    def annotator_info(self, name: str) -> Optional[messages.AnnotatorInfo]:
        """What the server says about an annotator (its parameters), None if unknown."""
        if self.models is None:
            return None
        return next((a for a in self.models.annotators if a.name == name), None)

    def offers(self) -> offers.Offers:
        """What the server offers per base model (conditions, LoRAs); offers everything
        and checks nothing before it answered."""
        return offers.Offers(self.models)

    def declared_params(self) -> Optional[Dict[str, Tuple[str, ...]]]:
        """Each annotator's parameter names, None before the server listed them."""
        if self.models is None:
            return None
        return {a.name: tuple(p.name for p in a.params) for a in self.models.annotators}

    def base_models(self) -> List[str]:
        """Base model names the server knows, the downloaded ones first."""
        if self.models is None:
            return []
        bases = [m for m in self.models.models if m.kind == "base"]
        return [m.name for m in sorted(bases, key=lambda m: not m.present)]

    def pose_detector(self) -> str:
        """The server's pose-detection annotator, "" when it has none available."""
        if self.models is None:
            return ""
        for info in self.models.annotators:
            if info.condition == "openpose" and info.available:
                return info.name
        return ""

    def save(self) -> None:
        if self._save is not None:
            try:
                self._save(self.settings.to_json())
            except Exception:
                log.exception("saving settings failed")

    # -- actions ------------------------------------------------------------------------

    def _current_canvas(self) -> Optional[CanvasPort]:
        canvas = self._canvas()
        if canvas is None:
            self.say("Open a document first.", "warning")
        return canvas

    def ensure_connected(self) -> bool:
        """Connect when not connected yet; False (with the reason said) if that cannot work."""
        return self._ready()

    def _ready(self) -> bool:
        if self.worker is None:
            self.connect()
        if self.status.state == "error":
            self.say(self.status.message, "error")
            return False
        return True

    def generate(self, *, seed: Optional[int] = None, batch: Optional[int] = None) -> Optional[str]:
        """Read the canvas, send the request; returns the job id (None + message on error)."""
        return self._start(lambda canvas: plan.build(
            self.settings, canvas, seed=seed, batch=batch, declared=self.declared_params(),
            offer=self.offers()))

    def edit(self, *, seed: Optional[int] = None) -> Optional[str]:
        """The Edit section's action: the selected layer (or the selected part of it)
        changed as the instruction says, the result a new layer above it; the job id
        (None + message on error).  Whether the base can edit is the server's answer
        (``edit_model_needed``, shown like any error)."""
        return self._start(lambda canvas: plan.build_edit(self.settings, canvas, seed=seed))

    def _start(self, build: Callable[[CanvasPort], Plan]) -> Optional[str]:
        """Build a plan from the current canvas and send it (see generate)."""
        canvas = self._current_canvas()
        if canvas is None or not self._ready():
            return None
        try:
            job_plan = build(canvas)
        except (PlanError, pixels.PixelError, openpose.PoseError) as err:
            self.say(str(err), "error")
            return None
        except ControlCanvasError as err:
            self.say(err.message, "error")
            return None
        request = job_plan.request
        if not self.settings.seed_locked:
            self.settings.seed = request.seed
        self.save()
        job_id = self.worker.submit(request, job_plan.images,
                                    preview_every=self.settings.preview_every)
        self.active[job_id] = _Active("generate", canvas, job_plan)
        self.progress = (0, request.steps * request.batch)
        self.preview = None
        note = " ".join(job_plan.notes)
        waiting = "" if self.online else f" (waiting for the server at {self.settings.url})"
        doing = "Editing the layer:" if job_plan.kind == "edit" else "Generating"
        self.say(f"{doing} {request.batch} image(s), seed {request.seed}{waiting}."
                  + (f" {note}" if note else ""), "warning" if note else "info")
        self._changed("busy")
        return job_id

    def apply_preset(self, key: str) -> None:
        """Set up the control units of a preset, bound to the layer the preset needs (a
        line-art preset finds the line art), and say which.  Chosen before the server
        listed its annotators, the preset is resolved again when the lists arrive."""
        p = plan.preset(key)
        canvas = self._canvas()
        doc = canvas.info() if canvas is not None else None
        layer = ""
        if doc is not None and p.source == "lineart":
            previous = [u.layer_id for u in self.settings.units if u.condition == p.condition]
            layer = plan.line_art_layer(canvas, doc, previous)
        elif doc is not None:
            layer = plan.pose_layer(doc) if p.source == "pose" else doc.active_id
        self.settings = plan.apply_preset(self.settings, key, layer,
                                          self.annotators(p.condition))
        self.pending_preset = key if self.models is None else ""
        self.save()
        info = doc.layer(layer) if doc is not None and layer else None
        bound = f"layer {info.name!r}" if info else "the visible image"
        self.say(f"{p.label}: control bound to {bound}. {p.notes}".strip())

    def _resolve_pending_preset(self) -> None:
        """The server's lists arrived: give a preset's units the annotator it prefers."""
        key, self.pending_preset = self.pending_preset, ""
        if not key or self.models is None:
            return
        p = plan.preset(key)
        names = self.annotators(p.condition)
        for unit in self.settings.units:
            if unit.condition == p.condition and unit.annotator == "none":
                unit.annotator = plan.pick_annotator(p.annotators, names)
        self.save()
        self._changed("units")

    def cancel(self) -> None:
        jobs = [job_id for job_id, a in self.active.items() if a.kind == "generate"]
        if not jobs or self.worker is None:
            return
        for job_id in jobs:
            self.worker.cancel(job_id)
        self.say("Cancelling…")

    def selected_seed(self, index: int) -> Optional[int]:
        if 0 <= index < len(self.history):
            seeds = [s for s in self.history[index].seeds if s is not None]
            return seeds[0] if seeds else None
        return None

    def reuse_seed(self, index: int) -> Optional[int]:
        """Lock the seed of a history entry, so the next Generate repeats it."""
        seed = self.selected_seed(index)
        if seed is None:
            self.say("Pick a result in the history first.", "warning")
            return None
        self.settings.seed, self.settings.seed_locked = seed, True
        self.save()
        self._changed("settings")
        return seed

    def regenerate_same_seed(self, index: int = 0) -> Optional[str]:
        """Same seed as a history entry (default: the newest), one image: the figure changes
        only as the pose (or prompt) did."""
        seed = self.selected_seed(index) if self.history else self.settings.seed
        if seed is None:
            seed = self.settings.seed
        return self.generate(seed=seed, batch=1)

    def variants(self, count: int = 4) -> Optional[str]:
        seed = plan.choose_seed(replace(self.settings, seed_locked=False))
        return self.generate(seed=seed, batch=max(1, min(16, count)))

    def apply_history(self, index: int) -> None:
        """Insert a remembered result again (e.g. after deleting or undoing it)."""
        if not 0 <= index < len(self.history):
            self.say("Pick a result in the history first.", "warning")
            return
        canvas = self._current_canvas()
        if canvas is None:
            return
        item = self.history[index]
        if not item.images:
            self.say("That entry was read back from the saved document: its layers are in "
                     "the file, not its pixels. Use Reuse seed to make it again.", "warning")
            return
        self._insert(canvas, item.prompt, item.images, item.placement)

    def preview_control(self, unit_index: int) -> Optional[str]:
        """Run a unit's annotator on the server and insert the control image as a layer."""
        units = self.settings.units
        if not 0 <= unit_index < len(units):
            self.say("Add a control unit first.", "warning")
            return None
        canvas = self._current_canvas()
        if canvas is None or not self._ready():
            return None
        unit = units[unit_index]
        doc = canvas.info()
        box = (0, 0, doc.width, doc.height)
        try:
            image, annotator = plan.unit_image(canvas, doc, unit, box, unit_index)
        except (PlanError, openpose.PoseError) as err:
            self.say(str(err), "error")
            return None
        layer = doc.layer(unit.layer_id)
        source = layer.name if layer else "visible image"
        annotator = annotator or "none"
        job_id = self.worker.preprocess(annotator, image, params=plan.unit_params(
            unit, annotator, self.declared_params()))
        self.active[job_id] = _Active("control-preview", canvas,
                                      name=f"Control: {annotator} of {source}",
                                      anchor_id=unit.layer_id, box=box)
        self.say(f"Making the control image ({annotator}) of {source}…")
        return job_id

    def insert_pose(self, layer_id: str = "") -> Optional[str]:
        """Default skeleton as an editable vector layer; or, with ``layer_id``, detect the
        pose in that layer on the server (when it can)."""
        canvas = self._current_canvas()
        if canvas is None:
            return None
        doc = canvas.info()
        if not layer_id:
            return self._insert_pose_layer(canvas, pose_mod.default_pose(doc.width, doc.height),
                                           doc.active_id)
        if not self._ready():
            return None
        detector = self.pose_detector()
        if not detector:
            self.say("Pose detection is not available on this server (it offers no openpose "
                      "annotator); start from the default skeleton and move its joints.",
                      "warning")
            return None
        k = min(1.0, POSE_DETECT_SIDE / max(doc.width, doc.height))
        w, h = max(8, int(round(doc.width * k))), max(8, int(round(doc.height * k)))
        image = canvas.read_layer(layer_id, (0, 0, doc.width, doc.height))
        job_id = self.worker.preprocess(detector, image, width=w, height=h)
        self.active[job_id] = _Active("pose-detect", canvas, anchor_id=layer_id,
                                      box=(0, 0, doc.width, doc.height))
        self.say("Detecting the pose…")
        return job_id

    def _insert_pose_layer(self, canvas: CanvasPort, skeleton: openpose.People,
                           anchor_id: str) -> Optional[str]:
        doc = canvas.info()
        svg = pose_mod.to_svg(skeleton, doc.width, doc.height, doc.resolution)
        try:
            layer_id = canvas.insert_pose_layer(svg, pose_mod.LAYER_NAME, anchor_id)
        except Exception as err:
            self.say(f"The pose layer could not be added ({err}).", "error")
            return None
        self.say("Pose skeleton added: move its joints with the shape tools, then "
                  "generate with an openpose unit bound to it.")
        return layer_id

    # -- events ---------------------------------------------------------------------------

    def poll(self) -> int:
        """Handle what the worker reported; returns how many events were handled."""
        if self.worker is None:
            return 0
        events = self.worker.drain()
        for event in events:
            try:
                self._handle(event)
            except Exception as err:  # never let one event stop the docker
                log.exception("handling %r failed", type(event).__name__)
                self.say(f"ControlCanvas could not handle the server's reply ({err}).",
                          "error")
        self._give_up_waiting()
        self.live.tick()
        return len(events)

    def _give_up_waiting(self) -> None:
        """Jobs that waited :attr:`server_wait` seconds for a server that is not there
        (never started, or gone and not back) are dropped, with what to do about it."""
        if self.online or not self.active:
            return
        now = time.monotonic()
        if now - self._offline_since < self.server_wait:
            return
        late = [job_id for job_id, a in self.active.items() if now - a.since >= self.server_wait]
        if not late:
            return
        for job_id in late:
            del self.active[job_id]
            if self.worker is not None:
                self.worker.cancel(job_id)
        self.progress, self.preview = (0, 0), None
        self._changed("progress")
        self._changed("busy")
        self.say(f"No server at {self.settings.url} (waited {self.server_wait:g} s): "
                 f"{len(late)} job(s) dropped. Run `controlcanvas serve` or fix the address, "
                 f"then Generate again.", "error")

    def run_until_idle(self, timeout: float = 60.0) -> bool:
        """Batch use: poll until no job is active (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if not self.active:
                return True
            time.sleep(0.01)
        self.poll()
        return not self.active

    def wait_online(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if self.online:
                return True
            time.sleep(0.01)
        return self.online

    def _handle(self, event: object) -> None:
        if self.live.owns(getattr(event, "job_id", None)):  # a live frame's events
            if isinstance(event, JobFailed):
                self.live.handle(event, event.code, event.message)
            elif isinstance(event, ResultReady):
                self.live.handle(event)
            return
        if isinstance(event, Connecting):
            if self.status.state != "online":
                self.status = Status("connecting", f"Connecting to {event.url}…")
                self._changed("status")
        elif isinstance(event, Connected):
            self.models = event.models or self.models
            resumed = f"; resumed {event.resumed} job(s)" if event.resumed else ""
            engine = f" ({event.engine} engine)" if event.engine.strip() else ""
            self.status = Status("online", f"Connected to {event.server or event.url}"
                                           f"{engine}{resumed}.")
            self._changed("status")
            self._changed("models")
            self._resolve_pending_preset()
        elif isinstance(event, Disconnected):
            if self.status.state == "online":
                self._connection_lost(event)
            retry = f" Retrying in {event.retry_in:g} s." if event.retry_in else ""
            keep = f" {len(self.active)} job(s) will resume." if self.active and \
                event.retry_in else ""
            self.status = Status("offline" if event.retry_in else "error",
                                 event.message + retry + keep)
            self._changed("status")
            if self.live.active:
                self.live.stop(f"the server went away ({event.message})", "error")
        elif isinstance(event, messages.Queued):
            if event.job_id in self.active and event.position > 0:
                self.say(f"Queued (position {event.position}).")
        elif isinstance(event, messages.Progress):
            if event.job_id in self.active and self.active[event.job_id].kind == "generate":
                self.progress = (event.step, event.total)
                self._changed("progress")
        elif isinstance(event, PreviewReady):
            if event.job_id in self.active:
                self.preview = event.image
                self._changed("preview")
        elif isinstance(event, ResultReady):
            active = self.active.pop(event.job_id, None)
            if active is not None:
                self._finished(active, event)
                self._changed("busy")
        elif isinstance(event, JobFailed):
            active = self.active.pop(event.job_id, None) if event.job_id else None
            if event.code == "cancelled":
                if active is not None or not event.job_id:
                    self.say("Cancelled.")
            else:
                self.say(event.message, "error")
            if active is not None:
                self.progress = (0, 0)
                self._changed("busy")

    def _connection_lost(self, event: Disconnected) -> None:
        """The link dropped: no stale progress; say that it reconnects, and what waits."""
        self._offline_since = time.monotonic()
        self.progress, self.preview = (0, 0), None
        self._changed("progress")
        jobs = sum(1 for a in self.active.values() if a.kind == "generate")
        if event.retry_in:
            waits = f" {jobs} job(s) will resume when it is back." if jobs else ""
            self.say(f"Disconnected from {event.url}; reconnecting…{waits}", "warning")
        else:
            self.say(f"Disconnected from {event.url}.", "error")

    def add_result(self, canvas: CanvasPort, prompt: str, images, placement: Placement,
                   message: str = "", job_id: str = "",
                   loras: Tuple[messages.LoraRef, ...] = ()) -> List[str]:
        """Insert result images as layers (one undo step) and add them to the history
        shown and the one kept in the document (with the request's ``loras``); the new
        layers' ids."""
        item = HistoryItem(job_id, prompt, list(images), placement, self.settings.to_json())
        item.layer_ids = self._insert(canvas, prompt, item.images, placement)
        history = self._history_of(canvas)
        history.insert(0, item)
        del history[HISTORY_SIZE:]
        if item.layer_ids:
            self._store(canvas, item, self._layer_names(prompt, item.images), loras)
            if message:
                self.say(message)
        self._changed("history")
        return item.layer_ids

    def _finished(self, active: _Active, event: ResultReady) -> None:
        if active.kind == "generate":
            job_plan = active.plan
            images = [(image, meta.seed) for meta, image in event.images]
            self.add_result(active.canvas, job_plan.prompt, images, job_plan.placement,
                            job_id=event.job_id, loras=job_plan.request.loras)
            self.progress = (self.progress[1], self.progress[1])
        elif active.kind == "control-preview":
            if not event.images:
                self.say("The server returned no control image.", "error")
                return
            image = event.images[0][1]
            x, y, w, h = active.box
            if image.size != (w, h):
                image = pixels.scale_nearest(image, w, h)
            where = "above" if active.anchor_id else "top"
            ids, note = active.canvas.insert_results(
                Placement(where, active.anchor_id, active.box), [(image, active.name)])
            self.say(f"Added the layer {active.name!r}." + (f" {note}" if note else ""))
        elif active.kind == "pose-detect":
            self._pose_detected(active, event)

    def _pose_detected(self, active: _Active, event: ResultReady) -> None:
        """The server's keypoints (OpenPose JSON in the result's info) when it sends them,
        else the joints read back from the skeleton picture; either way on the document."""
        x, y, w, h = active.box
        text = (event.info or {}).get("keypoints")
        try:
            if isinstance(text, str) and text:
                people = openpose.from_openpose_json(text, w, h)
            elif event.images:
                image = event.images[0][1]
                people = list(openpose.parse(image).resized(w, h).joints())
            else:
                people = []
        except openpose.PoseError as err:
            self.say(str(err), "warning")
            return
        skeleton = tuple(p for p in people if openpose.visible(p) >= 2)
        if not skeleton:
            self.say("No pose was found in that layer.", "warning")
            return
        self._insert_pose_layer(active.canvas, skeleton, active.anchor_id)

    @staticmethod
    def _layer_names(prompt: str, images) -> List[str]:
        return [naming.layer_name(prompt, seed) for _, seed in images]

    def _insert(self, canvas: CanvasPort, prompt: str, images, placement: Placement) -> List[str]:
        layers = []
        for image, seed in images:
            x, y, w, h = placement.box
            if image.size != (w, h):  # a server may answer at another size: fit the box
                image = pixels.scale_nearest(image, w, h)
            if placement.mask is not None:
                image = pixels.apply_mask_alpha(image, placement.mask)
            layers.append((image, naming.layer_name(prompt, seed)))
        group = naming.group_name(prompt, [s for _, s in images]) if len(layers) > 1 else ""
        try:
            ids, note = canvas.insert_results(placement, layers, group)
        except Exception as err:
            log.exception("inserting results failed")
            self.say(f"The result could not be added to the document ({err}); it is kept "
                      f"in the history.", "error")
            return []
        seeds = ", ".join(str(s) for _, s in images)
        self.say(f"Added {len(layers)} layer(s), seed {seeds}." + (f" {note}" if note else ""),
                  "warning" if note else "info")
        return ids
