"""The docker's Reference section: layers whose picture steers the generation (IP-Adapter).

Each row picks a layer of the document (a pasted photo, a painting whose style or layout
to borrow), a mode (Reference: the whole picture; Style: its style only; Composition: its
layout only; Face: the person's face, with the server's face adapter), a weight slider 0
to 2 in steps of 0.05 (0 = off) and the part of the steps it acts in (start/end, as a
control unit's).  The rows become ``GenerateRequest.references``; the plan sends each
layer whole, at most 512 px on its longer side (``plan.reference_units``).

The docker builds the section (:class:`docker.Section`) and hands it to
:class:`ReferencePanel`, which owns its widgets; the docker reads
:meth:`ReferencePanel.values` into the settings like every other field.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from .qt import Qt, QtWidgets
from .settings import REFERENCE_MODE_LABELS, REFERENCE_MODES, ReferenceSettings
from .widgets import RowsPanel, fill_layer_combo, narrow, small_label

W = QtWidgets
STEPS_PER_UNIT = 20  # slider positions per unit of weight: steps of 0.05
LAYER_TIP = "The layer that holds the reference picture (it is sent whole)"
MODE_TIPS = {
    "reference": "Reference: the whole picture (subject, colours, style) steers the result",
    "style": "Style: only the reference's style (colours, brushwork), not its layout",
    "composition": "Composition: only the reference's layout, not its style",
    "face": "Face: the person's face (needs the server's face IP-Adapter)",
}
WEIGHT_TIP = "Weight, 0 to 2: how strongly the reference steers (0 off, 0.5-1 usual)"
WINDOW_TIP = "The part of the steps the reference acts in (0 = first step, 1 = last)"


def _window_spin(value: float) -> W.QDoubleSpinBox:
    box = W.QDoubleSpinBox()
    box.setRange(0.0, 1.0)
    box.setSingleStep(0.05)
    box.setDecimals(2)
    box.setValue(value)
    box.setToolTip(WINDOW_TIP)
    return box


class ReferenceRow(W.QWidget):
    """One reference: its layer, mode, weight, start/end and a button that removes it."""

    def __init__(self, panel: "ReferencePanel", row: ReferenceSettings) -> None:
        super().__init__()
        self._layer_id = row.layer_id
        self.layer = narrow(W.QComboBox(), 4)
        self.layer.setToolTip(LAYER_TIP)
        self.mode = narrow(W.QComboBox(), 4)
        for mode in REFERENCE_MODES:
            self.mode.addItem(REFERENCE_MODE_LABELS[mode], mode)
            self.mode.setItemData(self.mode.count() - 1, MODE_TIPS[mode],
                                  Qt.ItemDataRole.ToolTipRole)
        self.mode.setCurrentIndex(max(0, self.mode.findData(row.mode)))
        self.slider = W.QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 2 * STEPS_PER_UNIT)
        self.slider.setPageStep(STEPS_PER_UNIT // 4)
        self.slider.setMinimumWidth(40)
        self.slider.setToolTip(WEIGHT_TIP)
        self.weight_label = small_label("")
        self.weight_label.setFixedWidth(self.weight_label.fontMetrics()
                                        .horizontalAdvance("2.00") + 4)
        self.weight_label.setToolTip(WEIGHT_TIP)
        self.start = _window_spin(row.start)
        self.end = _window_spin(row.end)
        self.remove = W.QToolButton()
        self.remove.setText("✕")
        self.remove.setAutoRaise(True)
        self.remove.setToolTip("Remove this reference")
        col = W.QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 2)
        col.setSpacing(1)
        top = W.QHBoxLayout()
        top.setSpacing(3)
        top.addWidget(self.layer, 3)
        top.addWidget(self.mode, 2)
        top.addWidget(self.remove)
        bottom = W.QHBoxLayout()
        bottom.setSpacing(3)
        bottom.addWidget(self.slider, 2)
        bottom.addWidget(self.weight_label)
        bottom.addWidget(small_label("steps"))
        bottom.addWidget(self.start)
        bottom.addWidget(self.end)
        col.addLayout(top)
        col.addLayout(bottom)
        self.slider.valueChanged.connect(self._show_weight)
        self.layer.currentIndexChanged.connect(self._picked)
        self.remove.clicked.connect(lambda: panel.remove(self))
        self.slider.setValue(int(round(row.weight * STEPS_PER_UNIT)))
        self._show_weight()

    @property
    def weight(self) -> float:
        return self.slider.value() / STEPS_PER_UNIT

    def _show_weight(self) -> None:
        self.weight_label.setText(f"{self.weight:.2f}")

    def _picked(self) -> None:
        if self.layer.currentIndex() >= 0:
            self._layer_id = self.layer.currentData() or ""

    def fill_layers(self, layers: Sequence) -> None:
        """The document's layers (``plan.LayerInfo``); the row's layer stays selected."""
        self._layer_id = fill_layer_combo(self.layer, layers, self._layer_id)

    def value(self) -> ReferenceSettings:
        start, end = self.start.value(), self.end.value()
        return ReferenceSettings(layer_id=self._layer_id, weight=self.weight,
                                 mode=self.mode.currentData() or "reference",
                                 start=start, end=end)


class ReferencePanel(RowsPanel):
    """The rows of the Reference section (built into the docker's ``section``) and the note
    under them."""

    rows: List[ReferenceRow]

    def __init__(self, section, on_change: Callable[[], None],
                 active_layer: Callable[[], str]) -> None:
        self._active_layer = active_layer
        self._layers: Sequence = ()
        super().__init__(section, on_change, "+ Reference",
                         "Add a reference picture (IP-Adapter): the selected layer steers the "
                         "result's look, style, layout or face")
        self._show_note()

    def add(self, settings: Optional[ReferenceSettings] = None) -> ReferenceRow:
        """A new row: ``settings``, else the active layer as a reference."""
        row = ReferenceRow(self, settings or ReferenceSettings(layer_id=self._active_layer()))
        row.fill_layers(self._layers)
        self.rows.append(row)
        self.rows_box.addWidget(row)
        self._show_note()
        return row

    def remove(self, row: ReferenceRow) -> None:
        self._drop(row)
        self._show_note()
        self._on_change()

    def fill_layers(self, layers: Sequence) -> None:
        self._layers = tuple(layers)
        for row in self.rows:
            row.fill_layers(self._layers)

    def _show_note(self) -> None:
        text = "" if self.rows else ("+ Reference: a layer's picture steers the result (its "
                                     "look, style, layout or a face).")
        self.note.setText(text)
        self.note.setVisible(bool(text))
