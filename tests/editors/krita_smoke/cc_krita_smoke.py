"""Smoke test of Krita's Python API, run by kritarunner inside the chroot.

    kritarunner -s cc_krita_smoke -f main OUT_DIR [TCP_PORT]

Every check prints one line ``CC_CHECK <name> OK|FAIL <json>`` and the run ends
with ``CC_DONE <n_ok> <n_fail>``; the same data is written to OUT_DIR/results.json.
kritarunner itself always exits 0 (even when Python raises), so callers must
parse these lines.
"""
import faulthandler
import json
import os
import socket
import sys
import time
import traceback

from krita import InfoObject, Krita, Selection
from PyQt5.QtCore import PYQT_VERSION_STR, QT_VERSION_STR
from PyQt5.QtGui import QColor, QImage
from PyQt5.QtWidgets import QApplication

W, H = 64, 48
DPI = 144.0  # not 72, so points and pixels differ (factor 2)
RESULTS = []
faulthandler.enable()  # a segfault in Krita prints the Python stack


def check(name):
    def deco(fn):
        def run(*a):
            try:
                detail = fn(*a)
                RESULTS.append((name, True, detail))
                print("CC_CHECK %s OK %s" % (name, json.dumps(detail, default=str)))
            except Exception as exc:  # keep going, report everything
                tb = traceback.format_exc()
                RESULTS.append((name, False, {"error": repr(exc), "tb": tb}))
                print("CC_CHECK %s FAIL %s" % (name, json.dumps(repr(exc))))
                print(tb)
        return run
    return deco


def bgra(r, g, b, a):
    return bytes([b, g, r, a])


def names(node):
    return [n.name() for n in node.childNodes()]  # bottom to top


def tree(node):
    """Nested names, bottom to top: ['a', ['grp', [...]], ...]."""
    return [[n.name(), tree(n)] if n.childNodes() else n.name() for n in node.childNodes()]


@check("environment")
def check_env():
    import pykrita
    info = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "krita": Krita.instance().version(),
        "qt": QT_VERSION_STR,
        "pyqt": PYQT_VERSION_STR,
        "pykrita_has_qt_major_version": hasattr(pykrita, "qt_major_version"),
        "pykrita_attrs": sorted(a for a in dir(pykrita) if not a.startswith("__")),
        "home": os.environ.get("HOME"),
        "sys_path": sys.path,
    }
    if info["pykrita_has_qt_major_version"]:
        info["qt_major_version"] = pykrita.qt_major_version()
    return info


@check("create_document")
def check_create(ctx):
    doc = Krita.instance().createDocument(W, H, "cc_smoke", "RGBA", "U8", "", DPI)
    doc.setBatchmode(True)
    ctx["doc"] = doc
    view = None
    if ctx.get("gui"):
        # A view makes it Krita.activeDocument() (needed by addShapesFromSvg, undo action).
        view = Krita.instance().activeWindow().addView(doc)
    active = Krita.instance().activeDocument()
    top = [(n.name(), n.type()) for n in doc.topLevelNodes()]
    assert doc.width() == W and doc.height() == H
    assert doc.resolution() == int(DPI), doc.resolution()
    return {"top_level_nodes": top, "resolution": doc.resolution(),
            "selection_when_none": repr(doc.selection()), "view": repr(view),
            "activeDocument_is_doc": active is not None
            and active.rootNode().uniqueId() == doc.rootNode().uniqueId()}


@check("paint_layer_pixels_bgra")
def check_paint(ctx):
    doc = ctx["doc"]
    root = doc.rootNode()
    layer = doc.createNode("cc_paint", "paintlayer")
    # Fill before adding to the tree (setPixelData is not undoable).
    px = bgra(10, 20, 30, 255)  # R=10 G=20 B=30
    layer.setPixelData(px, 3, 2, 1, 1)
    block = bgra(200, 0, 0, 255) * (8 * 4)  # 8x4 opaque red block at (40,30)
    layer.setPixelData(block, 40, 30, 8, 4)
    before_add = bytes(layer.pixelData(3, 2, 1, 1))
    ok = root.addChildNode(layer, None)
    doc.waitForDone()
    after_add = bytes(layer.pixelData(3, 2, 1, 1))
    assert before_add == px and after_add == px, (before_add, after_add)
    # Write after it is in the tree too.
    layer.setPixelData(bgra(1, 2, 3, 128), 0, 0, 1, 1)
    raw00 = bytes(layer.pixelData(0, 0, 1, 1))
    # Projection: Document.pixelData before/after refreshProjection.
    proj_early = bytes(doc.pixelData(3, 2, 1, 1))
    doc.refreshProjection()
    proj = bytes(doc.pixelData(3, 2, 1, 1))
    assert proj == px, proj
    qimg = doc.projection(0, 0, W, H)
    c = QColor(qimg.pixel(3, 2))
    assert (c.red(), c.green(), c.blue()) == (10, 20, 30), c.getRgb()
    ctx["paint"] = layer
    return {"addChildNode_returned": ok, "node_pixel_bytes": list(after_add),
            "semi_transparent_roundtrip": list(raw00),
            "doc_pixelData_before_refresh": list(proj_early),
            "doc_pixelData_after_refresh": list(proj),
            "projection_qimage_format": int(qimg.format()),
            "projection_rgb_at_3_2": c.getRgb(),
            "projectionPixelData_len": len(layer.projectionPixelData(0, 0, W, H))}


