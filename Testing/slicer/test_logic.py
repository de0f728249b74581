"""The module's non-Qt logic (DiffusionSegLib.slicer.logic) and its self-test body (slicer.selftest).

What the panel does besides running: parameter values -> SegmentSettings, the model list, installs
that load the network before accepting a model, dependency detection and install order, the
remembered speed, the progress text. The self-test that Slicer runs (DiffusionSegTest) runs here
too, on a real slicer-core scene with the real CLI in a child process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import unittest
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import REPO, new_mrml_scene
from DiffusionSegLib.core.enums import Stage
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.core.files import sha256_of
from DiffusionSegLib.models import store
from DiffusionSegLib.models.card import read_card
from DiffusionSegLib.models.catalogue import entry_for, summary_line
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.slicer import logic
from DiffusionSegLib.slicer.job import JobStatus
from DiffusionSegLib.slicer.workflow import MeasuredSpeed, SegmentationWorkflow

SAMPLE = REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"


def panel(**values):
    """The parameter node's values as the panel holds them (DiffusionSegParameterNode's fields)."""
    defaults = dict(model="", task="", samples=0, steps=0, seed=0, device="auto", crf=True)
    return SimpleNamespace(**{**defaults, **values})


@pytest.fixture()
def models_home(tmp_path, monkeypatch):
    """A private user models folder and no extra model folders: nothing outside tmp is touched."""
    monkeypatch.setenv("DIFFUSIONSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIFFUSIONSEG_MODELS", raising=False)
    return store.user_models_dir()


# -- settings -------------------------------------------------------------------------------------

def test_settings_from_the_panel_defaults_leave_the_model_card_in_charge():
    settings = logic.settings_from_parameters(panel())
    assert settings == SegmentSettings(model=None, samples=None, steps=None, seed=0, device="auto", crf=True,
                                       keep_samples=True)
    # Only what differs from the CLI's defaults reaches the child's command line.
    # The bundled card's CRF default is off, so the checked box asks for the plain CRF by name.
    assert settings.to_argv() == ["--crf", "mean", "--keep-samples"]


def test_settings_from_panel_values(tiny_model):
    settings = logic.settings_from_parameters(panel(model=str(tiny_model), samples=5, steps=12, seed=7,
                                                    device="cpu", crf=False))
    assert (settings.model, settings.samples, settings.steps, settings.seed) == (str(tiny_model), 5, 12, 7)
    assert settings.device == "cpu" and settings.crf == "off" and settings.keep_samples is True
    argv = settings.to_argv()
    for flag, value in [("--model", str(tiny_model)), ("--samples", "5"), ("--steps", "12"), ("--seed", "7"),
                        ("--device", "cpu")]:
        assert argv[argv.index(flag) + 1] == value
    assert "--no-crf" in argv and "--keep-samples" in argv
    settings.check()  # a run accepts them


def test_the_estimate_of_panel_settings_uses_the_model_card_defaults_and_a_stored_speed(tiny_model):
    """Panel values -> settings -> the time estimate next to Apply, on a real volume node."""
    scene = new_mrml_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
    import slicer

    slicer.util.updateVolumeFromArray(node, np.zeros((4, 32, 32), np.float32))
    workflow = logic.new_workflow(scene)
    card = read_card(tiny_model)
    stored = {logic.speed_key(card.name, "cpu"): "1e-6"}
    speed = logic.stored_speed(str(tiny_model), "cpu", stored.get)
    assert speed == MeasuredSpeed(card.name, "cpu", 1e-6)

    estimate = workflow.estimate(node, logic.settings_from_parameters(panel(model=str(tiny_model), device="cpu")),
                                 speed=speed)
    assert (estimate.samples, estimate.steps) == (card.default_samples, card.default_steps)
    assert estimate.items == 4  # a 2D model: one item per slice
    chosen = workflow.estimate(node, logic.settings_from_parameters(
        panel(model=str(tiny_model), device="cpu", samples=2, steps=1)), speed=speed)
    assert (chosen.samples, chosen.steps) == (2, 1)
    # Measured with another device setting: no estimate rather than a wrong one.
    assert workflow.estimate(node, logic.settings_from_parameters(panel(model=str(tiny_model))), speed=speed) is None


def test_the_speed_is_stored_under_the_model_card_name_and_read_back():
    card_name = read_card(store.resolve_model(None)).name
    key, value = logic.speed_setting(MeasuredSpeed(card_name, "auto", 2.5e-7))
    assert key == f"{logic.SPEED_SETTINGS_GROUP}/{card_name}/auto" and value == 2.5e-7
    settings = {key: value}
    assert logic.stored_speed(None, "auto", settings.get) == MeasuredSpeed(card_name, "auto", 2.5e-7)
    assert logic.stored_speed(None, "cpu", settings.get) is None
    assert logic.stored_speed(None, "auto", {key: "not a number"}.get) is None


# -- the workflow the module's Logic holds ---------------------------------------------------------

def test_the_workflow_runs_slicers_python_when_there(tmp_path, monkeypatch):
    scene = new_mrml_scene()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert logic.child_python() == sys.executable
    assert isinstance(logic.new_workflow(scene), SegmentationWorkflow)
    python_slicer = tmp_path / "PythonSlicer"
    python_slicer.write_text("#!/bin/sh\n")
    python_slicer.chmod(0o755)
    workflow = logic.new_workflow(scene)
    assert workflow.python == str(python_slicer) and workflow.scene is scene


def test_importing_the_logic_and_the_self_test_loads_neither_qt_nor_slicer_nor_torch():
    """The panel imports them when the module opens: before torch is installed, and fast."""
    code = ("import sys; import DiffusionSegLib.slicer.logic, DiffusionSegLib.slicer.selftest; "
            "print(','.join(m for m in ('qt', 'ctk', 'slicer', 'torch', 'monai', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


# -- models ---------------------------------------------------------------------------------------

def test_available_models_lists_the_bundled_default_with_its_catalogue_figures(models_home):
    entries = logic.available_models()
    defaults = [e for e in entries if e.is_default]
    assert len(defaults) == 1
    default = defaults[0]
    card = read_card(store.resolve_model(None))
    assert (default.name, default.origin) == (store.DEFAULT_MODEL, "bundled")
    assert Path(default.folder) == store.resolve_model(None)
    assert default.default_crf == bool(card.default_crf)
    assert default.summary.startswith(f"{card.name}: {card.modality}; labels: ")
    for index in card.output_label_indices():
        assert card.labels[index].name in default.summary
    figures = summary_line(entry_for(card.name))
    assert figures and figures in default.summary and figures in default.tooltip


def test_install_list_and_clear_a_model(models_home, tiny_model):
    installed = logic.install_model(tiny_model)
    assert installed == models_home / tiny_model.name
    entry = next(e for e in logic.available_models() if e.folder == str(installed))
    assert entry.origin == "installed" and not entry.is_default and entry.name == tiny_model.name
    assert logic.clear_models() == 1
    assert all(e.folder != str(installed) for e in logic.available_models())


def _mismatched_copy(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with a card that describes a wider network than its weights: the sha256 still fits."""
    shutil.copytree(tiny_model, folder)
    card_path = folder / "model.json"
    card = json.loads(card_path.read_text())
    card["network"]["channels"] = [16, 32]
    card_path.write_text(json.dumps(card))
    return folder


