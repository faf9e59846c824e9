"""The docker's Edit section: an instruction applied to the selected layer by an edit model.

"Make the jacket red", "colour this line art as a watercolour": the selected layer (with a
selection, only the selected part of it) goes to the server's edit model (FLUX.1 Kontext)
with the instruction and up to three further layers whose pictures the instruction may
refer to ("the jacket from the second picture").  The result comes back as a new layer
above the layer, in one undo step; outside a selection nothing changes (the server keeps
those pixels and the new layer is transparent there).  ``plan.build_edit`` builds the
request; this module only owns the widgets.

The edit model is picked among the server's base models.  The server's list does not say
which bases can edit, so any may be picked; one that cannot answers with the typed error
``edit_model_needed``, which names the edit models and shows in the docker's message.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from .qt import QtWidgets
from .settings import EDIT_REFERENCES, EditSettings
from .widgets import fill_layer_combo, narrow, small_label

W = QtWidgets
NO_REFERENCE = "(none)"
INSTRUCTION_TIP = ("What to change, in words: 'make the jacket red', 'colour this line art "
                   "as a watercolour'. It applies to the selected layer, or to the selected "
                   "part of it")
MODEL_TIP = ("An edit model on the server (FLUX.1 Kontext); empty: the server's default "
             "base, which must be an edit model")
REFERENCE_TIP = "A layer whose picture the instruction may refer to (it is sent whole)"
NOTE = ("Edits the selected layer (with a selection, only the selected part: nothing "
        "changes outside it). The result is a new layer above it.")


class EditPanel:
    """The widgets of the Edit section (built into the docker's ``section``)."""

    def __init__(self, section, on_change: Callable[[], None],
                 on_edit: Callable[[], None]) -> None:
        self.section = section
        self._on_change = on_change
        self._references: List[str] = [""] * EDIT_REFERENCES  # layer ids, "" = none
        self._layers: Sequence = ()
        self.instruction = W.QPlainTextEdit()
        self.instruction.setPlaceholderText("Instruction, e.g. make the jacket red")
        self.instruction.setToolTip(INSTRUCTION_TIP)
        self.instruction.setFixedHeight(42)
        self.model = narrow(W.QComboBox())
        self.model.setEditable(True)
        self.model.setInsertPolicy(W.QComboBox.InsertPolicy.NoInsert)
        self.model.lineEdit().setPlaceholderText("server default")
        self.model.setToolTip(MODEL_TIP)
        self.steps = W.QSpinBox()
        self.steps.setRange(1, 150)
        self.steps.setToolTip("Denoising steps (FLUX.1 Kontext: about 28)")
        self.cfg = W.QDoubleSpinBox()
        self.cfg.setRange(0.0, 30.0)
        self.cfg.setSingleStep(0.5)
        self.cfg.setDecimals(1)
        self.cfg.setToolTip("Guidance: how strictly to follow the instruction (FLUX.1 "
                            "Kontext: about 2.5)")
        self.pickers = [narrow(W.QComboBox(), 4) for _ in range(EDIT_REFERENCES)]
        for picker in self.pickers:
            picker.setToolTip(REFERENCE_TIP)
        self.edit_button = W.QPushButton("Edit layer")
        self.edit_button.setToolTip(NOTE)
        self.note = small_label(NOTE)
        self.note.setWordWrap(True)
        self._lay_out(section)
        for index, picker in enumerate(self.pickers):
            picker.currentIndexChanged.connect(lambda _, i=index: self._picked(i))
        self.edit_button.clicked.connect(on_edit)
        self.fill_layers(())

    def _lay_out(self, section) -> None:
        section.box.addWidget(self.instruction)
        grid = W.QGridLayout()
        grid.setHorizontalSpacing(4)
        grid.setVerticalSpacing(2)
        grid.addWidget(small_label("Model"), 0, 0)
        grid.addWidget(self.model, 0, 1, 1, 3)
        grid.addWidget(small_label("Steps"), 1, 0)
        grid.addWidget(self.steps, 1, 1)
        grid.addWidget(small_label("Guidance"), 1, 2)
        grid.addWidget(self.cfg, 1, 3)
        for index, picker in enumerate(self.pickers):
            grid.addWidget(small_label(f"Ref {index + 1}"), 2 + index, 0)
            grid.addWidget(picker, 2 + index, 1, 1, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        section.box.addLayout(grid)
        section.box.addWidget(self.edit_button)
        section.box.addWidget(self.note)

    def _picked(self, index: int) -> None:
        self._references[index] = self.pickers[index].currentData() or ""
        self._on_change()

    def load(self, edit: EditSettings) -> None:
        self.instruction.setPlainText(edit.instruction)
        self.model.setEditText(edit.base_model)
        self.steps.setValue(edit.steps)
        self.cfg.setValue(edit.cfg)
        refs = list(edit.references[:EDIT_REFERENCES])
        self._references = refs + [""] * (EDIT_REFERENCES - len(refs))
        self.fill_layers(self._layers)

    def values(self) -> EditSettings:
        return EditSettings(instruction=self.instruction.toPlainText().strip(),
                            base_model=self.model.currentText().strip(),
                            steps=self.steps.value(), cfg=self.cfg.value(),
                            references=list(self._references))  # "" = none

    def fill_layers(self, layers: Sequence) -> None:
        """The document's layers (``plan.LayerInfo``) in each picker; picks stay."""
        self._layers = tuple(layers)
        for index, picker in enumerate(self.pickers):
            self._references[index] = fill_layer_combo(picker, self._layers,
                                                       self._references[index], NO_REFERENCE)

    def fill_models(self, names: Sequence[str], default: str = "") -> None:
        """The server's base models as suggestions; the text stays free."""
        keep = self.model.currentText()
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItems([""] + list(names))
        self.model.setEditText(keep)
        self.model.blockSignals(False)
        self.model.lineEdit().setPlaceholderText(
            f"server default ({default})" if default else "server default")
