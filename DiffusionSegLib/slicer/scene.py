"""MRML bridge: Slicer volume node -> SimpleITK image, SegmentationResult -> MRML nodes.

Every function takes the scene or the nodes as arguments (no ``slicer.mrmlScene``, no Qt), so the
module runs unchanged inside Slicer and on a bare slicer-core scene under pytest. It never imports
torch, monai or qt. Arrays are in SimpleITK / Slicer array order: (K, J, I) = (z, y, x).

Geometry is always taken from the input volume NODE (its IJKToRAS matrix and parent transform):
the result's arrays lie on that node's voxel grid, so outputs share its IJKToRAS exactly and sit
under the same parent transform.

Names, colors and terminology of the segments equal those of ``writers.write_seg_nrrd``: segment IDs
"<stem>_<region>", names "<label name> <region>".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from DiffusionSegLib.pipeline.result import SegmentationResult
from DiffusionSegLib.outputs.writers import file_stems, segment_colors, terminology_entry

log = logging.getLogger(__name__)

ROLE_ATTRIBUTE = "DiffusionSeg.Role"  # "segmentation" | "probability" | "uncertainty" | "table"
INPUT_ATTRIBUTE = "DiffusionSeg.InputVolumeID"  # ID of the input volume node an output belongs to
REGION_TAG = "DiffusionSeg.Region"  # segment tag: "fused" | "consistency" | "ambiguity" | "sample<k>"

ATTRIBUTE_PREFIX = "DiffusionSeg."
DIVERSITY_ATTRIBUTE = "DiffusionSeg.SampleDiversity."  # + label name
VOLUME_ATTRIBUTE = "DiffusionSeg.VolumeML."  # + "<label>.<region>"
REPORT_ATTRIBUTE = "DiffusionSeg.Report"

REGIONS = ("fused", "consistency", "ambiguity")
TABLE_COLUMNS = ("Label", "Region", "Volume (mL)", "Sample diversity")

# Continuous color maps, best first. Inferno/Viridis are file-based tables that the Slicer
# application loads (not slicer-core); "Iron" (black-red-yellow-white, heat-like) and "Ocean" are
# built into every scene by vtkMRMLColorLogic::AddDefaultColorNodes, so one always exists.
UNCERTAINTY_COLORMAPS = ("Inferno", "vtkMRMLColorTableNodeIron")
PROBABILITY_COLORMAPS = ("Viridis", "vtkMRMLColorTableNodeOcean")
FOREGROUND_OPACITY = 0.5

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # ITK physical space is LPS: flip x and y
_TOLERANCE = 1e-6

IJKBox = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass
class BridgeOutputs:
    """Nodes that :func:`show_result` put into (or reused in) the scene."""

    segmentation_node: Any  # vtkMRMLSegmentationNode
    probability_nodes: list = field(default_factory=list)  # vtkMRMLScalarVolumeNode per label
    uncertainty_nodes: list = field(default_factory=list)  # vtkMRMLScalarVolumeNode per label
    table_node: Any = None  # vtkMRMLTableNode
    segment_ids: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> region -> ID


# --------------------------------------------------------------------------------------------
# Geometry helpers


def _matrix(vtk_matrix: Any) -> np.ndarray:
    """vtkMatrix4x4 -> (4, 4) float64 array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(matrix: np.ndarray) -> Any:
    """(4, 4) array -> vtkMatrix4x4."""
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def _ijk_to_ras(volume_node: Any) -> np.ndarray:
    """(4, 4) IJKToRAS of the node itself (its parent transform not applied)."""
    vm = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(vm)
    return _matrix(vm)


