"""The module's Qt Designer file against the Python code that uses it (no Slicer or Qt needed).

The UI code is the module file DiffusionSeg.py (the ``@parameterNodeWrapper`` class, the Widget that
loads the .ui) and the panel it hands off to, DiffusionSegLib/slicer/widget.py. Every ``self.ui.<name>``
in them must exist in DiffusionSeg.ui with the expected class (a typo or a renamed widget would only
fail when a user opens the module), every widget bound to the parameter node must name a field of
the ``@parameterNodeWrapper`` class with a type its widget can show, and every MRML node selector
must receive the scene. What the module file and the panel call on each other, on the Logic, on the
workflow and on the non-Qt logic must exist there (Slicer would only say so at run time).
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET

import pytest

from helpers import REPO  # noqa: E402

ROOT = REPO
MODULE_FILE = ROOT / "DiffusionSeg" / "DiffusionSeg.py"
WIDGET_FILE = ROOT / "DiffusionSegLib" / "slicer" / "widget.py"
UI_CODE_FILES = (MODULE_FILE, WIDGET_FILE)
PANEL_CLASS = "DiffusionSegPanel"
UI_FILE = ROOT / "DiffusionSeg" / "Resources" / "UI" / "DiffusionSeg.ui"

# name -> accepted classes, for every widget the code uses.
EXPECTED_CLASSES: dict[str, tuple[str, ...]] = {
    "inputVolumeSelector": ("qMRMLNodeComboBox",),
    "loadSampleButton": ("QPushButton",),
    "roiSelector": ("qMRMLNodeComboBox",),
    "modelComboBox": ("QComboBox",),
    "modelInfoLabel": ("QLabel",),
    "taskLabel": ("QLabel",),
    "taskComboBox": ("QComboBox",),
    "addModelButton": ("QPushButton",),
    "downloadModelButton": ("QPushButton",),
    "clearModelsButton": ("QPushButton",),
    "samplesSpinBox": ("QSpinBox",),
    "stepsSpinBox": ("QSpinBox",),
    "seedSpinBox": ("QSpinBox",),
    "deviceComboBox": ("QComboBox",),
    "crfCheckBox": ("QCheckBox",),
    "showSamplesCheckBox": ("QCheckBox",),
    "outputSegmentationSelector": ("qMRMLNodeComboBox",),
    "applyButton": ("QPushButton",),
    "estimateLabel": ("QLabel",),
    "inputWarningLabel": ("QLabel",),
    "referenceSegmentationSelector": ("qMRMLNodeComboBox",),
    "gedButton": ("QPushButton",),
    "progressBar": ("QProgressBar",),
    "statusLabel": ("QLabel",),
    "agreementSlider": ("ctkSliderWidget", "QSlider"),
    "agreementLabel": ("QLabel",),
    "resultsTable": ("QTableWidget", "qMRMLTableView"),
}

# Node selectors: node types they must offer, and whether "none" must be allowed.
EXPECTED_NODE_SELECTORS = {
    "inputVolumeSelector": ({"vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"}, False),
    "roiSelector": ({"vtkMRMLMarkupsROINode"}, True),
    "outputSegmentationSelector": ({"vtkMRMLSegmentationNode"}, True),
}

# Signals the code connects to, per widget class (PythonQt signature strings).
KNOWN_SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QComboBox": {"currentIndexChanged(int)", "activated(int)"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)"},
    "QSlider": {"valueChanged(int)", "sliderReleased()"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"},
    "QCheckBox": {"toggled(bool)", "stateChanged(int)"},
}

# Which widget classes the parameterNodeWrapper GUI connectors accept for which field types.
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QComboBox", "QTextEdit"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _string_list(prop: ET.Element) -> list[str]:
    return [s.text or "" for s in prop.iter("string")]


def _property_value(prop: ET.Element):
    child = list(prop)[0]
    if child.tag == "stringlist":
        return _string_list(child)
    if child.tag == "bool":
        return child.text == "true"
    return child.text


@pytest.fixture(scope="module")
def ui():
    """name -> (class, {property: value}) of every widget in the .ui file."""
    tree = ET.parse(UI_FILE)
    root = tree.getroot()
    assert root.tag == "ui"
    widgets = {}
    for widget in root.iter("widget"):
        properties = {prop.get("name"): _property_value(prop) for prop in widget.findall("property") if len(prop)}
        name = widget.get("name")
        assert name not in widgets, f"widget name {name!r} used twice"
        widgets[name] = (widget.get("class"), properties)
    return tree, widgets


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def widget_tree():
    return ast.parse(WIDGET_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui_code_trees():
    """(file name, tree) of every Python file that uses the .ui widgets."""
    return [(path.name, ast.parse(path.read_text(encoding="utf-8"))) for path in UI_CODE_FILES]


def _ui_names_used(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_root_widget_is_a_mrml_widget(ui):
    tree, widgets = ui
    top_widget = tree.getroot().find("widget")
    assert top_widget.get("class") == "qMRMLWidget"
    assert tree.getroot().find("class").text == top_widget.get("name")


def test_every_widget_the_code_uses_exists_with_the_expected_class(ui, ui_code_trees, widget_tree):
    _, widgets = ui
    assert _ui_names_used(widget_tree), "widget.py uses no self.ui widgets?"
    used = set()
    for name, tree in ui_code_trees:
        not_in_ui = sorted(_ui_names_used(tree) - set(widgets))
        assert not not_in_ui, f"used in {name} but missing in DiffusionSeg.ui: {not_in_ui}"
        used |= _ui_names_used(tree)
    unexpected = sorted(used - set(EXPECTED_CLASSES))
    assert not unexpected, f"add the expected class of these widgets to EXPECTED_CLASSES: {unexpected}"
    for name, classes in EXPECTED_CLASSES.items():
        assert name in widgets, f"{name} is missing in DiffusionSeg.ui"
        assert widgets[name][0] in classes, f"{name} is a {widgets[name][0]}, expected one of {classes}"


def test_node_selectors(ui):
    _, widgets = ui
    for name, (node_types, none_allowed) in EXPECTED_NODE_SELECTORS.items():
        cls, props = widgets[name]
        assert cls == "qMRMLNodeComboBox"
        assert set(props.get("nodeTypes", [])) == node_types, f"{name} nodeTypes: {props.get('nodeTypes')}"
        assert bool(props.get("noneEnabled", False)) == none_allowed, f"{name} noneEnabled"
    # Label maps are scalar volumes too, but no input for a segmentation model.
    assert "vtkMRMLLabelMapVolumeNode" in widgets["inputVolumeSelector"][1].get("hideChildNodeTypes", [])


def test_node_selectors_receive_the_scene(ui):
    tree, widgets = ui
    root_name = tree.getroot().find("widget").get("name")
    connected = set()
    for connection in tree.getroot().iter("connection"):
        if (connection.findtext("sender") == root_name
                and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"):
            connected.add(connection.findtext("receiver"))
    selectors = {name for name, (cls, _) in widgets.items() if cls.startswith("qMRML") and name != root_name}
    assert selectors <= connected, f"no scene for: {sorted(selectors - connected)}"


def test_custom_widgets_are_declared(ui):
    tree, widgets = ui
    declared = {c.findtext("class") for c in tree.getroot().iter("customwidget")}
    used = {cls for cls, _ in widgets.values() if not cls.startswith("Q")}
    assert used <= declared, f"declare in <customwidgets>: {sorted(used - declared)}"


def _all_nodes(trees):
    for _, tree in trees:
        yield from ast.walk(tree)


def test_connected_signals_exist_on_the_widget_class(ui, ui_code_trees):
    _, widgets = ui
    checked = 0
    for node in _all_nodes(ui_code_trees):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
                and target.value.attr == "ui"):
            continue
        assert node.args and isinstance(node.args[0], ast.Constant), "connect with a signal signature string"
        cls = widgets[target.attr][0]
        assert node.args[0].value in KNOWN_SIGNALS.get(cls, set()), f"{target.attr} ({cls}) has no signal {node.args[0].value}"
        checked += 1
    assert checked >= 5


def _parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> kind (bool/int/float/str/node) of the @parameterNodeWrapper class."""
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)]
    assert len(classes) == 1, "expected one @parameterNodeWrapper class"
    fields = {}
    for statement in classes[0].body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            annotation = ast.unparse(statement.annotation)
            if annotation.startswith("Annotated["):
                annotation = annotation[len("Annotated["):].split(",")[0].strip()
            kind = "node" if annotation.startswith("vtkMRML") else annotation
            fields[statement.target.id] = kind
    return fields


