"""An in-memory GIMP for the plug-in's logic tests: implements controlcanvas_gimp.host.Host.

It keeps a layer stack (top first; groups hold children), paths with strokes and
metadata, a selection (one byte per pixel of the image's canvas), undo groups,
progress and messages, and asserts that every call comes from the thread that
created it (GIMP's rule: no Gimp call off the main thread).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional

from controlcanvas_gimp.host import LayerInfo, NewLayer, SkeletonPath
from controlcanvas_gimp.problems import UsageError
from shared.images import Image


def resize_nearest(image: Image, width: int, height: int) -> Image:
    if image.size == (width, height):
        return image
    rows = []
    for y in range(height):
        sy = y * image.height // height
        row = image.data[sy * image.width * 4:(sy + 1) * image.width * 4]
        rows.append(b"".join(row[(x * image.width // width) * 4:(x * image.width // width) * 4 + 4]
                             for x in range(width)))
    return Image(width, height, b"".join(rows))


@dataclass
class FakeLayer:
    name: str
    image: Image
    x: int = 0
    y: int = 0
    undo_group: int = 0  # the undo group that added it (0: present from the start)
    generated_size: tuple = ()  # the size the result arrived at, before scaling
    children: Optional[List["FakeLayer"]] = None  # a layer group
    mask: Optional[bytes] = None  # the layer mask, one byte per pixel

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass
class FakePath:
    name: str
    strokes: List[List[float]]
    meta: Optional[str]
    undo_group: int = 0


@dataclass
class FakeHost:
    layers: List[FakeLayer]
    selected: Optional[FakeLayer] = None
    settings_file: Optional[str] = None
    paths: List[FakePath] = field(default_factory=list)
    undo_groups: int = 0
    open_group: int = 0
    progress_log: list = field(default_factory=list)
    messages: List[str] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)
    canvas: tuple = (96, 72)  # the image's size
    selection: Optional[bytes] = None  # canvas-sized coverage, None = nothing selected
    parasites: dict = field(default_factory=dict)  # the image's, name -> bytes (the .xcf)

    def select_rectangle(self, x: int, y: int, width: int, height: int,
                         value: int = 255) -> None:
        """Add a rectangle to the selection, as the Rectangle Select tool does."""
        cw, ch = self.canvas
        plane = bytearray(self.selection or bytes(cw * ch))
        for row in range(max(0, y), min(ch, y + height)):
            left, right = max(0, x), min(cw, x + width)
            plane[row * cw + left:row * cw + right] = bytes((value,)) * (right - left)
        self.selection = bytes(plane)

    def _main_thread_only(self) -> None:
        assert threading.get_ident() == self.thread, "a GIMP call off the main thread"

    def _mutating(self) -> int:
        self._main_thread_only()
        assert self.open_group, "the image changed outside an undo group"
        return self.open_group

    # Host interface ---------------------------------------------------------------

    def active_layer(self) -> LayerInfo:
        self._main_thread_only()
        if self.selected is None:
            raise UsageError("Select exactly one layer (0 are selected).")
        layer = self.selected
        return LayerInfo(layer.name, layer.width, layer.height, layer.x, layer.y, layer)

    def read_pixels(self, layer: LayerInfo, box=None) -> Image:
        self._main_thread_only()
        image = layer.handle.image
        return image if box is None else image.crop(*box)

    def find_layer(self, name: str) -> Optional[LayerInfo]:
        self._main_thread_only()

        def walk(stack):
            for layer in stack:
                if layer.name == name:
                    return layer
                found = walk(layer.children or [])
                if found is not None:
                    return found
            return None

        layer = walk(self.layers)
        return None if layer is None else LayerInfo(layer.name, layer.width, layer.height,
                                                    layer.x, layer.y, layer)

    def read_scaled(self, layer: LayerInfo, max_side: int) -> Image:
        self._main_thread_only()
        image = layer.handle.image
        scale = min(1.0, max_side / max(image.width, image.height))
        return resize_nearest(image, max(1, round(image.width * scale)),
                              max(1, round(image.height * scale)))

    def read_selection(self, layer: LayerInfo, box) -> bytes:
        self._main_thread_only()
        cw, ch = self.canvas
        x, y, w, h = box
        out = bytearray(w * h)  # outside the canvas nothing is selected
        for row in range(h):
            for col in range(w):
                cx, cy = layer.x + x + col, layer.y + y + row
                if self.selection and 0 <= cx < cw and 0 <= cy < ch:
                    out[row * w + col] = self.selection[cy * cw + cx]
        return bytes(out)

    def selection_bounds(self, layer: LayerInfo):
        self._main_thread_only()
        if self.selection is None or not any(self.selection):
            return None
        plane = self.read_selection(layer, (0, 0, layer.width, layer.height))
        picked = [(i % layer.width, i // layer.width) for i, v in enumerate(plane) if v]
        if not picked:
            return None
        xs, ys = [p[0] for p in picked], [p[1] for p in picked]
        return (min(xs), min(ys), max(xs) + 1 - min(xs), max(ys) + 1 - min(ys))

    @contextmanager
    def undo_group(self):
        self._main_thread_only()
        assert not self.open_group, "nested undo groups"
        self.undo_groups += 1
        self.open_group = self.undo_groups
        try:
            yield
        finally:
            self.open_group = 0

    def _stack_of(self, target: FakeLayer, stack: List[FakeLayer]):
        for item in stack:
            if item is target:
                return stack
            if item.children is not None:
                found = self._stack_of(target, item.children)
                if found is not None:
                    return found
        return None

    def insert_layers(self, anchor: LayerInfo, layers, *, below: bool, group=None):
        group_id = self._mutating()
        stack = self._stack_of(anchor.handle, self.layers)
        position = stack.index(anchor.handle) + (1 if below else 0)
        handles = []
        if group is not None:
            folder = FakeLayer(group, Image.filled(1, 1), undo_group=group_id, children=[])
            stack.insert(position, folder)
            handles.append(folder)
            stack, position = folder.children, 0
        for index, new in enumerate(layers):
            assert isinstance(new, NewLayer)
            assert new.mask is None or len(new.mask) == new.width * new.height
            layer = FakeLayer(new.name, resize_nearest(new.image, new.width, new.height),
                              new.x, new.y, undo_group=group_id,
                              generated_size=new.image.size, mask=new.mask)
            stack.insert(position + index, layer)
            handles.append(layer)
        return handles

    def find_skeleton(self) -> Optional[SkeletonPath]:
        self._main_thread_only()
        for path in self.paths:
            if path.meta is not None:
                return SkeletonPath(path.name, tuple(tuple(s) for s in path.strokes), path.meta,
                                    path)
        return None

    def add_skeleton(self, name, strokes, meta):
        group_id = self._mutating()
        path = FakePath(name, [list(s) for s in strokes], meta, group_id)
        self.paths.insert(0, path)
        return path

    def progress(self, text=None, fraction=None) -> None:
        self._main_thread_only()
        self.progress_log.append((text, fraction))

    def message(self, text: str) -> None:
        self._main_thread_only()
        self.messages.append(text)

    def settings_path(self):
        return self.settings_file

    def read_history(self) -> bytes:
        self._main_thread_only()
        return self.parasites.get("controlcanvas.history", b"")

    def write_history(self, data: bytes) -> None:
        self._main_thread_only()
        self.parasites["controlcanvas.history"] = bytes(data)

    def client_name(self) -> str:
        return "fake-gimp tests"

    # test helpers -------------------------------------------------------------------

    def names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def added(self) -> List[FakeLayer]:
        return [layer for layer in self.layers if layer.undo_group]
