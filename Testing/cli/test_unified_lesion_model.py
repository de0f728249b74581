"""The bundled unified lesion model (unified_lesion_unisegdiff_2d, one network with a task token) from the CLI:
without --task a chest CT runs the lung task (the card's default for CT) and finds a solid nodule; an MR
runs the brain task (the only MR task); a named task runs with its own window."""

import json

import numpy as np
import SimpleITK as sitk

from helpers import write_chest_phantom
from DiffusionSegLib.cli.main import main

MODEL = "unified_lesion_unisegdiff_2d"


def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_a_chest_ct_without_a_task_runs_the_lung_task_and_finds_the_nodule(tmp_path):
    nodule = write_chest_phantom(tmp_path / "chest.nii.gz")
    assert main(["segment", str(tmp_path / "chest.nii.gz"), "-o", str(tmp_path / "out"), "--model", MODEL, "-q"]) == 0
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "fused.nii.gz"))) > 0
    dice = 2.0 * (found & nodule).sum() / (found.sum() + nodule.sum())
    assert dice > 0.8, dice  # measured 0.996 at the card's 5 samples
    report = _report(tmp_path / "out")
    assert (report["model"]["task"], report["model"]["task_source"]) == ("lung", "the model card's default_task")
    assert report["model"]["normalization"] == {"kind": "ct_window", "center": -600, "width": 1500}
    post = report["postprocessing"]  # the lung task's filters ran and found the phantom's lungs
    assert post["region_components"] == {"lesion": "lungs"} and post["region_notes"] == []


def test_an_mr_runs_the_brain_task_and_a_named_task_its_own_window(tmp_path, capsys):
    # A head-like MR volume (positive intensities, no air at -1000): the input's statistics say "not CT",
    # and brain is the model's only task that is not CT. Synthetic MR phantoms do not look like the brain
    # MR it was trained on, so no accuracy is asserted here (the real brain1 tumour: docs/BENCHMARKS.md).
    rng = np.random.default_rng(1)
    z, y, x = np.ogrid[:6, :96, :96]
    head = (((y - 48) / 40.0) ** 2 + ((x - 48) / 34.0) ** 2 <= 1)[0]
    mr = rng.normal(5, 3, (6, 96, 96))
    mr[:, head] = 360 + rng.normal(0, 30, (6, int(head.sum())))
    image = sitk.GetImageFromArray(np.clip(mr, 0, None).astype(np.int16))
    image.SetSpacing((2.0, 2.0, 5.0))  # 192 mm in-plane, a head's width (over the model's 128 mm training view)
    image.SetOrigin((10.0, -20.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "mr.nii.gz"))
    assert main(["segment", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "mr"), "--model", MODEL, "-q"]) == 0
    report = _report(tmp_path / "mr")
    assert (report["model"]["task"], report["model"]["task_source"]) == ("brain", "the model's only task for not CT input")
    assert report["model"]["normalization"] == {"kind": "zscore"} and report["warnings"] == []
    # The brain task confines its pieces to the brain; this 30 mm slab is too thin to place the atlas on.
    post = report["postprocessing"]
    assert post["region_components"] == {"lesion": "brain"}
    assert post["region_notes"] == ["region brain not found in the input (the image spans 30 mm along one axis, under "
                                    "the 100 mm the brain atlas needs to be placed): lesion not confined to it"]
    assert f"  {post['region_notes'][0]}" in capsys.readouterr().out.splitlines()  # the CLI says so too
    fused = sitk.ReadImage(str(tmp_path / "mr" / "fused.nii.gz"))
    assert fused.GetSize() == (96, 96, 6) and fused.GetOrigin() == (10.0, -20.0, 3.0)
    # --task names the task: liver on the same image (the input check says it is no CT) with the liver window.
    assert main(["segment", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "liver"), "--model", MODEL,
                 "--task", "liver", "--samples", "2", "-q"]) == 0
    report = _report(tmp_path / "liver")
    assert report["model"]["task"] == "liver" and report["model"]["normalization"]["center"] == 50
    assert [w["code"] for w in report["warnings"]] == ["modality"]


def test_the_model_list_names_its_tasks(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(MODEL + " "))
    assert "unisegdiff ensemble of 3 2D CT+MR: lesion" in lines[at]
    assert lines[at + 1] == "    tasks: lung, liver, brain (default lung)"
    assert main(["models", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out) if e["name"] == MODEL)
    assert entry["tasks"] == ["lung", "liver", "brain"] and entry["default_task"] == "lung"
