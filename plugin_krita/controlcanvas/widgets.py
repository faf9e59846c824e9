"""Small widget helpers every part of the docker uses (Qt only, through the compat module)."""

from __future__ import annotations

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
