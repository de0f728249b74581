"""The writers: NIfTI maps on the reference grid, .seg.nrrd read back by slicer-core MRML, all-or-nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import LABELS, LIVER_TERMS, make_result, new_mrml_scene
from DiffusionSegLib.outputs import writers
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.models.card import LabelInfo
from DiffusionSegLib.pipeline.result import SegmentationResult

LIVER_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


def assert_reference_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_valid_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        width, height = png.size
    assert 200 <= width <= 1200 and 150 <= height <= 1200, (width, height)
    assert path.stat().st_size < 600_000


# --- units with hand-computed numbers ---------------------------------------------------------------


def test_label_map_gives_overlaps_to_the_more_probable_label():
    masks = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 1]], np.uint8)
    probability = np.array([[0.9, 0.4, 0.1, 0.0, 0.5], [0.1, 0.6, 0.8, 0.0, 0.5]], np.float32)
    out = writers.label_map(masks, probability)
    assert out.dtype == np.uint8
    assert out.tolist() == [1, 2, 2, 0, 1]  # last voxel: a tie goes to the lower index
    # Sample counts (what a result keeps) order the labels as the probability does.
    counts = np.array([[4, 2, 1, 0, 3], [1, 3, 4, 0, 3]], np.uint8)
    assert writers.label_map(masks, counts).tolist() == [1, 2, 2, 0, 1]
    # A voxel in a mask whose score is 0 (a CRF-added voxel no sample marked) still gets the label.
    assert writers.label_map(np.array([[1, 0]], np.uint8), np.zeros((1, 2), np.uint8)).tolist() == [1, 0]


def test_label_map_memory_is_one_label_map_not_all_labels():
    """9 labels: the temporaries are about one label's float map, not L of them (a 512 x 512 x 100
    CT would otherwise hold 0.9 GB of scores per label map written)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    masks = (rng.random((9, 20, 64, 64)) < 0.3).astype(np.uint8)
    counts = rng.integers(0, 6, size=masks.shape).astype(np.uint8)
    voxels = masks[0].size
    tracemalloc.start()
    try:
        writers.label_map(masks, counts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * voxels, f"label_map held {peak / voxels:.1f} bytes per voxel"


def test_file_stems_are_safe_and_unique():
    labels = [LabelInfo("left kidney"), LabelInfo("left/kidney"), LabelInfo("..."), LabelInfo("-Liver-2.a")]
    assert writers.file_stems(labels) == ["left_kidney", "left_kidney_1", "label2", "Liver-2_a"]


def test_terminology_entry_forms():
    assert writers.terminology_entry(LIVER_TERMS) == LIVER_ENTRY
    assert writers.terminology_entry("123037004;10200004") == LIVER_ENTRY.replace(
        "^Anatomical Structure", "^").replace("^Liver", "^")
    assert writers.terminology_entry(LIVER_ENTRY) == LIVER_ENTRY
    assert writers.terminology_entry("") is None
    assert writers.terminology_entry("just one code") is None
    assert writers.terminology_entry("a~b") is None


def test_ijk_to_lps_of_an_oblique_volume(oblique_3d):
    matrix = writers.ijk_to_lps(oblique_3d)
    for index in [(0, 0, 0), (3, 7, 5), (12, 9, 0)]:
        expected = oblique_3d.TransformIndexToPhysicalPoint(index)
        assert np.allclose((matrix @ [*index, 1])[:3], expected, atol=1e-9)


# --- whole writer -----------------------------------------------------------------------------------


def test_3d_oblique_outputs_on_the_reference_grid(tmp_path, oblique_3d):
    result = make_result(oblique_3d)
    out = tmp_path / "new" / "out"
    written = writers.write_outputs(result, out, keep_samples=True)

    stems = ["liver", "left_kidney_cortex"]
    expected = {"fused", "crf", "consistency", "ambiguity", "segmentation", "overview", "report",
                *(f"{kind}_{s}" for kind in ("probability", "uncertainty") for s in stems),
                "sample_0", "sample_1", "sample_2"}
    assert set(written) == expected
    assert all(p.is_file() and p.parent in (out, out / "samples") for p in written.values())
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary left behind"

    for path in out.rglob("*.nii.gz"):
        assert_reference_grid(sitk.ReadImage(str(path)), oblique_3d)
    for name, masks in [("fused", result.fused), ("crf", result.refined), ("consistency", result.consistency),
                        ("ambiguity", result.ambiguity)]:
        image = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert image.GetPixelID() == sitk.sitkUInt8
        values = sitk.GetArrayFromImage(image)
        both = masks[0].astype(bool) & masks[1].astype(bool)
        assert np.array_equal(values[masks[0].astype(bool) & ~both], np.full((masks[0] & ~both).sum(), 1))
        assert np.array_equal(values[masks[1].astype(bool) & ~both], np.full((masks[1] & ~both).sum(), 2))
        assert np.all(values[~masks.any(0)] == 0)
        winner = np.where(result.probability[1] > result.probability[0], 2, 1)
        assert np.array_equal(values[both], winner[both])
    assert ((result.fused[0] & result.fused[1]) == 1).any(), "the test data must contain overlaps"
    sample = read_array(out / "samples" / "sample_2.nii.gz")
    assert np.array_equal(sample > 0, result.samples[2].any(0))
    for i, stem in enumerate(stems):
        probability = sitk.ReadImage(str(out / f"probability_{stem}.nii.gz"))
        assert probability.GetPixelID() == sitk.sitkFloat32
        assert np.array_equal(sitk.GetArrayFromImage(probability), result.probability[i])
        assert np.array_equal(read_array(out / f"uncertainty_{stem}.nii.gz"), result.uncertainty[i])

    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"name": "tiny"} and report["seconds"] == 0.5
    assert sorted(report["outputs"]) == sorted(str(p.relative_to(out)) for p in written.values())
    assert_valid_png(out / "overview.png")