def test_parameter_bound_widgets_name_fields_of_the_parameter_node(ui, module_tree):
    _, widgets = ui
    fields = _parameter_fields(module_tree)
    bound = {name: (cls, props["SlicerParameterName"]) for name, (cls, props) in widgets.items()
             if "SlicerParameterName" in props}
    assert bound, "no widget is bound to the parameter node"
    parameters = [parameter for _, parameter in bound.values()]
    assert len(parameters) == len(set(parameters)), "two widgets bound to one parameter"
    for name, (cls, parameter) in bound.items():
        assert parameter in fields, f"{name} is bound to {parameter!r}, not a field of the parameter node"
        kind = fields[parameter]
        assert cls in CONNECTABLE.get(kind, set()), f"{name} ({cls}) cannot show a {kind} parameter"


def test_bound_combobox_and_slider_parameters_are_constrained(module_tree):
    """parameterNodeWrapper needs Choice for a str QComboBox and a range for ints (QSpinBox limits)."""
    classes = [node for node in module_tree.body if isinstance(node, ast.ClassDef) and node.name == "DiffusionSegParameterNode"]
    annotations = {s.target.id: ast.unparse(s.annotation) for s in classes[0].body if isinstance(s, ast.AnnAssign)}
    assert "Choice(" in annotations["device"]
    for name in ("samples", "steps", "seed"):
        assert "WithinRange(" in annotations[name], name


