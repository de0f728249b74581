"""A multi-task model (``ModelCard.tasks``): one network for several lesion sites, told the site by a task token.

Each task sets its own modality, normalization and post-processing over the card's; the network sees
the task as one-hot input planes after the image channels, the same way at training (load_case, the
patch sampler) and at inference (prepare). Every run names its task; a wrong or missing one is refused
before any work, and the report says which task ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.cli.main import main
from DiffusionSegLib.core.errors import DatasetError, ModelLoadError, SettingsError
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.pipeline.preprocess import prepare
from DiffusionSegLib.training.data import Augmentation, CaseFiles, PatchSampler, discover_cases, load_case

pytestmark = pytest.mark.usefixtures("one_thread")

LUNG = {"modality": "CT", "normalization": {"kind": "ct_window", "center": -600, "width": 1500},
        "region_components": {"lesion": "lungs"}}
BRAIN = {"modality": "MR", "normalization": {"kind": "zscore"}}
TASKS = {"lung": LUNG, "brain": BRAIN}


def task_card(**fields) -> ModelCard:
    values = dict(name="unified", method="unisegdiff", modality="CT+MR", spatial_dims=2, in_channels=1,
                  labels=[LabelInfo("lesion")], network={"channels": [8, 16], "norm_groups": 4},
                  normalization={"kind": "ct_window", "center": -300, "width": 1800}, tasks=TASKS)
    values.update(fields)
    return ModelCard(**values)


def ct_like(shape=(3, 20, 24)) -> tuple[sitk.Image, np.ndarray]:
    """(int16 HU image: air -1000 around a 40 HU body with a 600 HU patch, its HU array)."""
    zz, yy, xx = np.indices(shape)
    body = ((yy - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((xx - shape[2] / 2) / (0.4 * shape[2])) ** 2 < 1
    hu = np.where(body, 40, -1000).astype(np.int16)
    hu[:, 9:11, 11:13] = 600
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    return image, hu


def test_a_task_sets_its_fields_over_the_cards_and_adds_one_input_plane_per_task():
    card = task_card()
    assert card.network_in_channels == 1 + 2
    lung = card.for_task("lung")
    assert lung.task == "lung" and lung.normalization == LUNG["normalization"]
    assert lung.region_components == {"lesion": "lungs"} and lung.modality == "CT"
    assert lung.network_in_channels == 3 and lung.task_plane_values() == [1.0, 0.0]
    brain = card.for_task("brain")
    assert brain.modality == "MR" and brain.region_components == {} and brain.task_plane_values() == [0.0, 1.0]
    # The stored card is not changed by a run's choice.
    assert card.task is None and card.normalization["center"] == -300
    single = task_card(tasks={})
    assert single.network_in_channels == 1 and single.for_task(None) is single


@pytest.mark.parametrize("tasks, task, words", [
    (TASKS, None, "needs a task: choose one of lung, brain"),
    (TASKS, "liver", "has no task 'liver': choose one of lung, brain"),
    ({}, "lung", "has no tasks"),
])
def test_a_missing_or_unknown_task_is_refused_naming_the_choices(tasks, task, words):
    with pytest.raises(SettingsError, match=words):
        task_card(tasks=tasks).for_task(task)


def test_a_run_without_a_task_takes_the_only_task_of_its_modality_else_the_cards_default():
    liver = {"modality": "CT", "normalization": {"kind": "ct_window", "center": 50, "width": 350}}
    card = task_card(tasks={"lung": LUNG, "liver": liver, "brain": BRAIN})
    assert card.resolve_task("liver", "MR") == ("liver", "named by the run")  # a named task always wins
    assert card.resolve_task(None, "MR") == ("brain", "the model's only task for MR input")
    assert card.resolve_task(None, "not CT")[0] == "brain"  # an MR without a tag: told from its statistics
    assert card.resolve_task(None, "CT") == (None, "")  # lung or liver: nothing decides
    with_default = task_card(tasks={"lung": LUNG, "liver": liver, "brain": BRAIN}, default_task="lung")
    assert with_default.resolve_task(None, "CT") == ("lung", "the model card's default_task")
    assert with_default.resolve_task(None, "MR")[0] == "brain"  # the modality decides before the default
    assert with_default.resolve_task(None, "PT")[0] == "lung"  # no task fits: the default (the input check warns)
    assert task_card(tasks={}).resolve_task(None, "CT") == (None, "")


@pytest.mark.parametrize("tasks, words", [
    ({"Lung": {}}, "task name 'Lung'"),
    ({"lung": {"spacing": [1.0, 1.0]}}, "task 'lung' may set only"),
    ({"lung": "ct"}, "task 'lung' may set only"),
    ("default_task", "default_task 'liver' is not one of its tasks"),
])
def test_a_card_with_malformed_tasks_is_refused_when_read(tasks, words):
    data = json.loads(task_card().to_json())
    if tasks == "default_task":
        data["default_task"] = "liver"
    else:
        data["tasks"] = tasks
    with pytest.raises(ModelLoadError, match=words):
        ModelCard.from_dict(data)


def test_prepare_uses_the_tasks_window_and_appends_the_task_planes_everywhere():
    image, hu = ct_like()
    prepared = prepare(image, task_card().for_task("lung"), size_divisor=8)  # pads 20 x 24 to 24 x 24
    batch = prepared.batch
    assert batch.shape == (3, 3, 24, 24)
    # The lung window -600 +- 750 HU onto [-1, 1], by hand: air -400 / 750, body 640 / 750, 600 HU clipped.
    inside = batch[:, 0, 2:22, :]
    np.testing.assert_allclose(inside, np.clip((hu.astype(np.float64) + 600.0) / 750.0, -1, 1), rtol=1e-6)
    # The task token: the lung plane is 1, the brain plane 0, padding included.
    assert np.all(batch[:, 1] == 1.0) and np.all(batch[:, 2] == 0.0)
    assert prepared.task_channels == 2
    # The CRF reads the image, not the token.
    assert prepared.image_for_crf.shape == (1, 3, 24, 24)
    np.testing.assert_array_equal(prepared.image_for_crf[0], batch[:, 0])
    brain = prepare(image, task_card().for_task("brain"), size_divisor=8).batch
    assert np.all(brain[:, 1] == 0.0) and np.all(brain[:, 2] == 1.0)


def test_the_network_sees_the_task():
    from DiffusionSegLib.methods.registry import build_network

    card = task_card()
    torch.manual_seed(0)
    net = build_network(card).eval()
    image, _ = ct_like()
    with torch.inference_mode():
        lung = net.encode(torch.from_numpy(prepare(image, card.for_task("lung"), 8).batch)).prior_logits
        brain_planes = prepare(image, card.for_task("lung"), 8).batch.copy()
        brain_planes[:, 1:] = [[[0.0]], [[1.0]]]  # the same image, only the token changed
        brain = net.encode(torch.from_numpy(brain_planes)).prior_logits
    assert float((lung - brain).abs().max()) > 1e-4


def write_task_dataset(root: Path, tasks_of_cases: dict[str, str | None], test: dict[str, str] | None = None) -> Path:
    """Small CT volumes with a bright blob as the lesion; dataset.json entries name each case's task."""
    rng = np.random.default_rng(0)
    entries = {"training": [], "test": []}
    for split, cases in (("training", tasks_of_cases), ("test", test or {})):
        images, labels = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        for sub in (images, labels):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for name, task in cases.items():
            image, hu = ct_like((4, 32, 32))
            lesion = np.zeros(hu.shape, np.uint8)
            cy, cx = rng.integers(10, 22, 2)
            lesion[:, cy - 3:cy + 3, cx - 3:cx + 3] = 1
            hu = hu + 300 * lesion.astype(np.int16)
            for array, sub in ((hu, images), (lesion, labels)):
                out = sitk.GetImageFromArray(array)
                out.CopyInformation(image)
                sitk.WriteImage(out, str(root / sub / f"{name}.nii.gz"))
            entry = {"image": f"./{images}/{name}.nii.gz", "label": f"./{labels}/{name}.nii.gz"}
            if task is not None:
                entry["task"] = task
            entries[split].append(entry)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}, **entries}))
    return root