def test_2d_rgb_outputs_keep_the_scalar_geometry(tmp_path, rgb_2d):
    result = make_result(rgb_2d, refined=False)
    written = writers.write_outputs(result, tmp_path / "o")  # keep_samples off: samples not written
    assert "crf" not in written and not (tmp_path / "o" / "samples").exists()
    niftis = list((tmp_path / "o").glob("*.nii.gz"))
    assert len(niftis) == 3 + 2 * 2
    for path in niftis:
        image = sitk.ReadImage(str(path))
        assert image.GetNumberOfComponentsPerPixel() == 1
        assert_reference_grid(image, rgb_2d)
    fused = read_array(tmp_path / "o" / "fused.nii.gz")
    assert np.array_equal(fused, writers.label_map(result.fused, result.probability))
    assert_valid_png(written["overview"])


def test_failure_midway_leaves_nothing(tmp_path, oblique_3d, monkeypatch):
    def broken_overview(*args, **kwargs):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(writers, "write_overview", broken_overview)
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="matplotlib broke"):
        writers.write_outputs(make_result(oblique_3d), out, keep_samples=True)
    assert not (tmp_path / "a").exists(), "folders created by the failed call must go"

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        writers.write_outputs(make_result(oblique_3d), existing, keep_samples=True, overwrite=True)
    assert sorted(p.name for p in existing.rglob("*")) == ["notes.txt"]


def test_failure_while_renaming_removes_the_files_already_renamed(tmp_path, oblique_3d, monkeypatch):
    out = tmp_path / "out"
    real_replace = os.replace
    renamed: list[str] = []

    def replace_failing_on_the_third_output(src, dst):
        if Path(dst).parent in (out, out / "samples"):  # the final renames, not io's own temporaries
            if len(renamed) == 2:
                raise OSError(28, "No space left on device")
            renamed.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_on_the_third_output)
    with pytest.raises(DiffusionSegError, match="No space left on device") as err:
        writers.write_outputs(make_result(oblique_3d), out)
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert len(renamed) == 2 and not out.exists()


def test_output_folder_that_is_a_file_is_a_user_error(tmp_path, oblique_3d):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(DiffusionSegError, match="taken"):
        writers.write_outputs(make_result(oblique_3d), target)
    assert target.read_text() == "x"


# --- a reused output folder (issue item 10) --------------------------------------------------------


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rewrite_leaves_only_the_new_runs_outputs(tmp_path, rgb_2d):
    out = tmp_path / "o"
    first = writers.write_outputs(make_result(rgb_2d), out, keep_samples=True)
    assert "crf" in first and (out / "samples").is_dir()
    second = writers.write_outputs(make_result(rgb_2d, refined=False), out)  # no CRF, no samples
    assert not (out / "crf.nii.gz").exists() and not (out / "samples").exists()
    listed = json.loads((out / "report.json").read_text())["outputs"]
    assert sorted(folder_state(out)) == sorted(listed) == sorted(str(p.relative_to(out)) for p in second.values())