def test_spinbox_ranges_match_the_parameter_ranges(ui, module_tree):
    _, widgets = ui
    classes = [node for node in module_tree.body if isinstance(node, ast.ClassDef) and node.name == "DiffusionSegParameterNode"]
    ranges = {}
    for statement in classes[0].body:
        if isinstance(statement, ast.AnnAssign):
            for call in ast.walk(statement.annotation):
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "WithinRange":
                    ranges[statement.target.id] = tuple(ast.literal_eval(a) for a in call.args)
    for name, (cls, props) in widgets.items():
        parameter = props.get("SlicerParameterName")
        if cls == "QSpinBox" and parameter in ranges:
            assert (int(props.get("minimum", 0)), int(props.get("maximum", 99))) == ranges[parameter], name


def test_ui_text_is_not_empty_for_buttons(ui):
    _, widgets = ui
    for name, (cls, props) in widgets.items():
        if cls in ("QPushButton", "QCheckBox", "ctkCollapsibleButton"):
            assert props.get("text"), f"{name} has no text"


def _layout_holding(root: ET.Element, widget_name: str) -> ET.Element:
    """The <layout> element whose items directly hold the widget ``widget_name``."""
    for layout in root.iter("layout"):
        for item in layout.findall("item"):
            widget = item.find("widget")
            if widget is not None and widget.get("name") == widget_name:
                return layout
    raise AssertionError(f"{widget_name} is in no layout")


def test_the_estimate_sits_next_to_apply_and_the_input_warning_above_it(ui):
    tree, _ = ui
    root = tree.getroot()
    row = _layout_holding(root, "applyButton")
    assert row.get("class") == "QHBoxLayout"
    assert [i.find("widget").get("name") for i in row.findall("item")] == ["applyButton", "estimateLabel"]
    main = _layout_holding(root, "inputWarningLabel")
    items = main.findall("item")
    names = [(i.find("widget").get("name") if i.find("widget") is not None else
              (i.find("layout").get("name") if i.find("layout") is not None else None)) for i in items]
    assert names.index("inputWarningLabel") + 1 == names.index(row.get("name")), names


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found")


def _calls(function: ast.FunctionDef) -> set[str]:
    return {node.func.attr for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def test_the_input_check_runs_when_the_selection_changes_not_only_on_apply(widget_tree):
    # The parameter node's ModifiedEvent (volume, model, ROI, samples... changed) calls _updateGuiState.
    setter = ast.unparse(_method(widget_tree, PANEL_CLASS, "setParameterNode"))
    assert "ModifiedEvent" in setter and "self._updateGuiState" in setter
    assert "_updateInputCheck" in _calls(_method(widget_tree, PANEL_CLASS, "_updateGuiState"))
    check = _method(widget_tree, PANEL_CLASS, "_updateInputCheck")
    assert {"check_input", "estimate", "_showInputWarnings"} <= _calls(check)
    show = ast.unparse(_method(widget_tree, PANEL_CLASS, "_showInputWarnings"))
    assert "inputWarningLabel" in show and "setVisible(True)" in show
    # While the run goes, the child's own warnings and measured estimate replace the pre-run ones.
    assert "run_messages" in _calls(_method(widget_tree, PANEL_CLASS, "onPollTimer"))


# -- the module file and the panel: who calls whom ---------------------------------------------------

def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def _class_attributes(cls: ast.ClassDef) -> set[str]:
    """Methods, properties and ``self.<name> = ...`` attributes a class defines."""
    names = {item.name for item in cls.body if isinstance(item, ast.FunctionDef)}
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                        and element.value.id == "self"):
                    names.add(element.attr)
    return names