def test_installs_from_the_panel_load_the_network_before_accepting_a_model(models_home, tiny_model, tmp_path):
    broken = _mismatched_copy(tiny_model, tmp_path / "wrong_architecture")
    with pytest.raises(ModelLoadError, match="do not match the architecture"):
        logic.install_model(broken)
    assert not any(models_home.iterdir()), "a refused model left files behind"

    archive = tmp_path / "wrong_architecture.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in broken.iterdir():
            zf.write(path, path.name)
    seen = []
    with pytest.raises(ModelLoadError, match="do not match the architecture"):
        logic.download_model(archive.as_uri(), sha256_of(archive), progress=lambda done, total: seen.append(done))
    assert seen and seen[-1] == archive.stat().st_size
    assert not [e for e in logic.available_models() if e.origin == "installed"]
    # The store alone (no load check) would have taken it: the panel's install is the stricter one.
    assert store.install_model(broken) == models_home / tiny_model.name


# -- dependencies ---------------------------------------------------------------------------------

def hiding(*names: str, installed: set[str] | None = None):
    """find_spec that cannot find ``names`` (unless later added to ``installed``)."""
    installed = installed if installed is not None else set()

    def find_spec(name, *args):
        if name in names and name not in installed:
            return None
        return importlib.util.find_spec(name, *args)

    return find_spec