def test_load_case_prepares_a_case_with_its_own_task_and_refuses_a_case_without_one(tmp_path):
    data = write_task_dataset(tmp_path, {"a_lung": "lung", "b_brain": "brain", "c_none": None})
    files = {f.name: f for f in discover_cases(data, "training")}
    assert files["a_lung"].task == "lung" and files["c_none"].task is None
    card = task_card()
    lung = load_case(files["a_lung"], card, {"lesion": (1,)})
    assert lung.image.shape[0] == 3 and np.all(lung.image[1] == 1.0) and np.all(lung.image[2] == 0.0)
    assert lung.image[0].min() == pytest.approx(-400.0 / 750.0)  # air in the lung window
    brain = load_case(files["b_brain"], card, {"lesion": (1,)})
    assert np.all(brain.image[1] == 0.0) and np.all(brain.image[2] == 1.0)
    with pytest.raises(DatasetError, match="case c_none: the model's tasks are lung, brain; the case's "
                                           "dataset.json entry names no task"):
        load_case(files["c_none"], card, {"lesion": (1,)})
    # A single-task card ignores the entry's task.
    assert load_case(files["a_lung"], task_card(tasks={}), {"lesion": (1,)}).image.shape[0] == 1


def test_a_task_that_is_not_a_name_is_refused(tmp_path):
    data = write_task_dataset(tmp_path, {"a": "lung"})
    meta = json.loads((data / "dataset.json").read_text())
    meta["training"][0]["task"] = 3
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="task must be a name, got 3"):
        discover_cases(data, "training")