def _used_on(tree: ast.AST, owner: str) -> set[str]:
    """Names X of every ``self.<owner>.X`` in ``tree``."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == owner and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_the_module_widget_hands_off_to_the_panel(module_tree, widget_tree):
    widget = _class(module_tree, "DiffusionSegWidget")
    setup = ast.unparse(_method(module_tree, "DiffusionSegWidget", "setup"))
    assert f"import {PANEL_CLASS}" in setup and f"self.panel = {PANEL_CLASS}(" in setup
    assert "self.resourcePath('UI/DiffusionSeg.ui')" in setup
    # Slicer calls these on the module widget; each one reaches the panel.
    for name, panel_call in [("cleanup", "cleanup"), ("enter", "enter"), ("exit", "exit"),
                             ("onSceneStartClose", "onSceneStartClose"), ("onSceneEndClose", "onSceneEndClose")]:
        assert panel_call in _used_on(_method(module_tree, "DiffusionSegWidget", name), "panel"), name
    called = _used_on(widget, "panel")
    defined = _class_attributes(_class(widget_tree, PANEL_CLASS))
    assert called and called <= defined, f"the module widget calls what the panel lacks: {sorted(called - defined)}"
    for event in ("StartCloseEvent", "EndCloseEvent"):
        assert f"slicer.mrmlScene.{event}" in setup


def test_what_the_panel_uses_of_the_logic_exists(module_tree, widget_tree):
    used = _used_on(_class(widget_tree, PANEL_CLASS), "logic")
    defined = _class_attributes(_class(module_tree, "DiffusionSegLogic"))
    assert {"getParameterNode", "workflow", "resetWorkflow"} <= used
    assert used <= defined, f"DiffusionSegLogic has no {sorted(used - defined)}"


def test_what_the_panel_calls_on_the_workflow_and_the_logic_module_exists(widget_tree):
    from DiffusionSegLib.slicer import logic as modulelogic
    from DiffusionSegLib.slicer.workflow import SegmentationWorkflow

    on_workflow = _used_on(_class(widget_tree, PANEL_CLASS), "workflow")
    assert {"start", "poll", "cancel", "finish", "check_input", "estimate", "set_agreement"} <= on_workflow
    missing = sorted(name for name in on_workflow if not hasattr(SegmentationWorkflow, name))
    assert not missing, f"SegmentationWorkflow has no {missing}"
    on_module = {node.attr for node in ast.walk(widget_tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "modulelogic"}
    assert {"settings_from_parameters", "ensure_dependencies", "install_model", "progress_percent"} <= on_module
    missing = sorted(name for name in on_module if not hasattr(modulelogic, name))
    assert not missing, f"DiffusionSegLib.slicer.logic has no {missing}"


def _file_scope_imports(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_panel_imports_qt_and_nothing_in_the_library_imports_the_panel():
    """widget.py needs Slicer's Qt; any other library module must import under pytest and the CLI."""
    library = ROOT / "DiffusionSegLib"
    for path in sorted(library.rglob("*.py")):
        if path == WIDGET_FILE or "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {name.split(".")[0] for name in _file_scope_imports(tree)}
        assert not top & {"qt", "ctk"}, f"{path.relative_to(ROOT)} imports Qt at file scope"
        if path.parent.name == "slicer" and path.stem in ("logic", "selftest"):
            assert "slicer" not in top, f"{path.relative_to(ROOT)} imports slicer at file scope"
        for node in ast.walk(tree):
            imported = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            assert "DiffusionSegLib.slicer.widget" not in imported, f"{path.relative_to(ROOT)} imports the panel"
