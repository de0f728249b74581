"""MRML bridge on a real slicer-core scene (no fake slicer module): geometry, segments, overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from helpers import new_mrml_scene  # noqa: E402
from DiffusionSegLib.slicer import scene as mb  # noqa: E402
from DiffusionSegLib.models.card import LabelInfo  # noqa: E402
from DiffusionSegLib.pipeline.result import SegmentationResult  # noqa: E402
from DiffusionSegLib.outputs.writers import segment_colors, terminology_entry, write_seg_nrrd  # noqa: E402

LIVER_TERMINOLOGY = "SCT^123037004^Anatomical Structure;SCT^10200004^Liver"
FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


@pytest.fixture
def scene():
    """A scene with the application logic, default color nodes and the segmentations logic."""
    scene = new_mrml_scene()
    yield scene
    scene.Clear(True)


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """(3, 3) rotation about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


ROT = rotation((1.0, 2.0, 3.0), 30.0)
SPACING = np.array([0.7, 1.3, 2.5])
ORIGIN_RAS = np.array([10.0, -20.0, 30.0])


def oblique_matrix(spacing=SPACING, origin=ORIGIN_RAS, rot=ROT) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rot * spacing
    m[:3, 3] = origin
    return m


def vtk_matrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def np_matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    vm = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    return np_matrix(vm)


def add_volume(scene, voxels: np.ndarray, matrix: np.ndarray, name: str = "CT",
               class_name: str = "vtkMRMLScalarVolumeNode"):
    """Volume node with voxels (K, J, I[, C]) and IJKToRAS ``matrix``."""
    node = scene.AddNewNodeByClass(class_name, name)
    comps = voxels.shape[3] if voxels.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(voxels).reshape(-1, comps), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def node_voxels(node) -> np.ndarray:
    image = node.GetImageData()
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


# ----------------------------------------------------------------------------- volume_to_image


def test_volume_to_image_oblique_geometry_values_and_crop(scene):
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (K, J, I)
    node = add_volume(scene, voxels, oblique_matrix())
    image = mb.volume_to_image(node)

    assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-12)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), FLIP @ ROT, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), [-10.0, 20.0, 30.0], atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)
    # A voxel's physical point is the IJKToRAS point flipped to LPS.
    ras = oblique_matrix() @ np.array([3, 1, 2, 1.0])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((3, 1, 2)), FLIP @ ras[:3], atol=1e-9)

    crop = mb.volume_to_image(node, ((1, 2, 1), (5, 5, 3)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), voxels[1:3, 2:5, 1:5])
    np.testing.assert_allclose(crop.TransformIndexToPhysicalPoint((0, 0, 0)),
                               image.TransformIndexToPhysicalPoint((1, 2, 1)), atol=1e-9)
    np.testing.assert_allclose(crop.TransformIndexToPhysicalPoint((2, 1, 1)),
                               image.TransformIndexToPhysicalPoint((3, 3, 2)), atol=1e-9)
    assert crop.GetDirection() == image.GetDirection() and crop.GetSpacing() == image.GetSpacing()
    for bad in [((0, 0, 0), (7, 5, 4)), ((2, 0, 0), (2, 5, 4)), ((0, 0), (1, 1))]:
        with pytest.raises(ValueError, match="ijk_box"):
            mb.volume_to_image(node, bad)


def test_volume_to_image_hardens_linear_transform_and_rejects_others(scene):
    node = add_volume(scene, np.zeros((2, 3, 4), np.float32), oblique_matrix())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation((0, 0, 1), 90.0)
    to_parent[:3, 3] = [5.0, 0.0, -2.0]
    transform.SetMatrixTransformToParent(vtk_matrix(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    image = mb.volume_to_image(node)
    world = to_parent @ oblique_matrix()
    np.testing.assert_allclose(image.GetOrigin(), FLIP @ world[:3, 3], atol=1e-9)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), FLIP @ world[:3, :3] / SPACING,
                               atol=1e-9)

    grid = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ([0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]):
        src.InsertNextPoint(p)
        dst.InsertNextPoint([v + 1.0 for v in p])
    spline.SetSourceLandmarks(src)
    spline.SetTargetLandmarks(dst)
    grid.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        mb.volume_to_image(node)


