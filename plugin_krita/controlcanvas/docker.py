"""The docker's widgets (Qt only, through the compat module); logic lives in Controller.

The panel never blocks: buttons call the controller, a QTimer drains the worker's
events every 50 ms, and the controller's notifications update the widgets.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import plan
from .controller import Controller
from .edit_panel import EditPanel
from .lora_panel import LoraPanel
from .reference_panel import ReferencePanel
from .proto import messages, offers
from .qt import Qt, QtCore, QtGui, QtWidgets, qimage_from_rgba
from .settings import (CONTROL_MODE_LABELS, CONTROL_MODES, MODE_LABELS, MODES,
                       RESIZE_MODE_LABELS, RESIZE_MODES, Settings, UnitSettings)
from .widgets import narrow as _narrow, set_item_enabled, small_label as _small_label

W = QtWidgets
CONDITION_LABELS = offers.CONDITION_LABELS
STATE_COLOURS = {"online": "#3fb950", "connecting": "#d29922", "offline": "#8b949e",
                 "error": "#f85149"}
MESSAGE_COLOURS = {"info": "palette(text)", "warning": "#d29922", "error": "#f85149"}
VISIBLE_IMAGE = "(visible image)"
CONDITION_TIP = ("What the control image shows (picks the ControlNet). Greyed out: the chosen "
                 "base model has no ControlNet for it (hover it to see which bases do)")
INT_LIMIT = 2**31 - 1  # what a QSpinBox holds
LIVE_OFF = "Off. Frames go into the layer 'ControlCanvas live'."


def _combo(items, current=None) -> W.QComboBox:
    box = _narrow(W.QComboBox())
    for key, label in items:
        box.addItem(label, key)
    if current is not None:
        _select(box, current)
    return box


def _select(box: W.QComboBox, key) -> None:
    index = box.findData(key)
    if index >= 0:
        box.setCurrentIndex(index)


def _spin(lo, hi, value, step=1.0, decimals=None) -> W.QAbstractSpinBox:
    if decimals is None:
        box = W.QSpinBox()
        box.setRange(int(lo), int(hi))
        box.setValue(int(value))
        box.setSingleStep(int(step))
    else:
        box = W.QDoubleSpinBox()
        box.setDecimals(decimals)
        box.setRange(lo, hi)
        box.setSingleStep(step)
        box.setValue(value)
    box.setKeyboardTracking(False)
    return box


def _lines_label(lines: int) -> W.QLabel:
    """A word-wrapped label at most ``lines`` lines high (the full text in its tooltip),
    so a long sentence cannot push Generate out of a small docker."""
    label = _ToolTipLabel()
    label.setWordWrap(True)
    label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)  # cut the end
    label.setMaximumHeight(lines * label.fontMetrics().lineSpacing() + 2)
    return label


class _ToolTipLabel(W.QLabel):
    """Asks the layout for the lines its text needs at its width (up to its maximum):
    a wrapped label's own size hint is too small inside a nested layout."""

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's name
        super().setText(text)
        self.setToolTip(text)
        self._fit()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        need = min(self.maximumHeight(), max(0, self.heightForWidth(max(1, self.width()))))
        if need != self.minimumHeight():
            self.setMinimumHeight(need)


class Section(W.QWidget):
    """A section of the docker: a heading (PROMPT, CONTROL, ...) that folds its body.

    The heading is drawn with the palette's own text colour (no fixed grey), so it
    reads on Krita's dark theme as on a light one; a thin rule in the palette's mid tone marks the section."""

    def __init__(self, title: str) -> None:
        super().__init__()
        col = W.QVBoxLayout(self)
        col.setContentsMargins(0, 3, 0, 0)
        col.setSpacing(2)
        self.head = W.QHBoxLayout()
        self.head.setSpacing(4)
        self.toggle = W.QToolButton()
        self.toggle.setText(title.upper())
        self.toggle.setAutoRaise(True)  # not checkable: a checked button draws a box
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow)
        self.toggle.setIconSize(QtCore.QSize(8, 8))
        self.toggle.setToolTip(f"Show or hide {title.lower()}")
        font = self.toggle.font()
        font.setBold(True)
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        self.toggle.setFont(font)
        line = W.QFrame()
        line.setFrameShape(W.QFrame.Shape.HLine)
        line.setFrameShadow(W.QFrame.Shadow.Plain)
        line.setForegroundRole(QtGui.QPalette.ColorRole.Mid)  # a quiet rule, any theme
        self.head.addWidget(self.toggle)
        self.head.addWidget(line, 1)
        col.addLayout(self.head)
        self.body = W.QWidget()
        self.box = W.QVBoxLayout(self.body)
        self.box.setContentsMargins(0, 0, 0, 0)
        self.box.setSpacing(3)
        col.addWidget(self.body)
        self.open = True
        self.toggle.clicked.connect(lambda: self.fold(not self.open))

    def fold(self, show: bool) -> None:
        self.open = show
        self.body.setVisible(show)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if show else Qt.ArrowType.RightArrow)