@check("selection")
def check_selection(ctx):
    doc = ctx["doc"]
    assert doc.selection() is None
    sel = Selection()
    sel.select(10, 5, 20, 10, 255)
    doc.setSelection(sel)
    s = doc.selection()
    data = bytes(s.pixelData(0, 0, W, H))
    assert len(data) == W * H, len(data)
    inside = data[7 * W + 15]
    outside = data[0]
    assert inside == 255 and outside == 0, (inside, outside)
    bbox = (s.x(), s.y(), s.width(), s.height())
    # Deselect. NOTE: doc.setSelection(None) SEGFAULTS here (Krita 5.1.5, after
    # layers were added); setting an empty Selection() is safe.
    doc.setSelection(Selection())
    after = doc.selection()
    after_desc = None if after is None else bytes(after.pixelData(0, 0, W, H)).count(255)
    return {"len": len(data), "inside": inside, "outside": outside, "bbox": bbox,
            "count_255": data.count(255), "after_empty_selection_count_255": after_desc,
            "after_empty_selection_is_none": after is None}


SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="64pt" height="48pt" viewBox="0 0 64 48">
  <rect id="cc_rect" x="10" y="4" width="12" height="6" fill="#00ff00"/>
  <path id="cc_path" d="M 2 40 L 20 40 L 20 46 Z" fill="#0000ff" stroke="none"/>
</svg>"""


def shape_info(shapes):
    out = []
    for sh in shapes:
        bb, pos = sh.boundingBox(), sh.position()
        out.append({"name": sh.name(), "type": sh.type(),
                    "bbox_pt": [bb.x(), bb.y(), bb.width(), bb.height()],
                    "pos_pt": [pos.x(), pos.y()], "svg": sh.toSvg()})
    return out


def green_bbox(doc, timeout=3.0):
    """Pixel bbox [x0, y0, x1, y1) of the green rect in the projection, and the
    seconds it took: vector layers rasterize asynchronously (needs the Qt event
    loop), so poll with processEvents."""
    t0 = time.time()
    while True:
        QApplication.processEvents()
        doc.waitForDone()
        doc.refreshProjection()
        img = doc.projection(0, 0, doc.width(), doc.height())
        pts = [(x, y) for y in range(doc.height()) for x in range(doc.width())
               if QColor(img.pixel(x, y)).green() > 200 and QColor(img.pixel(x, y)).red() < 50]
        if pts or time.time() - t0 > timeout:
            break
        time.sleep(0.05)
    if not pts:
        return None
    return {"bbox": [min(p[0] for p in pts), min(p[1] for p in pts),
                     max(p[0] for p in pts) + 1, max(p[1] for p in pts) + 1],
            "after_s": round(time.time() - t0, 2)}


@check("vector_layer_addShapesFromSvg")
def check_vector(ctx):
    """Krita 5.1.5's VectorLayer.addShapesFromSvg dereferences
    Krita.activeDocument(), which is None without a view (always in kritarunner):
    it SEGFAULTS. So only call it when the document is active (GUI + view)."""
    doc = ctx["doc"]
    active = Krita.instance().activeDocument()
    if active is None or active.rootNode().uniqueId() != doc.rootNode().uniqueId():
        return {"skipped": "Krita.activeDocument() is not this document (no view): "
                           "addShapesFromSvg would segfault in 5.1.5"}
    vec = doc.createVectorLayer("cc_vector")
    doc.rootNode().addChildNode(vec, None)
    added = vec.addShapesFromSvg(SVG)
    doc.waitForDone()
    info = shape_info(vec.shapes())
    ctx["vector"] = vec
    assert [s["name"] for s in info] == ["cc_rect", "cc_path"], [s["name"] for s in info]
    gb = green_bbox(doc)
    # Unit-less SVG (no pt, no viewBox): are user units points or pixels?
    vec2 = doc.createVectorLayer("cc_vector_unitless")
    doc.rootNode().addChildNode(vec2, None)
    vec2.addShapesFromSvg('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
                          '<rect id="cc_u" x="10" y="4" width="12" height="6" fill="#ff00ff"/></svg>')
    bb = vec2.shapes()[0].boundingBox()
    unitless = [bb.x(), bb.y(), bb.width(), bb.height()]
    vec2.remove()
    return {"added_len": len(added), "shapes": info, "green_pixel_bbox_px": gb,
            "points_to_pixels": doc.resolution() / 72.0, "layer_toSvg": vec.toSvg(),
            "unitless_svg_rect_x10_y4_w12_h6_bbox_pt": unitless}


@check("vector_layer_from_svg_file")
def check_vector_file(ctx, out):
    """Works everywhere: open an SVG file (needs Krita batchmode, else a
    resolution dialog blocks) and read its vector layer's shapes."""
    path = os.path.join(out, "cc_shapes.svg")
    with open(path, "w") as f:
        f.write(SVG)
    d = Krita.instance().openDocument(path)
    d.setBatchmode(True)
    layers = [(n.name(), n.type()) for n in d.topLevelNodes()]
    vec = [n for n in d.topLevelNodes() if n.type() == "vectorlayer"][0]
    info = shape_info(vec.shapes())
    res = {"doc_size_px": [d.width(), d.height()], "resolution": d.resolution(),
           "layers": layers, "shapes": info, "green_pixel_bbox_px": green_bbox(d)}
    d.close()
    assert [s["name"] for s in info] == ["cc_rect", "cc_path"], [s["name"] for s in info]
    return res


