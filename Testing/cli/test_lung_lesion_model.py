"""The bundled lung lesion model (ct_lung_lesion_unisegdiff_2d) from the CLI: it finds a solid nodule in
a chest phantom, marks nothing else, and lands on the input grid."""

import json

import numpy as np
import SimpleITK as sitk

from helpers import write_chest_phantom
from DiffusionSegLib.cli.main import main

MODEL = "ct_lung_lesion_unisegdiff_2d"


def test_the_lung_lesion_model_finds_a_nodule_and_nothing_else(tmp_path, capsys):
    nodule = write_chest_phantom(tmp_path / "chest.nii.gz")
    assert main(["segment", str(tmp_path / "chest.nii.gz"), "-o", str(tmp_path / "out"), "--model", MODEL,
                 "--samples", "2", "-q"]) == 0
    fused = sitk.ReadImage(str(tmp_path / "out" / "fused.nii.gz"))
    assert fused.GetSize() == (160, 160, 20) and fused.GetOrigin() == (-160.0, -160.0, 30.0)
    found = sitk.GetArrayFromImage(fused) > 0
    dice = 2.0 * (found & nodule).sum() / (found.sum() + nodule.sum())
    assert dice > 0.8, dice  # measured 0.93 at the card's 5 samples
    assert not (found & ~np.asarray(nodule)).reshape(20, -1).any(axis=1)[:5].any()  # slices far from it stay empty
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["name"] == MODEL and report["crf_mode"] == "off"  # the card's default: CRF measured worse
    post = report["postprocessing"]  # the card's filters ran, and found the phantom's lungs
    assert post["region_components"] == {"lesion": "lungs"} and post["consistent_components"] == ["lesion"]
    assert post["region_notes"] == []
    # The card crops to the chest cavity: the phantom's box (131 x 95 of 160 x 160) leaves out more than a
    # quarter of each slice, so only the box was sampled; the nodule found above is on the whole grid.
    crop = report["crop"]
    assert crop["removed_fraction"] == 0.514 and crop["size_xyz"] == [131, 95, 20]
    assert crop["note"] == "sampled inside this box only; every output is zero outside it"
    assert f"  crop to lungs: {crop['note']}" in capsys.readouterr().out.splitlines()  # the CLI says so