def test_a_folder_with_other_files_is_refused_without_overwrite(tmp_path, rgb_2d):
    out = tmp_path / "o"
    writers.write_outputs(make_result(rgb_2d), out, keep_samples=True)
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "my_edit.nii.gz").write_text("also mine")
    before = folder_state(out)
    with pytest.raises(DiffusionSegError, match="--overwrite") as err:
        writers.write_outputs(make_result(rgb_2d, refined=False), out)
    assert "notes.txt" in str(err.value) and "\n" not in str(err.value)
    assert folder_state(out) == before, "a refused call changes nothing"

    writers.write_outputs(make_result(rgb_2d, refined=False), out, overwrite=True)
    after = folder_state(out)
    (out / ".DS_Store").write_bytes(b"Finder")  # the user looked at the folder: still ours to rewrite
    (out / "notes.txt").unlink()
    (out / "samples" / "my_edit.nii.gz").unlink()
    writers.write_outputs(make_result(rgb_2d, refined=False), out)
    assert (out / ".DS_Store").read_bytes() == b"Finder"
    assert after["notes.txt"] == b"mine" and after["samples/my_edit.nii.gz"] == b"also mine"
    assert "crf.nii.gz" not in after and "samples/sample_0.nii.gz" not in after, "the earlier run's outputs go"


def test_only_files_named_as_our_outputs_count_as_the_earlier_runs(tmp_path, rgb_2d):
    # A report.json (hand-edited, or another tool's) must never make the writer delete other files.
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text(json.dumps({"outputs": ["notes.txt", "../outside.txt", "report.json"]}))
    with pytest.raises(DiffusionSegError, match="notes.txt"):
        writers.write_outputs(make_result(rgb_2d), out)
    writers.write_outputs(make_result(rgb_2d), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.txt").read_text() == "x"


def test_a_failed_rewrite_keeps_the_earlier_outputs(tmp_path, oblique_3d, monkeypatch):
    out = tmp_path / "o"
    writers.write_outputs(make_result(oblique_3d), out, keep_samples=True)
    before = folder_state(out)
    real_replace = os.replace
    renamed: list[str] = []

    def replace_failing_once_on_the_third_new_output(src, dst):
        # Renames into the folder (not io's temporaries); once, so that the undo can move files back.
        if Path(dst).parent in (out, out / "samples") and "failed" not in renamed:
            if len(renamed) == 2:
                renamed.append("failed")
                raise OSError(28, "No space left on device")
            renamed.append(str(dst))
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_failing_once_on_the_third_new_output)
        with pytest.raises(DiffusionSegError, match="No space left on device"):
            writers.write_outputs(make_result(oblique_3d, n_samples=2, refined=False), out)
    assert folder_state(out) == before, "the earlier outputs come back exactly"

    monkeypatch.setattr(writers, "write_overview", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broke")))
    with pytest.raises(RuntimeError, match="broke"):
        writers.write_outputs(make_result(oblique_3d, refined=False), out)
    assert folder_state(out) == before


def test_the_folder_is_checked_and_reserved_before_the_outputs_exist(tmp_path):
    # OutputFolder.open runs before the long sampling: an unusable folder fails in no time, and a
    # run that fails afterwards leaves no trace of the reservation.
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    with pytest.raises(DiffusionSegError, match="a file"):
        writers.OutputFolder(blocker / "out").open()
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        with writers.OutputFolder(out) as folder:
            assert out.is_dir() and [p.name for p in out.iterdir()][0].startswith(".diffusionseg-")
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    assert folder is not None


@pytest.mark.skipif(os.name == "nt", reason="stale staging folders are recognised by a dead POSIX pid")
def test_staging_left_by_a_killed_run_is_not_a_user_file_and_is_cleared(tmp_path, rgb_2d):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    writers.write_outputs(make_result(rgb_2d), out)
    leftover = out / f".diffusionseg-{dead.pid}-0123abcd.partial"
    (leftover / "new").mkdir(parents=True)
    (leftover / "new" / "fused.nii.gz").write_text("partial")
    writers.write_outputs(make_result(rgb_2d), out)  # no --overwrite needed: the leftover is ours
    assert not leftover.exists()


# --- .seg.nrrd read by Slicer's own MRML (slicer-core) --------------------------------------------


@pytest.fixture(scope="module")
def slicer_scene():
    scene = new_mrml_scene()
    return pytest.importorskip("slicer"), scene, scene.segmentations_logic


def read_seg_nrrd(slicer_scene, path: Path):
    slicer, scene, _ = slicer_scene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def segment_voxels_in_lps(slicer_scene, node, segment_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) LPS voxel centres of a segment's binary labelmap as Slicer reads it, and its 4x4 IJK->RAS."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    slicer, _, seg_logic = slicer_scene
    image = slicer.vtkOrientedImageData()
    assert seg_logic.GetSegmentBinaryLabelmapRepresentation(node, segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    if extent[1] < extent[0]:  # Slicer's empty segment
        return np.zeros((0, 3)), ijk_to_ras
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])  # (k, j, i)
    # Segments sharing a layer come back as that shared labelmap: the segment is its own label value.
    label_value = node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    ijk = np.argwhere(voxels == label_value)[:, ::-1] + [extent[0], extent[2], extent[4]]
    ras = (ijk_to_ras @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    return ras * [-1, -1, 1], ijk_to_ras  # RAS -> LPS: x and y negated


def assert_segment_matches(slicer_scene, node, segment_id: str, mask: np.ndarray, reference: sitk.Image) -> None:
    """The segment's voxels sit, in physical space, exactly on the reference voxels of ``mask``."""
    lps, ijk_to_ras = segment_voxels_in_lps(slicer_scene, node, segment_id)
    dim = reference.GetDimension()
    if dim == 2:
        assert np.allclose(lps[:, 2], 0.0)  # one slice at z = 0
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(p[:dim].tolist()) for p in lps])
    assert np.allclose(index, np.round(index), atol=1e-4), "segment voxels are off the reference grid"
    found = np.zeros(mask.shape, bool)
    found[tuple(np.round(index).astype(int)[:, ::-1].T)] = True  # (x, y[, z]) index -> array order
    assert np.array_equal(found, mask.astype(bool)), segment_id
    # The Slicer geometry itself: IJK->RAS = RAS<-LPS flip times the reference's direction*spacing, origin.
    expected = np.eye(4)
    expected[:dim, :dim] = np.reshape(reference.GetDirection(), (dim, dim)) * reference.GetSpacing()
    expected[:dim, 3] = reference.GetOrigin()
    assert np.allclose(ijk_to_ras, np.diag([-1, -1, 1, 1]) @ expected, atol=1e-6)