@check("layer_order")
def check_order(ctx):
    """addChildNode(node, above): node goes directly above `above`; None -> top.
    (Node.setChildNodes is broken in 5.1.5: SAFE ASSERTs and wrong order.)"""
    doc = ctx["doc"]
    root = doc.rootNode()
    paint = ctx["paint"]
    start = names(root)
    above = doc.createNode("cc_above_paint", "paintlayer")
    root.addChildNode(above, paint)
    after_above = names(root)
    kids = root.childNodes()
    idx = [n.name() for n in kids].index("cc_paint")
    below = doc.createNode("cc_below_paint", "paintlayer")
    root.addChildNode(below, kids[idx - 1])  # "below X" = above X's lower sibling
    after_below = names(root)
    top = doc.createNode("cc_top", "paintlayer")
    root.addChildNode(top, None)
    after_top = names(root)
    # Very bottom: put new above the old bottom, then re-add the old bottom above it.
    bottom = doc.createNode("cc_bottom", "paintlayer")
    old_bottom = root.childNodes()[0]
    root.addChildNode(bottom, old_bottom)
    old_bottom.remove()
    root.addChildNode(old_bottom, bottom)
    doc.waitForDone()
    after_bottom = names(root)
    assert after_above.index("cc_above_paint") == after_above.index("cc_paint") + 1
    assert after_below.index("cc_below_paint") == after_below.index("cc_paint") - 1
    assert after_top[-1] == "cc_top" and after_bottom[0] == "cc_bottom", after_bottom
    return {"start": start, "after_above": after_above, "after_below": after_below,
            "after_top": after_top, "after_bottom_trick": after_bottom}


@check("group_layer")
def check_group(ctx):
    doc = ctx["doc"]
    root = doc.rootNode()
    grp = doc.createGroupLayer("cc_group")
    root.addChildNode(grp, None)
    child = doc.createNode("cc_in_group", "paintlayer")
    child.setPixelData(bgra(0, 0, 255, 255) * 4, 60, 0, 2, 2)
    grp.addChildNode(child, None)
    doc.waitForDone()
    doc.refreshProjection()
    proj = bytes(doc.pixelData(60, 0, 1, 1))
    assert child.parentNode().name() == "cc_group"
    assert proj == bgra(0, 0, 255, 255), list(proj)
    return {"group_type": grp.type(), "children": names(grp),
            "parent_of_child": child.parentNode().name(), "projection_in_group": list(proj)}


