"""Everything that talks to Krita: the only module that imports ``krita``.

* :class:`KritaCanvas` implements :class:`~controlcanvas.plan.CanvasPort` on one
  Krita document (pixels in, result layers out).
* :func:`register` adds the docker and the extension (called from ``__init__``).

Facts this relies on (checked in Krita 5.1.5, see tests/editors/krita_smoke):
``pixelData`` of an 8-bit RGBA node is BGRA; a selection is 1 byte per pixel;
``setPixelData`` is not undoable but ``addChildNode`` is, so a result layer is
filled first and added to the tree last (one Ctrl+Z removes it; a batch is added
as one filled group); ``addChildNode(node, above)`` puts ``node`` directly above
``above`` (None = on top); ``VectorLayer.addShapesFromSvg`` crashes Krita 5.1 when
the document is not the active one, so it is only called for the active document.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

from . import pixels, pose as pose_mod
from .plan import Box, CanvasPort, DocInfo, LayerInfo, Placement
from .proto import Image, doc_history

try:
    import krita
except ImportError:  # outside Krita (pure-logic tests import the package)
    krita = None

log = logging.getLogger(__name__)
SETTINGS_GROUP = "controlcanvas"
DOCKER_ID = "controlcanvas_docker"
MASK_TYPES = ("selectionmask", "transparencymask", "filtermask", "transformmask",
              "colorizemask")


def _uid(node) -> str:
    return node.uniqueId().toString()


class KritaCanvas(CanvasPort):
    """One Krita document seen through the plug-in's CanvasPort."""

    def __init__(self, document) -> None:
        self.doc = document
        self._key = ""

    # -- reading --------------------------------------------------------------------

    def _nodes(self):
        """(node, depth) for every layer, top to bottom, masks left out."""
        out = []

        def walk(parent, depth):
            for node in reversed(parent.childNodes()):
                if node.type() in MASK_TYPES:
                    continue
                out.append((node, depth))
                if node.type() == "grouplayer":
                    walk(node, depth + 1)

        walk(self.doc.rootNode(), 0)
        return out

    def node(self, layer_id: str):
        for node, _ in self._nodes():
            if _uid(node) == layer_id:
                return node
        return None

    def info(self) -> DocInfo:
        active = self.doc.activeNode()
        layers = tuple(LayerInfo(_uid(n), n.name(), n.type(), depth)
                       for n, depth in self._nodes())
        return DocInfo(width=self.doc.width(), height=self.doc.height(),
                       resolution=float(self.doc.resolution() or 72),
                       color_model=self.doc.colorModel(), color_depth=self.doc.colorDepth(),
                       name=self.doc.name() or "", layers=layers,
                       active_id=_uid(active) if active is not None else "")

    def _image(self, data, box: Box) -> Image:
        x, y, w, h = box
        return pixels.image_from_bgra(w, h, pixels.to_u8(bytes(data), self.doc.colorDepth()))

    def read_layer(self, layer_id: str, box: Box) -> Image:
        node = self.node(layer_id)
        if node is None:
            raise pixels.PixelError("That layer is gone; pick another one.")
        self.doc.waitForDone()
        return self._image(node.projectionPixelData(*box), box)

    def read_projection(self, box: Box) -> Image:
        self.doc.waitForDone()
        if krita.Krita.instance().activeWindow() is None:
            self.doc.refreshProjection()  # no view keeps it up to date (batch use)
        return self._image(self.doc.pixelData(*box), box)

    def read_selection(self) -> Optional[bytes]:
        selection = self.doc.selection()
        if selection is None:
            return None
        return bytes(selection.pixelData(0, 0, self.doc.width(), self.doc.height()))

    def sample_layer(self, layer_id: str, lines: int = 16) -> bytes:
        node = self.node(layer_id)
        if node is None:
            return b""
        self.doc.waitForDone()
        w, h = self.doc.width(), self.doc.height()
        out = []
        for i in range(min(lines, w, h)):
            y, x = (2 * i + 1) * h // (2 * lines), (2 * i + 1) * w // (2 * lines)
            out.append(self._image(node.pixelData(0, y, w, 1), (0, y, w, 1)).data)
            out.append(self._image(node.pixelData(x, 0, 1, h), (x, 0, 1, h)).data)
        return b"".join(out)

    def read_pose(self, layer_id: str):
        node = self.node(layer_id)
        if node is None or node.type() != "vectorlayer":
            return None
        shapes = []
        for shape in node.shapes():
            rect = shape.boundingBox()
            shapes.append((shape.name(), (rect.x(), rect.y(), rect.width(), rect.height())))
        try:
            return pose_mod.keypoints_from_shapes(shapes, self.doc.resolution() or 72)
        except pose_mod.PoseError:
            pass
        try:
            return pose_mod.keypoints_from_svg(node.toSvg(), self.doc.resolution() or 72)
        except pose_mod.PoseError:
            return None

    def key(self) -> str:
        if not self._key:  # kept: a closed document has no root node to ask
            self._key = _uid(self.doc.rootNode())
        return self._key

    def is_open(self) -> bool:
        key = self.key()
        return any(_uid(d.rootNode()) == key for d in krita.Krita.instance().documents()
                   if d.rootNode() is not None)

    def modified(self) -> bool:
        return bool(self.doc.modified())

    def read_history(self) -> bytes:
        if doc_history.NAME not in self.doc.annotationTypes():
            return b""
        return bytes(self.doc.annotation(doc_history.NAME))

    def write_history(self, data: bytes) -> None:
        # An annotation is saved in the .kra (annotations/<type>) since Krita 5.1;
        # setting one marks the document modified, so the artist is asked to save it.
        from .qt import QtCore
        self.doc.setAnnotation(doc_history.NAME, doc_history.DESCRIPTION,
                               QtCore.QByteArray(data))

    # -- writing --------------------------------------------------------------------

    def _where(self, placement: Placement):
        """(parent, above, note) for Node.addChildNode."""
        root = self.doc.rootNode()
        anchor = self.node(placement.anchor_id) if placement.anchor_id else None
        if anchor is None:
            return root, None, ""
        parent = anchor.parentNode() or root
        if placement.where == "above":
            return parent, anchor, ""
        siblings = parent.childNodes()  # bottom to top
        ids = [_uid(n) for n in siblings]
        index = ids.index(_uid(anchor)) if _uid(anchor) in ids else -1
        if index > 0:
            return parent, siblings[index - 1], ""
        # Krita's scripting API cannot insert under the lowest layer in one undoable
        # step; Multiply above it keeps dark lines visible without touching the layer.
        return parent, anchor, (f"{anchor.name()!r} is the lowest layer, so the result was "
                                f"added above it in Multiply mode (dark lines stay visible); "
                                f"put a background layer under it to get results below it.")

    def insert_results(self, placement: Placement, layers: Sequence[Tuple[Image, str]],
                       group: str = "") -> Tuple[List[str], str]:
        doc = self.doc
        x, y, w, h = placement.box
        nodes = []
        for image, name in layers:
            node = doc.createNode(name, "paintlayer")
            # Fill before the node joins the tree: setPixelData is not undoable.
            node.setPixelData(pixels.from_u8(image.to_bgra(), doc.colorDepth()), x, y, w, h)
            nodes.append(node)
        parent, above, note = self._where(placement)
        multiply = bool(note)
        if group:
            top = doc.createGroupLayer(group)
            for i, node in enumerate(reversed(nodes)):  # the first seed ends on top
                node.setVisible(i == len(nodes) - 1)
                top.addChildNode(node, None)
        else:
            top = nodes[0]
        if multiply:
            top.setBlendingMode("multiply")
        parent.addChildNode(top, above)  # the one undoable step
        doc.waitForDone()
        if krita.Krita.instance().activeWindow() is not None:
            doc.setActiveNode(top)
        return [_uid(n) for n in nodes], note

    def show_live(self, layer_id: str, name: str, placement: Placement, image: Image,
                  clear: Optional[Box] = None) -> str:
        doc = self.doc
        x, y, w, h = placement.box
        data = pixels.from_u8(image.to_bgra(), doc.colorDepth())
        node = self.node(layer_id) if layer_id else None
        if node is None:  # first frame, or the layer was undone or deleted
            node = doc.createNode(name, "paintlayer")
            node.setPixelData(data, x, y, w, h)  # filled before it joins the tree
            parent, above, lowest = self._where(placement)
            if lowest:  # over the lowest layer, as results: Multiply keeps the lines seen
                node.setBlendingMode("multiply")
            parent.addChildNode(node, above)  # the one undo step of live painting
        else:
            if clear is not None and tuple(clear) != (x, y, w, h):
                cx, cy, cw, ch = clear
                node.setPixelData(pixels.from_u8(bytes(cw * ch * 4), doc.colorDepth()),
                                  cx, cy, cw, ch)
            node.setPixelData(data, x, y, w, h)  # in place: no undo step per frame
        doc.refreshProjection()
        return _uid(node)

    def remove_layer(self, layer_id: str) -> None:
        node = self.node(layer_id)
        if node is not None:
            node.remove()

    def set_layer_visible(self, layer_id: str, visible: bool) -> None:
        node = self.node(layer_id)
        if node is not None and bool(node.visible()) != visible:
            node.setVisible(visible)
            self.doc.refreshProjection()

    def insert_pose_layer(self, svg: str, name: str, anchor_id: str = "") -> str:
        app = krita.Krita.instance()
        active = app.activeDocument()
        if active is None or _uid(active.rootNode()) != _uid(self.doc.rootNode()):
            raise RuntimeError("the document must be open in a window (Krita 5 cannot add "
                               "vector shapes to a document without a view)")
        layer = self.doc.createVectorLayer(name)
        parent, above, _ = self._where(Placement("above", anchor_id))
        parent.addChildNode(layer, above)
        layer.addShapesFromSvg(svg)
        self.doc.waitForDone()
        return _uid(layer)