def test_seg_nrrd_opens_in_slicer_mrml_as_named_colored_segments(tmp_path, oblique_3d, slicer_scene):
    result = make_result(oblique_3d)
    path = writers.write_outputs(result, tmp_path / "o")["segmentation"]
    node = read_seg_nrrd(slicer_scene, path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 6
    names = [segmentation.GetNthSegment(i).GetName() for i in range(6)]
    assert names == [f"{lab} {region}" for lab in ("liver", "left kidney/cortex")
                     for region in ("fused", "consistency", "ambiguity")]
    liver_fused = segmentation.GetSegment("liver_fused")
    assert np.allclose(liver_fused.GetColor(), (0.8, 0.4, 0.2), atol=1e-4)
    consistency_color = segmentation.GetSegment("liver_consistency").GetColor()
    assert np.allclose(consistency_color, (0.48, 0.24, 0.12), atol=1e-4)  # darker than the label color
    ambiguity_color = segmentation.GetSegment("left_kidney_cortex_ambiguity").GetColor()
    assert ambiguity_color[0] > 0.75 and ambiguity_color[2] < 0.5  # orange-ish, not the kidney's blue
    for region in ("fused", "consistency", "ambiguity"):
        assert segmentation.GetSegment(f"liver_{region}").GetTerminology() == LIVER_ENTRY

    # Overlapping segments (consistency inside fused, the two labels overlapping) each come back whole;
    # "fused" is the CRF-refined mask when there is one; an empty segment reads back empty.
    assert_segment_matches(slicer_scene, node, "liver_fused", result.refined[0], oblique_3d)
    assert_segment_matches(slicer_scene, node, "liver_consistency", result.consistency[0], oblique_3d)
    assert_segment_matches(slicer_scene, node, "liver_ambiguity", result.ambiguity[0], oblique_3d)
    assert_segment_matches(slicer_scene, node, "left_kidney_cortex_fused", result.refined[1], oblique_3d)
    assert not result.ambiguity[1].any()
    lps, _ = segment_voxels_in_lps(slicer_scene, node, "left_kidney_cortex_ambiguity")
    assert len(lps) == 0


def test_seg_nrrd_of_a_2d_image_is_one_slice_in_slicer(tmp_path, rgb_2d, slicer_scene):
    result = make_result(rgb_2d, refined=False)
    path = writers.write_outputs(result, tmp_path / "o")["segmentation"]
    node = read_seg_nrrd(slicer_scene, path)
    assert node.GetSegmentation().GetNumberOfSegments() == 6
    assert_segment_matches(slicer_scene, node, "liver_fused", result.fused[0], rgb_2d)
    assert_segment_matches(slicer_scene, node, "left_kidney_cortex_consistency", result.consistency[1], rgb_2d)


# --- overview.png: readable without the other outputs ----------------------------------------------


def ct_result(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), input_modality: str = "CT") -> SegmentationResult:
    """A CT slab: air -1000 HU, a soft-tissue body at 50 HU, a 700 HU bone, and a bright marker
    block at the smallest column index (patient left when the x axis is flipped)."""
    shape = (5, 60, 80)
    arr = np.full(shape, -1000.0, np.float32)
    arr[:, 10:50, 10:70] = 50.0
    arr[:, 25:35, 36:44] = 700.0
    arr[:, 20:30, 12:18] = 150.0  # marker: 0.75 grey in W400/L50
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-30.0, -20.0, 112.5))
    image.SetDirection(direction)
    base = make_result(image)
    report = {"model": {"name": "ct_test", "normalization": {"kind": "ct_window", "center": 50, "width": 400}},
              "modality": {"model": "CT", "input": input_modality}, "uncertainty_kind": "variance", "samples": 3,
              "warnings": [{"code": "spacing", "message": "no spacing"}]}
    base.report = report
    return base


