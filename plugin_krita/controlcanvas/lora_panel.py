"""The docker's LoRA section: LoRAs from the server's list, each with a strength.

Each row picks one LoRA the server lists (``Models.loras``).  LoRAs made for another
base family than the chosen base model stay in the list, greyed out, with the reason in
their tooltip (``shared.offers`` decides what fits).  A LoRA saved in the settings that
the server no longer lists stays selected, marked, and Generate says which LoRAs the
server has.  The strength slider runs from -2 to 2 in steps of 0.05 (1 = as trained,
0 = off, below 0 = the opposite style); the rows become ``GenerateRequest.loras``.

The docker builds the section (:class:`docker.Section`) and hands it to
:class:`LoraPanel`, which owns its widgets; the docker reads :meth:`LoraPanel.values`
into the settings like every other field.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from .proto import messages, offers
from .qt import Qt, QtWidgets
from .settings import LORA_MAX, LORA_MIN, LoraSettings
from .widgets import RowsPanel, narrow, set_item_enabled, small_label

W = QtWidgets
STEPS_PER_UNIT = 20  # slider positions per unit of strength: steps of 0.05
NAME_TIP = ("A LoRA from the server's LoRA folder. Greyed out: made for another kind of "
            "base model than the one chosen (hover it to see which)")
STRENGTH_TIP = ("Strength, -2 to 2: 1 as trained, 0 off, below 0 the opposite; "
                "double-click the number to set 1")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1_000_000 else f"{nbytes / 1e3:.0f} KB"


def describe(info: messages.LoraInfo) -> str:
    """A LoRA's tooltip: the family it fits and its size."""
    family = offers.family_label(info.family)
    fits = f"for {family} base models" if info.family not in offers.UNKNOWN_FAMILY else \
        "base family unknown (the server checks it)"
    return f"{info.name}: {fits}, {_size(info.size)}"


class _StrengthLabel(W.QLabel):
    """The strength as a number; a double-click sets it back to 1."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        super().__init__()
        self._on_reset = on_reset

    def mouseDoubleClickEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._on_reset()


class LoraRow(W.QWidget):
    """One LoRA: which one, its strength, and a button that removes the row."""

    def __init__(self, panel: "LoraPanel", row: LoraSettings) -> None:
        super().__init__()
        self._name = row.name
        self.name = narrow(W.QComboBox(), 4)
        self.name.setToolTip(NAME_TIP)
        self.slider = W.QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(int(LORA_MIN * STEPS_PER_UNIT), int(LORA_MAX * STEPS_PER_UNIT))
        self.slider.setPageStep(STEPS_PER_UNIT // 4)
        self.slider.setMinimumWidth(40)
        self.slider.setSizePolicy(W.QSizePolicy.Policy.Expanding, W.QSizePolicy.Policy.Fixed)
        self.slider.setToolTip(STRENGTH_TIP)
        self.strength_label = _StrengthLabel(lambda: self.set_strength(1.0))
        self.strength_label.setFont(small_label("").font())
        self.strength_label.setFixedWidth(self.strength_label.fontMetrics()
                                          .horizontalAdvance("-2.00") + 4)
        self.strength_label.setAlignment(Qt.AlignmentFlag.AlignRight |
                                         Qt.AlignmentFlag.AlignVCenter)
        self.strength_label.setToolTip(STRENGTH_TIP)
        self.remove = W.QToolButton()
        self.remove.setText("✕")
        self.remove.setAutoRaise(True)
        self.remove.setToolTip("Remove this LoRA")
        row_box = W.QHBoxLayout(self)
        row_box.setContentsMargins(0, 0, 0, 0)
        row_box.setSpacing(3)
        row_box.addWidget(self.name, 3)
        row_box.addWidget(self.slider, 2)
        row_box.addWidget(self.strength_label)
        row_box.addWidget(self.remove)
        self.slider.valueChanged.connect(self._show_strength)
        self.name.currentIndexChanged.connect(self._picked)
        self.remove.clicked.connect(lambda: panel.remove(self))
        self.set_strength(row.strength)
        self._show_strength()

    def set_strength(self, strength: float) -> None:
        self.slider.setValue(int(round(strength * STEPS_PER_UNIT)))

    @property
    def strength(self) -> float:
        return self.slider.value() / STEPS_PER_UNIT

    def _show_strength(self) -> None:
        self.strength_label.setText(f"{self.strength:.2f}")

    def _picked(self) -> None:
        if self.name.currentIndex() >= 0:
            self._name = self.name.currentData() or ""
        self._tip()

    def _tip(self) -> None:
        tip = self.name.itemData(self.name.currentIndex(), Qt.ItemDataRole.ToolTipRole) \
            if self.name.currentIndex() >= 0 else ""
        self.name.setToolTip(f"{tip}\n\n{NAME_TIP}" if tip else NAME_TIP)

    def fill(self, choices: Sequence[Tuple[messages.LoraInfo, str]], listed: bool) -> None:
        """The server's LoRAs (``choices``: each with why it does not fit, '' = it fits);
        the row's LoRA stays selected, marked when the server does not list it."""
        keep = self._name
        self.name.blockSignals(True)
        self.name.clear()
        for info, problem in choices:
            self.name.addItem(info.name, info.name)
            set_item_enabled(self.name, self.name.count() - 1, not problem,
                             problem[:1].upper() + problem[1:] if problem else describe(info))
        if keep and self.name.findData(keep) < 0:
            missing = "not on the server" if listed else "not listed yet: connect"
            self.name.addItem(f"{keep} ({missing})", keep)
            set_item_enabled(self.name, self.name.count() - 1, not listed,
                             f"The server lists no LoRA named {keep!r}" if listed else
                             "Connect to the server to see its LoRAs")
        index = self.name.findData(keep) if keep else next(
            (i for i, (_, problem) in enumerate(choices) if not problem), -1)
        self.name.setCurrentIndex(index)
        self._name = (self.name.currentData() or "") if index >= 0 else keep
        self.name.blockSignals(False)
        self._tip()

    def value(self) -> LoraSettings:
        return LoraSettings(name=self._name, strength=self.strength)


