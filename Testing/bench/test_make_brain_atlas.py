"""scripts/make_brain_atlas.py: the bundled brain atlas, made from the pinned nilearn template."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import load_script
from DiffusionSegLib.bench import realdata
from DiffusionSegLib.core.files import sha256_of
from DiffusionSegLib.pipeline import brain_atlas


def test_the_script_writes_a_3_mm_byte_atlas_and_its_notice(tmp_path, monkeypatch):
    script = load_script("make_brain_atlas")
    template = np.zeros((40, 46, 38), np.uint8)
    template[8:32, 9:37, 7:31] = 180  # a 1 mm "brain"
    source = tmp_path / "template.nii.gz"
    image = sitk.GetImageFromArray(template)
    image.SetOrigin((98.0, 134.0, -72.0))
    sitk.WriteImage(image, str(source))
    monkeypatch.setattr(script.realdata, "extract_brain_template", lambda dest: source)
    assert script.main(["--out", str(tmp_path / "atlas")]) == 0
    atlas = sitk.ReadImage(str(tmp_path / "atlas" / brain_atlas.ATLAS_PATH.name))
    assert atlas.GetSize() == (13, 15, 13) and atlas.GetSpacing() == (3.0, 3.0, 3.0)
    assert atlas.GetOrigin() == (98.0, 134.0, -72.0) and atlas.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(atlas)[6, 7, 6] == 180
    notice = (tmp_path / "atlas" / "NOTICE.txt").read_text()
    assert "Louis Collins" in notice and realdata.ARCHIVES["nilearn"].requirement in notice
    assert sorted(p.name for p in (tmp_path / "atlas").iterdir()) == ["NOTICE.txt", brain_atlas.ATLAS_PATH.name]


def test_the_script_remakes_the_bundled_file_from_the_cached_sdist(tmp_path):
    if not (realdata.cache_dir() / realdata.ARCHIVES["nilearn"].filename).is_file():
        pytest.skip("nilearn sdist not in the data cache (diffusionseg bench ... --prepare-only fetches it)")
    assert load_script("make_brain_atlas").main(["--out", str(tmp_path)]) == 0
    assert sha256_of(tmp_path / brain_atlas.ATLAS_PATH.name) == brain_atlas.ATLAS_SHA256