def _transform_to_world(node: Any) -> np.ndarray:
    """(4, 4) node-to-world matrix of ``node``'s parent transform; ValueError when not linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"'{node.GetName()}' is under a non-linear transform "
                         f"('{parent.GetName()}'); harden or remove it first")
    vm = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(vm)
    return _matrix(vm)


def _ijk_to_world(volume_node: Any) -> np.ndarray:
    """(4, 4) IJK -> world RAS of the node with its linear parent transform hardened in."""
    return _transform_to_world(volume_node) @ _ijk_to_ras(volume_node)


def volume_shape_kji(volume_node: Any) -> tuple[int, int, int]:
    """(K, J, I) voxel shape of the node's image data; ValueError when there is none."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data")
    i, j, k = image.GetDimensions()
    if min(i, j, k) < 1:
        raise ValueError(f"volume '{volume_node.GetName()}' has an empty image ({i}x{j}x{k})")
    return k, j, i


def _components(volume_node: Any) -> int:
    """Number of voxel components the bridge accepts for this node: 1 (scalar) or 3 (RGB).

    Raises ValueError for labelmaps (segmentations, not images), tensor/diffusion volumes and
    vector volumes whose component count is not 3.
    """
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{name}' is a labelmap volume; choose the image to segment "
                         "(a scalar or RGB volume), not a label map")
    volume_shape_kji(volume_node)
    comps = volume_node.GetImageData().GetNumberOfScalarComponents()
    if volume_node.IsA("vtkMRMLVectorVolumeNode"):
        if comps != 3:
            raise ValueError(f"'{name}' is a vector volume with {comps} components; only 3-component "
                             "(RGB) vector volumes are supported")
        return 3
    # Tensor and diffusion volumes derive from the scalar volume class but are not images to segment.
    if (volume_node.IsA("vtkMRMLScalarVolumeNode") and not volume_node.IsA("vtkMRMLTensorVolumeNode")
            and not volume_node.IsA("vtkMRMLDiffusionWeightedVolumeNode")):
        if comps != 1:
            raise ValueError(f"'{name}' is a scalar volume with {comps} components per voxel")
        return 1
    raise ValueError(f"'{name}' ({volume_node.GetClassName()}) is neither a scalar volume nor a "
                     "3-component (RGB) vector volume")


def _voxels(volume_node: Any) -> np.ndarray:
    """View of the node's voxels: (K, J, I) or (K, J, I, C) (no copy)."""
    shape = volume_shape_kji(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    return numpy_support.vtk_to_numpy(scalars).reshape(shape + ((comps,) if comps > 1 else ()))


def volume_to_image(volume_node: Any, ijk_box: IJKBox | None = None) -> sitk.Image:
    """Scalar volume -> scalar 3D image; RGB vector volume -> 3-component vector 3D image.

    Geometry (LPS, as SimpleITK uses) comes from the node's IJKToRAS matrix with a linear parent
    transform hardened in; oblique directions are kept. ``ijk_box`` = ((i0, j0, k0), (i1, j1, k1))
    is a half-open IJK crop; the cropped image's origin is the physical point of voxel (i0, j0, k0).
    Voxel values are copied with their type. Raises ValueError for a node without image data, a
    labelmap, a node that is neither scalar nor 3-component vector, a non-linear parent transform,
    a sheared/degenerate geometry, or a box outside the volume.
    """
    comps = _components(volume_node)
    shape = volume_shape_kji(volume_node)  # (K, J, I)
    matrix = _ijk_to_world(volume_node)
    start = (0, 0, 0)
    voxels = _voxels(volume_node)
    if ijk_box is not None:
        start, stop = _check_box(ijk_box, shape)
        voxels = voxels[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels), isVector=comps > 1)
    linear = _RAS_TO_LPS @ matrix[:3, :3]  # columns: LPS step of one voxel along i, j, k
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing < 1e-12):
        raise ValueError(f"'{volume_node.GetName()}' has a zero voxel spacing")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise ValueError(f"'{volume_node.GetName()}' has a sheared geometry (non-orthogonal axes, "
                         "e.g. from a shearing or non-uniformly scaling transform); not supported")
    origin = _RAS_TO_LPS @ (matrix[:3, :3] @ np.asarray(start, float) + matrix[:3, 3])
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(origin.tolist())
    return image