@check("export_and_reopen")
def check_export(ctx, out):
    doc = ctx["doc"]
    k = Krita.instance()
    png = os.path.join(out, "cc_smoke.png")
    kra = os.path.join(out, "cc_smoke.kra")
    doc.refreshProjection()
    ok_png = doc.exportImage(png, InfoObject())
    ok_kra = doc.saveAs(kra)
    q = QImage(png)
    c = QColor(q.pixel(3, 2))
    assert (c.red(), c.green(), c.blue()) == (10, 20, 30), c.getRgb()
    d2 = k.openDocument(kra)
    d2.setBatchmode(True)
    n2 = d2.nodeByName("cc_paint")
    px2 = bytes(n2.pixelData(3, 2, 1, 1))
    vec2 = d2.nodeByName("cc_vector")
    shape_names = [s.name() for s in vec2.shapes()] if vec2 else None
    d2.close()
    d3 = k.openDocument(png)
    d3.setBatchmode(True)
    top3 = [(n.name(), n.type()) for n in d3.topLevelNodes()]
    px3 = bytes(d3.topLevelNodes()[0].pixelData(3, 2, 1, 1))
    res3 = d3.resolution()
    d3.close()
    assert px2 == bgra(10, 20, 30, 255) and px3 == bgra(10, 20, 30, 255), (px2, px3)
    return {"exportImage_png": ok_png, "saveAs_kra": ok_kra,
            "png_size": os.path.getsize(png), "kra_size": os.path.getsize(kra),
            "png_qimage_rgb_3_2": c.getRgb(), "kra_reopen_pixel": list(px2),
            "kra_reopen_shapes": shape_names, "png_open_nodes": top3,
            "png_open_pixel": list(px3), "png_open_resolution": res3}


@check("undo")
def check_undo(ctx):
    k = Krita.instance()
    act = k.action("edit_undo")
    res = {"action_edit_undo": repr(act), "n_actions": len(k.actions()),
           "windows": len(k.windows())}
    if act is None:
        res["note"] = "no main window (kritarunner): no actions, no undo from scripting"
        return res
    doc = ctx["doc"]
    root = doc.rootNode()

    def undo(action="edit_undo"):
        k.action(action).trigger()
        doc.waitForDone()
        QApplication.processEvents()

    paint = doc.nodeByName("cc_paint")
    before_px = bytes(paint.pixelData(3, 2, 1, 1))
    layers0 = names(root)
    tree0 = tree(root)
    paint.setPixelData(bgra(99, 99, 99, 255), 3, 2, 1, 1)
    undo()
    res["setPixelData_then_undo"] = {
        "pixel_before": list(before_px),
        "pixel_after_undo": list(bytes(paint.pixelData(3, 2, 1, 1))),
        "tree_before": tree0, "tree_after_undo": tree(root)}
    undo("edit_redo")
    res["setPixelData_then_undo"]["tree_after_redo"] = tree(root)
    probe = doc.createNode("cc_undo_probe", "paintlayer")
    root.addChildNode(probe, None)
    doc.waitForDone()
    with_probe = names(root)
    undo()
    after_undo = names(root)
    undo("edit_redo")
    after_redo = names(root)
    res["addChildNode_undo"] = {"with": with_probe, "after_undo": after_undo,
                                "after_redo": after_redo}
    assert "cc_undo_probe" in with_probe and "cc_undo_probe" not in after_undo
    assert "cc_undo_probe" in after_redo
    return res


@check("tcp_to_host")
def check_tcp(port):
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    s.sendall(b"ping-from-krita\n")
    reply = s.makefile("rb").readline().strip()
    s.close()
    assert reply == b"pong:ping-from-krita", reply
    return {"reply": reply.decode()}


@check("plugin_import")
def check_plugins():
    res = {}
    for mod in ("cc_smoke_plugin_krita", "cc_smoke_plugin_runner"):
        try:
            m = __import__(mod)
            res[mod] = {"importable": True, "file": m.__file__,
                        "extension_registered": getattr(m, "REGISTERED", None)}
        except Exception as exc:
            res[mod] = {"importable": False, "error": repr(exc)}
    import pykrita
    res["pykrita.plugins"] = repr(getattr(pykrita, "plugins", None))
    return res


def main(args):
    """args: [OUT_DIR, TCP_PORT or "", "gui" when run inside the full krita]."""
    out = args[0] if args else "/tmp"
    port = args[1] if len(args) > 1 else None
    ctx = {"gui": len(args) > 2 and args[2] == "gui"}
    os.makedirs(out, exist_ok=True)
    Krita.instance().setBatchmode(True)  # else importers (SVG...) open dialogs and hang
    check_env()
    check_create(ctx)
    if "doc" in ctx:
        check_paint(ctx)
        check_selection(ctx)
        check_vector(ctx)
        if "paint" in ctx:
            check_order(ctx)
        check_group(ctx)
        check_export(ctx, out)
        check_undo(ctx)
    check_vector_file(ctx, out)
    if port:
        check_tcp(port)
    check_plugins()
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump([{"name": n, "ok": ok, "detail": d} for n, ok, d in RESULTS], f,
                  indent=1, default=str)
    n_ok = sum(1 for _, ok, _ in RESULTS if ok)
    print("CC_DONE %d %d" % (n_ok, len(RESULTS) - n_ok))


def fail(args):
    """Used to show that kritarunner exits 0 even when the function raises."""
    raise RuntimeError("deliberate failure")
