"""A small stand-in for Krita's ``krita`` module, faithful where the plug-in relies on it.

Behaviour copied from Krita 5.1.5 as measured in tests/editors/krita_smoke:

* ``pixelData``/``setPixelData`` of 8-bit RGBA nodes are BGRA; a selection is 1 byte/px;
* ``childNodes()`` is bottom to top and includes the "Selection Mask" when there is a
  selection; ``addChildNode(node, above)`` puts node directly above ``above`` (None =
  top) and refuses (SAFE ASSERT, returns True, does nothing) when ``above`` is not a
  child; it is ONE undo step when the parent is in the document tree;
* ``setPixelData`` on a node in the tree is NOT undoable: the mock counts such writes
  in ``Document.unundoable_writes`` so tests can prove results are filled first;
* ``VectorLayer.addShapesFromSvg`` crashes Krita when the document is not the active
  one: the mock raises instead; shapes keep the SVG ids as names, in points;
* a document is listed by ``Krita.documents()`` from its creation until ``close()``;
  after that its ``rootNode()`` is None; ``modified()`` turns True on a pixel write or a
  tree change (until ``setModified(False)``, as saving does).

Test helpers (not Krita API) are marked ``# test helper``.
"""

from __future__ import annotations

import itertools
import re
import uuid
import xml.etree.ElementTree as ET

from PyQt6 import QtWidgets

_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class _Uuid:
    def __init__(self) -> None:
        self._text = "{%s}" % uuid.uuid4()

    def toString(self) -> str:
        return self._text


class _Rect:
    def __init__(self, x, y, w, h) -> None:
        self._v = (float(x), float(y), float(w), float(h))

    def x(self):
        return self._v[0]

    def y(self):
        return self._v[1]

    def width(self):
        return self._v[2]

    def height(self):
        return self._v[3]


class Shape:
    def __init__(self, name: str, kind: str, bbox, svg: str) -> None:
        self._name, self._kind, self._bbox, self._svg = name, kind, list(bbox), svg

    def name(self):
        return self._name

    def type(self):
        return "KoPathShape"

    def boundingBox(self):
        return _Rect(*self._bbox)

    def position(self):
        return _Rect(self._bbox[0], self._bbox[1], 0, 0)

    def toSvg(self):
        x, y = self._bbox[0], self._bbox[1]
        return self._svg.replace("/>", f' transform="translate({x}, {y})"/>', 1)

    def move_by(self, dx_pt: float, dy_pt: float) -> None:  # test helper: the shape tool
        self._bbox[0] += dx_pt
        self._bbox[1] += dy_pt