def _check_box(ijk_box: IJKBox, shape_kji: tuple[int, int, int]) -> IJKBox:
    """Validate a half-open IJK box against a (K, J, I) shape; return it as int tuples."""
    try:
        start = tuple(int(v) for v in ijk_box[0])
        stop = tuple(int(v) for v in ijk_box[1])
    except (TypeError, IndexError) as err:
        raise ValueError(f"ijk_box must be ((i0, j0, k0), (i1, j1, k1)), got {ijk_box!r}") from err
    dims = shape_kji[::-1]
    if len(start) != 3 or len(stop) != 3 or any(
            not 0 <= a < b <= n for a, b, n in zip(start, stop, dims)):
        raise ValueError(f"ijk_box {ijk_box!r} is empty or outside the volume (I, J, K = {dims})")
    return start, stop  # type: ignore[return-value]


def roi_ijk_box(volume_node: Any, roi_node: Any) -> IJKBox:
    """Half-open IJK box of the voxels a vtkMRMLMarkupsROINode touches, clamped to the volume.

    The 8 ROI corners (world RAS, oriented ROIs included) are mapped to the volume's continuous IJK
    (parent transforms of both applied); in voxel-corner coordinates (IJK + 0.5) the box is
    floor(min) .. ceil(max). A flat ROI (zero size along one axis) selects the voxel layer it lies
    in, which is how a ROI is drawn on a single-slice image. ValueError when the ROI is undefined,
    a point or a line, or does not overlap the volume.
    """
    shape = volume_shape_kji(volume_node)
    size = np.array(roi_node.GetSize(), float)
    if roi_node.GetNumberOfControlPoints() < 1 or np.count_nonzero(size > 0) < 2:
        raise ValueError(f"ROI '{roi_node.GetName()}' has zero size; place or resize it first")
    object_to_world = _matrix(roi_node.GetObjectToWorldMatrix())
    half = size / 2.0
    corners = np.array([[sx * half[0], sy * half[1], sz * half[2], 1.0]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]).T  # (4, 8)
    world_to_ijk = np.linalg.inv(_ijk_to_world(volume_node))
    ijk = (world_to_ijk @ object_to_world @ corners)[:3]  # (3, 8) continuous IJK
    # Round away float noise first, so a ROI edge exactly on a voxel border does not add a voxel.
    low = np.floor(np.round(ijk.min(axis=1) + 0.5, 6))
    high = np.ceil(np.round(ijk.max(axis=1) + 0.5, 6))
    high = np.maximum(high, low + 1)  # flat ROI exactly on a voxel border: the voxel it starts
    dims = np.array(shape[::-1])
    low = np.clip(low, 0, dims).astype(int)
    high = np.clip(high, 0, dims).astype(int)
    if np.any(high <= low):
        raise ValueError(f"ROI '{roi_node.GetName()}' does not overlap volume '{volume_node.GetName()}'")
    return (tuple(int(v) for v in low), tuple(int(v) for v in high))  # type: ignore[return-value]


def result_arrays_to_ijk(volume_node: Any, array: np.ndarray) -> np.ndarray:
    """(L, *spatial) result array in SimpleITK order -> (L, K, J, I) on the node's voxel grid.

    ``spatial`` must equal the node's (K, J, I), or (J, I) when the node has a single slice
    (K == 1, e.g. a photograph read as 2D). Returns a view when possible. ValueError otherwise.
    """
    shape = volume_shape_kji(volume_node)
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1:] == shape:
        return array
    if array.ndim == 3 and shape[0] == 1 and array.shape[1:] == shape[1:]:
        return array[:, None]
    raise ValueError(f"result array of shape {array.shape} does not match volume "
                     f"'{volume_node.GetName()}' of shape (K, J, I) = {shape} (expected (L, K, J, I)"
                     + (" or (L, J, I)" if shape[0] == 1 else "") + ")")


# --------------------------------------------------------------------------------------------
# Segments