def test_volume_to_image_rejects_labelmaps_and_empty_nodes(scene):
    labelmap = add_volume(scene, np.zeros((2, 3, 4), np.uint8), np.eye(4), "seg",
                          "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="labelmap"):
        mb.volume_to_image(labelmap)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        mb.volume_to_image(empty)
    two = add_volume(scene, np.zeros((1, 3, 4, 2), np.uint8), np.eye(4), "two",
                     "vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="3-component"):
        mb.volume_to_image(two)


def test_volume_to_image_rgb_vector_volume(scene):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)  # one slice: a photograph
    node = add_volume(scene, rgb, oblique_matrix(spacing=np.array([0.1, 0.2, 1.0])), "photo",
                      "vtkMRMLVectorVolumeNode")
    image = mb.volume_to_image(node)
    assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), rgb)
    np.testing.assert_allclose(image.GetSpacing(), [0.1, 0.2, 1.0], atol=1e-12)
    crop = mb.volume_to_image(node, ((2, 1, 0), (6, 4, 1)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), rgb[:, 1:4, 2:6])


# ----------------------------------------------------------------------------- roi_ijk_box


def add_roi(scene, center_ras, size, rot=np.eye(3)):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = rot
    object_to_node[:3, 3] = center_ras
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(object_to_node))
    roi.SetSize(*size)
    return roi


def test_roi_ijk_box_on_oblique_volume(scene):
    node = add_volume(scene, np.zeros((6, 8, 10), np.int16), oblique_matrix())  # I, J, K = 10, 8, 6
    m = oblique_matrix()
    # ROI aligned with the volume axes covering voxel corners i 2..5, j 1..4, k 0..2 (half-open):
    # its center is voxel (3, 2, 0.5) and its size 3, 3, 2 voxels.
    center = (m @ [3.0, 2.0, 0.5, 1.0])[:3]
    roi = add_roi(scene, center, SPACING * [3, 3, 2], ROT)
    assert mb.roi_ijk_box(node, roi) == ((2, 1, 0), (5, 4, 2))
    # Slightly larger (0.2 voxel each side): the voxels it touches are added.
    roi.SetSize(*(SPACING * [3.4, 3.4, 2.4]))
    assert mb.roi_ijk_box(node, roi) == ((1, 0, 0), (6, 5, 3))
    # Half outside the volume along -i and +k: clamped. Continuous IJK i -2..2, j 1..3, k 3..7 ->
    # voxel corners -1.5..2.5, 1.5..3.5, 3.5..7.5 -> floor/ceil -1..3, 1..4, 3..8 -> clamped.
    center = (m @ [0.0, 2.0, 5.0, 1.0])[:3]
    roi2 = add_roi(scene, center, SPACING * [4, 2, 4], ROT)
    assert mb.roi_ijk_box(node, roi2) == ((0, 1, 3), (3, 4, 6))
    # An axis-aligned (not oblique) ROI: its 8 corners span a larger IJK box than it covers.
    roi3 = add_roi(scene, (m @ [5.0, 4.0, 3.0, 1.0])[:3], (1.0, 1.0, 1.0))
    corners = np.array([[sx, sy, sz] for sx in (-.5, .5) for sy in (-.5, .5) for sz in (-.5, .5)])
    ijk = (np.linalg.inv(m) @ np.c_[corners + (m @ [5, 4, 3, 1.0])[:3], np.ones(8)].T)[:3]
    low, high = ijk.min(axis=1) + 0.5, ijk.max(axis=1) + 0.5
    assert mb.roi_ijk_box(node, roi3) == (tuple(np.floor(low).astype(int)), tuple(np.ceil(high).astype(int)))

    far = add_roi(scene, (m @ [50.0, 2.0, 2.0, 1.0])[:3], (5.0, 5.0, 5.0), ROT)
    with pytest.raises(ValueError, match="does not overlap"):
        mb.roi_ijk_box(node, far)
    flat = add_roi(scene, center, (0.0, 0.0, 3.0))
    with pytest.raises(ValueError, match="zero size"):
        mb.roi_ijk_box(node, flat)


def test_roi_flat_on_single_slice(scene):
    node = add_volume(scene, np.zeros((1, 8, 10), np.int16), np.diag([0.5, 0.5, 1.0, 1.0]))
    roi = add_roi(scene, (2.0, 1.5, 0.0), (2.0, 1.0, 0.0))  # drawn in the slice plane, no thickness
    # i: 1.0..3.0 mm -> corners 2.5..6.5 -> 2..7; j: 1.0..2.0 mm -> 2.5..4.5 -> 2..5.
    assert mb.roi_ijk_box(node, roi) == ((2, 2, 0), (7, 5, 1))