class Node:
    _counter = itertools.count(1)

    def __init__(self, doc: "Document", name: str, kind: str) -> None:
        self._doc = doc
        self._name = name
        self._type = kind
        self._uid = _Uuid()
        self._children: list = []
        self._parent = None
        self._visible = True
        self._blending = "normal"
        self._opacity = 255
        self._pixels = bytearray(doc.width() * doc.height() * doc._bpp) \
            if kind in ("paintlayer",) else None
        self._shapes: list = []
        self._selection = None  # for "Selection Mask" nodes

    # identity
    def name(self):
        return self._name

    def setName(self, name):
        self._name = name

    def type(self):
        return self._type

    def uniqueId(self):
        return self._uid

    def visible(self):
        return self._visible

    def setVisible(self, value):
        self._visible = bool(value)

    def blendingMode(self):
        return self._blending

    def setBlendingMode(self, value):
        self._blending = value

    def opacity(self):
        return self._opacity

    # tree
    def childNodes(self):
        return list(self._children)

    def parentNode(self):
        return self._parent

    def _in_tree(self) -> bool:
        node = self
        while node._parent is not None:
            node = node._parent
        return node is self._doc._root

    def addChildNode(self, child, above):
        if child._parent is not None:
            print("SAFE ASSERT (mock krita): !newNode->parent()")
            return True
        if above is not None and above._parent is not self:
            print("SAFE ASSERT (mock krita): !aboveThis || aboveThis->parent().data() == this")
            return True
        index = len(self._children) if above is None else self._children.index(above) + 1
        self._children.insert(index, child)
        child._parent = self
        if self._in_tree():
            self._doc._undo.append(("add", child, self, index))
            self._doc._modified = True
        return True

    def remove(self):
        if self._parent is None:
            return False
        parent = self._parent
        index = parent._children.index(self)
        parent._children.remove(self)
        self._parent = None
        self._doc._undo.append(("remove", self, parent, index))
        return True

    # pixels
    def _read(self, buf, x, y, w, h):
        dw, dh, bpp = self._doc.width(), self._doc.height(), self._doc._bpp
        out = bytearray(w * h * bpp)
        for row in range(h):
            sy = y + row
            if not 0 <= sy < dh:
                continue
            x0, x1 = max(0, x), min(dw, x + w)
            if x1 <= x0:
                continue
            src = (sy * dw + x0) * bpp
            dst = (row * w + (x0 - x)) * bpp
            out[dst:dst + (x1 - x0) * bpp] = buf[src:src + (x1 - x0) * bpp]
        return bytes(out)

    def pixelData(self, x, y, w, h):
        if self._pixels is None:
            return b""
        return self._read(self._pixels, x, y, w, h)

    def projectionPixelData(self, x, y, w, h):
        if self._type == "paintlayer":
            return self.pixelData(x, y, w, h)
        return self._read(self._doc._composite(self._children), x, y, w, h)

    def setPixelData(self, data, x, y, w, h):
        if self._pixels is None:
            return False
        bpp = self._doc._bpp
        data = bytes(data)
        assert len(data) >= w * h * bpp, "not enough data"
        if self._in_tree():
            self._doc.unundoable_writes += 1
            self._doc._modified = True
        dw = self._doc.width()
        for row in range(h):
            sy = y + row
            if not 0 <= sy < self._doc.height():
                continue
            for col in range(w):
                sx = x + col
                if 0 <= sx < dw:
                    s = (row * w + col) * bpp
                    d = (sy * dw + sx) * bpp
                    self._pixels[d:d + bpp] = data[s:s + bpp]
        return True

    # vector layers
    def shapes(self):
        return list(self._shapes)

    def addShapesFromSvg(self, svg):
        active = Krita.instance().activeDocument()
        if active is not self._doc:
            raise RuntimeError("mock krita: addShapesFromSvg without an active document "
                               "segfaults Krita 5.1.5")
        root = ET.fromstring(svg)
        box = [float(v) for v in _NUM.findall(root.get("viewBox", ""))]
        width = float(_NUM.match(root.get("width", "0")).group(0)) if root.get("width") else 0
        k = width / box[2] if len(box) == 4 and box[2] else 1.0
        added = []
        for el in root:
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "circle":
                cx, cy, r = (float(el.get(a)) * k for a in ("cx", "cy", "r"))
                bbox = (cx - r, cy - r, 2 * r, 2 * r)
                svg_el = f'<circle id="{el.get("id")}" cx="{r}" cy="{r}" r="{r}"/>'
            elif tag == "path":
                nums = [float(v) * k for v in _NUM.findall(el.get("d", ""))]
                xs, ys = nums[0::2], nums[1::2]
                bbox = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
                svg_el = f'<path id="{el.get("id")}" d="M0 0"/>'
            else:
                continue
            shape = Shape(el.get("id", ""), tag, bbox, svg_el)
            self._shapes.append(shape)
            added.append(shape)
        return added

    def toSvg(self):
        w = self._doc.width() * 72.0 / self._doc.resolution()
        h = self._doc.height() * 72.0 / self._doc.resolution()
        body = "".join(s.toSvg() for s in self._shapes)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}pt" height="{h}pt" '
                f'viewBox="0 0 {w} {h}">{body}</svg>')


class Selection:
    def __init__(self, doc=None) -> None:
        self._doc = doc
        self._w = self._h = 0
        self._data = bytearray()

    def _ensure(self, w, h):
        if (self._w, self._h) != (w, h):
            self._w, self._h, self._data = w, h, bytearray(w * h)

    def select(self, x, y, w, h, value):  # the real API
        doc = self._doc or Krita.instance().activeDocument()
        self._ensure(doc.width(), doc.height())
        for row in range(y, y + h):
            self._data[row * self._w + x:row * self._w + x + w] = bytes([value]) * w

    def pixelData(self, x, y, w, h):
        out = bytearray(w * h)
        for row in range(h):
            sy = y + row
            if 0 <= sy < self._h:
                out[row * w:(row + 1) * w] = self._data[sy * self._w + x:sy * self._w + x + w]
        return bytes(out)