def test_augmentation_never_touches_the_task_planes(tmp_path):
    data = write_task_dataset(tmp_path, {"a": "lung", "b": "brain"})
    cases = [load_case(f, task_card(), {"lesion": (1,)}) for f in discover_cases(data, "training")]
    aug = Augmentation(prob=1.0, rotate_deg=30.0, scale=0.2, intensity_scale=0.5, intensity_shift=0.5, noise_std=0.5,
                       label_offsets=((0.3, 0.5),), label_offset_prob=1.0)
    sampler = PatchSampler(cases, 2, (16, 16), augmentation=aug, seed=0, task_channels=2)
    images, _ = sampler.batch(16)
    planes = images[:, 1:]
    assert set(np.unique(planes).tolist()) == {0.0, 1.0}
    assert np.all(planes.min(axis=(2, 3)) == planes.max(axis=(2, 3)))  # constant over each item
    assert np.all(planes.sum(axis=1) == 1.0)  # one task per item
    assert images[:, 0].std() > 0.1  # while the image itself was augmented


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as done:
        return int(done.code or 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset with lung and brain cases and test cases, a multi-task UniSegDiff trained on it for 2 steps)."""
    root = tmp_path_factory.mktemp("tasks")
    data = write_task_dataset(root / "data", {"l0": "lung", "l1": "lung", "b0": "brain", "b1": "brain"},
                              test={"t_lung": "lung", "t_brain": "brain"})
    config = {"method": "unisegdiff", "network": {"channels": [8, 16], "norm_groups": 4}, "patch_size": [16, 16],
              "normalization": {"kind": "ct_window", "center": -300, "width": 1800}, "modality": "CT+MR",
              "tasks": {"lung": LUNG, "brain": {**BRAIN, "modality": "CT"}}, "batch_size": 2, "steps": 2,
              "val_every": 2, "checkpoint_every": 2, "val_cases": ["l1", "b1"], "val_samples": 1, "val_steps": 3,
              "default_samples": 2, "default_steps": 3, "default_crf": "off"}
    (root / "config.json").write_text(json.dumps(config))
    assert cli("train", data, "-o", root / "model", "--config", root / "config.json", "-q") == 0
    return data, root / "model"


def test_train_writes_the_tasks_into_the_card(trained):
    _, model = trained
    card = json.loads((model / "model.json").read_text())
    assert list(card["tasks"]) == ["lung", "brain"] and card["task"] is None
    assert card["tasks"]["lung"]["region_components"] == {"lesion": "lungs"}


def test_segment_runs_the_chosen_task_and_refuses_a_run_without_one(trained, tmp_path, capsys):
    data, model = trained
    image = data / "imagesTs" / "t_lung.nii.gz"
    assert cli("segment", image, "-o", tmp_path / "none", "--model", model, "-q") == 2
    assert "needs a task: choose one of lung, brain (--task)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert cli("segment", image, "-o", tmp_path / "lung", "--model", model, "--task", "lung", "-q") == 0
    report = json.loads((tmp_path / "lung" / "report.json").read_text())
    assert report["model"]["task"] == "lung" and report["model"]["tasks"] == ["lung", "brain"]
    assert report["model"]["normalization"] == LUNG["normalization"]
    assert report["postprocessing"]["region_components"] == {"lesion": "lungs"}
    assert cli("segment", image, "-o", tmp_path / "brain", "--model", model, "--task", "brain", "-q") == 0
    report = json.loads((tmp_path / "brain" / "report.json").read_text())
    assert report["model"]["task"] == "brain" and report["postprocessing"]["region_components"] == {}
    assert report["model"]["task_source"] == "named by the run"
    # A card with a default task runs a CT without --task (both tasks take CT here: the default decides).
    default = tmp_path / "with_default"
    shutil.copytree(model, default)
    card = json.loads((default / "model.json").read_text())
    (default / "model.json").write_text(json.dumps({**card, "default_task": "lung"}))
    assert cli("segment", image, "-o", tmp_path / "auto", "--model", default, "-q") == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert (report["model"]["task"], report["model"]["task_source"]) == ("lung", "the model card's default_task")


def test_evaluate_runs_each_case_with_its_task_and_checks_them_all_first(trained, tmp_path, capsys):
    data, model = trained
    out = tmp_path / "eval.json"
    assert cli("evaluate", model, data, "--split", "test", "-o", out, "-q") == 0
    rows = {row["case"]: row for row in json.loads(out.read_text())["cases"]}
    assert rows["t_lung"]["task"] == "lung" and rows["t_brain"]["task"] == "brain"
    # --task runs every case with that task.
    assert cli("evaluate", model, data, "--split", "test", "--task", "brain", "-o", out, "-q") == 0
    assert {row["task"] for row in json.loads(out.read_text())["cases"]} == {"brain"}
    # A case whose task the model lacks stops the run before the first case is segmented.
    meta = json.loads((data / "dataset.json").read_text())
    meta["test"][1]["task"] = "breast"
    (tmp_path / "data").mkdir()
    for sub in ("imagesTs", "labelsTs"):
        (tmp_path / "data" / sub).symlink_to(data / sub)
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({**meta, "training": []}))
    assert cli("evaluate", model, tmp_path / "data", "--split", "test", "-o", tmp_path / "bad.json", "-q") == 2
    assert "has no task 'breast'" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
