"""Small widget helpers every part of the docker uses (Qt only, through the compat module)."""

from __future__ import annotations

from typing import Sequence

from .qt import QtWidgets

W = QtWidgets


def narrow(box: W.QComboBox, chars: int = 5) -> W.QComboBox:
    """Let a combo box shrink with the docker instead of forcing its width."""
    box.setSizeAdjustPolicy(W.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(chars)
    box.setSizePolicy(W.QSizePolicy.Policy.Expanding, W.QSizePolicy.Policy.Fixed)
    return box


def small_label(text: str) -> W.QLabel:
    label = W.QLabel(text)
    font = label.font()
    font.setPointSizeF(max(7.0, font.pointSizeF() * 0.9))
    label.setFont(font)
    return label


def set_item_enabled(box: W.QComboBox, index: int, enabled: bool, tip: str = "") -> None:
    """Grey out one entry of a combo box (it stays listed, with ``tip`` saying why)."""
    item = getattr(box.model(), "item", lambda row: None)(index)  # a QStandardItemModel
    if item is not None:
        item.setEnabled(enabled)
        item.setToolTip(tip)


def fill_layer_combo(box: W.QComboBox, layers: Sequence, keep: str,
                     none_label: str = "") -> str:
    """List the document's layers (``plan.LayerInfo``, indented by depth) in ``box`` with
    ``keep`` (a layer id) still selected, a first entry ``none_label`` (id "") when given;
    a layer that is gone stays listed as such, to be picked again.  Signals are held
    back.  Returns the id now selected (``keep`` when nothing can be)."""
    box.blockSignals(True)
    box.clear()
    if none_label:
        box.addItem(none_label, "")
    for info in layers:
        box.addItem("  " * info.depth + info.name, info.id)
    index = box.findData(keep) if keep or none_label else -1
    if keep and index < 0:
        box.addItem("(layer gone: pick one)", keep)
        index = box.count() - 1
    box.setCurrentIndex(index if index >= 0 else (0 if box.count() else -1))
    box.blockSignals(False)
    return (box.currentData() or "") if box.currentIndex() >= 0 else keep