class Document:
    def __init__(self, width, height, name="mock", model="RGBA", depth="U8",
                 resolution=72.0) -> None:
        self._w, self._h = width, height
        self._name = name
        self._model, self._depth = model, depth
        self._bpp = 4 if depth == "U8" else 8
        self._res = resolution
        self._root = Node(self, "root", "grouplayer")
        self._active = None
        self._selection = None
        self._undo: list = []
        self.unundoable_writes = 0
        self._annotations: dict = {}  # type -> (description, bytes), saved with the .kra
        self._modified = False
        self.projection_refreshes = 0  # test helper: refreshProjection() calls
        self._closed = False
        Krita.instance()._documents.append(self)  # open, as Krita's documents() lists it

    def modified(self):
        return self._modified

    def setModified(self, value):
        self._modified = bool(value)

    def close(self):
        """Close the document: it leaves documents(), and its root node is gone."""
        app = Krita.instance()
        if self in app._documents:
            app._documents.remove(self)
        if app._active is self:
            app._active = None
        self._closed = True
        return True

    def width(self):
        return self._w

    # Document annotations, as Krita 5.1+ / 6 have them (kept in the .kra under
    # annotations/<type>); the real API takes and returns a QByteArray.
    def setAnnotation(self, type, description, annotation):
        self._annotations[type] = (description, bytes(annotation))

    def annotation(self, type):
        return self._annotations.get(type, ("", b""))[1]

    def annotationDescription(self, type):
        return self._annotations.get(type, ("", b""))[0]

    def annotationTypes(self):
        return list(self._annotations)

    def removeAnnotation(self, type):
        self._annotations.pop(type, None)

    def height(self):
        return self._h

    def name(self):
        return self._name

    def resolution(self):
        return int(self._res)

    def colorModel(self):
        return self._model

    def colorDepth(self):
        return self._depth

    def rootNode(self):
        return None if self._closed else self._root

    def topLevelNodes(self):
        return self._root.childNodes()

    def activeNode(self):
        return self._active

    def setActiveNode(self, node):
        self._active = node

    def selection(self):
        return self._selection

    def setSelection(self, selection):
        self._selection = selection
        mask = [n for n in self._root._children if n._type == "selectionmask"]
        for node in mask:
            self._root._children.remove(node)
            node._parent = None
        if selection is not None:  # Krita shows it as a node in the tree
            node = Node(self, "Selection Mask", "selectionmask")
            self._root._children.append(node)
            node._parent = self._root

    def createNode(self, name, kind):
        return Node(self, name, kind)

    def createGroupLayer(self, name):
        return Node(self, name, "grouplayer")

    def createVectorLayer(self, name):
        return Node(self, name, "vectorlayer")

    def nodeByName(self, name):
        def walk(node):
            for child in node._children:
                if child._name == name:
                    return child
                found = walk(child)
                if found:
                    return found
            return None
        return walk(self._root)

    def waitForDone(self):
        pass

    def refreshProjection(self):
        self.projection_refreshes += 1

    def _composite(self, nodes):
        """Straight-alpha 'over' of visible paint layers (and groups), BGRA U8."""
        out = bytearray(self._w * self._h * 4)
        for node in nodes:
            if not node._visible:
                continue
            if node._type == "grouplayer":
                src = self._composite(node._children)
            elif node._type == "paintlayer" and self._bpp == 4:
                src = node._pixels
            else:
                continue
            multiply = node._blending == "multiply"
            for i in range(0, len(out), 4):
                sa = src[i + 3]
                if sa == 0:
                    continue
                da = out[i + 3]
                for c in range(3):
                    s = src[i + c]
                    if multiply and da:
                        s = s * out[i + c] // 255
                    out[i + c] = (s * sa + out[i + c] * (255 - sa)) // 255 if da else s
                out[i + 3] = sa + da * (255 - sa) // 255
        return bytes(out)

    def pixelData(self, x, y, w, h):
        return self._root._read(self._composite(self._root._children), x, y, w, h)

    # test helpers
    def undo(self):
        kind, node, parent, index = self._undo.pop()
        if kind == "add":
            parent._children.remove(node)
            node._parent = None
        else:
            parent._children.insert(index, node)
            node._parent = parent

    @property
    def undo_steps(self):
        return len(self._undo)

    def layer_names(self, node=None):
        """Bottom-to-top names, groups as [name, [children...]]."""
        node = node or self._root
        return [[c._name, self.layer_names(c)] if c._type == "grouplayer" else c._name
                for c in node._children]


class Window:
    def __init__(self) -> None:
        self.views = []


class Extension:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class DockWidget(QtWidgets.QDockWidget):
    def __init__(self) -> None:
        super().__init__()

    def canvasChanged(self, canvas):
        pass


class DockWidgetFactoryBase:
    class DockPosition:
        DockRight = 2
    DockRight = 2


class DockWidgetFactory(DockWidgetFactoryBase):
    def __init__(self, ident, position, cls) -> None:
        self.ident, self.position, self.cls = ident, position, cls


class Krita:
    _instance = None

    def __init__(self) -> None:
        self._active = None
        self._window = None
        self._documents = []
        self._settings = {}
        self.extensions = []
        self.docker_factories = []

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def activeDocument(self):
        return self._active

    def documents(self):
        return list(self._documents)

    def setActiveDocument(self, doc):
        self._active = doc

    def activeWindow(self):
        return self._window

    def readSetting(self, group, name, default):
        return self._settings.get((group, name), default)

    def writeSetting(self, group, name, value):
        self._settings[(group, name)] = value

    def addExtension(self, extension):
        self.extensions.append(extension)

    def addDockWidgetFactory(self, factory):
        self.docker_factories.append(factory)

    def batchmode(self):
        return True

    def setBatchmode(self, value):
        pass

    # test helpers
    def open_with_view(self, doc):
        self._active = doc
        self._window = self._window or Window()

    def reset(self):
        self._active = None
        self._window = None
        self._documents = []
