"""Small widget helpers every part of the docker uses (Qt only, through the compat module)."""

from __future__ import annotations

from typing import Callable, List, Sequence

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


class RowsPanel:
    """A docker section whose rows are added with a "+ ..." button in its head, with a
    note under them (the LoRA and Reference sections): the button, the rows' box and the
    note; loading, reading and dropping rows.  A subclass makes a row in ``add`` and says
    the note in ``_show_note``."""

    def __init__(self, section, on_change: Callable[[], None], add_text: str,
                 add_tip: str) -> None:
        self.section = section
        self._on_change = on_change
        self.rows: List = []
        self.add_button = W.QToolButton()
        self.add_button.setText(add_text)
        self.add_button.setAutoRaise(True)
        self.add_button.setToolTip(add_tip)
        section.head.addWidget(self.add_button)
        self.rows_box = W.QVBoxLayout()
        self.rows_box.setSpacing(2)
        section.box.addLayout(self.rows_box)
        self.note = small_label("")
        self.note.setWordWrap(True)
        section.box.addWidget(self.note)
        self.add_button.clicked.connect(lambda: (self.add(), self._on_change()))

    def add(self, settings=None):
        raise NotImplementedError

    def load(self, rows: Sequence) -> None:
        for row in list(self.rows):
            self._drop(row)
        for row in rows:
            self.add(row)

    def values(self) -> List:
        return [row.value() for row in self.rows]

    def _drop(self, row) -> None:
        self.rows.remove(row)
        self.rows_box.removeWidget(row)
        row.setParent(None)
        row.deleteLater()
