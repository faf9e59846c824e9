"""The GIMP adapter: the only module that imports Gimp, Gegl, GimpUi and GLib.

It registers the procedures described in :mod:`procedures` under
Filters ▸ ControlNet, shows GIMP's own dialog for them (last-used values are kept
by GIMP), and implements :class:`host.Host` over GIMP's API: 8-bit RGBA pixels
through GEGL, new layers filled through their buffers inside one undo group, skeleton
paths, the selection (read as coverage; a regenerated selection comes back as a
layer with that coverage as its layer mask), the progress bar.  All of it runs on
the plug-in's main thread.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, List, Optional, Sequence

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, GLib, GObject  # noqa: E402

from shared import doc_history  # noqa: E402
from shared.images import Image  # noqa: E402

from . import __version__, actions, generation, pose, procedures, settings  # noqa: E402
from .host import LayerInfo, NewLayer, SkeletonPath  # noqa: E402
from .problems import UsageError, describe  # noqa: E402
from .procedures import ProcedureSpec  # noqa: E402

FORMAT = "R'G'B'A u8"  # straight 8-bit RGBA with the sRGB curve, as the protocol wants
MASK_FORMAT = "Y u8"  # selection coverage and layer masks: 0 = not at all, 255 = fully
READWRITE = GObject.ParamFlags.READWRITE


# -- the host: GIMP behind the interface the actions use ---------------------------

def _write(drawable, width: int, height: int, babl_format: str, data: bytes) -> None:
    """Fill a drawable the plug-in has just created (adding it is the undo step).

    Straight into its buffer: the shadow buffer route (``merge_shadow``) writes only
    where the image's selection is, which would clip results to whatever the artist
    had selected.
    """
    buffer = drawable.get_buffer()
    buffer.set(Gegl.Rectangle.new(0, 0, width, height), babl_format, data)
    buffer.flush()
    drawable.update(0, 0, width, height)


class GimpHost:
    def __init__(self, image: Optional[Gimp.Image], drawables: Sequence[Any]) -> None:
        self.image = image
        self.drawables = list(drawables or [])

    # reading

    def active_layer(self) -> LayerInfo:
        image = self.image
        if image is None:
            raise UsageError("Open an image and select a layer first.")
        if image.get_base_type() == Gimp.ImageBaseType.INDEXED:
            raise UsageError("The image is indexed; convert it with Image ▸ Mode ▸ RGB first.")
        drawables = self.drawables or list(image.get_selected_drawables())
        if len(drawables) != 1:
            raise UsageError(f"Select exactly one layer ({len(drawables)} are selected).")
        drawable = drawables[0]
        if drawable.is_layer_mask():
            drawable = Gimp.Layer.from_mask(drawable)
        if not drawable.is_layer():
            raise UsageError("Select a layer: the filter does not work on channels.")
        _, x, y = drawable.get_offsets()
        return LayerInfo(drawable.get_name(), drawable.get_width(), drawable.get_height(),
                         x, y, drawable)

    def find_layer(self, name: str) -> Optional[LayerInfo]:
        found = self.image.get_layer_by_name(name) if self.image is not None else None
        if found is None:
            return None
        _, x, y = found.get_offsets()
        return LayerInfo(found.get_name(), found.get_width(), found.get_height(), x, y, found)

    def read_scaled(self, layer: LayerInfo, max_side: int) -> Image:
        """The whole layer, at most ``max_side`` on its longer side: GIMP scales a copy in a
        scratch image (its own interpolation), the artist's image is not touched.

        Not ``buffer.get`` at a scale below 1: a plug-in's GEGL buffer has no mipmaps, and
        in GIMP 3.0 and 3.2 such a read gives transparent or black pixels."""
        scale = min(1.0, max_side / max(layer.width, layer.height))
        if scale >= 1.0:
            return self.read_pixels(layer)
        w, h = max(1, round(layer.width * scale)), max(1, round(layer.height * scale))
        base = self.image.get_base_type()
        scratch = Gimp.Image.new(layer.width, layer.height,
                                 Gimp.ImageBaseType.RGB if base == Gimp.ImageBaseType.INDEXED
                                 else base)
        try:
            scratch.undo_disable()
            copy = Gimp.Layer.new_from_drawable(layer.handle, scratch)
            scratch.insert_layer(copy, None, 0)
            copy.scale(w, h, False)
            return self.read_pixels(LayerInfo(layer.name, w, h, 0, 0, copy))
        finally:
            scratch.delete()

    def read_pixels(self, layer: LayerInfo, box=None) -> Image:
        x, y, w, h = box or (0, 0, layer.width, layer.height)
        rect = Gegl.Rectangle.new(x, y, w, h)
        data = layer.handle.get_buffer().get(rect, 1.0, FORMAT, Gegl.AbyssPolicy.CLAMP)
        return Image(w, h, bytes(data))

    def selection_bounds(self, layer: LayerInfo):
        if Gimp.Selection.is_empty(self.image):
            return None  # (mask_intersect would answer with the whole layer)
        found, x, y, w, h = layer.handle.mask_intersect()  # in the layer's pixels
        return (x, y, w, h) if found and w > 0 and h > 0 else None

    def read_selection(self, layer: LayerInfo, box) -> bytes:
        x, y, w, h = box  # the selection channel covers the image: add the layer's offsets
        rect = Gegl.Rectangle.new(layer.x + x, layer.y + y, w, h)
        buffer = self.image.get_selection().get_buffer()
        return bytes(buffer.get(rect, 1.0, MASK_FORMAT, Gegl.AbyssPolicy.NONE))

    def find_skeleton(self) -> Optional[SkeletonPath]:
        if self.image is None:
            return None
        selected = list(self.image.get_selected_paths())
        ids = {p.get_id() for p in selected}
        for path in selected + [p for p in self.image.get_paths() if p.get_id() not in ids]:
            parasite = path.get_parasite(pose.PARASITE_NAME)
            if parasite is None:
                continue
            meta = bytes(parasite.get_data()).decode("utf-8", "replace")
            strokes = tuple(tuple(path.stroke_get_points(sid)[1]) for sid in path.get_strokes())
            return SkeletonPath(path.get_name(), strokes, meta, path)
        return None

    # writing (callers wrap these in undo_group)

    @contextmanager
    def undo_group(self):
        self.image.undo_group_start()
        try:
            yield
        finally:
            self.image.undo_group_end()
            Gimp.displays_flush()

    def _layer_type(self):
        if self.image.get_base_type() == Gimp.ImageBaseType.GRAY:
            return Gimp.ImageType.GRAYA_IMAGE
        return Gimp.ImageType.RGBA_IMAGE

    def _add_layer(self, new: NewLayer, parent, position: int):
        picture = new.image
        layer = Gimp.Layer.new(self.image, new.name, picture.width, picture.height,
                               self._layer_type(), 100.0, Gimp.LayerMode.NORMAL)
        self.image.insert_layer(layer, parent, position)
        _write(layer, picture.width, picture.height, FORMAT, picture.data)
        if (picture.width, picture.height) != (new.width, new.height):
            layer.scale(new.width, new.height, False)
        layer.set_offsets(new.x, new.y)
        if new.mask is not None:  # a regenerated selection: the layer shows only there
            mask = layer.create_mask(Gimp.AddMaskType.BLACK)
            layer.add_mask(mask)
            _write(mask, new.width, new.height, MASK_FORMAT, new.mask)
        return layer

    def insert_layers(self, anchor: LayerInfo, layers: Sequence[NewLayer], *, below: bool,
                      group: Optional[str] = None) -> List[Any]:
        item = anchor.handle
        parent = item.get_parent()
        position = self.image.get_item_position(item) + (1 if below else 0)
        handles: List[Any] = []
        if group is not None:
            folder = Gimp.GroupLayer.new(self.image, group)
            self.image.insert_layer(folder, parent, position)
            handles.append(folder)
            parent, position = folder, 0
        for index, new in enumerate(layers):
            handles.append(self._add_layer(new, parent, position + index))
        return handles

    def add_skeleton(self, name: str, strokes: Sequence[Sequence[float]], meta: str):
        path = Gimp.Path.new(self.image, name)
        self.image.insert_path(path, None, 0)
        for points in strokes:
            path.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, [float(v) for v in points],
                                        False)
        path.attach_parasite(Gimp.Parasite.new(
            pose.PARASITE_NAME, Gimp.PARASITE_PERSISTENT | Gimp.PARASITE_UNDOABLE,
            list(meta.encode("utf-8"))))
        path.set_visible(True)
        return path

    # feedback

    def progress(self, text: Optional[str] = None, fraction: Optional[float] = None) -> None:
        if text:
            Gimp.progress_set_text(text)
        if fraction is not None:
            Gimp.progress_update(max(0.0, min(1.0, fraction)))

    def message(self, text: str) -> None:
        Gimp.message(text)

    def settings_path(self) -> Optional[str]:
        return os.path.join(Gimp.directory(), settings.SETTINGS_FILE)

    def read_history(self) -> bytes:
        if self.image is None:
            return b""
        parasite = self.image.get_parasite(doc_history.NAME)
        if parasite is None:
            return b""
        data = parasite.get_data()  # gchar in GIR: signed values -128..127
        return data if isinstance(data, bytes) else bytes(v & 0xFF for v in data)

    def write_history(self, data: bytes) -> None:
        if self.image is None:
            return
        # PERSISTENT: saved in the .xcf; UNDOABLE: Ctrl+Z takes it back with the layers.
        flags = getattr(Gimp, "PARASITE_PERSISTENT", 1) | getattr(Gimp, "PARASITE_UNDOABLE", 2)
        signed = [v - 256 if v > 127 else v for v in data]  # GIR types the data as gchar
        self.image.attach_parasite(Gimp.Parasite.new(doc_history.NAME, flags, signed))

    def client_name(self) -> str:
        version = Gimp.version() if hasattr(Gimp, "version") else "3"
        return f"gimp {version} controlcanvas-gimp {__version__}"


# -- procedures ---------------------------------------------------------------------

def _add_argument(proc, arg: procedures.Arg, label: str) -> None:
    if arg.kind == "string":
        proc.add_string_argument(arg.name, label, arg.help, arg.default, READWRITE)
    elif arg.kind == "int":
        proc.add_int_argument(arg.name, label, arg.help, int(arg.minimum), int(arg.maximum),
                              arg.default, READWRITE)
    elif arg.kind == "double":
        proc.add_double_argument(arg.name, label, arg.help, arg.minimum, arg.maximum,
                                 arg.default, READWRITE)
    elif arg.kind == "boolean":
        proc.add_boolean_argument(arg.name, label, arg.help, arg.default, READWRITE)
    elif arg.kind == "choice":
        choice = Gimp.Choice.new()
        for index, (nick, text) in enumerate(arg.choices):
            choice.add(nick, index, text, "")
        proc.add_choice_argument(arg.name, label, arg.help, choice, arg.default, READWRITE)
    else:  # pragma: no cover - procedures.py declares only the kinds above
        raise ValueError(f"unknown argument kind {arg.kind!r}")


def _add_return_value(proc, name: str) -> None:
    if name == "seed":
        proc.add_int_return_value("seed", "Seed", "The seed of the (first) new layer", -1,
                                  generation.GINT_MAX, -1, READWRITE)
    elif name == "layer":
        proc.add_layer_return_value("layer", "Layer", "The new layer (or layer group)", True,
                                    READWRITE)
    elif name == "report":
        proc.add_string_return_value("report", "Report", "What the connection test found",
                                     "", READWRITE)


def _return_value(name: str, outcome: actions.Outcome):
    if name == "seed":
        return GObject.Value(GObject.TYPE_INT, int(outcome.seed))
    if name == "layer":
        return GObject.Value(Gimp.Layer, outcome.layer)
    return GObject.Value(GObject.TYPE_STRING, outcome.report)


def create_procedure(plug_in, spec: ProcedureSpec):
    proc = Gimp.ImageProcedure.new(plug_in, spec.name, Gimp.PDBProcType.PLUGIN, run, None)
    if spec.needs_drawable:
        proc.set_image_types("RGB*, GRAY*")
        proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
    else:
        proc.set_image_types("*")
        proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.ALWAYS)
    proc.set_menu_label(spec.label)
    proc.add_menu_path(procedures.MENU_PATH)
    proc.set_documentation(spec.blurb, spec.help, spec.name)
    proc.set_attribution("ControlCanvas", "ControlCanvas contributors", "2026")
    labels = procedures.mnemonic_labels(spec)
    for arg in spec.args:
        _add_argument(proc, arg, labels[arg.name])
    for name in spec.returns:
        _add_return_value(proc, name)
    return proc


def _show_dialog(procedure, config, spec: ProcedureSpec) -> bool:
    gi.require_version("GimpUi", "3.0")
    from gi.repository import GimpUi

    GimpUi.init("controlcanvas")
    dialog = GimpUi.ProcedureDialog(procedure=procedure, config=config,
                                    title="ControlNet: " + spec.label.rstrip("…"))
    dialog.fill(list(spec.dialog_args))
    try:
        return bool(dialog.run())
    finally:
        dialog.destroy()


def run(procedure, run_mode, image, drawables, config, data):
    spec = procedures.BY_NAME[procedure.get_name()]
    try:
        if run_mode == Gimp.RunMode.INTERACTIVE and spec.dialog_args:
            if not _show_dialog(procedure, config, spec):
                return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, None)
        # Interactive and repeat runs use only what the dialog shows: GIMP restores
        # last-used values for every argument, and a hidden address or token given by a
        # script once must not linger (the address and token come from Settings).
        values = {arg.name: config.get_property(arg.name) for arg in spec.args
                  if arg.in_dialog or run_mode == Gimp.RunMode.NONINTERACTIVE}
        Gimp.progress_init("ControlCanvas: " + spec.label.rstrip("…"))
        try:
            outcome = actions.run(spec, GimpHost(image, drawables), values)
        finally:
            Gimp.progress_end()
    except actions.Failed as failure:
        if failure.is_bug:
            traceback.print_exception(type(failure.cause), failure.cause,
                                      failure.cause.__traceback__, file=sys.stderr)
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                           GLib.Error(failure.message))
    except Exception as err:  # a bug in this adapter: the message, never the traceback
        traceback.print_exc(file=sys.stderr)
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                           GLib.Error(describe(err)))
    values = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, None)
    for index, name in enumerate(spec.returns, start=1):
        values.remove(index)
        values.insert(index, _return_value(name, outcome))
    return values


class ControlCanvas(Gimp.PlugIn):
    def do_query_procedures(self):
        return [spec.name for spec in procedures.PROCEDURES]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        return create_procedure(self, procedures.BY_NAME[name])


def main(argv: Optional[List[str]] = None) -> None:
    Gimp.main(ControlCanvas.__gtype__, list(argv if argv is not None else sys.argv))