# ----------------------------------------------------------------------------- result arrays


def test_result_arrays_to_ijk_shapes(scene):
    vol = add_volume(scene, np.zeros((3, 4, 5), np.int16), np.eye(4))
    assert mb.result_arrays_to_ijk(vol, np.zeros((2, 3, 4, 5))).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="does not match"):
        mb.result_arrays_to_ijk(vol, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="does not match"):
        mb.result_arrays_to_ijk(vol, np.zeros((2, 3, 5, 4)))
    photo = add_volume(scene, np.zeros((1, 4, 5, 3), np.uint8), np.eye(4), "p", "vtkMRMLVectorVolumeNode")
    assert mb.result_arrays_to_ijk(photo, np.zeros((2, 4, 5))).shape == (2, 1, 4, 5)
    assert mb.result_arrays_to_ijk(photo, np.zeros((2, 1, 4, 5))).shape == (2, 1, 4, 5)


# ----------------------------------------------------------------------------- show_result

LABELS = [LabelInfo("liver", (0.8, 0.4, 0.2), LIVER_TERMINOLOGY), LabelInfo("lesion", (0.2, 0.9, 0.3))]


def make_result(spatial: tuple[int, ...], reference=None, seed: int = 1, n_samples: int = 3) -> SegmentationResult:
    """A hand-built 2-label result with samples; masks derived from the samples like the ensemble."""
    rng = np.random.default_rng(seed)
    samples = (rng.random((n_samples, 2, *spatial)) < 0.5).astype(np.uint8)
    samples[:, 1] = 0
    samples[:, 1, ..., 1:3, 1:3] = 1  # lesion: a small block all samples agree on
    samples[0, 1, ..., 0, 0] = 1  # ... plus one voxel only sample 0 has
    counts = samples.sum(axis=0, dtype=np.uint8)
    fused = (2 * counts > n_samples).astype(np.uint8)
    refined = fused.copy()
    refined[0].flat[0] = 1 - refined[0].flat[0]  # the CRF changed one voxel: final_mask must be it
    return SegmentationResult(
        reference=reference, labels=LABELS, counts=counts, n_samples=n_samples, fused=fused, refined=refined,
        samples=samples, sample_diversity=[0.42, 0.125], report={"model": "test", "seed": seed})


def add_study(scene, volume):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, volume)
    return sh, study