class ParamsForm(W.QWidget):
    """Widgets for one annotator's parameters, built from the server's ParamInfo list:
    int and float as spin boxes within their range, bool as a check box, choice as a
    combo box, anything else as text.  :meth:`values` gives what differs from the
    defaults (the server fills in the rest)."""

    def __init__(self, annotator: str, params: Sequence[messages.ParamInfo],
                 values: Mapping[str, Any]) -> None:
        super().__init__()
        self.annotator = annotator
        self.params = tuple(params)
        self.widgets: Dict[str, W.QWidget] = {}
        form = W.QFormLayout(self)
        form.setContentsMargins(0, 2, 0, 0)
        form.setHorizontalSpacing(4)
        form.setVerticalSpacing(2)
        form.setFieldGrowthPolicy(W.QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for info in self.params:
            widget = self._widget(info, values.get(info.name, info.default))
            widget.setToolTip(info.help or info.name)
            self.widgets[info.name] = widget
            form.addRow(_small_label(info.name.replace("_", " ").capitalize()), widget)

    @staticmethod
    def _widget(info: messages.ParamInfo, value: Any) -> W.QWidget:
        if info.kind == "bool":
            box = W.QCheckBox()
            box.setChecked(bool(value))
            return box
        if info.kind in ("int", "float"):
            lo = -INT_LIMIT if info.min is None else info.min
            hi = INT_LIMIT if info.max is None else info.max
            if info.kind == "int":
                return _spin(max(lo, -INT_LIMIT), min(hi, INT_LIMIT), int(value))
            step = 0.05 if hi - lo <= 2 else 0.5
            return _spin(float(lo), float(hi), float(value), step, 2)
        if info.kind == "choice":
            return _combo([(c, c) for c in info.choices], value)
        return W.QLineEdit(str(value))

    def values(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for info in self.params:
            widget = self.widgets[info.name]
            if info.kind == "bool":
                value: Any = widget.isChecked()
            elif info.kind == "int":
                value = int(widget.value())
            elif info.kind == "float":
                value = float(widget.value())
            elif info.kind == "choice":
                value = widget.currentData()
            else:
                value = widget.text()
            default = info.default
            if info.kind == "float" and abs(value - float(default)) < 0.005:
                continue
            if value != default:
                out[info.name] = value
        return out


class UnitWidget(W.QFrame):
    """One control unit: condition, layer, annotator (+ preview), weight, range, mode."""

    def __init__(self, panel: "DockerPanel", unit: UnitSettings) -> None:
        super().__init__()
        self.panel = panel
        self.setFrameShape(W.QFrame.Shape.StyledPanel)
        self._make_fields(unit)
        self._lay_out()
        self._layer_id = unit.layer_id
        self._annotator = unit.annotator
        self._params, self._params_for = dict(unit.params), unit.annotator
        self._offer, self._base = offers.Offers(None), ""
        self.condition.currentIndexChanged.connect(self.fill_annotators)
        self.condition.currentIndexChanged.connect(self._condition_tip)
        self.annotator.currentIndexChanged.connect(self.fill_params)
        self.options.toggled.connect(self._show_params)
        self.layer.currentIndexChanged.connect(self._layer_changed)
        self.remove.clicked.connect(lambda: panel.remove_unit(self))
        self.preview.clicked.connect(lambda: panel.preview_unit(self))

    def _make_fields(self, unit: UnitSettings) -> None:
        self.enabled = W.QCheckBox()
        self.enabled.setChecked(unit.enabled)
        self.enabled.setToolTip("Use this unit")
        self.condition = _combo([(c, CONDITION_LABELS.get(c, c)) for c in messages.CONDITIONS
                                 if c != "inpaint"], unit.condition)
        self.condition.setToolTip(CONDITION_TIP)
        self.remove = W.QToolButton()
        self.remove.setText("✕")
        self.remove.setToolTip("Remove this control unit")
        self.remove.setAutoRaise(True)
        self.layer = _narrow(W.QComboBox())
        self.layer.setToolTip("The layer this unit reads")
        self.annotator = _narrow(W.QComboBox(), 4)
        self.annotator.setToolTip("How the layer is turned into the control image (on the "
                                  "server); 'none' uses it as it is")
        self.preview = W.QToolButton()
        self.preview.setText("Preview")
        self.preview.setToolTip("Insert the control image as a layer, to check or edit it")
        self.options = W.QToolButton()
        self.options.setText("⚙")
        self.options.setCheckable(True)
        self.options.setAutoRaise(True)
        self.options.setToolTip("The annotator's settings")
        self.params_box = W.QVBoxLayout()
        self.params_box.setContentsMargins(0, 0, 0, 0)
        self.form: Optional[ParamsForm] = None
        self.resize = _combo([(m, RESIZE_MODE_LABELS[m]) for m in RESIZE_MODES],
                             unit.resize_mode)
        self.resize.setToolTip("When the layer's shape differs from the generated image's: "
                               "crop it to fit, stretch it, or fit it inside (padding)")
        self.weight = _spin(0.0, 2.0, unit.weight, 0.05, 2)
        self.weight.setToolTip("Control weight (0-2)")
        self.start = _spin(0.0, 1.0, unit.start, 0.05, 2)
        self.start.setToolTip("Start: fraction of the steps before the control applies")
        self.end = _spin(0.0, 1.0, unit.end, 0.05, 2)
        self.end.setToolTip("End: fraction of the steps after which the control stops")
        self.mode = _combo([(m, CONTROL_MODE_LABELS[m]) for m in CONTROL_MODES],
                           unit.control_mode)
        self.mode.setToolTip("Control mode: balanced, prompt is more important, or control is "
                             "more important")
    def _lay_out(self) -> None:
        """Laid out for a narrow docker (~240 px): at most two fields per row."""
        grid = W.QGridLayout(self)
        grid.setContentsMargins(2, 3, 2, 3)
        grid.setHorizontalSpacing(4)
        grid.setVerticalSpacing(2)
        top = W.QHBoxLayout()
        top.setSpacing(3)
        top.addWidget(self.enabled)
        top.addWidget(self.condition, 2)
        top.addWidget(self.layer, 3)
        top.addWidget(self.remove)
        grid.addLayout(top, 0, 0, 1, 4)
        grid.addWidget(_small_label("Annotator"), 1, 0)
        annotator_row = W.QHBoxLayout()
        annotator_row.setSpacing(2)
        annotator_row.addWidget(self.annotator, 1)
        annotator_row.addWidget(self.options)
        grid.addLayout(annotator_row, 1, 1, 1, 2)
        grid.addWidget(self.preview, 1, 3)
        grid.addLayout(self.params_box, 2, 1, 1, 3)
        grid.addWidget(_small_label("Weight"), 3, 0)
        grid.addWidget(self.weight, 3, 1)
        grid.addWidget(self.mode, 3, 2, 1, 2)
        grid.addWidget(_small_label("Range"), 4, 0)
        grid.addWidget(self.start, 4, 1)
        grid.addWidget(self.end, 4, 2, 1, 2)
        grid.addWidget(_small_label("Fit"), 5, 0)
        grid.addWidget(self.resize, 5, 1, 1, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(2, 1)

    def _layer_changed(self) -> None:
        if self.layer.currentIndex() >= 0:
            self._layer_id = self.layer.currentData() or ""

    def fill_conditions(self, offer: offers.Offers, base: str) -> None:
        """Grey out the conditions the chosen base model cannot serve (as the server says),
        each with why in its tooltip; the unit's own condition stays selected."""
        self._offer, self._base = offer, base
        served = offer.conditions(base)
        for index in range(self.condition.count()):
            condition = self.condition.itemData(index)
            problem = "" if condition in served else offer.condition_problem(condition, base)
            set_item_enabled(self.condition, index, not problem, problem)
        self._condition_tip()

    def _condition_tip(self) -> None:
        """The condition list's tooltip: why the unit's condition cannot be served, if so."""
        self.condition.setToolTip(self._offer.condition_problem(self.condition.currentData(),
                                                                self._base) or CONDITION_TIP)

    def fill_layers(self, layers: List[plan.LayerInfo]) -> None:
        keep = self._layer_id
        self.layer.blockSignals(True)
        self.layer.clear()
        self.layer.addItem(VISIBLE_IMAGE, "")
        for info in layers:
            self.layer.addItem("  " * info.depth + info.name, info.id)
        index = self.layer.findData(keep)
        self.layer.setCurrentIndex(index if index >= 0 else 0)
        self.layer.blockSignals(False)

    def fill_annotators(self) -> None:
        keep = self.annotator.currentText() or self._annotator
        names = self.panel.controller.annotators(self.condition.currentData())
        if keep and keep not in names:
            names.append(keep)
        self.annotator.blockSignals(True)
        self.annotator.clear()
        self.annotator.addItems(names)
        self.annotator.setCurrentText(keep if keep in names else "none")
        self.annotator.blockSignals(False)
        self.fill_params()

    def set_annotator(self, name: str) -> None:
        self._annotator = name
        if self.annotator.findText(name) >= 0:
            self.annotator.setCurrentText(name)

    def fill_params(self) -> None:
        """Rebuild the settings of the chosen annotator (from the server's description);
        values set for it before are kept, another annotator starts from its defaults."""
        if self.form is not None:
            self._params, self._params_for = self.form.values(), self.form.annotator
            self.params_box.removeWidget(self.form)
            self.form.setParent(None)
            self.form.deleteLater()
            self.form = None
        name = self.annotator.currentText() or "none"
        info = self.panel.controller.annotator_info(name)
        params = info.params if info is not None else ()
        if params:
            self.form = ParamsForm(name, params,
                                   self._params if name == self._params_for else {})
            self.params_box.addWidget(self.form)
        self.options.setEnabled(bool(params))
        self._show_params(self.options.isChecked() and bool(params))

    def _show_params(self, show: bool) -> None:
        if self.form is not None:
            self.form.setVisible(show)

    def params(self) -> Dict[str, Any]:
        name = self.annotator.currentText() or "none"
        if self.form is not None and self.form.annotator == name:
            return self.form.values()
        return dict(self._params) if name == self._params_for else {}

    def value(self) -> UnitSettings:
        start, end = self.start.value(), self.end.value()
        return UnitSettings(layer_id=self._layer_id, condition=self.condition.currentData(),
                            annotator=self.annotator.currentText() or "none",
                            weight=self.weight.value(), start=start, end=end,
                            control_mode=self.mode.currentData(),
                            enabled=self.enabled.isChecked(),
                            resize_mode=self.resize.currentData(), params=self.params())


class DockerPanel(W.QWidget):
    def __init__(self, controller: Controller, parent: Optional[W.QWidget] = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.units: List[UnitWidget] = []
        self._layers: List[plan.LayerInfo] = []
        self._layer_key = None
        self._build()
        self.load(controller.settings)
        controller.listeners.append(self._on_change)
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(50)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        self._ticks = 0
        self._on_change("status")
        self.refresh_layers()

    # -- building -------------------------------------------------------------------
    # Docked at Krita's default size (about 262 x 241 px) only the top part fits: the
    # connection state, preset, prompt, Generate, progress and the message stay there,
    # outside the scroll area; everything else scrolls below, in sections that fold.

    def _build(self) -> None:
        outer = W.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(3)
        self.top = W.QWidget()
        self._build_top(self.top)
        outer.addWidget(self.top)
        self.scroll = W.QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(W.QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.scroll.setMinimumHeight(24)  # below its own hint: the top part comes first
        outer.addWidget(self.scroll, 1)
        body = W.QWidget()
        self.scroll.setWidget(body)
        col = W.QVBoxLayout(body)
        col.setContentsMargins(3, 0, 1, 4)
        col.setSpacing(2)
        col.addWidget(self._build_server())
        self.preview_image = W.QLabel()
        self.preview_image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview_image.setVisible(False)
        col.addWidget(self.preview_image)
        self.sections: Dict[str, Section] = {}
        for title, build in (("Prompt", self._build_prompt_options),
                             ("Control", self._build_control),
                             ("Sampling", self._build_sampling),
                             ("LoRA", self._build_loras),
                             ("Reference", self._build_references),
                             ("Edit", self._build_edit),
                             ("Live", self._build_live),
                             ("History", self._build_history)):
            section = Section(title)
            build(section)
            self.sections[title] = section
            col.addWidget(section)
        col.addStretch(1)
        self._wire()

    def _build_top(self, top: W.QWidget) -> None:
        col = W.QVBoxLayout(top)
        col.setContentsMargins(6, 6, 6, 0)
        col.setSpacing(3)
        row = W.QHBoxLayout()
        self.state_dot = W.QLabel("●")
        self.state_text = _lines_label(2)
        self.state_text.setText("Not connected.")
        self.server_toggle = W.QToolButton()
        self.server_toggle.setText("Server")
        self.server_toggle.setCheckable(True)
        self.server_toggle.setAutoRaise(True)
        row.addWidget(self.state_dot)
        row.addWidget(self.state_text, 1)
        row.addWidget(self.server_toggle)
        col.addLayout(row)
        row = W.QHBoxLayout()
        self.preset = _combo([("", "Preset…")] + [(p.key, p.label) for p in plan.PRESETS])
        self.preset.setToolTip("Set up the control units for a workflow (a line-art preset "
                               "finds the line-art layer)")
        self.mode = _combo([(m, MODE_LABELS[m]) for m in MODES])
        row.addWidget(self.preset, 1)
        row.addWidget(self.mode, 1)
        col.addLayout(row)
        self.prompt = W.QPlainTextEdit()
        self.prompt.setPlaceholderText("What to paint, e.g. flat colours, girl in a red coat")
        self.prompt.setFixedHeight(42)
        col.addWidget(self.prompt)
        row = W.QHBoxLayout()
        self.generate_button = W.QPushButton("Generate")
        self.generate_button.setDefault(True)
        font = self.generate_button.font()
        font.setBold(True)
        self.generate_button.setFont(font)
        self.generate_button.setMinimumHeight(26)
        self.cancel_button = W.QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setSizePolicy(W.QSizePolicy.Policy.Minimum,
                                         W.QSizePolicy.Policy.Fixed)
        self.live_button = W.QToolButton()
        self.live_button.setText("Live")
        self.live_button.setCheckable(True)
        self.live_button.setToolTip("Live painting: the picture follows every stroke (few "
                                    "steps, seed locked); Keep frame copies it as a layer")
        row.addWidget(self.generate_button, 3)
        row.addWidget(self.cancel_button, 1)
        row.addWidget(self.live_button)
        col.addLayout(row)
        self.progress = W.QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFixedHeight(14)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m")
        col.addWidget(self.progress)
        self.message = _lines_label(3)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        col.addWidget(self.message)

    def _build_server(self) -> W.QWidget:
        self.server_box = W.QWidget()
        form = W.QFormLayout(self.server_box)
        form.setContentsMargins(0, 0, 0, 0)
        self.url = W.QLineEdit()
        self.url.setPlaceholderText("ws://127.0.0.1:7351")
        self.url.setToolTip("The server's address: ws://127.0.0.1:7351 for a server on this "
                            "computer, ws://GPU-MACHINE:7351 for one on another computer")
        self.token = W.QLineEdit()
        self.token.setEchoMode(W.QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("blank: local token file")
        self.token.setToolTip(
            "The server's access token. Leave it blank for a server on this computer "
            "(127.0.0.1, localhost): its token file is read. A server on another computer "
            "needs its own token pasted here (`controlcanvas serve` prints where its token "
            "file is); this computer's token is never sent there.")
        self.connect_button = W.QPushButton("Connect")
        self.token_note = _small_label("")
        self.token_note.setWordWrap(True)
        form.addRow("Address", self.url)
        form.addRow("Token", self.token)
        form.addRow("", self.connect_button)
        form.addRow(self.token_note)
        self.server_box.setVisible(False)
        return self.server_box

    def _build_prompt_options(self, section: "Section") -> None:
        self.negative = W.QLineEdit()
        self.negative.setPlaceholderText("Negative prompt")
        section.box.addWidget(self.negative)
        row = W.QHBoxLayout()
        self.strength_label = _small_label("Strength")
        self.strength = _spin(0.0, 1.0, 0.75, 0.05, 2)
        self.strength.setToolTip("How much of the canvas is repainted (img2img/inpaint)")
        row.addWidget(self.strength_label)
        row.addWidget(self.strength, 1)
        row.addWidget(_small_label("Result"))
        self.place = _combo([("above", "Above layer"),
                             ("below", "Under line art")])
        self.place.setToolTip("Where new layers go: above the selected layer, or under the "
                              "line-art layer of the first control unit (lines stay on top)")
        row.addWidget(self.place, 2)
        section.box.addLayout(row)

    def _build_control(self, section: "Section") -> None:
        self.add_unit_button = W.QToolButton()
        self.add_unit_button.setText("+ Unit")
        self.add_unit_button.setAutoRaise(True)
        self.add_unit_button.setToolTip("Add a control unit bound to the selected layer")
        section.head.addWidget(self.add_unit_button)
        self.units_box = W.QVBoxLayout()
        self.units_box.setSpacing(3)
        section.box.addLayout(self.units_box)
        # Shown while the chosen base has no ControlNet and the server emulates its units
        # (Flux.2 Klein: each control image becomes a reference picture): offers.control_note
        self.control_note = _lines_label(6)
        self.control_note.setVisible(False)
        section.box.addWidget(self.control_note)
        poses = W.QGridLayout()
        poses.setSpacing(3)
        self.pose_add = W.QPushButton("Add skeleton")
        self.pose_add.setToolTip("Insert an editable pose skeleton (vector layer)")
        self.pose_detect = W.QPushButton("Detect pose")
        self.pose_detect.setToolTip("Detect the pose in the selected layer (photo) on the "
                                    "server")
        self.same_seed = W.QPushButton("Same seed")
        self.same_seed.setToolTip("Same seed, new pose: regenerate with the seed of the "
                                  "selected result, so only what you changed changes")
        self.variants = W.QPushButton("Variants ×4")
        self.variants.setToolTip("Four images with new seeds, as a group of layers")
        for i, button in enumerate((self.pose_add, self.pose_detect, self.same_seed,
                                    self.variants)):
            button.setSizePolicy(W.QSizePolicy.Policy.Ignored, W.QSizePolicy.Policy.Fixed)
            poses.addWidget(button, i // 2, i % 2)
        section.box.addLayout(poses)

    def _build_sampling(self, section: "Section") -> None:
        self.seed = _spin(0, messages.MAX_SEED, 0, 1.0, 0)  # QSpinBox stops at 2**31-1
        self.seed.setToolTip("Seed of the next image")
        self.seed_lock = W.QCheckBox("Lock")
        self.seed_lock.setToolTip("Keep this seed; otherwise every Generate picks a new one")
        self.steps = _spin(1, 150, 20)
        self.cfg = _spin(0.0, 30.0, 7.0, 0.5, 1)
        self.sampler = _combo([(s, s) for s in messages.SAMPLERS])
        self.batch = _spin(1, 16, 1)
        self.base_model = _narrow(W.QComboBox())
        self.base_model.setEditable(True)
        self.base_model.setInsertPolicy(W.QComboBox.InsertPolicy.NoInsert)
        self.base_model.lineEdit().setPlaceholderText("server default")
        self.base_model.setToolTip("Base model on the server (a name it lists, a hub id or a "
                                   "path there); empty: the server's default")
        self.hires = W.QCheckBox("Hi-res pass")
        self.hires.setToolTip("Generate at the model's size, then repaint at the full size for "
                              "detail (slower)")
        grid = W.QGridLayout()
        grid.setHorizontalSpacing(4)
        grid.setVerticalSpacing(2)
        seed_row = W.QHBoxLayout()
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.seed_lock)
        for row, cells in enumerate(((("Seed", seed_row),),
                                     (("Steps", self.steps), ("CFG", self.cfg)),
                                     (("Sampler", self.sampler), ("Batch", self.batch)),
                                     (("Model", self.base_model),), (("", self.hires),))):
            for i, (label, field) in enumerate(cells):
                if label:
                    grid.addWidget(_small_label(label), row, 2 * i)
                span = 3 if len(cells) == 1 else 1
                if isinstance(field, W.QLayout):
                    grid.addLayout(field, row, 2 * i + 1, 1, span)
                else:
                    grid.addWidget(field, row, 2 * i + 1, 1, span)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        section.box.addLayout(grid)

    def _build_loras(self, section: "Section") -> None:
        self.lora_panel = LoraPanel(section, self.collect)

    def _build_references(self, section: "Section") -> None:
        self.reference_panel = ReferencePanel(section, self.collect,
                                              self.controller.active_layer_id)

    def _build_edit(self, section: "Section") -> None:
        self.edit_panel = EditPanel(section, self.collect, self.on_edit)

    def _build_live(self, section: "Section") -> None:
        """Live painting's options (the toggle sits beside Generate): the few-step preset,
        and what the last frames did."""
        self.live_preset = _combo([("", "The settings above")])
        self.live_preset.setToolTip("A few-step preset of the server (LoRA, scheduler, steps, "
                                    "CFG) for live frames; the settings above otherwise")
        self.live_status = _small_label(LIVE_OFF)
        self.live_status.setWordWrap(True)
        row = W.QHBoxLayout()
        row.addWidget(_small_label("Preset"))
        row.addWidget(self.live_preset, 1)
        section.box.addLayout(row)
        section.box.addWidget(self.live_status)

    def _fill_live_presets(self) -> None:
        models = self.controller.models
        keep = self.live_preset.currentData()
        self.live_preset.clear()
        self.live_preset.addItem("The settings above", "")
        for p in models.presets if models is not None else ():
            notes = ("" if p.present else " (not downloaded)") + \
                ("" if p.commercial else " · non-commercial")
            self.live_preset.addItem(f"{p.label or p.name}{notes}", p.name)
            self.live_preset.setItemData(self.live_preset.count() - 1,
                                         f"{p.steps} steps, CFG {p.cfg:g}, {p.licence}. "
                                         f"{p.note}" + ("" if p.present else
                                                        f" Server: {p.download}"),
                                         Qt.ItemDataRole.ToolTipRole)
        _select(self.live_preset, keep)

    def on_live(self, on: bool) -> None:
        live = self.controller.live
        if on and not live.active:
            self.collect()
            live.preset = self.live_preset.currentData() or ""
            live.start()
        elif not on and live.active:
            live.stop()
        self._on_change("live")

    def _show_live(self) -> None:
        live = self.controller.live
        self.live_button.blockSignals(True)
        self.live_button.setChecked(live.active)
        self.live_button.blockSignals(False)
        self.generate_button.setText("Keep frame" if live.active else "Generate")
        self.seed.setEnabled(not live.active)
        self.seed_lock.setEnabled(not live.active)
        self.live_preset.setEnabled(not live.active)
        if live.active:
            last = f", last {live.last_elapsed:.2f} s" if live.frames else ""
            self.live_status.setText(f"On: {live.frames} frame(s){last}.")
        else:
            self.live_status.setText(LIVE_OFF)

    def _build_history(self, section: "Section") -> None:
        self.history = W.QListWidget()
        self.history.setIconSize(QtCore.QSize(40, 40))
        self.history.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.history.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.history.setUniformItemSizes(True)
        self.history.setMinimumHeight(96)
        self.history.setMaximumHeight(150)
        section.box.addWidget(self.history)
        row = W.QHBoxLayout()
        self.apply_button = W.QPushButton("Apply again")
        self.apply_button.setToolTip("Insert the selected result as new layer(s) again")
        self.reuse_button = W.QPushButton("Reuse seed")
        self.reuse_button.setToolTip("Lock the seed of the selected result")
        for button in (self.apply_button, self.reuse_button):
            button.setSizePolicy(W.QSizePolicy.Policy.Ignored, W.QSizePolicy.Policy.Fixed)
            row.addWidget(button)
        section.box.addLayout(row)

    def _wire(self) -> None:
        self.server_toggle.toggled.connect(self._show_server)
        self.connect_button.clicked.connect(self.on_connect)
        self.url.textEdited.connect(self._token_hint)
        self.token.textEdited.connect(self._token_hint)
        self.preset.activated.connect(self.on_preset)
        self.mode.currentIndexChanged.connect(self._mode_changed)
        self.base_model.currentTextChanged.connect(self._base_changed)
        self.add_unit_button.clicked.connect(self.on_add_unit)
        self.pose_add.clicked.connect(lambda: self.controller.insert_pose(""))
        self.pose_detect.clicked.connect(self.on_detect_pose)
        self.same_seed.clicked.connect(self.on_same_seed)
        self.variants.clicked.connect(self.on_variants)
        self.generate_button.clicked.connect(self.on_generate)
        self.live_button.toggled.connect(self.on_live)
        self.cancel_button.clicked.connect(self.controller.cancel)
        self.apply_button.clicked.connect(
            lambda: self.controller.apply_history(self.history.currentRow()))
        self.reuse_button.clicked.connect(self.on_reuse_seed)

    def _show_server(self, show: bool) -> None:
        self.server_box.setVisible(show)
        if show:
            self.scroll.verticalScrollBar().setValue(0)  # the box is the first thing there

    # -- settings <-> widgets ---------------------------------------------------------

    def load(self, s: Settings) -> None:
        self.url.setText(s.url)
        self.token.setText(s.token)
        self.prompt.setPlainText(s.prompt)
        self.negative.setText(s.negative_prompt)
        _select(self.mode, s.mode)
        self.strength.setValue(s.strength)
        _select(self.place, s.place)
        self.seed.setValue(s.seed)
        self.seed_lock.setChecked(s.seed_locked)
        self.steps.setValue(s.steps)
        self.cfg.setValue(s.cfg)
        _select(self.sampler, s.sampler)
        self.batch.setValue(s.batch)
        self.base_model.setEditText(s.base_model)
        self.hires.setChecked(s.hires)
        for widget in list(self.units):
            self._drop_unit(widget)
        for unit in s.units:
            self._add_unit(unit)
        self.lora_panel.load(s.loras)
        self.reference_panel.load(s.references)
        self.edit_panel.load(s.edit)
        self._mode_changed()
        self._base_changed()

    def collect(self) -> Settings:
        s = self.controller.settings
        s.url = self.url.text().strip() or s.url
        s.token = self.token.text().strip()
        s.prompt = self.prompt.toPlainText().strip()
        s.negative_prompt = self.negative.text().strip()
        s.mode = self.mode.currentData()
        s.strength = self.strength.value()
        s.place = self.place.currentData()
        s.seed = int(self.seed.value())
        s.seed_locked = self.seed_lock.isChecked()
        s.steps = self.steps.value()
        s.cfg = self.cfg.value()
        s.sampler = self.sampler.currentData()
        s.batch = self.batch.value()
        s.base_model = self.base_model.currentText().strip()
        s.hires = self.hires.isChecked()
        s.units = [w.value() for w in self.units]
        s.loras = self.lora_panel.values()
        s.references = self.reference_panel.values()
        s.edit = self.edit_panel.values()
        return s

    def _mode_changed(self) -> None:
        show = self.mode.currentData() in ("img2img", "inpaint")
        self.strength.setEnabled(show)
        self.strength_label.setEnabled(show)

    # -- units ----------------------------------------------------------------------

    def _base_changed(self) -> None:
        """The chosen base model (or the server's list) changed: each unit's conditions and
        the LoRA choices follow it."""
        offer, base = self.controller.offers(), self.base_model.currentText().strip()
        for widget in self.units:
            widget.fill_conditions(offer, base)
        note = offer.control_note(base)
        self.control_note.setText(note)
        self.control_note.setVisible(bool(note))
        self.lora_panel.refresh(offer, base)

    def _add_unit(self, unit: UnitSettings) -> UnitWidget:
        widget = UnitWidget(self, unit)
        widget.fill_layers(self._layers)
        widget.fill_annotators()
        widget.fill_conditions(self.controller.offers(), self.base_model.currentText().strip())
        self.units.append(widget)
        self.units_box.addWidget(widget)
        return widget

    def _drop_unit(self, widget: UnitWidget) -> None:
        self.units.remove(widget)
        self.units_box.removeWidget(widget)
        widget.setParent(None)
        widget.deleteLater()

    def remove_unit(self, widget: UnitWidget) -> None:
        self._drop_unit(widget)
        self.collect()

    def on_add_unit(self) -> None:
        active = self.controller.active_layer_id()
        self._add_unit(UnitSettings(layer_id=active))
        self.collect()

    def preview_unit(self, widget: UnitWidget) -> None:
        self.collect()
        self.controller.preview_control(self.units.index(widget))

    def refresh_layers(self) -> None:
        self.controller.bind_document()  # another document: its own (stored) history
        canvas = self.controller.canvas()
        layers = list(canvas.info().layers) if canvas is not None else []
        key = tuple((info.id, info.name, info.depth) for info in layers)
        if key == self._layer_key:
            return
        self._layer_key = key
        self._layers = layers
        for widget in self.units:
            widget.fill_layers(layers)
        self.reference_panel.fill_layers(layers)
        self.edit_panel.fill_layers(layers)

    # -- actions ----------------------------------------------------------------------

    def on_connect(self) -> None:
        self.collect()
        self.controller.connect(self.url.text(), self.token.text())

    def _token_hint(self) -> None:
        """Which token the typed address will get (before Connect): a server elsewhere
        with the Token field blank is told to need its own."""
        url = self.url.text().strip() or self.controller.settings.url
        self.token_note.setText(self.controller.resolve_token(url, self.token.text()).note)

    def on_preset(self) -> None:
        key = self.preset.currentData()
        self.preset.setCurrentIndex(0)
        if not key:
            return
        self.collect()
        self.controller.apply_preset(key)
        self.load(self.controller.settings)

    def on_generate(self) -> None:
        if self.controller.live.active:  # while live, the button keeps the frame
            self.controller.live.keep()
            return
        self.collect()
        self.controller.generate()
        self._sync_seed()

    def on_edit(self) -> None:
        self.collect()
        self.controller.edit()
        self._sync_seed()

    def on_same_seed(self) -> None:
        self.collect()
        row = max(0, self.history.currentRow())
        self.controller.regenerate_same_seed(row)

    def on_variants(self) -> None:
        self.collect()
        self.controller.variants(4)
        self._sync_seed()

    def on_reuse_seed(self) -> None:
        seed = self.controller.reuse_seed(self.history.currentRow())
        if seed is not None:
            self.seed.setValue(float(seed))
            self.seed_lock.setChecked(True)

    def on_detect_pose(self) -> None:
        self.collect()
        layer = self.controller.active_layer_id()
        if not layer:
            self.controller.say("Select the photo layer to detect a pose in.", "warning")
            return
        self.controller.insert_pose(layer)

    def _sync_seed(self) -> None:
        if not self.seed_lock.isChecked():
            self.seed.setValue(self.controller.settings.seed)

    # -- updates ----------------------------------------------------------------------

    def _tick(self) -> None:
        if self.controller.live.active:
            self.collect()  # live frames follow the prompt and settings as they are typed
        self.controller.poll()
        self._ticks += 1
        if self._ticks % 20 == 0:  # once a second: the layer lists follow the document
            self.refresh_layers()

    def _on_change(self, what: str) -> None:
        c = self.controller
        if what == "status":
            colour = STATE_COLOURS.get(c.status.state, "#8b949e")
            self.state_dot.setStyleSheet(f"color: {colour};")
            self.state_text.setText(c.status.message)
            self.token_note.setText(c.token_note)
            if c.status.state == "error":
                self.server_toggle.setChecked(True)
        elif what == "models":
            for widget in self.units:
                widget.fill_annotators()
            self._fill_base_models()
            self._base_changed()
            self._fill_live_presets()
        elif what == "live":
            self._show_live()
        elif what == "message":
            self.message.setStyleSheet(f"color: {MESSAGE_COLOURS.get(c.level, '')};")
            self.message.setText(c.message)
        elif what == "progress":
            step, total = c.progress
            self.progress.setRange(0, max(1, total))
            self.progress.setValue(min(step, max(1, total)))
            if not total:  # reset (a dropped link, a dropped job): no stale preview either
                self.preview_image.setVisible(False)
        elif what == "preview" and c.preview is not None:
            image = qimage_from_rgba(c.preview.width, c.preview.height, c.preview.data)
            pix = QtGui.QPixmap.fromImage(image).scaled(
                96, 96, Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation)
            self.preview_image.setPixmap(pix)
            self.preview_image.setVisible(True)
        elif what == "busy":
            busy = c.busy
            self.cancel_button.setEnabled(busy)
            if not c.live.active:
                self.generate_button.setText("Generate (queue)" if busy else "Generate")
            if not busy:
                self.preview_image.setVisible(False)
        elif what == "units":  # a preset resolved once the server's lists came
            for widget, unit in zip(self.units, c.settings.units):
                widget.set_annotator(unit.annotator)
        elif what == "history":
            self._fill_history()
        elif what == "settings":
            self.seed.setValue(c.settings.seed)
            self.seed_lock.setChecked(c.settings.seed_locked)

    def _fill_base_models(self) -> None:
        """The server's base models as suggestions; the text stays free."""
        keep = self.base_model.currentText()
        self.base_model.blockSignals(True)
        self.base_model.clear()
        self.base_model.addItems([""] + self.controller.base_models())
        self.base_model.setEditText(keep)
        self.base_model.blockSignals(False)
        models = self.controller.models
        default = models.default_base if models is not None else ""
        self.base_model.lineEdit().setPlaceholderText(
            f"server default ({default})" if default else "server default")
        self.edit_panel.fill_models(self.controller.edit_models())

    def _fill_history(self) -> None:
        self.history.clear()
        for item in self.controller.history:
            entry = W.QListWidgetItem(item.label())
            if item.images:
                image = item.images[0][0]
                qimage = qimage_from_rgba(image.width, image.height, image.data)
                pix = QtGui.QPixmap.fromImage(qimage).scaled(
                    40, 40, Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation)
                entry.setIcon(QtGui.QIcon(pix))
            entry.setToolTip(item.prompt)
            self.history.addItem(entry)
        if self.controller.history:
            self.history.setCurrentRow(0)

    def closeEvent(self, event) -> None:  # pragma: no cover - Krita owns the lifetime
        self.timer.stop()
        self.controller.shutdown()
        super().closeEvent(event)
