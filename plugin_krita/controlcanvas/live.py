"""Live painting: the canvas regenerates as the artist draws (docs/live.md).

Pure logic, like the controller it belongs to (no Qt, no krita): the docker's Live
toggle calls :meth:`LiveSession.start` / :meth:`LiveSession.stop`, the controller's
``poll`` calls :meth:`LiveSession.tick` (every 50 ms from the docker's timer) and hands
it the worker's events of live jobs.

* **Change detection.** Krita's scripting API has no signal for "the document changed",
  so every ``interval`` the session reads what the request reads (the layers the units
  are bound to, the visible image for img2img or a unit bound to it) with
  :func:`plan.build` and hashes those pixels with the request (prompt, settings); the
  document's own ``modified`` flag lets it skip the read while nothing was touched since
  the document was opened or saved, except once every ``REREAD`` (0.5 s): Krita does not
  flag every change (a script's ``setPixelData``, a layer shown or hidden).  The live layer itself is hidden while the visible
  image is read, so a frame never feeds the next one.
* **Debounce.** A change is sent once the input has been still for ``debounce`` (150
  ms), or, during a long stroke, ``max_wait`` after the first change not sent yet
  (at least 0.6 s, and 1.5 x the last frame's time, so a frame can finish before the
  next one replaces it).  On the server a new live job supersedes the previous one.
* **The frame** goes into one paint layer, ``ControlCanvas live``, written in place
  (``setPixelData`` on a layer in the tree is not an undo step: adding the layer is the
  only one).  **Keep** copies the current frame as a normal result layer, one undo step,
  and into the history.
* **Seed** locked while live (the one shown, or a new one when it was not locked), and
  unlocked again after, as it was.
* **Stops** with a sentence when the document closes, the server goes away, or a frame
  fails (a missing LoRA would fail every frame the same way).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

from . import pixels, plan
from .plan import CanvasPort, Placement, PlanError
from .proto import ControlCanvasError, Image, ResultReady, messages, naming, pose as openpose

if TYPE_CHECKING:  # the controller owns the session
    from .controller import Controller

log = logging.getLogger(__name__)
LIVE_LAYER = "ControlCanvas live"
INTERVAL = 0.1  # seconds between two reads of the canvas
DEBOUNCE = 0.15  # seconds the input must be still before it is sent
REREAD = 0.5  # seconds: the canvas is read at least this often, modified flag or not
MAX_WAIT = 0.6  # seconds a change waits at most while the artist keeps drawing
QUIET_CODES = ("superseded", "cancelled")  # a frame replaced or stopped: nothing to say


@dataclass
class Frame:
    """The frame shown: its pixels (the placement's box), where it is, and its seed."""
    image: Image
    placement: Placement
    prompt: str
    seed: int
    loras: tuple = ()  # the request's LoRAs (messages.LoraRef), kept in the history


class LiveSession:
    def __init__(self, controller: "Controller", clock: Callable[[], float] = time.monotonic,
                 interval: float = INTERVAL, debounce: float = DEBOUNCE) -> None:
        self.controller = controller
        self.clock = clock
        self.interval = interval
        self.debounce = debounce
        self.preset = ""  # a few-step preset the server lists ("": the docker's settings)
        self.canvas: Optional[CanvasPort] = None  # the document it paints, while active
        self.layer_id = ""
        self.frame: Optional[Frame] = None
        self.frames = 0  # shown since start
        self.last_elapsed = 0.0
        self._job: Optional[str] = None
        self._plans: dict = {}  # job id -> the plan it was sent with
        self._seed_was = (0, False)
        self._reset_timing()

    def _reset_timing(self) -> None:
        self._read_at = -1e9
        self._looked_at = -1e9
        self._seen = ""  # the hash of the input read last
        self._sent = ""  # the hash of the input sent last
        self._changed_at = 0.0  # when the input read last first looked like this
        self._pending_since = 0.0  # when the first change not sent yet was seen
        self._wanted = ""  # the docker's settings when the canvas was read last

    @property
    def active(self) -> bool:
        return self.canvas is not None

    # -- on and off -----------------------------------------------------------------------

    def start(self) -> bool:
        """Turn live painting on for the active document; False (and a message) if not."""
        c = self.controller
        if self.active:
            return True
        canvas = c.canvas()
        if canvas is None:
            c.say("Open a document first.", "warning")
            return False
        if not c.ensure_connected():
            return False
        settings = c.settings
        self._seed_was = (settings.seed, settings.seed_locked)
        settings.seed = plan.choose_seed(settings)
        settings.seed_locked = True
        self.canvas, self.layer_id, self.frame, self.frames = canvas, "", None, 0
        self._reset_timing()
        c.notify("settings")
        c.notify("live")
        preset = f" with the {self.preset} preset" if self.preset else ""
        c.say(f"Live{preset}: paint, and the picture follows (seed {settings.seed}, locked). "
              f"Keep copies a frame as a layer.")
        return True

    def stop(self, reason: str = "", level: str = "info") -> None:
        """Turn live painting off: the pending frame is cancelled, the live layer removed
        (while the document is open), the seed lock set back as it was."""
        if not self.active:
            return
        c, canvas = self.controller, self.canvas
        if self._job is not None and c.worker is not None:
            c.worker.cancel(self._job)
        self._job, self._plans = None, {}
        if self.layer_id and canvas.is_open():
            try:
                canvas.remove_layer(self.layer_id)
            except Exception:  # the document is going away: nothing to clean
                log.exception("removing the live layer failed")
        c.settings.seed, c.settings.seed_locked = self._seed_was
        self.canvas, self.layer_id = None, ""
        c.notify("settings")
        c.notify("live")
        c.say(f"Live stopped: {reason}" if reason else "Live stopped.", level)

    # -- every tick -----------------------------------------------------------------------

    def tick(self) -> None:
        if not self.active:
            return
        if not self.canvas.is_open():
            self.stop("the document was closed.")
            return
        now = self.clock()
        if now - self._read_at < self.interval:
            return
        self._read_at = now
        wanted = self.controller.settings.to_json() + self.preset
        # Krita flags brush strokes as modifications, but not every change (a script's
        # setPixelData, a layer shown or hidden): those are read at least every REREAD.
        if wanted != self._wanted or self.canvas.modified() or not self._seen \
                or now - self._looked_at >= REREAD:
            self._wanted = wanted  # the docker's settings, or the document, may have changed
            self._looked_at = now
            self._look(now)
        if self._due(now):
            self._send()

    def _look(self, now: float) -> None:
        """Read the input and note when it changed."""
        try:
            job_plan = self._build()
        except (PlanError, pixels.PixelError, openpose.PoseError) as err:
            self.stop(str(err), "error")
            return
        except ControlCanvasError as err:
            self.stop(err.message, "error")
            return
        digest = _digest(job_plan)
        if digest != self._seen:
            if self._seen == self._sent:
                self._pending_since = now
            self._seen, self._changed_at = digest, now
            self._plan = job_plan

    def _due(self, now: float) -> bool:
        if not self._seen or self._seen == self._sent:
            return False
        still = now - self._changed_at >= self.debounce
        waited = now - self._pending_since >= max(MAX_WAIT, 1.5 * self.last_elapsed)
        return still or waited

    def _build(self) -> plan.Plan:
        """The request for the canvas as it is now (the live layer hidden from the
        visible image), with the locked seed and the preset's steps and CFG."""
        c, canvas = self.controller, self.canvas
        settings = replace(c.settings, batch=1, hires=False)
        preset = self._preset_info()
        if preset is not None:
            settings = replace(settings, steps=preset.steps, cfg=preset.cfg)
        hide = self.layer_id and _reads_projection(settings)
        if hide:
            canvas.set_layer_visible(self.layer_id, False)
        try:
            job_plan = plan.build(settings, canvas, seed=settings.seed, batch=1,
                                  declared=c.declared_params(), offer=c.offers())
        finally:
            if hide:
                canvas.set_layer_visible(self.layer_id, True)
        if preset is not None:
            job_plan = replace(job_plan, request=replace(job_plan.request, preset=preset.name))
        return job_plan

    def _preset_info(self) -> Optional[messages.PresetInfo]:
        models = self.controller.models
        if not self.preset or models is None:
            return None
        return next((p for p in models.presets if p.name == self.preset), None)

    def _send(self) -> None:
        c = self.controller
        if c.worker is None:
            return
        job_plan = self._plan
        self._job = c.worker.submit(job_plan.request, job_plan.images, live=True)
        self._plans = {self._job: job_plan}  # older ones are superseded on the server
        self._sent = self._seen

    # -- the worker's events --------------------------------------------------------------

    def owns(self, job_id: Optional[str]) -> bool:
        return bool(job_id) and job_id in self._plans

    def handle(self, event: object, failed_code: str = "", message: str = "") -> None:
        """An event of a live job (the controller asks :meth:`owns` first)."""
        job_id = getattr(event, "job_id", "")
        job_plan = self._plans.get(job_id)
        if isinstance(event, ResultReady):
            self._plans.pop(job_id, None)
            if job_id == self._job:
                self._job = None
            if self.active and job_plan is not None and event.images:
                self.last_elapsed = event.elapsed
                self._show(job_plan, event.images[0][1], event.images[0][0].seed)
        elif failed_code:
            self._plans.pop(job_id, None)
            if job_id == self._job:
                self._job = None
            if failed_code not in QUIET_CODES:
                self.stop(message, "error")

    def _show(self, job_plan: plan.Plan, image: Image, seed: Optional[int]) -> None:
        placement = job_plan.placement
        x, y, w, h = placement.box
        if image.size != (w, h):
            image = pixels.scale_nearest(image, w, h)
        if placement.mask is not None:
            image = pixels.apply_mask_alpha(image, placement.mask)
        previous = self.frame.placement.box if self.frame is not None else None
        try:
            self.layer_id = self.canvas.show_live(self.layer_id, LIVE_LAYER, placement, image,
                                                  clear=previous)
        except Exception as err:
            log.exception("showing the live frame failed")
            self.stop(f"the frame could not be shown ({err}).", "error")
            return
        self.frame = Frame(image, placement, job_plan.prompt,
                           seed if seed is not None else job_plan.request.seed,
                           job_plan.request.loras)
        self.frames += 1
        self.controller.notify("live")

    # -- keep ---------------------------------------------------------------------------

    def keep(self) -> Optional[str]:
        """Copy the frame shown as a normal result layer (one undo step); its id."""
        frame, canvas = self.frame, self.canvas
        if frame is None or canvas is None:
            self.controller.say("No live frame yet: paint something first.", "warning")
            return None
        name = naming.layer_name(frame.prompt, frame.seed)
        placement = replace(frame.placement, mask=None)  # the frame is masked already
        ids = self.controller.add_result(canvas, frame.prompt, [(frame.image, frame.seed)],
                                         placement, f"Kept the live frame as {name!r}.",
                                         loras=frame.loras)
        return ids[0] if ids else None


def _reads_projection(settings) -> bool:
    """Whether the request reads the visible image (where the live layer shows)."""
    return settings.mode in ("img2img", "inpaint") or any(
        u.enabled and not u.layer_id for u in settings.units)


def _digest(job_plan: plan.Plan) -> str:
    """A hash of everything that decides the frame: the request and its pixels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(messages.to_json(messages.Generate(job_id="0" * 32,
                                                request=job_plan.request)).encode("utf-8"))
    for slot in sorted(job_plan.images):
        image = job_plan.images[slot]
        h.update(f"{slot}:{image.width}x{image.height}".encode())
        h.update(image.data)
    h.update(repr(job_plan.placement.box).encode())
    return h.hexdigest()