def test_missing_dependencies_are_detected_without_importing_them():
    assert logic.missing_dependencies(hiding("monai", "nibabel")) == {"monai": "monai>=1.4", "nibabel": "nibabel"}
    assert logic.missing_dependencies(hiding()) == logic.missing_dependencies()


def test_nothing_missing_nothing_asked():
    def never(*_):
        raise AssertionError("nothing may be asked or installed when all packages are there")

    assert logic.ensure_dependencies(confirm=never, install_torch=never, pip_install=never, find_spec=hiding())


def test_declined_install_installs_nothing():
    asked, calls = [], []
    ok = logic.ensure_dependencies(confirm=lambda q: asked.append(q) or False,
                                   install_torch=lambda: calls.append("torch") or True,
                                   pip_install=calls.append, find_spec=hiding("torch", "monai"))
    assert ok is False and calls == []
    assert "torch>=2.1" in asked[0] and "monai>=1.4" in asked[0]


def test_torch_comes_through_the_pytorch_extension_first_then_pip_installs_the_rest():
    installed: set[str] = set()
    calls = []

    def install_torch():
        calls.append("torch")
        installed.add("torch")
        return True

    def pip_install(requirements):
        assert calls == ["torch"], "torch must be there before pip installs monai (which requires torch)"
        calls.append(list(requirements))
        installed.update(r.split(">")[0] for r in requirements)

    find_spec = hiding("torch", "monai", "einops", installed=installed)
    assert logic.ensure_dependencies(confirm=lambda q: True, install_torch=install_torch, pip_install=pip_install,
                                     find_spec=find_spec)
    assert calls == ["torch", ["monai>=1.4", "einops"]]


def test_declining_the_pytorch_install_stops_before_pip():
    calls = []
    ok = logic.ensure_dependencies(confirm=lambda q: True, install_torch=lambda: False, pip_install=calls.append,
                                   find_spec=hiding("torch", "monai"))
    assert ok is False and calls == []


def test_a_package_that_stays_missing_is_reported():
    with pytest.raises(RuntimeError, match="could not be installed: scipy"):
        logic.ensure_dependencies(confirm=lambda q: True, install_torch=lambda: True, pip_install=lambda r: None,
                                  find_spec=hiding("scipy"))


def test_without_the_pytorch_extension_the_user_is_told_to_install_it():
    assert importlib.util.find_spec("PyTorchUtils") is None  # only inside Slicer with the extension
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        logic.install_torch_with_extension()


def test_gpu_availability_is_what_torch_says():
    torch = pytest.importorskip("torch")
    mps = getattr(torch.backends, "mps", None)
    assert logic.gpu_available() is (torch.cuda.is_available() or bool(mps is not None and mps.is_available()))


def test_device_note_only_when_a_gpu_was_expected_but_is_missing():
    assert logic.device_note("cpu", False) == ""
    assert logic.device_note("auto", True) == "" and logic.device_note("auto", None) == ""
    assert "CUDA" in logic.device_note("cuda", False)
    assert "CPU" in logic.device_note("auto", False)


# -- progress -------------------------------------------------------------------------------------

def status(stage, done=0, total=0, finished=False, returncode=None):
    return JobStatus(str(stage), done, total, finished, returncode, None)


def test_progress_follows_the_stages_in_order():
    percents = [logic.progress_percent(status(stage)) for stage in Stage]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] < 100
    assert set(logic.STAGE_PERCENT) == set(Stage)
    sampling = [logic.progress_percent(status(Stage.SAMPLING, done, 120)) for done in (0, 60, 120, 500)]
    assert sampling[0] == logic.STAGE_PERCENT[Stage.SAMPLING]
    assert sampling[0] < sampling[1] < sampling[2] == sampling[3] == logic.STAGE_PERCENT[Stage.CRF]
    assert logic.progress_percent(status(Stage.WRITE, finished=True, returncode=0)) == 100
    assert logic.progress_percent(status("cancelled")) == 0


