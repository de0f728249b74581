"""scripts/make_eval_folder.py: chosen cases of a dataset become the test split of a folder of links,
each entry with its task, so ``diffusionseg evaluate`` scores them; bad choices are refused first."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.training.data import discover_cases
from helpers import load_script


def _script():
    return load_script("make_eval_folder")


def _dataset(root):
    """Training a (lung), val_b (brain, validation), val_c (lung, validation); test t1 (lung), t2 (breast)."""
    entries = {"training": [("a", "lung", "Tr"), ("val_b", "brain", "Tr"), ("val_c", "lung", "Tr")],
               "test": [("t1", "lung", "Ts"), ("t2", "breast", "Ts")]}
    meta = {"labels": {"0": "background", "1": "lesion"}, "validation_cases": ["val_c", "val_b"],
            "case_modality": {"a": "CT", "val_b": "MR", "val_c": "CT", "t1": "CT", "t2": "MR"}}
    for split, cases in entries.items():
        meta[split] = []
        for n, (case, task, folder) in enumerate(cases):
            for kind in ("images", "labels"):
                (root / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
                array = np.full((3, 8, 8), n, np.int16) if kind == "images" else np.ones((3, 8, 8), np.uint8)
                sitk.WriteImage(sitk.GetImageFromArray(array), str(root / f"{kind}{folder}" / f"{case}.nii.gz"))
            meta[split].append({"image": f"./images{folder}/{case}.nii.gz", "label": f"./labels{folder}/{case}.nii.gz",
                                "task": task})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_validation_cases_become_a_test_split_of_links_with_their_tasks(tmp_path):
    script, data = _script(), _dataset(tmp_path / "ds")
    out = tmp_path / "val"
    test = script.build(data, out)
    assert [(e["image"], e["task"]) for e in test] == [("./imagesTs/val_c.nii.gz", "lung"),
                                                       ("./imagesTs/val_b.nii.gz", "brain")]
    assert (out / "labelsTs" / "val_b.nii.gz").resolve() == (data / "labelsTr" / "val_b.nii.gz").resolve()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"] == [] and meta["case_modality"] == {"val_b": "MR", "val_c": "CT"}
    found = discover_cases(out, "test")  # what diffusionseg evaluate reads
    assert [(c.name, c.task) for c in found] == [("val_c", "lung"), ("val_b", "brain")]
    assert all(c.label is not None and c.label.is_file() for c in found)


def test_test_cases_filtered_by_task_and_named_cases(tmp_path):
    script, data = _script(), _dataset(tmp_path / "ds")
    assert [e["task"] for e in script.build(data, tmp_path / "t", "test", ["lung"])] == ["lung"]
    assert [e["image"] for e in script.build(data, tmp_path / "n", "t2,a")] == ["./imagesTs/t2.nii.gz",
                                                                              "./imagesTs/a.nii.gz"]


def test_bad_choices_are_refused_and_leave_nothing(tmp_path):
    script, data = _script(), _dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="nope"):
        script.build(data, tmp_path / "x", "a,nope")
    with pytest.raises(DatasetError, match="no case chosen"):
        script.build(data, tmp_path / "x", "test", ["liver"])
    (data / "imagesTs" / "t1.nii.gz").unlink()  # a listed file that is gone: refused mid-way, nothing left
    with pytest.raises(DatasetError, match="t1.nii.gz"):
        script.build(data, tmp_path / "x", "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    script.build(data, tmp_path / "y", "a")
    with pytest.raises(DatasetError, match="exists"):  # an existing folder is kept without --overwrite
        script.build(data, tmp_path / "y", "val_b")
    assert script.main([str(data), str(tmp_path / "y"), "--cases", "val_b", "--overwrite"]) == 0
    assert json.loads((tmp_path / "y" / "dataset.json").read_text())["test"][0]["task"] == "brain"