def _labelmap_image(mask_kji: np.ndarray, image_to_world: np.ndarray) -> Any:
    """(K, J, I) mask -> vtkOrientedImageData (uint8 0/1) cropped to the mask's bounding box.

    Cropping keeps the live agreement slider fast and memory small. An empty mask becomes one zero
    voxel: VTK pipelines report errors on an empty extent, and replacing with it clears the segment.
    """
    import slicer

    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(_vtk_matrix(image_to_world))
    inside = mask_kji != 0
    nonzero = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(idx.size == 0 for idx in nonzero):
        (k0, k1), (j0, j1), (i0, i1) = (0, 0), (0, 0), (0, 0)
    else:
        (k0, k1), (j0, j1), (i0, i1) = [(int(idx[0]), int(idx[-1])) for idx in nonzero]
    block = np.ascontiguousarray(inside[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1], dtype=np.uint8)
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    scalars = numpy_support.numpy_to_vtk(block.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def _segment_image_to_world(segmentation_node: Any, volume_node: Any) -> np.ndarray:
    """(4, 4) IJK of the volume -> the segmentation node's RAS (identity transform when both share
    the parent transform, the normal case); ValueError when the transform between them is not linear."""
    import slicer

    vm = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), vm):
        raise ValueError(f"the transform between '{volume_node.GetName()}' and segmentation "
                         f"'{segmentation_node.GetName()}' is not linear")
    return _matrix(vm) @ _ijk_to_ras(volume_node)


def _write_segment(segmentation_node: Any, volume_node: Any, segment_id: str, mask_kji: np.ndarray) -> None:
    """Replace the binary labelmap of an existing segment by a (K, J, I) mask on the volume grid."""
    import slicer

    image = _labelmap_image(mask_kji, _segment_image_to_world(segmentation_node, volume_node))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"Slicer could not set the labelmap of segment '{segment_id}'")


def set_segment_mask(segmentation_node: Any, volume_node: Any, segment_id: str, mask: np.ndarray) -> None:
    """Replace one segment's binary labelmap, keeping its name, color, tags and display settings.

    ``mask``: (K, J, I), or (J, I) for a single-slice volume; any nonzero voxel is inside. Only this
    segment's voxels change (used live by the agreement slider: no node is re-created).
    """
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    mask_kji = result_arrays_to_ijk(volume_node, np.asarray(mask)[None])[0]
    _write_segment(segmentation_node, volume_node, segment_id, mask_kji)