# -- plug-in registration ---------------------------------------------------------------

def active_canvas() -> Optional[KritaCanvas]:
    doc = krita.Krita.instance().activeDocument()
    return KritaCanvas(doc) if doc is not None else None


def load_settings() -> str:
    return krita.Krita.instance().readSetting(SETTINGS_GROUP, "settings", "")


def save_settings(text: str) -> None:
    krita.Krita.instance().writeSetting(SETTINGS_GROUP, "settings", text)


def make_controller():
    from .controller import Controller
    from .settings import Settings
    return Controller(active_canvas, settings=Settings.from_json(load_settings()),
                      save_settings=save_settings)


_DOCKERS: list = []

if krita is not None:
    class ControlCanvasDocker(krita.DockWidget):
        def __init__(self) -> None:
            super().__init__()
            from .docker import DockerPanel
            self.setWindowTitle("ControlCanvas")
            self.panel = DockerPanel(make_controller())
            self.setWidget(self.panel)
            _DOCKERS.append(self)

        def canvasChanged(self, canvas) -> None:
            self.panel.refresh_layers()

    class ControlCanvasExtension(krita.Extension):
        def setup(self) -> None:
            pass

        def createActions(self, window) -> None:
            action = window.createAction("controlcanvas_generate", "ControlCanvas: Generate",
                                         "tools/scripts")
            action.triggered.connect(self._generate)

        def _generate(self) -> None:
            for docker in _DOCKERS:
                if docker.isVisible():
                    docker.panel.on_generate()
                    return


def register() -> bool:
    """Add the extension and the docker to Krita; False outside Krita."""
    if krita is None or not hasattr(krita, "Krita"):
        return False
    app = krita.Krita.instance()
    app.addExtension(ControlCanvasExtension(app))
    base = krita.DockWidgetFactoryBase
    right = getattr(getattr(base, "DockPosition", base), "DockRight", None)
    if right is None:
        right = base.DockRight
    app.addDockWidgetFactory(krita.DockWidgetFactory(DOCKER_ID, right, ControlCanvasDocker))
    return True