def export_segment(scene, seg_node, segment_id, reference):
    """(K, J, I) array and IJKToRAS of one segment exported on the reference volume's grid."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg_node, [segment_id], labelmap, reference)
    out = node_voxels(labelmap), ijk_to_ras(labelmap)
    scene.RemoveNode(labelmap)
    return out


def segment_tag(segment, tag: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def our_nodes(scene, volume):
    return sorted(n.GetID() for n in mb.find_outputs(scene, volume))


def test_show_result_segments_overlays_table_hierarchy(scene, tmp_path):
    shape = (3, 6, 5)  # (K, J, I)
    volume = add_volume(scene, np.arange(90, dtype=np.int16).reshape(shape), oblique_matrix())
    sh, study = add_study(scene, volume)
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(2)]
    # Reference geometry is deliberately wrong (identity): the bridge must use the node's.
    result = make_result(shape, reference=sitk.Image([5, 6, 3], sitk.sitkInt16))
    out = mb.show_result(scene, volume, result, show_samples=True)

    seg = out.segmentation_node
    assert seg.GetName() == "CT DiffusionSeg"
    assert seg.GetAttribute(mb.ROLE_ATTRIBUTE) == "segmentation"
    assert seg.GetAttribute(mb.INPUT_ATTRIBUTE) == volume.GetID()
    segmentation = seg.GetSegmentation()
    display = seg.GetDisplayNode()
    expected_ids = {"liver": {r: f"liver_{r}" for r in ("fused", "consistency", "ambiguity")},
                    "lesion": {r: f"lesion_{r}" for r in ("fused", "consistency", "ambiguity")}}
    for name in expected_ids:
        expected_ids[name].update({f"sample{k}": f"{name}_sample{k}" for k in range(3)})
    assert out.segment_ids == expected_ids
    assert segmentation.GetNumberOfSegments() == 2 * 6
    regions = {"fused": result.refined, "consistency": result.consistency, "ambiguity": result.ambiguity}
    for i, label in enumerate(LABELS):
        colors = segment_colors(label.color)
        for region, ids in ((r, out.segment_ids[label.name][r]) for r in out.segment_ids[label.name]):
            segment = segmentation.GetSegment(ids)
            sample = region.startswith("sample")
            assert segment.GetName() == (f"{label.name} sample {region[6:]}" if sample
                                         else f"{label.name} {region}")
            np.testing.assert_allclose(segment.GetColor(), colors["fused" if sample else region], atol=1e-6)
            assert segment_tag(segment, mb.REGION_TAG) == region
            if label.terminology:  # else Slicer's default ("Tissue") stays, as in the Segment Editor
                assert segment_tag(segment, segment.GetTerminologyEntryTagName()) == \
                    terminology_entry(label.terminology)
            assert bool(display.GetSegmentVisibility(ids)) is (not sample)
            mask = result.samples[int(region[6:]), i] if sample else regions[region][i]
            exported, matrix = export_segment(scene, seg, ids, volume)
            np.testing.assert_array_equal(exported, mask)
            np.testing.assert_array_equal(matrix, ijk_to_ras(volume))  # exactly the input's grid
        amb = out.segment_ids[label.name]["ambiguity"]
        assert display.GetSegmentOpacity2DFill(amb) == 0.0
        assert display.GetSegmentOpacity2DOutline(amb) > 0 and display.GetVisibility2DOutline()
        fused = out.segment_ids[label.name]["fused"]
        assert display.GetSegmentOpacity2DFill(fused) > 0 and display.GetSegmentVisibility(fused)
    assert terminology_entry(LIVER_TERMINOLOGY) is not None  # the liver tag above is a real entry
    assert not result.ambiguity[1].all() and result.ambiguity[1].any()  # the lesion has an ambiguity

    # Overlays: exact geometry, values, color maps that exist in the scene, window 0..max.
    assert [n.GetName() for n in out.probability_nodes] == ["CT liver probability", "CT lesion probability"]
    assert [n.GetName() for n in out.uncertainty_nodes] == ["CT liver uncertainty", "CT lesion uncertainty"]
    for i in range(2):
        for node, values, role in ((out.probability_nodes[i], result.probability[i], "probability"),
                                   (out.uncertainty_nodes[i], result.uncertainty[i], "uncertainty")):
            assert node.GetAttribute(mb.ROLE_ATTRIBUTE) == role
            np.testing.assert_array_equal(ijk_to_ras(node), ijk_to_ras(volume))
            voxels = node_voxels(node)
            assert voxels.dtype == np.float32
            np.testing.assert_array_equal(voxels, values)
            disp = node.GetDisplayNode()
            expected_map = "vtkMRMLColorTableNodeOcean" if role == "probability" else "vtkMRMLColorTableNodeIron"
            assert disp.GetColorNodeID() == expected_map and scene.GetNodeByID(expected_map) is not None
            assert disp.GetWindowLevelMin() == pytest.approx(0.0)
            assert disp.GetWindowLevelMax() == pytest.approx(float(values.max()))
    for composite in composites:
        assert composite.GetForegroundVolumeID() == out.uncertainty_nodes[0].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)

    # Table and attributes: volumes hand-computed from the node's spacing (0.7*1.3*2.5 mm3 per voxel).
    table = out.table_node
    assert table.GetName() == "CT DiffusionSeg results"
    assert [table.GetColumnName(c) for c in range(4)] == ["Label", "Region", "Volume (mL)", "Sample diversity"]
    assert table.GetNumberOfRows() == 6
    voxel_ml = 0.7 * 1.3 * 2.5 / 1000.0
    row = 0
    for i, label in enumerate(LABELS):
        for region in ("fused", "consistency", "ambiguity"):
            expected = int(regions[region][i].sum()) * voxel_ml
            assert table.GetCellText(row, 0) == label.name and table.GetCellText(row, 1) == region
            assert float(table.GetCellText(row, 2)) == pytest.approx(expected, rel=1e-6)
            assert float(table.GetCellText(row, 3)) == pytest.approx(result.sample_diversity[i])
            assert float(seg.GetAttribute(f"DiffusionSeg.VolumeML.{label.name}.{region}")) == \
                pytest.approx(expected, rel=1e-12)
            row += 1
        assert float(seg.GetAttribute(f"DiffusionSeg.SampleDiversity.{label.name}")) == result.sample_diversity[i]
    # The lesion block: 2x2 voxels in each of the 3 slices, all samples agree -> 12 consistent voxels.
    assert float(table.GetCellText(4, 2)) == pytest.approx(12 * voxel_ml, rel=1e-6)
    assert json.loads(seg.GetAttribute("DiffusionSeg.Report")) == result.report

    # Subject hierarchy: every output sits in the input's study.
    for node in [seg, table, *out.probability_nodes, *out.uncertainty_nodes]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study

    # The .seg.nrrd written by Slicer reads back with the same segments and voxels.
    path = str(tmp_path / "ours.seg.nrrd")
    storage = seg.CreateDefaultStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(seg)
    scene.RemoveNode(storage) if storage.GetScene() else None
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(path)
    assert reader.ReadData(back)
    assert list(back.GetSegmentation().GetSegmentIDs()) == list(segmentation.GetSegmentIDs())
    for sid in segmentation.GetSegmentIDs():
        ours, theirs = segmentation.GetSegment(sid), back.GetSegmentation().GetSegment(sid)
        assert theirs.GetName() == ours.GetName()
        np.testing.assert_allclose(theirs.GetColor(), ours.GetColor(), atol=1e-6)
        assert segment_tag(theirs, mb.REGION_TAG) == segment_tag(ours, mb.REGION_TAG)
        assert segment_tag(theirs, "TerminologyEntry") == segment_tag(ours, "TerminologyEntry")
        np.testing.assert_array_equal(export_segment(scene, back, sid, volume)[0],
                                      export_segment(scene, seg, sid, volume)[0])

    # The file the CLI writes (writers.write_seg_nrrd) has the same IDs, names, colors, tags, voxels.
    result.reference = mb.volume_to_image(volume)
    cli_path = str(tmp_path / "cli.seg.nrrd")
    write_seg_nrrd(result, cli_path)
    cli = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "cli")
    reader.SetFileName(cli_path)
    assert reader.ReadData(cli)
    for sid in cli.GetSegmentation().GetSegmentIDs():
        theirs, ours = cli.GetSegmentation().GetSegment(sid), segmentation.GetSegment(sid)
        assert ours is not None and theirs.GetName() == ours.GetName()
        np.testing.assert_allclose(theirs.GetColor(), ours.GetColor(), atol=1e-6)
        assert segment_tag(theirs, "TerminologyEntry") == segment_tag(ours, "TerminologyEntry")
        np.testing.assert_array_equal(export_segment(scene, cli, sid, volume)[0],
                                      export_segment(scene, seg, sid, volume)[0])


def test_rerun_replaces_only_our_outputs(scene):
    shape = (2, 5, 4)
    volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix())
    other_volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix(), "MR")
    first = mb.show_result(scene, volume, make_result(shape), show_samples=True)
    other_out = mb.show_result(scene, other_volume, make_result(shape))
    seg = first.segmentation_node
    # A segment the user drew into our node, and the user's own segmentation node.
    user_id = seg.GetSegmentation().AddEmptySegment("my_tumor", "my tumor", [0.1, 0.2, 0.3])
    user_mask = np.zeros(shape, np.uint8)
    user_mask[1, 2:4, 1:3] = 1
    mb.set_segment_mask(seg, volume, user_id, user_mask)
    # The user also reused one of our IDs for a segment of their own (no REGION_TAG): kept as is.
    seg.GetSegmentation().RemoveSegment("liver_consistency")
    assert seg.GetSegmentation().AddEmptySegment("liver_consistency", "my liver core") == "liver_consistency"
    user_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    manual_id = user_node.GetSegmentation().AddEmptySegment("manual", "manual")
    user_node.SetAttribute("DiffusionSeg.InputVolumeID", volume.GetID())  # no role: still not ours
    before_ours = our_nodes(scene, volume)
    count = scene.GetNumberOfNodes()
    other_before = our_nodes(scene, other_volume)

    second_result = make_result(shape, seed=7)
    second = mb.show_result(scene, volume, second_result)  # no samples this time
    assert second.segmentation_node is seg  # reused
    assert scene.GetNumberOfNodes() == count
    assert len(our_nodes(scene, volume)) == len(before_ours)
    ids = list(seg.GetSegmentation().GetSegmentIDs())
    assert "my_tumor" in ids and not any("sample" in i for i in ids)
    assert len(ids) == 2 + 2 * 3
    assert seg.GetSegmentation().GetSegment("liver_consistency").GetName() == "my liver core"
    ours = second.segment_ids["liver"]["consistency"]
    assert ours != "liver_consistency" and seg.GetSegmentation().GetSegment(ours).GetName() == \
        "liver consistency"
    np.testing.assert_array_equal(export_segment(scene, seg, ours, volume)[0], second_result.consistency[0])
    np.testing.assert_array_equal(export_segment(scene, seg, "my_tumor", volume)[0], user_mask)
    np.testing.assert_array_equal(export_segment(scene, seg, "liver_fused", volume)[0],
                                  second_result.refined[0])
    assert scene.GetNodeByID(user_node.GetID()) is user_node
    assert list(user_node.GetSegmentation().GetSegmentIDs()) == [manual_id]
    assert our_nodes(scene, other_volume) == other_before  # the other input's outputs are untouched
    assert other_out.segmentation_node.GetSegmentation().GetNumberOfSegments() == 6
    for node in first.probability_nodes + first.uncertainty_nodes + [first.table_node]:
        assert node.GetScene() is None  # replaced

    # A user-given segmentation node: ours are added, the user's segment and its attributes stay.
    third = mb.show_result(scene, volume, second_result, segmentation_node=user_node)
    assert third.segmentation_node is user_node
    assert manual_id in user_node.GetSegmentation().GetSegmentIDs()
    assert user_node.GetSegmentation().GetNumberOfSegments() == 1 + 6
    assert user_node.GetAttribute(mb.ROLE_ATTRIBUTE) is None and user_node.GetName() == "manual"
    # Running again into it replaces our segments only.
    mb.show_result(scene, volume, second_result, segmentation_node=user_node)
    assert user_node.GetSegmentation().GetNumberOfSegments() == 1 + 6

    mb.remove_outputs(scene, volume)
    assert mb.find_outputs(scene, volume) == []
    assert scene.GetNodeByID(user_node.GetID()) is user_node
    assert our_nodes(scene, other_volume) == other_before


def test_set_segment_mask_changes_only_that_segment(scene):
    shape = (2, 6, 5)
    volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix())
    result = make_result(shape)
    out = mb.show_result(scene, volume, result)
    seg = out.segmentation_node
    ids = [sid for regions in out.segment_ids.values() for sid in regions.values()]
    before = {sid: export_segment(scene, seg, sid, volume)[0] for sid in ids}
    target = out.segment_ids["liver"]["fused"]
    segment = seg.GetSegmentation().GetSegment(target)
    name, color = segment.GetName(), segment.GetColor()
    new_mask = np.zeros(shape, np.uint8)
    new_mask[:, 0:4, 0:2] = 7  # any nonzero is inside; overlaps the other segments
    mb.set_segment_mask(seg, volume, target, new_mask)
    assert seg.GetSegmentation().GetSegment(target) is segment
    assert segment.GetName() == name and segment.GetColor() == color
    assert segment_tag(segment, mb.REGION_TAG) == "fused"
    for sid in ids:
        expected = (new_mask > 0).astype(np.uint8) if sid == target else before[sid]
        np.testing.assert_array_equal(export_segment(scene, seg, sid, volume)[0], expected)
    mb.set_segment_mask(seg, volume, target, np.zeros(shape, np.uint8))  # empty is fine
    assert not export_segment(scene, seg, target, volume)[0].any()
    with pytest.raises(ValueError, match="no segment"):
        mb.set_segment_mask(seg, volume, "nope", new_mask)
    with pytest.raises(ValueError, match="does not match"):
        mb.set_segment_mask(seg, volume, target, new_mask[0])


def test_single_slice_rgb_photo_with_2d_arrays(scene):
    rgb = np.random.default_rng(3).integers(0, 256, (1, 6, 7, 3), dtype=np.uint8)
    photo = add_volume(scene, rgb, np.diag([0.1, 0.1, 1.0, 1.0]), "photo", "vtkMRMLVectorVolumeNode")
    result = make_result((6, 7))  # (L, J, I) arrays as the 2D pipeline produces
    out = mb.show_result(scene, photo, result)
    exported, matrix = export_segment(scene, out.segmentation_node, "liver_fused", photo)
    np.testing.assert_array_equal(exported, result.refined[0][None])
    np.testing.assert_array_equal(matrix, ijk_to_ras(photo))
    np.testing.assert_array_equal(node_voxels(out.uncertainty_nodes[1]), result.uncertainty[1][None])
    voxel_ml = 0.1 * 0.1 * 1.0 / 1000
    assert float(out.table_node.GetCellText(4, 2)) == pytest.approx(4 * voxel_ml, rel=1e-6)
    mask = np.zeros((6, 7), np.uint8)
    mask[2, 3] = 1
    mb.set_segment_mask(out.segmentation_node, photo, "lesion_ambiguity", mask)
    np.testing.assert_array_equal(export_segment(scene, out.segmentation_node, "lesion_ambiguity", photo)[0],
                                  mask[None])


def test_failure_leaves_scene_unchanged(scene, monkeypatch):
    shape = (2, 5, 4)
    volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix())
    add_study(scene, volume)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    count = scene.GetNumberOfNodes()
    bad = make_result(shape)
    bad.counts = bad.counts[:, :, :3]  # wrong shape (probability, uncertainty, consistency, ambiguity follow it)
    with pytest.raises(ValueError, match="does not match"):
        mb.show_result(scene, volume, bad)
    assert scene.GetNumberOfNodes() == count

    # A failure after nodes were created (fresh run): all of them are removed again.
    def boom(*args, **kwargs):
        raise ValueError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(mb, "_add_segments", boom)
        with pytest.raises(ValueError, match="boom"):
            mb.show_result(scene, volume, make_result(shape))
    assert scene.GetNumberOfNodes() == count and mb.find_outputs(scene, volume) == []
    assert composite.GetForegroundVolumeID() is None

    # A failure during a re-run: the reused segmentation and the earlier overlays are as before.
    first = mb.show_result(scene, volume, make_result(shape), show_samples=True)
    seg = first.segmentation_node
    ids_before = list(seg.GetSegmentation().GetSegmentIDs())
    fused_before = export_segment(scene, seg, "liver_fused", volume)[0]
    attributes_before = {n: seg.GetAttribute(n) for n in seg.GetAttributeNames()}
    count = scene.GetNumberOfNodes()
    nodes_before = our_nodes(scene, volume)
    foreground = composite.GetForegroundVolumeID()
    calls = []

    def fail_late(segmentation_node, volume_node, segment_id, mask):
        calls.append(segment_id)
        if len(calls) == 4:  # some of the new segments are in already
            raise RuntimeError("late")
        original(segmentation_node, volume_node, segment_id, mask)

    original = mb._write_segment
    with monkeypatch.context() as patch:
        patch.setattr(mb, "_write_segment", fail_late)
        with pytest.raises(RuntimeError, match="late"):
            mb.show_result(scene, volume, make_result(shape, seed=9))
    assert scene.GetNumberOfNodes() == count and our_nodes(scene, volume) == nodes_before
    assert list(seg.GetSegmentation().GetSegmentIDs()) == ids_before
    np.testing.assert_array_equal(export_segment(scene, seg, "liver_fused", volume)[0], fused_before)
    assert {n: seg.GetAttribute(n) for n in seg.GetAttributeNames()} == attributes_before
    display = seg.GetDisplayNode()
    assert display.GetSegmentOpacity2DFill("liver_ambiguity") == 0.0  # display settings restored too
    assert not display.GetSegmentVisibility("liver_sample0")
    assert composite.GetForegroundVolumeID() == foreground


def test_outputs_follow_the_inputs_linear_transform(scene):
    shape = (2, 5, 4)
    volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation((1, 0, 0), 20.0)
    to_parent[:3, 3] = [3.0, -4.0, 5.0]
    transform.SetMatrixTransformToParent(vtk_matrix(to_parent))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = make_result(shape)
    out = mb.show_result(scene, volume, result)
    for node in [out.segmentation_node, *out.probability_nodes, *out.uncertainty_nodes]:
        assert node.GetTransformNodeID() == transform.GetID()
    exported, matrix = export_segment(scene, out.segmentation_node, "lesion_fused", volume)
    np.testing.assert_array_equal(exported, result.refined[1])
    np.testing.assert_array_equal(matrix, ijk_to_ras(volume))
    # A user's segmentation outside the transform: masks are mapped into its (world) space.
    user_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    user_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # the input's grid, in world
    mb.show_result(scene, volume, result, segmentation_node=user_node)
    assert user_node.GetTransformNodeID() is None
    exported, _ = export_segment(scene, user_node, "lesion_fused", volume)  # export maps world back
    np.testing.assert_array_equal(exported, result.refined[1])