def segment_mask(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """One segment as a (K, J, I) uint8 0/1 mask on ``volume_node``'s voxel grid.

    Uses Slicer's own export onto the volume's geometry, so a segment drawn on another grid, in
    another representation (closed surface) or under a linear transform lands where Slicer shows it.
    """
    import slicer

    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, volume_node):
            raise RuntimeError(f"Slicer could not export segment '{segment_id}' onto '{volume_node.GetName()}'")
        if labelmap.GetImageData() is None or volume_shape_kji(labelmap) != volume_shape_kji(volume_node):
            raise RuntimeError(f"segment '{segment_id}' was not exported on the grid of '{volume_node.GetName()}'")
        return (_voxels(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


# --------------------------------------------------------------------------------------------
# Finding and removing outputs


def _nodes(scene: Any, class_name: str = "vtkMRMLNode") -> list:
    """All nodes of a class in the scene (a list, so callers may remove nodes while iterating)."""
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def find_outputs(scene: Any, volume_node: Any) -> list:
    """Nodes this module created for ``volume_node``: ROLE_ATTRIBUTE set and INPUT_ATTRIBUTE == its ID."""
    volume_id = volume_node.GetID()
    return [node for node in _nodes(scene)
            if node.GetAttribute(ROLE_ATTRIBUTE) and node.GetAttribute(INPUT_ATTRIBUTE) == volume_id]


def _remove_node(scene: Any, node: Any) -> None:
    """Remove a node with the display and storage nodes it owns (the scene keeps them otherwise)."""
    if node is None or node.GetScene() is None:
        return
    owned = []
    for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
        if hasattr(node, getter):
            nth = node.GetNthDisplayNode if "Display" in getter else node.GetNthStorageNode
            owned += [nth(i) for i in range(getattr(node, getter)())]
    scene.RemoveNode(node)
    for sub in owned:
        if sub is not None and sub.GetScene() is not None:
            scene.RemoveNode(sub)


def remove_outputs(scene: Any, volume_node: Any) -> None:
    """Remove the overlays, table and segmentation nodes this module made for ``volume_node``.

    Nodes without our ROLE_ATTRIBUTE are never removed (a user's own segmentation survives).
    """
    for node in find_outputs(scene, volume_node):
        _remove_node(scene, node)


# --------------------------------------------------------------------------------------------
# show_result


@dataclass
class _Plan:
    """Everything show_result computes before it touches the scene."""

    masks: dict[str, np.ndarray]  # region -> (L, K, J, I) uint8
    samples: np.ndarray | None  # (N, L, K, J, I)
    probability: np.ndarray  # (L, K, J, I) float32
    uncertainty: np.ndarray  # (L, K, J, I) float32
    volumes_ml: list[dict[str, float]]  # per label: region -> mL
    diversity: list[float]  # per label (NaN when unknown)


def _plan(volume_node: Any, result: SegmentationResult, show_samples: bool) -> _Plan:
    """Validate ``result`` against the node's grid and compute what is shown; touches no node."""
    count = len(result.labels)
    if count == 0:
        raise ValueError("the result has no labels")

    def arrays(name: str, value: np.ndarray) -> np.ndarray:
        array = result_arrays_to_ijk(volume_node, value)
        if array.shape[0] != count:
            raise ValueError(f"result.{name} has {array.shape[0]} labels, the result names {count}")
        return array

    masks = {"fused": arrays("final_mask", result.final_mask),
             "consistency": arrays("consistency", result.consistency),
             "ambiguity": arrays("ambiguity", result.ambiguity)}
    probability = arrays("probability", result.probability).astype(np.float32, copy=False)
    uncertainty = arrays("uncertainty", result.uncertainty).astype(np.float32, copy=False)
    samples = None
    if show_samples and result.samples is not None:
        samples = np.stack([arrays(f"samples[{k}]", s) for k, s in enumerate(result.samples)])
    # Volume from the NODE's spacing: the grid shown is the node's, whatever result.reference says.
    voxel_ml = float(np.prod(volume_node.GetSpacing())) / 1000.0
    volumes = [{region: float(np.count_nonzero(masks[region][i])) * voxel_ml for region in REGIONS}
               for i in range(count)]
    diversity = [float(result.sample_diversity[i]) if i < len(result.sample_diversity) else float("nan")
                 for i in range(count)]
    return _Plan(masks, samples, probability, uncertainty, volumes, diversity)


def _colormap_id(scene: Any, preferences: Iterable[str]) -> str | None:
    """First color node found by ID or name among ``preferences``; None when none is in the scene."""
    for key in preferences:
        node = scene.GetNodeByID(key)
        if node is None:
            found = scene.GetNodesByClassByName("vtkMRMLColorNode", key)
            node = found.GetItemAsObject(0) if found.GetNumberOfItems() else None
        if node is not None:
            return node.GetID()
    return None


def _tag(node: Any, role: str, volume_node: Any) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(INPUT_ATTRIBUTE, volume_node.GetID())


def _add_overlay(scene: Any, volume_node: Any, name: str, role: str, values: np.ndarray,
                 colormap: str | None, created: list) -> Any:
    """Float32 scalar volume on the input's exact geometry with a continuous color map, 0..max."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    created.append(node)
    _tag(node, role, volume_node)
    vm = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(vm)
    node.SetIJKToRASMatrix(vm)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    values = np.ascontiguousarray(values, dtype=np.float32)  # (K, J, I)
    image = vtk.vtkImageData()
    image.SetDimensions(values.shape[2], values.shape[1], values.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.ravel(), deep=True,
                                                               array_type=vtk.VTK_FLOAT))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    created.append(display)
    if colormap:
        display.SetAndObserveColorNodeID(colormap)
    top = float(values.max()) if values.size else 0.0
    top = top if top > 0 else 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    # Voxels at ~0 (certain background) are transparent, so the overlay does not dim the image.
    display.SetLowerThreshold(top * 1e-3)
    display.SetUpperThreshold(top)
    display.ApplyThresholdOn()
    return node


def _fill_table(table_node: Any, labels: list, plan: _Plan) -> None:
    """One row per label and region: Label, Region, Volume (mL), Sample diversity."""
    table = table_node.GetTable()
    columns = [vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
    for column, name in zip(columns, TABLE_COLUMNS):
        column.SetName(name)
    for i, label in enumerate(labels):
        for region in REGIONS:
            columns[0].InsertNextValue(label.name)
            columns[1].InsertNextValue(region)
            columns[2].InsertNextValue(plan.volumes_ml[i][region])
            columns[3].InsertNextValue(plan.diversity[i])
    for column in columns:
        table.AddColumn(column)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.Modified()


def _remove_our_segments(segmentation: Any) -> None:
    """Remove the segments carrying REGION_TAG (made by an earlier run); keep every other one."""
    for segment_id in list(segmentation.GetSegmentIDs()):
        segment = segmentation.GetSegment(segment_id)
        if segment.HasTag(REGION_TAG):
            segmentation.RemoveSegment(segment_id)


_SegmentSpec = tuple[int, str, str, str, list[float], np.ndarray, bool]


def _segment_specs(result: SegmentationResult, plan: _Plan) -> list[_SegmentSpec]:
    """(label index, region, ID, name, color, (K, J, I) mask, visible) of every segment to add.

    IDs and names are those of writers.write_seg_nrrd; samples ("<stem>_sample<k>", "<label>
    sample k") use the label color and start hidden: they are for browsing, not reading.
    """
    specs: list[_SegmentSpec] = []
    for i, (label, stem) in enumerate(zip(result.labels, file_stems(result.labels))):
        colors = segment_colors(label.color)
        for region in REGIONS:
            specs.append((i, region, f"{stem}_{region}", f"{label.name} {region}", colors[region],
                          plan.masks[region][i], True))
        if plan.samples is not None:
            for k in range(plan.samples.shape[0]):
                specs.append((i, f"sample{k}", f"{stem}_sample{k}", f"{label.name} sample {k}",
                              colors["fused"], plan.samples[k, i], False))
    return specs


def _add_segments(segmentation_node: Any, volume_node: Any, result: SegmentationResult,
                  plan: _Plan) -> dict[str, dict[str, str]]:
    """Add the fused/consistency/ambiguity (and sample) segments; return label -> region -> ID."""
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    entries = [terminology_entry(label.terminology) for label in result.labels]
    ids: dict[str, dict[str, str]] = {label.name: {} for label in result.labels}
    for i, region, wanted_id, name, color, mask, visible in _segment_specs(result, plan):
        # A user segment may already use our ID: never overwrite it, take a free ID instead.
        segment_id = wanted_id if segmentation.GetSegment(wanted_id) is None \
            else segmentation.GenerateUniqueSegmentID(wanted_id)
        segment_id = segmentation.AddEmptySegment(segment_id, name, color)
        segment = segmentation.GetSegment(segment_id)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(REGION_TAG, region)
        if entries[i] is not None:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entries[i])
        _write_segment(segmentation_node, volume_node, segment_id, mask)
        ids[result.labels[i].name][region] = segment_id
        if display is not None:
            display.SetSegmentVisibility(segment_id, visible)
            if region == "ambiguity":
                # Outline only: reads as "uncertain border zone", does not hide the fused fill.
                display.SetSegmentOpacity2DFill(segment_id, 0.0)
                display.SetSegmentOpacity2DOutline(segment_id, 1.0)
                display.SetSegmentOpacity3D(segment_id, 0.4)
    if display is not None:
        display.SetVisibility2DOutline(True)
    return ids


def _study_item(scene: Any, volume_node: Any) -> tuple[Any, int]:
    """Subject hierarchy node and the parent item (study) of the input volume (scene item if none)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(item) if item != sh.GetInvalidItemID() else sh.GetSceneItemID()
    if parent == sh.GetInvalidItemID():
        parent = sh.GetSceneItemID()
    return sh, parent


def _place_in_hierarchy(sh: Any, parent: int, node: Any) -> None:
    """Put ``node`` under ``parent`` in subject hierarchy (creating its item when missing)."""
    item = sh.GetItemByDataNode(node)
    if item == sh.GetInvalidItemID():
        sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)


def _our_attributes(node: Any) -> dict[str, str]:
    """The DiffusionSeg.* attributes of a node."""
    return {name: node.GetAttribute(name) for name in node.GetAttributeNames()
            if name.startswith(ATTRIBUTE_PREFIX)}


def show_result(scene: Any, volume_node: Any, result: SegmentationResult, *, show_samples: bool = False,
                segmentation_node: Any = None) -> BridgeOutputs:
    """Put a result on the input volume's geometry into the scene; return the nodes.

    - Segmentation ("<input> DiffusionSeg"; reused from an earlier run for this input, or the given
      ``segmentation_node``): per label "<label> fused" (CRF-refined when present), "<label>
      consistency", "<label> ambiguity" (outline only), and with ``show_samples`` hidden
      "<label> sample k" segments; writers' colors, the label's terminology, REGION_TAG. Only
      segments with REGION_TAG are replaced; user segments are kept.
    - Per label a probability and an uncertainty float32 volume ("<input> <label> probability"),
      same IJKToRAS and parent transform as the input; the first label's uncertainty becomes the
      foreground (opacity 0.5) of every slice composite node.
    - Table "<input> DiffusionSeg results": Label, Region, Volume (mL), Sample diversity.
    - Statistics and the JSON report as attributes of our segmentation node.
    - All created nodes under the input's parent item (its study) in subject hierarchy.

    Result arrays must be (L, K, J, I) on the node's grid ((L, J, I) for a single slice); the
    result's own reference geometry is not used. All or nothing: on any failure the nodes this call
    created are removed, the reused segmentation is restored, then the error is re-raised.
    """
    import slicer

    plan = _plan(volume_node, result, show_samples)  # ValueError before anything is touched
    input_name = volume_node.GetName()
    previous = find_outputs(scene, volume_node)
    replaced_roles = ("probability", "uncertainty", "table")
    old_overlays = [n for n in previous if n.GetAttribute(ROLE_ATTRIBUTE) in replaced_roles]
    created: list = []
    seg_backup = None  # (vtkSegmentation, display node copy) of a reused segmentation node
    seg_node = segmentation_node
    old_attributes: dict[str, str] | None = None
    old_foreground: list[tuple[Any, str | None, float]] = []
    had_sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") is not None
    try:
        sh, parent = _study_item(scene, volume_node)
        if not had_sh:
            created.append(scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode"))
        if seg_node is None:
            ours = [n for n in previous if n.GetAttribute(ROLE_ATTRIBUTE) == "segmentation"
                    and n.IsA("vtkMRMLSegmentationNode")]
            seg_node = ours[-1] if ours else None
        new_seg = seg_node is None
        if new_seg:
            seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{input_name} DiffusionSeg")
            created.append(seg_node)
            _tag(seg_node, "segmentation", volume_node)
            seg_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        else:
            segmentation_copy = slicer.vtkSegmentation()
            segmentation_copy.DeepCopy(seg_node.GetSegmentation())
            display_copy = None
            if seg_node.GetDisplayNode() is not None:  # per-segment display settings live there
                display_copy = slicer.vtkMRMLSegmentationDisplayNode()
                display_copy.CopyContent(seg_node.GetDisplayNode())
            seg_backup = (segmentation_copy, display_copy)
        is_ours = bool(seg_node.GetAttribute(ROLE_ATTRIBUTE))
        if seg_node.GetDisplayNode() is None:
            seg_node.CreateDefaultDisplayNodes()
            created.append(seg_node.GetDisplayNode())

        outputs = BridgeOutputs(segmentation_node=seg_node)
        prob_map = _colormap_id(scene, PROBABILITY_COLORMAPS)
        unc_map = _colormap_id(scene, UNCERTAINTY_COLORMAPS)
        for i, label in enumerate(result.labels):
            outputs.probability_nodes.append(_add_overlay(
                scene, volume_node, f"{input_name} {label.name} probability", "probability",
                plan.probability[i], prob_map, created))
            outputs.uncertainty_nodes.append(_add_overlay(
                scene, volume_node, f"{input_name} {label.name} uncertainty", "uncertainty",
                plan.uncertainty[i], unc_map, created))
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{input_name} DiffusionSeg results")
        created.append(table)
        _tag(table, "table", volume_node)
        _fill_table(table, result.labels, plan)
        outputs.table_node = table

        if not new_seg:
            _remove_our_segments(seg_node.GetSegmentation())
        reference_set = bool(seg_node.GetSegmentation().GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()))
        if is_ours or not reference_set:
            # Our node follows the input's grid; a user's node keeps a reference geometry it has.
            seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        outputs.segment_ids = _add_segments(seg_node, volume_node, result, plan)

        if is_ours:  # a user's own node gets our segments only, none of our bookkeeping
            old_attributes = _our_attributes(seg_node)
            for name in old_attributes:
                if name not in (ROLE_ATTRIBUTE, INPUT_ATTRIBUTE):
                    seg_node.RemoveAttribute(name)
            for i, label in enumerate(result.labels):
                seg_node.SetAttribute(DIVERSITY_ATTRIBUTE + label.name, repr(plan.diversity[i]))
                for region in REGIONS:
                    seg_node.SetAttribute(f"{VOLUME_ATTRIBUTE}{label.name}.{region}",
                                          repr(plan.volumes_ml[i][region]))
            seg_node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report, default=str))

        for node in created:
            if node is not None and (node.IsA("vtkMRMLDisplayableNode") or node.IsA("vtkMRMLTableNode")):
                _place_in_hierarchy(sh, parent, node)

        for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
            old_foreground.append((composite, composite.GetForegroundVolumeID(),
                                   composite.GetForegroundOpacity()))
            composite.SetForegroundVolumeID(outputs.uncertainty_nodes[0].GetID())
            composite.SetForegroundOpacity(FOREGROUND_OPACITY)
    except BaseException:
        _rollback(scene, created, seg_node, seg_backup, old_attributes, old_foreground)
        raise
    # Commit: the earlier run's overlays and table are replaced by the new ones.
    for node in old_overlays:
        _remove_node(scene, node)
    return outputs


def _rollback(scene: Any, created: list, seg_node: Any, seg_backup: Any,
              old_attributes: dict[str, str] | None, old_foreground: list) -> None:
    """Undo a failed show_result: restore slice views, the reused segmentation, remove new nodes."""
    try:
        for composite, volume_id, opacity in old_foreground:
            composite.SetForegroundVolumeID(volume_id)
            composite.SetForegroundOpacity(opacity)
        if seg_backup is not None and seg_node is not None:
            segmentation_copy, display_copy = seg_backup
            seg_node.GetSegmentation().DeepCopy(segmentation_copy)
            if display_copy is not None and seg_node.GetDisplayNode() is not None:
                seg_node.GetDisplayNode().CopyContent(display_copy)
        if old_attributes is not None and seg_node is not None:
            for name in _our_attributes(seg_node):
                seg_node.RemoveAttribute(name)
            for name, value in old_attributes.items():
                seg_node.SetAttribute(name, value)
        for node in reversed(created):
            if node is not None and node.GetScene() is not None:
                _remove_node(scene, node)
    except Exception:  # the original error matters more; log this one
        log.exception("could not fully undo a failed show_result")