def render_overview(result: SegmentationResult, path: Path, monkeypatch) -> "object":
    """Write the overview and return the matplotlib Figure it saved (to read its texts and images)."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    writers.write_overview(result, path)
    return figures[0]


def all_texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_overview_names_colours_units_window_and_positions(tmp_path, monkeypatch):
    result = ct_result()
    fig = render_overview(result, tmp_path / "overview.png", monkeypatch)
    texts = all_texts(fig)
    joined = "\n".join(texts)
    # A legend names each label's colour (outline and ambiguity).
    for label in LABELS:
        assert any(label.name in t and "final mask" in t for t in texts), label.name
        assert any(label.name in t and "ambiguity" in t for t in texts), label.name
    # The uncertainty colorbar has a title that says what is measured and its scale.
    assert any("variance p(1-p)" in t and "0.25" in t for t in texts), texts
    # The model's CT window, named, and slice positions in mm along the patient axis.
    assert "W400/L50 HU" in joined
    assert sum("mm" in t and "axial slice" in t for t in texts) >= 1
    # Input warnings are not hidden in the JSON only.
    assert "Input does not fit the model (spacing)" in joined
    # The grey levels are the window: 50 HU is mid-grey (a 1-99 % window would put it elsewhere).
    shown = fig.axes[1].images[0].get_array()
    assert np.isclose(np.asarray(shown), 0.5, atol=1e-6).any()
    assert float(np.asarray(shown).max()) == 1.0  # 700 HU bone saturates at the top of W400/L50
    from PIL import Image

    with Image.open(tmp_path / "overview.png") as png:
        assert png.size[0] >= 1000, "too small to read on a screen"


def test_overview_of_a_non_ct_input_uses_a_percentile_window(tmp_path, monkeypatch):
    fig = render_overview(ct_result(input_modality="not CT"), tmp_path / "overview.png", monkeypatch)
    assert "W400/L50" not in "\n".join(all_texts(fig))
    assert any("1-99 %" in t for t in all_texts(fig))


def test_overview_shows_patient_right_on_the_left_whatever_the_file_direction(tmp_path, monkeypatch):
    # The same anatomy stored with x and y flipped (RAS-like NIfTI): the marker at the smallest
    # column index is at the patient's left, so it must appear on the right half of the picture.
    flipped = render_overview(ct_result(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)), tmp_path / "a.png", monkeypatch)
    shown = np.asarray(flipped.axes[1].images[0].get_array())
    marker_cols = np.flatnonzero(np.isclose(shown, 0.75, atol=1e-6).any(axis=0))
    assert marker_cols.size and marker_cols.min() > shown.shape[1] / 2, \
        "patient left drawn on the left: not the radiological view"
    texts = all_texts(flipped)
    assert {"R", "L", "A", "P"} <= set(texts)
