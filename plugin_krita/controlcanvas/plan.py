"""From what the docker shows and what the document holds to one GenerateRequest.

Pure logic: the canvas is reached through the small :class:`CanvasPort` interface
(``canvas.KritaCanvas`` in Krita, a mock in tests), so every decision here - which
pixels are sent, at which size, where the result goes and what it is called - is
tested without Krita.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import pixels
from .proto import Image, errors, geometry, messages, offers, pose as openpose
from .settings import ReferenceSettings, Settings, UnitSettings

Box = Tuple[int, int, int, int]
REFERENCE_SIDE = 512  # a reference layer is sent at most this big (the CLIP encoder reads 224)


class PlanError(ValueError):
    """The request cannot be built; the message tells the artist what to change."""


@dataclass(frozen=True)
class LayerInfo:
    id: str
    name: str
    kind: str  # Krita's Node.type(): paintlayer, vectorlayer, grouplayer, ...
    depth: int = 0  # nesting level, for indenting the layer lists


@dataclass(frozen=True)
class DocInfo:
    width: int
    height: int
    resolution: float = 72.0
    color_model: str = "RGBA"
    color_depth: str = "U8"
    name: str = ""
    layers: Tuple[LayerInfo, ...] = ()  # top to bottom, masks left out
    active_id: str = ""

    def layer(self, layer_id: str) -> Optional[LayerInfo]:
        return next((layer for layer in self.layers if layer.id == layer_id), None)


class CanvasPort:
    """What planning and result insertion need from the editor (see canvas.py)."""

    def info(self) -> DocInfo:
        raise NotImplementedError

    def read_layer(self, layer_id: str, box: Box) -> Image:
        """RGBA8 pixels of a layer (its own pixels, not the stack) inside ``box``."""
        raise NotImplementedError

    def read_projection(self, box: Box) -> Image:
        raise NotImplementedError

    def read_selection(self) -> Optional[bytes]:
        """One byte per document pixel, or None without a selection."""
        raise NotImplementedError

    def read_pose(self, layer_id: str) -> Optional[openpose.People]:
        """The skeleton of a vector layer, None when the layer is not a vector layer."""
        raise NotImplementedError

    def sample_layer(self, layer_id: str, lines: int = 16) -> bytes:
        """RGBA8 pixels of a few evenly spaced rows and columns of a layer's own pixels
        (a cheap look at what it holds); b"" when the layer is gone."""
        raise NotImplementedError

    def insert_results(self, placement: "Placement", layers: Sequence[Tuple[Image, str]],
                       group: str = "") -> Tuple[List[str], str]:
        """Add result layers in one undoable step (a group when ``group`` is given);
        returns (new layer ids, a note for the artist or "")."""
        raise NotImplementedError

    def insert_pose_layer(self, svg: str, name: str, anchor_id: str = "") -> str:
        """Add a vector layer holding ``svg`` above ``anchor_id`` (top when ""); its id."""
        raise NotImplementedError

    def key(self) -> str:
        """What tells this document from another one open at the same time."""
        return "document"

    def read_history(self) -> bytes:
        """The history record stored in the document (shared.doc_history), b"" if none."""
        return b""

    def write_history(self, data: bytes) -> None:
        """Store the history record in the document (it is saved with the file)."""

    # live painting (live.py)

    def is_open(self) -> bool:
        """Whether the document is still open in the editor."""
        return True

    def modified(self) -> bool:
        """The editor's "modified since opened or saved" flag (True when unknown)."""
        return True

    def show_live(self, layer_id: str, name: str, placement: "Placement", image: Image,
                  clear: Optional[Box] = None) -> str:
        """Write ``image`` over ``placement.box`` of the live layer ``layer_id`` in place
        (not an undo step), after making ``clear`` transparent; a layer that is gone is
        made again (filled first, then added: one undo step). Returns the layer's id."""
        raise NotImplementedError

    def remove_layer(self, layer_id: str) -> None:
        raise NotImplementedError

    def set_layer_visible(self, layer_id: str, visible: bool) -> None:
        """Show or hide a layer (the visible image is brought up to date)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Placement:
    """Where results go: next to ``anchor_id`` ("above"/"below") or on top ("top")."""
    where: str = "top"
    anchor_id: str = ""
    box: Box = (0, 0, 0, 0)  # document rectangle the result covers
    mask: Optional[bytes] = None  # 1 byte/px alpha for the box (inpaint), None = opaque
    note: str = ""  # shown in the docker when the placement differs from what was asked


@dataclass(frozen=True)
class Plan:
    request: messages.GenerateRequest
    images: Dict[int, Image]
    placement: Placement
    prompt: str
    notes: Tuple[str, ...] = ()
    kind: str = "generate"


def short_prompt(prompt: str, limit: int = 48) -> str:
    text = " ".join(prompt.split())
    if len(text) > limit:
        text = text[:limit - 1].rstrip() + "…"
    return text or "ControlCanvas"


def choose_seed(settings: Settings, rng: Optional[random.Random] = None) -> int:
    if settings.seed_locked:
        return max(0, min(messages.MAX_SEED, settings.seed))
    return (rng or random.Random()).randint(0, messages.MAX_SEED)


def _unit_skeleton(canvas: CanvasPort, doc: DocInfo, unit: UnitSettings,
                   box: Box) -> Optional[openpose.People]:
    """The pose of an openpose unit bound to a skeleton (vector) layer, in ``box``
    coordinates; None for any other unit (it sends a picture)."""
    layer = doc.layer(unit.layer_id) if unit.layer_id else None
    if layer is None or layer.kind != "vectorlayer" or unit.condition != "openpose":
        return None
    skeleton = canvas.read_pose(unit.layer_id)
    if not skeleton:
        return None
    x, y = box[0], box[1]
    return tuple(openpose.transformed(person, dx=-x, dy=-y) for person in skeleton)


def unit_image(canvas: CanvasPort, doc: DocInfo, unit: UnitSettings, box: Box,
                index: int) -> Tuple[Image, str]:
    """The control image of a unit and the preprocessor the server should run (a skeleton
    is drawn here: the control preview shows what the server will draw)."""
    if not unit.layer_id:
        return canvas.read_projection(box), unit.annotator
    if doc.layer(unit.layer_id) is None:
        raise PlanError(f"Control unit {index + 1} is bound to a layer that no longer exists; "
                        f"pick its layer again.")
    skeleton = _unit_skeleton(canvas, doc, unit, box)
    if skeleton:
        return openpose.render_people(skeleton, box[2], box[3]), "none"
    return canvas.read_layer(unit.layer_id, box), unit.annotator


def unit_params(unit: UnitSettings, preprocessor: str,
                declared: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, Any]:
    """The annotator parameters a unit sends: none for ``none``; with ``declared`` (each
    annotator's parameter names, from the server), only those the annotator takes."""
    if preprocessor == "none":
        return {}
    known = None if declared is None else set(declared.get(preprocessor, ()))
    return {k: v for k, v in unit.params.items() if known is None or k in known}


def lora_refs(settings: Settings, offer: Optional[offers.Offers] = None
              ) -> Tuple[messages.LoraRef, ...]:
    """The docker's LoRA rows as the request's LoRAs (rows without a LoRA left out),
    checked against the server's list when it answered (``offer``): a LoRA it does not
    have, or one of another family than the base, is the server's own typed error."""
    refs: List[messages.LoraRef] = []
    for row in settings.loras:
        name = row.name.strip()
        if not name:
            continue
        if any(ref.name == name for ref in refs):
            raise PlanError(f"The LoRA {name!r} is in the list twice; remove one of its rows.")
        try:
            refs.append(messages.LoraRef(name, row.strength))
        except errors.ControlCanvasError as err:
            raise PlanError(f"LoRA {name!r}: {err.message}") from None
    if offer is not None:
        offer.check_loras(refs, settings.base_model)
    return tuple(refs)


def reference_image(canvas: "CanvasPort", doc: DocInfo, layer_id: str, what: str) -> Image:
    """The whole layer ``layer_id`` (the picture, not the region generated), at most
    :data:`REFERENCE_SIDE` on its longer side; ``what`` names it in a message
    ("Reference 2")."""
    layer = doc.layer(layer_id) if layer_id else None
    if layer is None:
        raise PlanError(f"{what}: pick the layer that holds the reference picture (the layer "
                        f"it had is gone).")
    image = canvas.read_layer(layer_id, (0, 0, doc.width, doc.height))
    if image.is_transparent():
        raise PlanError(f"{what}: the layer {layer.name!r} is empty; paste the reference "
                        f"picture into it or pick another layer.")
    scale = min(1.0, REFERENCE_SIDE / max(doc.width, doc.height))
    if scale < 1.0:
        image = pixels.scale_nearest(image, max(1, round(doc.width * scale)),
                                     max(1, round(doc.height * scale)))
    return image


def reference_units(settings: Settings, canvas: "CanvasPort", doc: DocInfo,
                    images: Dict[int, Image]) -> Tuple[messages.ReferenceUnit, ...]:
    """The docker's reference rows as the request's references, their pictures added to
    ``images`` in the next free slots (rows at weight 0 are left out: no reference)."""
    refs: List[messages.ReferenceUnit] = []
    for index, row in enumerate(settings.references):
        if row.weight <= 0:
            continue
        slot = len(images)
        images[slot] = reference_image(canvas, doc, row.layer_id, f"Reference {index + 1}")
        try:
            refs.append(messages.ReferenceUnit(image=slot, weight=row.weight, start=row.start,
                                               end=row.end, mode=row.mode))
        except errors.ControlCanvasError as err:
            raise PlanError(f"Reference {index + 1}: {err.message}") from None
    if len(refs) > messages.MAX_REFERENCES:
        raise PlanError(f"{len(refs)} references: at most {messages.MAX_REFERENCES} per "
                        f"generation; remove one.")
    return tuple(refs)


def check_conditions(settings: Settings, offer: Optional[offers.Offers]) -> None:
    """Each enabled unit's condition must be one the chosen base serves (the server's
    list; a server that does not say leaves every condition open)."""
    if offer is None:
        return
    for index, unit in enumerate(u for u in settings.units if u.enabled):
        problem = offer.condition_problem(unit.condition, settings.base_model)
        if problem:
            raise PlanError(f"Control unit {index + 1}: {problem}")


def build(settings: Settings, canvas: CanvasPort, *, seed: Optional[int] = None,
          batch: Optional[int] = None,
          declared: Optional[Mapping[str, Sequence[str]]] = None,
          offer: Optional[offers.Offers] = None) -> Plan:
    """Read the canvas and build the request the docker's Generate button sends
    (``declared``: each annotator's parameter names, when the server listed them;
    ``offer``: what the server offers, to check conditions and LoRAs before sending)."""
    check_conditions(settings, offer)
    loras = lora_refs(settings, offer)
    doc = canvas.info()
    notes: List[str] = []
    note = pixels.depth_note(doc.color_model, doc.color_depth)
    if note:
        notes.append(note)
    full: Box = (0, 0, doc.width, doc.height)
    box, mask_plane = full, None
    mode = settings.mode
    if mode == "inpaint":
        box, mask_plane = _selected_region(canvas, doc)
        if mask_plane is None:
            raise PlanError("Inpaint changes the selected pixels only: select the area to "
                            "regenerate first (or choose another mode).")
    x, y, w, h = box
    images: Dict[int, Image] = {}
    init_slot = mask_slot = None
    if mode in ("img2img", "inpaint"):
        init_slot = 0
        images[init_slot] = canvas.read_projection(box)  # the visible image
    if mode == "inpaint":
        mask_slot = 1
        images[mask_slot] = pixels.mask_image(w, h, mask_plane)
    units = []
    for index, unit in enumerate(u for u in settings.units if u.enabled):
        common = dict(condition=unit.condition, weight=unit.weight, start=unit.start,
                      end=unit.end, control_mode=unit.control_mode,
                      resize_mode=unit.resize_mode)
        skeleton = _unit_skeleton(canvas, doc, unit, box)
        if skeleton:  # the keypoints travel; the server draws them at its working size
            units.append(messages.ControlUnit(pose=openpose.to_message(skeleton, w, h),
                                              **common))
            continue
        slot = len(images)
        image, preprocessor = unit_image(canvas, doc, unit, box, index)
        if image.is_transparent() and preprocessor != "none":
            layer = doc.layer(unit.layer_id)
            raise PlanError(f"Control unit {index + 1}: the layer "
                            f"{layer.name if layer else 'image'!r} is empty here; draw on it "
                            f"or bind the unit to another layer.")
        images[slot] = image
        preprocessor = preprocessor or "none"
        units.append(messages.ControlUnit(image=slot, preprocessor=preprocessor,
                                          params=unit_params(unit, preprocessor, declared),
                                          **common))
    references = reference_units(settings, canvas, doc, images)
    seed = choose_seed(settings) if seed is None else seed
    try:
        request = messages.GenerateRequest(
            width=w, height=h, mode=mode, prompt=settings.prompt,
            negative_prompt=settings.negative_prompt, seed=seed, steps=settings.steps,
            cfg=settings.cfg, sampler=settings.sampler, strength=settings.strength,
            batch=batch or settings.batch, base_model=settings.base_model.strip(),
            init_image=init_slot, mask_image=mask_slot, controls=tuple(units),
            hires=settings.hires, loras=loras, references=references)
    except errors.ControlCanvasError as err:
        raise PlanError(f"A setting is out of range: {err}") from None
    placement = place_results(settings, doc, box, mask_plane)
    if placement.note:
        notes.append(placement.note)
    return Plan(request, images, placement, settings.prompt, tuple(notes))


def _selected_region(canvas: CanvasPort, doc: DocInfo) -> Tuple[Box, Optional[bytes]]:
    """The region an edit reads: the selection's box with some context and its mask plane,
    or the whole document and no mask when nothing is selected."""
    selection = canvas.read_selection()
    bbox = None if selection is None else pixels.selection_bbox(doc.width, doc.height,
                                                                selection)
    if bbox is None:
        return (0, 0, doc.width, doc.height), None
    box = geometry.context_box(bbox, doc.width, doc.height)
    return box, pixels.crop_plane(selection, doc.width, box)


def build_edit(settings: Settings, canvas: CanvasPort, *,
               seed: Optional[int] = None) -> Plan:
    """The request the Edit section's button sends: the active layer's own pixels (inside
    the selection's box with its mask when something is selected) changed as the
    instruction says, with the section's reference layers; the result goes above it."""
    edit = settings.edit
    instruction = edit.instruction.strip()
    if not instruction:
        raise PlanError("Type the instruction first: what to change, in words (for example "
                        "'make the jacket red').")
    doc = canvas.info()
    layer = doc.layer(doc.active_id)
    if layer is None:
        raise PlanError("Select the layer to edit first (Edit changes the selected layer, "
                        "or the selected part of it).")
    notes = [n for n in (pixels.depth_note(doc.color_model, doc.color_depth),) if n]
    box, mask_plane = _selected_region(canvas, doc)
    images: Dict[int, Image] = {0: canvas.read_layer(layer.id, box)}
    if images[0].is_transparent():
        raise PlanError(f"The layer {layer.name!r} is empty there; select the layer that holds "
                        f"the picture to edit.")
    if mask_plane is not None:
        images[1] = pixels.mask_image(box[2], box[3], mask_plane)
    picked = [layer_id for layer_id in edit.references if layer_id]
    if len(picked) > messages.MAX_EDIT_REFERENCES:
        raise PlanError(f"{len(picked)} reference layers: an edit takes at most "
                        f"{messages.MAX_EDIT_REFERENCES}; remove one.")
    slots = []
    for index, layer_id in enumerate(picked):
        slots.append(len(images))
        images[slots[-1]] = reference_image(canvas, doc, layer_id,
                                            f"Edit reference {index + 1}")
    try:
        request = messages.GenerateRequest(
            width=box[2], height=box[3], mode="edit", prompt=instruction,
            seed=choose_seed(settings) if seed is None else seed, steps=edit.steps,
            cfg=edit.cfg, batch=settings.batch, base_model=edit.base_model.strip(),
            init_image=0, mask_image=1 if mask_plane is not None else None,
            edit_references=tuple(slots))
    except errors.ControlCanvasError as err:
        raise PlanError(f"A setting is out of range: {err}") from None
    placement = Placement("above", layer.id, box, mask_plane)
    return Plan(request, images, placement, instruction, tuple(notes), kind="edit")


def place_results(settings: Settings, doc: DocInfo, box: Box,
                  mask: Optional[bytes] = None) -> Placement:
    """Above the source layer; below the first unit's layer when asked (line art)."""
    bound = [u.layer_id for u in settings.units if u.enabled and u.layer_id]
    if settings.place == "below" and bound and doc.layer(bound[0]) is not None:
        return Placement("below", bound[0], box, mask)
    if settings.place == "below":
        return Placement("top", "", box, mask,
                         note="Bind a control unit to the line-art layer to place the colours "
                              "under it; the result went on top.")
    anchor = doc.active_id if doc.layer(doc.active_id) else (bound[0] if bound else "")
    return Placement("above" if anchor else "top", anchor, box, mask)


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    condition: str
    place: str
    prompt: str = ""
    annotators: Tuple[str, ...] = ()  # preferred, first available wins
    notes: str = ""
    source: str = "selected"  # the layer it binds: "selected", "lineart" or "pose"


PRESETS: Tuple[Preset, ...] = (
    Preset("colourise", "Colourise line art", "lineart", "below",
           "flat colours, soft shading",
           ("lineart_from_drawing", "lineart_drawing", "invert", "none"),
           "Colours go under the lines.", "lineart"),
    Preset("pose", "Figure from pose", "openpose", "below", "full body figure",
           ("none",), "Figures go under the skeleton, so it stays on top to edit.",
           "pose"),
    Preset("scribble", "Sketch to image", "scribble", "above", "",
           ("scribble", "none")),
)


def preset(key: str) -> Preset:
    for p in PRESETS:
        if p.key == key:
            return p
    raise KeyError(key)


def pick_annotator(preferred: Sequence[str], available: Sequence[str]) -> str:
    for name in preferred:
        if name in available:
            return name
    return "none"


def looks_like_line_art(rgba: bytes) -> bool:
    """Dark strokes on a transparent background, judged from sampled RGBA8 pixels: at least
    half of them transparent, some inked, and most of the inked ones dark."""
    alpha = rgba[3::4]
    inked = [i for i, a in enumerate(alpha) if a >= 128]
    if not inked or 2 * sum(1 for a in alpha if a < 32) < len(alpha):
        return False
    dark = sum(1 for i in inked
               if 299 * rgba[4 * i] + 587 * rgba[4 * i + 1] + 114 * rgba[4 * i + 2] < 128_000)
    return 5 * dark >= 3 * len(inked)


def line_art_layer(canvas: CanvasPort, doc: DocInfo, previous: Sequence[str] = ()) -> str:
    """The layer a line-art preset reads: the one its unit used before while it exists;
    else the selected layer when it holds line art, else the topmost paint layer that
    does; else the selected layer.  (After an Undo Krita selects Background.)"""
    for layer_id in previous:
        if layer_id and doc.layer(layer_id) is not None:
            return layer_id
    order = [doc.active_id] + [layer.id for layer in doc.layers if layer.id != doc.active_id]
    for layer_id in order:
        layer = doc.layer(layer_id)
        if layer is not None and layer.kind == "paintlayer" and \
                looks_like_line_art(canvas.sample_layer(layer_id)):
            return layer_id
    return doc.active_id


def pose_layer(doc: DocInfo) -> str:
    """The layer a pose preset reads: the selected vector layer, else the topmost one."""
    active = doc.layer(doc.active_id)
    if active is not None and active.kind == "vectorlayer":
        return active.id
    poses = [layer.id for layer in doc.layers if layer.kind == "vectorlayer"]
    return poses[0] if poses else doc.active_id


def apply_preset(settings: Settings, key: str, layer_id: str,
                 annotators: Sequence[str]) -> Settings:
    p = preset(key)
    unit = UnitSettings(layer_id=layer_id, condition=p.condition,
                        annotator=pick_annotator(p.annotators, annotators))
    out = replace(settings, units=[unit], place=p.place, mode="txt2img")
    if not out.prompt and p.prompt:
        out = replace(out, prompt=p.prompt)
    return out


@dataclass
class HistoryItem:
    """One finished job: its images (RGBA8) with seeds, and where they went."""
    job_id: str
    prompt: str
    images: List[Tuple[Image, Optional[int]]]
    placement: Placement
    settings_json: str = ""
    layer_ids: List[str] = field(default_factory=list)
    stored_seeds: Tuple[Optional[int], ...] = ()  # read back from the document: no pixels

    @property
    def seeds(self) -> List[Optional[int]]:
        if not self.images:
            return list(self.stored_seeds)
        return [seed for _, seed in self.images]

    def label(self) -> str:
        seeds = ", ".join(str(s) for s in self.seeds)
        saved = "" if self.images else " (saved)"  # read back from the file: no pixels
        return f"{short_prompt(self.prompt, 36)} · seed {seeds}{saved}"