def test_the_done_text_carries_the_runs_region_notes():
    assert logic.done_text(12.4, {"postprocessing": {"region_notes": []}}) == "Done in 12 s."
    note = "region brain not found in the input (...): lesion not confined to it"
    assert logic.done_text(3.0, {"postprocessing": {"region_notes": [note]}}) == f"Done in 3 s.\n{note}"
    assert logic.done_text(1.0, None) == "Done in 1 s."  # a summary without a report
    # A card that crops says where it sampled: nothing outside the box was looked at.
    crop = {"region": "lungs", "note": "sampled inside this box only; every output is zero outside it"}
    assert logic.done_text(3.0, {"crop": crop, "postprocessing": {"region_notes": [note]}}) == (
        f"Done in 3 s.\nCrop to lungs: {crop['note']}\n{note}")


def test_stage_text():
    texts = {stage: logic.stage_text(status(stage)) for stage in Stage}
    assert len(set(texts.values())) == len(Stage), "each stage has its own line"
    assert logic.stage_text(status(Stage.SAMPLING, 30, 120)) == "Sampling 30 of 120 network evaluations"
    assert logic.stage_text(status("cancelled")) == "Cancelled."
    assert logic.stage_text(status(Stage.WRITE, finished=True, returncode=0)).startswith("Finished")
    assert "stopped" in logic.stage_text(status(Stage.SAMPLING, finished=True, returncode=2))


# -- the module's self-test, on a slicer-core scene -------------------------------------------------

def load_volume_into(scene):
    """slicer.util.loadVolume for a slicer-core scene: the file's voxels and geometry (LPS -> RAS)."""
    import SimpleITK as sitk
    import slicer
    import vtk

    def load(path: str):
        image = sitk.ReadImage(path)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", Path(path).name.split(".")[0])
        node.CreateDefaultDisplayNodes()
        direction = np.array(image.GetDirection()).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(image.GetSpacing())
        matrix[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetOrigin())
        vtk_matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                vtk_matrix.SetElement(r, c, matrix[r, c])
        node.SetIJKToRASMatrix(vtk_matrix)
        slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
        # In Slicer a loaded volume is in the subject hierarchy (whose node always exists there).
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        return node

    return load


@pytest.fixture()
def self_test():
    from DiffusionSegLib.slicer.selftest import SelfTest

    scene = new_mrml_scene()
    case = unittest.TestCase()
    return SelfTest(case, scene, lambda: logic.new_workflow(scene), str(SAMPLE), load_volume_into(scene))