class LoraPanel(RowsPanel):
    """The rows of the LoRA section (built into the docker's ``section``) and the note
    under them; :meth:`refresh` follows the server's list and the chosen base model."""

    rows: List[LoraRow]

    def __init__(self, section, on_change: Callable[[], None]) -> None:
        self._offers = offers.Offers(None)
        self._base = ""
        super().__init__(section, on_change, "+ LoRA",
                         "Add a LoRA (a style or character the base model learnt later) "
                         "from the server's LoRA folder")
        self._show_note()

    def add(self, settings: Optional[LoraSettings] = None) -> LoraRow:
        """A new row: ``settings``, else the first fitting LoRA not in a row yet."""
        if settings is None:
            used = {row.value().name for row in self.rows}
            free = [info.name for info, problem in self._offers.lora_choices(self._base)
                    if not problem and info.name not in used]
            settings = LoraSettings(name=free[0] if free else "")
        row = LoraRow(self, settings)
        row.fill(self._offers.lora_choices(self._base), self._offers.models is not None)
        self.rows.append(row)
        self.rows_box.addWidget(row)
        self._show_note()
        return row

    def remove(self, row: LoraRow) -> None:
        self._drop(row)
        self._show_note()
        self._on_change()

    def refresh(self, offer: "offers.Offers", base: str) -> None:
        """The server's list (or the chosen base model) changed: refill every row."""
        self._offers, self._base = offer, base
        choices = offer.lora_choices(base)
        for row in self.rows:
            row.fill(choices, offer.models is not None)
        self._show_note()

    def _show_note(self) -> None:
        o = self._offers
        if o.models is None:
            text = "Connect to list the server's LoRAs."
        elif not o.loras:
            text = ("The server lists no LoRAs: put .safetensors files in its LoRA folder "
                    "(`controlcanvas models` shows where).")
        elif not self.rows:
            fit = sum(1 for _, problem in o.lora_choices(self._base) if not problem)
            family = offers.family_label(o.family(self._base))
            text = f"{fit} of {len(o.loras)} LoRA(s) on the server fit this base " \
                   f"model ({family})." if fit < len(o.loras) else \
                f"{fit} LoRA(s) on the server; + LoRA adds one."
        else:
            text = ""
        self.note.setText(text)
        self.note.setVisible(bool(text))
        self.add_button.setEnabled(bool(o.loras))
