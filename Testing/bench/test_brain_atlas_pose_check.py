"""scripts/brain_atlas_pose_check.py: the brain atlas region followed a head moved within its grid."""

import numpy as np
import SimpleITK as sitk

from helpers import load_script, synthetic_head_mr, tilted_pose


def test_a_moved_head_gets_the_moved_brain_and_keeps_its_tumour(tmp_path, capsys, monkeypatch):
    script = load_script("brain_atlas_pose_check")
    head, brain = synthetic_head_mr(tilted_pose())
    tumour = np.zeros(brain.shape, np.uint8)
    z, y, x = (int(np.median(a)) for a in np.nonzero(brain))
    tumour[z - 1:z + 2, y - 5:y + 5, x + 10:x + 20] = 1  # inside the brain, off its middle
    assert brain[tumour > 0].all()
    label = sitk.GetImageFromArray(tumour)
    label.CopyInformation(head)
    rows = script.pose_rows(head, label, poses=((0, 15.0, 0.0), (0, 0.0, 15.0)))
    assert [(r["axis"], r["degrees"], r["shift_mm"]) for r in rows] == [(0, 15.0, 0.0), (0, 0.0, 15.0)]
    for row in rows:
        assert row["dice"] >= 0.9 and row["tumour_inside"] == 1.0, row
    for kind, image in (("images", head), ("labels", label)):
        (tmp_path / f"{kind}Ts").mkdir()
        sitk.WriteImage(image, str(tmp_path / f"{kind}Ts" / "head.nii.gz"))
    monkeypatch.setattr(script, "POSES", ((2, 10.0, 0.0),))  # one pose through main(), to keep the test short
    assert script.main([str(tmp_path), "--case", "head"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("head: rotation +10 deg about axis 2, shift +0 mm: brain Dice ")
    assert script.main([str(tmp_path / "empty")]) == 2
