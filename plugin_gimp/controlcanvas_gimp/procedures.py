"""Every procedure the plug-in registers, with its menu label and arguments, as data.

``canvas`` turns these specs into ``Gimp.ImageProcedure`` arguments and dialogs;
``actions`` reads the values back by the same names.  A script calls the same
procedures non-interactively with the same argument names, e.g.::

    proc = Gimp.get_pdb().lookup_procedure("python-fu-controlcanvas-generate")
    cfg = proc.create_config()
    cfg.set_property("image", image)
    cfg.set_core_object_array("drawables", [layer])
    cfg.set_property("prompt", "knight in armour")
    cfg.set_property("seed", 1234)
    result = proc.run(cfg)          # values: status, seed, layer

:func:`check_values` validates a mapping of values against a spec exactly as
GIMP would clamp them, so the logic tests call procedures the way GIMP does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from shared.messages import MAX_EDIT_REFERENCES, SAMPLERS

from .generation import GINT_MAX, SAME_SEED
from .problems import UsageError

MENU_PATH = "<Image>/Filters/ControlNet"
PREFIX = "python-fu-controlcanvas-"

# Condition nick -> label, in the order the dialog lists them (inpaint is not a
# layer-driven condition, so it is not offered here).
CONDITION_CHOICES: Tuple[Tuple[str, str], ...] = (
    ("lineart", "Line art"),
    ("lineart_anime", "Anime line art"),
    ("scribble", "Scribble"),
    ("softedge", "Soft edge"),
    ("canny", "Canny edges"),
    ("depth", "Depth"),
    ("normal", "Normal map"),
    ("openpose", "Pose (OpenPose)"),
    ("mlsd", "Straight lines (MLSD)"),
    ("seg", "Segmentation"),
    ("tile", "Tile (detail)"),
    ("shuffle", "Shuffle (style)"),
)
INPAINT_CONDITION_CHOICES = (("none", "None: repaint from the prompt alone"),) + \
    CONDITION_CHOICES
SAMPLER_LABELS = {
    "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC",
    "euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "lcm": "LCM (few-step models)",
}
SAMPLER_CHOICES = tuple((name, SAMPLER_LABELS.get(name, name)) for name in SAMPLERS)
CONTROL_MODE_CHOICES = (
    ("balanced", "Balanced"),
    ("prompt", "My prompt is more important"),
    ("control", "ControlNet is more important"),
)
SIZE_CHOICES = (
    ("model", "The model's native size"),
    ("layer", "The layer's own size"),
)
POSE_SOURCE_CHOICES = (
    ("path", "The skeleton path"),
    ("layer", "The selected layer (an OpenPose image)"),
)


REFERENCE_MODE_CHOICES = (
    ("reference", "Reference: the whole picture"),
    ("style", "Style only"),
    ("composition", "Composition (layout) only"),
    ("face", "Face (needs the server's face IP-Adapter)"),
)
REFERENCE_HELP = ("The name of a layer of this image whose picture steers the result "
                  "(IP-Adapter): a photo or painting to borrow the look, style, layout or a "
                  "face from. It is sent whole, at most 512 px. Blank: none")
LORAS_HELP = ("LoRAs (styles, characters) from the server's LoRA folder, as name:strength "
              "separated by commas, e.g. \"ink:0.8, watercolour\" (strength -2 to 2, 1 when "
              "left out, 0 off). Settings / connection test… lists the server's LoRAs and the "
              "base models each fits. Blank: none")


@dataclass(frozen=True)
class Arg:
    """One procedure argument: kind is string, int, double, boolean or choice."""

    name: str
    kind: str
    label: str
    help: str
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Tuple[Tuple[str, str], ...] = ()
    in_dialog: bool = True

    def check(self, value: Any) -> Any:
        """The value GIMP would hand to the procedure, or UsageError naming the argument."""
        if self.kind == "string":
            if value is None:  # GIMP hands over an unset text argument as NULL
                return ""
            if not isinstance(value, str):
                raise UsageError(f"Argument {self.name!r} must be text; got {value!r}.",
                                 field=self.name)
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise UsageError(f"Argument {self.name!r} must be true or false; got {value!r}.",
                                 field=self.name)
            return value
        if self.kind == "choice":
            nicks = [nick for nick, _ in self.choices]
            if value not in nicks:
                raise UsageError(f"Argument {self.name!r} must be one of {', '.join(nicks)}; "
                                 f"got {value!r}.", field=self.name)
            return value
        if self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)
        if not ok or value < self.minimum or value > self.maximum:
            raise UsageError(f"Argument {self.name!r} must be a number from {self.minimum:g} to "
                             f"{self.maximum:g}; got {value!r}.", field=self.name)
        return int(value) if self.kind == "int" else float(value)


@dataclass(frozen=True)
class ProcedureSpec:
    """A menu entry: ``action`` names the function in :mod:`actions` that runs it."""

    name: str
    label: str
    blurb: str
    help: str
    action: str
    args: Tuple[Arg, ...]
    returns: Tuple[str, ...] = ()
    fixed: Dict[str, Any] = field(default_factory=dict)  # values the preset decides
    below: bool = False  # result goes below the source layer (colourise)
    needs_drawable: bool = True

    def arg(self, name: str) -> Arg:
        for arg in self.args:
            if arg.name == name:
                return arg
        raise KeyError(name)

    @property
    def dialog_args(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args if a.in_dialog)


def _string(name, label, help, default="", in_dialog=True) -> Arg:
    return Arg(name, "string", label, help, default, in_dialog=in_dialog)


def _int(name, label, help, default, lo, hi) -> Arg:
    return Arg(name, "int", label, help, default, lo, hi)


def _double(name, label, help, default, lo, hi) -> Arg:
    return Arg(name, "double", label, help, default, lo, hi)


def _bool(name, label, help, default) -> Arg:
    return Arg(name, "boolean", label, help, default)


def _choice(name, label, help, choices, default) -> Arg:
    return Arg(name, "choice", label, help, default, choices=choices)


def connection_args(in_dialog: bool = False) -> Tuple[Arg, ...]:
    return (
        _string("server-url", "Server address",
                "ws://HOST:PORT of the ControlCanvas server; blank: the address saved by "
                "Settings, else ws://127.0.0.1:7351", in_dialog=in_dialog),
        _string("token", "Token",
                "Access token; blank: the token saved by Settings for its address, else, for "
                "a server on this computer only, its token file. A server on another "
                "computer needs its own token", in_dialog=in_dialog),
    )


def condition_arg(default: str = "lineart") -> Arg:
    return _choice("condition", "Condition", "What the layer shows: the kind of ControlNet "
                   "to steer the picture with", CONDITION_CHOICES, default)


def annotator_args(annotate: bool, annotator: str) -> Tuple[Arg, ...]:
    return (
        _bool("annotate", "Annotate the layer first",
              "On: the server turns the layer into a control image (e.g. photo → line art). "
              "Off: the layer already is the control image", annotate),
        _string("annotator", "Annotator", "Annotator name on the server; blank: the server's "
                "default for the condition", annotator),
    )


def generation_args() -> Tuple[Arg, ...]:
    return (
        _string("prompt", "Prompt", "What the picture should show"),
        _string("negative-prompt", "Negative prompt", "What it should not show"),
        _int("seed", "Seed", "Same seed + same settings = same picture; -1 picks a random "
             "seed (shown in the new layer's name); -2 repeats the seed of this image's "
             "last result (kept in the .xcf)", -1, SAME_SEED, GINT_MAX),
        _int("batch", "Variants", "How many pictures (seed, seed+1, ...); more than one "
             "arrive in a layer group", 1, 1, 16),
        _int("steps", "Steps", "Denoising steps", 20, 1, 150),
        _double("cfg", "Guidance (CFG)", "How strictly to follow the prompt", 7.0, 0.0, 30.0),
        _choice("sampler", "Sampler", "Sampling method", SAMPLER_CHOICES, "dpmpp_2m_karras"),
        _double("control-weight", "Control weight", "How strongly the control image steers "
                "(0-2)", 1.0, 0.0, 2.0),
        _double("control-start", "Control start", "Fraction of the steps at which the "
                "control starts", 0.0, 0.0, 1.0),
        _double("control-end", "Control end", "Fraction of the steps at which the control "
                "stops", 1.0, 0.0, 1.0),
        _choice("control-mode", "Control mode", "Balance between prompt and control image",
                CONTROL_MODE_CHOICES, "balanced"),
        _choice("size", "Work at", "Generation size. Native: the model's own scale (512 px "
                "for SD1.5, 1024 px for SDXL) with the layer's aspect ratio. Layer: the layer's "
                "size rounded to multiples of 8. Either way the result comes back at the "
                "layer's exact size and position", SIZE_CHOICES, "model"),
        _string("base-model", "Base model", "Model name on the server; blank: the server's "
                "default"),
        _string("loras", "LoRAs", LORAS_HELP),
        _string("reference-layer", "Reference layer", REFERENCE_HELP),
        _double("reference-weight", "Reference weight", "How strongly the reference layer "
                "steers (0-2; 0 off, 0.5-1 usual)", 0.8, 0.0, 2.0),
        _choice("reference-mode", "Reference mode", "What the reference layer gives: the "
                "whole picture, its style, its layout, or a face", REFERENCE_MODE_CHOICES,
                "reference"),
    )


def _generating(name, label, blurb, help, head, fixed=None, below=False) -> ProcedureSpec:
    return ProcedureSpec(name=PREFIX + name, label=label, blurb=blurb, help=help,
                         action="generate", args=tuple(head) + generation_args()
                         + connection_args(), returns=("seed", "layer"),
                         fixed=dict(fixed or {}), below=below)


PROCEDURES: Tuple[ProcedureSpec, ...] = (
    _generating(
        "generate", "Generate from layer…",
        "Generate a picture steered by the selected layer (ControlNet)",
        "Sends the selected layer to the ControlCanvas server as a control image and adds "
        "the result as a new layer above it, at its position and size, in one undo step.",
        (condition_arg("lineart"),) + annotator_args(True, "")),
    _generating(
        "colourise", "Colourise line art…",
        "Colour the selected line-art layer; the colours go in a new layer below it",
        "Line-art preset: the selected layer (dark lines, transparent or white paper) steers "
        "the picture; the result goes below it so the lines stay crisp on top.",
        annotator_args(True, "lineart_from_drawing"), fixed={"condition": "lineart"},
        below=True),
    _generating(
        "figure-from-pose", "Figure from pose…",
        "Generate a figure in the pose of the image's skeleton path",
        "OpenPose preset: the skeleton path (one stroke per limb; move its joints with the "
        "Paths tool, then run again with the same seed) or an OpenPose layer steers the "
        "figure. The path's joints travel as keypoints and the server draws them at the "
        "size it generates at. Without a skeleton path a default one is added to the image.",
        (_choice("pose-source", "Pose from", "The image's skeleton path (a default skeleton "
                 "is added when there is none), or the selected layer when it already is an "
                 "OpenPose image", POSE_SOURCE_CHOICES, "path"),),
        fixed={"condition": "openpose", "annotate": False, "annotator": ""}),
    ProcedureSpec(
        name=PREFIX + "inpaint", label="Regenerate selection…",
        blurb="Repaint the selected part of the layer; nothing outside the selection changes",
        help="Select an area of the layer first (any selection tool; feathered edges blend "
             "in). The server repaints it, seeing some of the layer around it, and the "
             "result is added above the layer as a new layer whose layer mask is the "
             "selection: outside it the image stays exactly as it was, and the mask can be "
             "painted to show more or less of the result. Optionally a ControlNet reading "
             "the same layer steers the new pixels.",
        action="inpaint",
        args=(_choice("condition", "Control", "A ControlNet that reads the layer (for "
                      "example line art) to steer the repainted area, or none",
                      INPAINT_CONDITION_CHOICES, "none"),)
        + annotator_args(True, "")
        + (_double("strength", "Strength", "How much the selected area changes: 1 paints "
                   "it anew, lower values keep more of what is there", 0.75, 0.0, 1.0),)
        + generation_args() + connection_args(),
        returns=("seed", "layer")),
    ProcedureSpec(
        name=PREFIX + "edit", label="Edit with instruction…",
        blurb="Change the layer (or its selection) as an instruction says, with an edit model",
        help="Type what to change ('colour this line art as a watercolour', 'make the jacket "
             "red'). The server's edit model (FLUX.1 Kontext) sees the layer, and up to "
             f"{MAX_EDIT_REFERENCES} reference layers named below, and the result is added "
             "above the layer as a new layer. With a selection only the selected pixels "
             "change: outside it the image stays exactly as it was.",
        action="edit",
        args=(_string("prompt", "Instruction", "What to change, in words"),
              _string("reference-layers", "Reference layers",
                      f"Up to {MAX_EDIT_REFERENCES} layer names, separated by commas, whose "
                      f"pictures the instruction may refer to; blank: none"),
              _int("seed", "Seed", "Same seed + same settings = same picture; -1 picks a "
                   "random seed", -1, SAME_SEED, GINT_MAX),
              _int("batch", "Variants", "How many pictures (seed, seed+1, ...)", 1, 1, 16),
              _int("steps", "Steps", "Denoising steps", 28, 1, 150),
              _double("cfg", "Guidance", "How strictly to follow the instruction (FLUX.1 "
                      "Kontext: about 2.5)", 2.5, 0.0, 30.0),
              _choice("size", "Work at", "Generation size: the model's own scale, or the "
                      "layer's size", SIZE_CHOICES, "model"),
              _string("base-model", "Edit model", "An edit model on the server (FLUX.1 "
                      "Kontext); blank: the server picks its edit model"))
        + connection_args(),
        returns=("seed", "layer")),
    ProcedureSpec(
        name=PREFIX + "control-image", label="Make control image…",
        blurb="Run an annotator on the selected layer and add the control image as a layer",
        help="Shows what the ControlNet will see (line art, edges, depth...) so it can be "
             "inspected or edited first, then used with 'Generate from layer' with "
             "'Annotate' off.",
        action="control_image",
        args=(condition_arg("lineart"),
              _string("annotator", "Annotator", "Annotator name on the server; blank: the "
                      "server's default for the condition"))
        + connection_args(),
        returns=("layer",)),
    ProcedureSpec(
        name=PREFIX + "pose-from-photo", label="Pose from photo…",
        blurb="Detect the pose in the selected photo layer as an editable skeleton path",
        help="Adds the detected skeleton as a path (one stroke per limb) and its OpenPose "
             "image as a layer. Needs a server with pose detection.",
        action="pose_from_photo", args=connection_args(), returns=("layer",)),
    ProcedureSpec(
        name=PREFIX + "repeat-last", label="Repeat last",
        blurb="Run the image's last ControlNet filter again: same settings, same seed, "
              "no dialog",
        help="Regenerates with the procedure, settings and seed of this image's last "
             "ControlCanvas result (kept in the .xcf), on the selected layer as it is now: "
             "move a skeleton's joint or touch up the line art, then repeat. No dialog, so "
             "it can have a keyboard shortcut (Edit ▸ Keyboard Shortcuts, search "
             "'Repeat last'). GIMP's plug-ins run once per call, so this is GIMP's "
             "counterpart of Krita's live mode.",
        action="repeat_last", args=connection_args(), returns=("seed", "layer")),
    ProcedureSpec(
        name=PREFIX + "settings", label="Settings / connection test…",
        blurb="Set the ControlCanvas server address and token, and test the connection",
        help="Blank fields use the defaults: ws://127.0.0.1:7351 and the token file that "
             "`controlcanvas serve` writes on this machine. For a server on another "
             "computer, enter its address and its own token (this computer's token file is "
             "only sent to 127.0.0.1, localhost or ::1). Saved for all ControlNet filters.",
        action="settings", args=connection_args(in_dialog=True), returns=("report",),
        needs_drawable=False),
)
BY_NAME: Dict[str, ProcedureSpec] = {spec.name: spec for spec in PROCEDURES}


def mnemonic_labels(spec: ProcedureSpec) -> Dict[str, str]:
    """Each argument's label with a keyboard mnemonic ("_Prompt"): distinct letters while
    they last (dialog arguments first), never those of the dialog's buttons (Help, Reset,
    Cancel, OK, Save/Load settings) unless a label has no other letter."""
    buttons = set("hrcosl")
    taken = set(buttons)
    out = {}
    for arg in sorted(spec.args, key=lambda a: not a.in_dialog):
        letters = [i for i, ch in enumerate(arg.label) if ch.isalnum()]
        free = [i for i in letters if arg.label[i].lower() not in taken]
        clear = [i for i in letters if arg.label[i].lower() not in buttons]
        index = (free or clear or letters)[0]
        taken.add(arg.label[index].lower())
        out[arg.name] = arg.label[:index] + "_" + arg.label[index:]
    return {arg.name: out[arg.name] for arg in spec.args}


def check_values(spec: ProcedureSpec, values: Mapping[str, Any]) -> Dict[str, Any]:
    """Every argument of ``spec`` with its checked value; missing ones get defaults.

    The preset's ``fixed`` values win over anything given.
    """
    unknown = set(values) - {a.name for a in spec.args} - set(spec.fixed)
    if unknown:
        raise UsageError(f"{spec.name} has no argument(s) {', '.join(sorted(unknown))}.",
                         field=sorted(unknown)[0])
    out = {a.name: a.check(values.get(a.name, a.default)) for a in spec.args}
    out.update(spec.fixed)
    return out
