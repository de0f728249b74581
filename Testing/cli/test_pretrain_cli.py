"""``diffusionseg pretrain`` end to end on small synthetic CTs, with and without coordinate guidance."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from helpers import write_body_ct
from DiffusionSegLib.cli.main import main
from DiffusionSegLib.methods.pretrain3d.coordinates import CoordinateNet, save_coordinate_model
from DiffusionSegLib.methods.pretrain3d.denoising import load_backbone

TINY = ["--steps", "3", "--patch", "8", "--channels", "8", "16", "--batch", "2", "--checkpoint-every", "2"]


def test_pretrain_writes_a_backbone_from_a_folder_of_cts(tmp_path, capsys):
    cts = tmp_path / "cts"
    cts.mkdir()
    write_body_ct(cts / "a.nii.gz")
    write_body_ct(cts / "b.nrrd", flip=True)
    write_body_ct(cts / "c_thick.nii.gz", size=(24, 20, 8), spacing=(2.0, 2.0, 5.0))  # slices coarser than the grid
    (cts / "notes.txt").write_text("not a CT")
    out = tmp_path / "backbone"
    assert main(["pretrain", str(cts), "-o", str(out), "--spacing", "4", *TINY]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 3
    net, card = load_backbone(out)
    assert card["pretraining"]["objective"]["kind"] == "diffusion" and not card["network"]["coordinate_head"]
    log = json.loads((out / "pretraining_log.json").read_text())
    assert len(log["inputs"]) == 3 and log["spacing_mm"] == 4.0 and [s[0] for s in log["shapes"]] == [9, 9, 10]
    assert card["spacing_mm"] == [4.0, 4.0, 4.0]
    assert len(log["losses"]) == 3 and all(np.isfinite(r["total"]) for r in log["losses"])


def test_pretrain_with_a_coordinate_model_takes_its_spacing_and_adds_the_head(tmp_path):
    write_body_ct(tmp_path / "a.nii.gz")
    coords = CoordinateNet(channels=(4, 8), norm_groups=2)
    coords.trained_spacing, coords.trained_patch = (6.0, 6.0, 6.0), (8, 8, 8)
    save_coordinate_model(tmp_path / "coords", coords)
    out = tmp_path / "guided"
    assert main(["pretrain", str(tmp_path / "a.nii.gz"), "-o", str(out), "--objective", "restorative",
                 "--coordinates", str(tmp_path / "coords"), "--coordinate-weight", "0.5", *TINY]) == 0
    _, card = load_backbone(out)
    assert card["network"]["coordinate_head"] and card["pretraining"]["objective"]["coordinate_weight"] == 0.5
    assert json.loads((out / "pretraining_log.json").read_text())["spacing_mm"] == 6.0
    assert main(["pretrain", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "x"), "--spacing", "4",
                 "--coordinates", str(tmp_path / "coords"), *TINY]) == 2  # not the coordinate model's grid


def test_pretrain_refuses_bad_inputs_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    picture = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(256, dtype=np.int16).reshape(16, 16)), str(picture))
    for args, why in [([str(empty)], "no CT volume"), ([str(tmp_path / "missing.nii.gz")], "no such file"),
                      ([str(picture)], "3D scalar CT"), ([str(empty), "--patch", "10"], "multiple of 4")]:
        assert main(["pretrain", *args, "-o", str(tmp_path / "o"), *TINY[:2]]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