def test_the_self_test_segments_the_sample(self_test):
    self_test.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "left over from an earlier test")
    self_test.test_process()
    volumes = [self_test.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()
               for i in range(self_test.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert "left over from an earlier test" not in volumes, "each self-test starts from a clear scene"


def test_the_self_test_cancels_a_run(self_test):
    self_test.test_cancel()


def test_the_self_test_fails_when_the_sample_is_missing(self_test):
    self_test.sample_path = None
    with pytest.raises(AssertionError, match="sample volume is missing"):
        self_test.load_sample()


def test_the_self_test_skips_naming_the_missing_packages(self_test, monkeypatch):
    monkeypatch.setattr(logic, "missing_dependencies", lambda: {"monai": "monai>=1.4"})
    with pytest.raises(unittest.SkipTest, match="monai>=1.4"):
        self_test.test_process()
    shown = []
    self_test.case.delayDisplay = shown.append
    self_test.run_all()  # the "Reload and Test" button: reported, not raised
    assert shown == ["Skipped: missing Python packages (press Apply once in the module to install them): "
                     "monai>=1.4"] * 2



def test_the_crf_checkbox_lets_a_cards_own_protocol_run(tmp_path):
    from helpers import make_model

    published = make_model(tmp_path / "published_model", default_crf="published")
    plain = make_model(tmp_path / "plain_model", default_crf=False)
    assert logic.settings_from_parameters(panel(model=str(published), crf=True)).crf is None  # the card decides
    assert logic.settings_from_parameters(panel(model=str(plain), crf=True)).crf == "mean"
    assert logic.settings_from_parameters(panel(model=str(published), crf=False)).crf == "off"


def test_reference_segments_are_found_by_label_name_and_the_runs_own_segments_are_not():
    from helpers import new_mrml_scene

    from DiffusionSegLib.slicer.scene import REGION_TAG

    scene = new_mrml_scene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "readers")
    ids = {name: node.GetSegmentation().AddEmptySegment(name, name)  # (id, name)
           for name in ("Liver", "liver 2", "liver fused", "spleen reader B", "livers", "kidney")}
    node.GetSegmentation().GetSegment(ids["liver fused"]).SetTag(REGION_TAG, "fused")  # made by a run
    matched = logic.match_reference_segments(node, ["liver", "spleen", "aorta"])
    assert {label: [segment_id for _, segment_id in refs] for label, refs in matched.items()} == {
        "liver": [ids["Liver"], ids["liver 2"]], "spleen": [ids["spleen reader B"]]}
    assert all(n is node for refs in matched.values() for n, _ in refs)


def test_the_bundled_diffseg_model_is_selectable_with_its_figures_and_crf_default(models_home):
    entry = next(e for e in logic.available_models() if e.name == "rgb_skin_lesion_diffseg_2d")
    card = read_card(Path(entry.folder))
    assert (entry.origin, entry.is_default, card.method) == ("bundled", False, "diffseg")
    assert entry.default_crf and card.default_crf == "published"  # the checkbox starts on: the card's protocol
    figures = summary_line(entry_for(card.name))
    assert figures and figures in entry.summary
    # the checked box runs the card's own (published) CRF: the setting leaves it to the card (None)
    from types import SimpleNamespace

    panel = SimpleNamespace(model=entry.name, task="", samples=0, steps=0, seed=0, device="cpu", crf=True)
    assert logic.settings_from_parameters(panel).crf is None
    assert logic.settings_from_parameters(SimpleNamespace(**{**vars(panel), "crf": False})).crf == "off"


def test_a_multi_task_model_lists_its_tasks_and_the_panels_task_reaches_the_run_and_the_input_check(
        models_home, tmp_path):
    """The task list under the model list, the chosen task on the child's command line, and the input check
    of the chosen task (the brain task takes MR: a CT volume is flagged; the lung task takes CT)."""
    from helpers import make_model

    from DiffusionSegLib.core.errors import SettingsError

    tasks = {"lung": {"modality": "CT", "normalization": {"kind": "ct_window", "center": -600, "width": 1500},
                      "description": "Lung lesions on CT"},
             "liver": {"modality": "CT", "normalization": {"kind": "ct_window", "center": 50, "width": 350}},
             "brain": {"modality": "MR", "normalization": {"kind": "zscore"}}}
    model = make_model(tmp_path / "unified", method="unisegdiff", modality="CT+MR", tasks=tasks)
    installed = logic.install_model(model)
    entry = next(e for e in logic.available_models() if e.folder == str(installed))
    assert entry.tasks == (("lung", "Lung lesions on CT"), ("liver", ""), ("brain", ""))
    assert "; tasks: lung, liver, brain" in entry.summary.splitlines()[0]
    settings = logic.settings_from_parameters(panel(model=str(installed), task="lung"))
    assert settings.task == "lung" and settings.to_argv()[:4] == ["--model", str(installed), "--task", "lung"]
    assert logic.settings_from_parameters(panel(model=str(installed))).task is None

    import slicer

    scene = new_mrml_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    hu = np.full((4, 32, 32), -1000, np.int16)
    hu[:, 6:26, 6:26] = 40
    slicer.util.updateVolumeFromArray(node, hu)
    workflow = logic.new_workflow(scene)
    modality = [w for w in workflow.check_input(node, str(installed), task="brain") if w.code == "modality"]
    assert modality and "MR" in modality[0].message
    assert not [w for w in workflow.check_input(node, str(installed), task="lung") if w.code == "modality"]
    # No task chosen ("Automatic"): two tasks take CT and the card names no default, so the panel shows why.
    with pytest.raises(SettingsError, match="needs a task: choose one of lung, liver, brain"):
        workflow.check_input(node, str(installed))
