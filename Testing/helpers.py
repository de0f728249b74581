"""Helpers shared by the tests (no test module imports another): the repository, tiny models written
in the real format, a real slicer-core MRML scene, synthetic images, results and datasets."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.methods.registry import build_network
from DiffusionSegLib.models.card import LabelInfo, ModelCard, save_model
from DiffusionSegLib.pipeline.result import SegmentationResult
from DiffusionSegLib.training.loop import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"


def load_script(name: str) -> ModuleType:
    """``scripts/NAME.py`` imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def write_lung_check_set(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]) -> Path:
    """A stand-in for a prepared benchmark folder's lung check set: ``root/bench/lung_synthetic_check`` with
    each case's (ct, label, spacing) written at origin (10, -5, 100). Returns ``root/bench``."""
    check = root / "bench" / "lung_synthetic_check"
    (check / "imagesTs").mkdir(parents=True)
    (check / "labelsTs").mkdir()
    (check / "dataset.json").write_text("{}")
    for case, (ct, label, spacing) in cases.items():
        for array, folder in ((ct, "imagesTs"), (label, "labelsTs")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            image.SetOrigin((10.0, -5.0, 100.0))
            sitk.WriteImage(image, str(check / folder / f"{case}.nii.gz"))
    return root / "bench"


def make_model(folder: Path, **card_fields) -> Path:
    """Write a randomly initialised (seeded) tiny model; card_fields override the card."""
    fields = dict(name=folder.name, method="medsegdiff", spatial_dims=2, in_channels=1,
                  labels=[LabelInfo("lesion", (1.0, 0.2, 0.2))],
                  network={"channels": [8, 16], "norm_groups": 4},
                  normalization={"kind": "zscore"}, default_steps=3, default_samples=3)
    fields.update(card_fields)
    card = ModelCard(**fields)
    torch.manual_seed(0)
    net = build_network(card)
    save_model(folder, net.state_dict(), card)
    return folder


def segment_with_and_without_postprocessing(image: sitk.Image, model: Path, samples: int,
                                            steps: int) -> tuple[SegmentationResult, SegmentationResult]:
    """One run with the card's post-processing and one with ``postprocess=False``, no CRF: (on, off)."""
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings

    on = segment_image(image, model, SegmentSettings(samples=samples, steps=steps, crf=False))
    off = segment_image(image, model, SegmentSettings(samples=samples, steps=steps, crf=False, postprocess=False))
    return on, off


def new_mrml_scene():
    """A real slicer-core MRML scene set up as SLICER.md describes: application logic, default
    color nodes and the segmentations logic (which also registers the representation converters).

    The logics are kept on the scene (``scene.segmentations_logic``, ``scene.application_logic``):
    they must outlive the test. Skips the test when slicer-core is not installed.
    """
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Segmentations", seg_logic)
    scene.application_logic, scene.segmentations_logic = app, seg_logic
    return scene


# -- results and images (writers, readers, the Slicer workflow) --

LIVER_TERMS = "SCT^123037004^Anatomical Structure;SCT^10200004^Liver"


LABELS = [LabelInfo("liver", (0.8, 0.4, 0.2), LIVER_TERMS), LabelInfo("left kidney/cortex", (0.2, 0.4, 1.0))]


def rotation(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def make_result(reference: sitk.Image, n_samples: int = 3, refined: bool = True) -> SegmentationResult:
    """A result for two overlapping blobs, with statistics computed from random samples around them."""
    shape = tuple(reversed(reference.GetSize()))
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, np.float32).reshape(-1, *[1] * len(shape))
    radius = np.sqrt((((grid - centre * 0.45) / (centre * 0.6)) ** 2).sum(0))
    radius2 = np.sqrt((((grid - centre * 0.6) / (centre * 0.4)) ** 2).sum(0))
    rng = np.random.default_rng(0)
    samples = np.stack([np.stack([radius < 0.7 + 0.1 * rng.random(shape), radius2 < 0.7 + 0.1 * rng.random(shape)])
                        for _ in range(n_samples)]).astype(np.uint8)
    samples[:, 1] = samples[0, 1]  # label 1 has no disagreement: an empty ambiguity segment
    counts = samples.sum(0, dtype=np.uint8)
    fused = (2 * counts > n_samples).astype(np.uint8)
    crf = fused.copy()
    crf[0].flat[np.flatnonzero(fused[0])[:3]] = 0  # the refined mask differs from the fused one
    return SegmentationResult(
        reference=reference, labels=LABELS, counts=counts, n_samples=n_samples, fused=fused,
        refined=crf if refined else None, samples=samples, sample_diversity=[0.125, 0.0],
        report={"model": {"name": "tiny"}, "samples": n_samples, "seconds": np.float32(0.5)})


def write_dicom_series(folder: Path, volume: sitk.Image, series_uid: str, first_instance: int = 1) -> None:
    """One file per z slice with the tags a series reader needs (position, orientation, UIDs)."""
    folder.mkdir(exist_ok=True)
    direction = np.reshape(volume.GetDirection(), (3, 3))
    origin = np.array(volume.GetOrigin())
    spacing = volume.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    array = sitk.GetArrayFromImage(volume)
    for k in range(array.shape[0]):
        slice_image = sitk.GetImageFromArray(array[k])
        slice_image.SetSpacing(spacing[:2])
        position = origin + k * spacing[2] * direction[:, 2]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{first_instance + k}",
            "0010|0010": "Phantom^Test",
            "0020|000d": "1.2.826.0.1.3680043.9.7.1",
            "0020|000e": series_uid,
            "0020|0013": str(first_instance + k),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]]),
            "0018|0050": f"{spacing[2]:g}",
            "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}",
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(slice_image)


# -- a tiny learnable dataset (training, baselines) --

TINY_NET = {"channels": [8, 16, 32], "norm_groups": 4}  # size_divisor 4


def shape_image(rng: np.random.Generator, size: int = 32, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image (unit-variance gaussian noise) with an ellipse ``contrast`` brighter, and its mask.

    At contrast 1 one pixel says little (best global threshold: Dice < 0.5): a model must pool
    over the neighbourhood to find the shape.
    """
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(10, size - 10, 2)
    ry, rx = rng.uniform(4, 8, 2)
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    return (rng.normal(0.0, 1.0, (size, size)) + contrast * mask).astype(np.float32), mask


def write_shapes(root, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = shape_image(rng)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "imagesTr" / f"s{i:03d}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(root / "labelsTr" / f"s{i:03d}.nrrd"))


def train_config(**kwargs) -> TrainConfig:
    base = dict(network=TINY_NET, patch_size=[32, 32], batch_size=4, lr=1e-3, steps=6, val_every=3,
                checkpoint_every=3, val_cases=2, val_samples=1, val_steps=2, seed=0)
    return TrainConfig(**{**base, **kwargs})


def short_run_losses(root: Path, runs: dict[str, dict]) -> list[list[float]]:
    """The training losses of 2-step runs on a shapes dataset, one run per name -> extra settings."""
    from DiffusionSegLib.training.loop import train

    write_shapes(root / "shapes", 6, seed=0)
    losses = []
    for name, extra in runs.items():
        train(root / "shapes", root / name, train_config(steps=2, val_every=2, checkpoint_every=2, **extra),
              progress=False)
        losses.append(json.loads((root / name / "training_log.json").read_text())["losses"])
    return losses


def write_body_ct(path: Path, flip: bool = False, size: tuple[int, int, int] = (24, 20, 12),
                  texture_seed: int | None = None, spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)) -> None:
    """A body-like ellipse of soft tissue (40 HU) in air (x, y, z = ``size`` voxels of ``spacing`` mm), stored
    with a flipped x axis when asked; ``texture_seed`` adds +-30 HU of noise inside the body."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in reversed(size)], indexing="ij")
    body = x ** 2 + (y / 0.7) ** 2 < 0.8
    hu = np.where(body, 40.0, -1000.0)
    if texture_seed is not None:
        hu = hu + body * np.random.default_rng(texture_seed).uniform(-30, 30, hu.shape)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    if flip:
        image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))


def blob_phantom(shape=(24, 24, 24)) -> np.ndarray:
    """Smooth, asymmetric phantom in [-1, 1]: three Gaussian blobs of different sizes and heights, so a
    position can be read off the content."""
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    out = np.full(shape, -0.8, np.float32)
    for (cz, cy, cx), r, h in (((6, 8, 16), 5.0, 1.6), ((16, 16, 6), 7.0, 1.0), ((18, 5, 18), 3.0, 1.8)):
        out += h * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return np.clip(out, -1.0, 1.0)


def write_chest_phantom(path: Path) -> np.ndarray:
    """(z, y, x) = (20, 160, 160) at 3 x 2 x 2 mm: a 40 HU body, two -850 HU lungs, an 18 mm 30 HU nodule in the
    right lung, scanner-like noise. Writes the CT and returns the nodule mask."""
    rng = np.random.default_rng(0)
    shape = (20, 160, 160)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ct = np.full(shape, -1000.0)
    ct[:, (((y - 80) / 60.0) ** 2 + ((x - 80) / 75.0) ** 2 <= 1)[0]] = 40
    for cx in (45, 115):
        ct[:, (((y - 80) / 42.0) ** 2 + ((x - cx) / 25.0) ** 2 <= 1)[0]] = -850
    ct += rng.normal(0, 20, shape)
    nodule = ((z - 10) * 3.0) ** 2 + ((y - 70) * 2.0) ** 2 + ((x - 45) * 2.0) ** 2 <= 9.0 ** 2
    ct[nodule] = 30 + rng.normal(0, 20, int(nodule.sum()))
    image = sitk.GetImageFromArray(ct.astype(np.int16))
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((-160.0, -160.0, 30.0))
    sitk.WriteImage(image, str(path))
    return nodule


def tilted_pose() -> sitk.Euler3DTransform:
    """Head point -> atlas point: 8 degrees about the slice axis and a shift of (6, -8, 10) mm."""
    pose = sitk.Euler3DTransform()
    pose.SetCenter((0.0, -18.0, 18.0))  # about the template brain's middle
    pose.SetRotation(0.0, 0.0, np.deg2rad(8.0))
    pose.SetTranslation((6.0, -8.0, 10.0))
    return pose


def synthetic_head_mr(pose: sitk.Transform, spacing=(1.5, 1.5, 5.0),
                      size=(128, 150, 34)) -> tuple[sitk.Image, np.ndarray]:
    """A synthetic head MR on its own grid and the atlas brain it holds (bool (z, y, x)), for the brain
    atlas tests: the atlas T1 moved by ``pose`` in the brain, a 4 mm dark gap (CSF, skull), a 6 mm bright
    scalp, air outside, and noise."""
    from scipy import ndimage

    from DiffusionSegLib.pipeline import brain_atlas

    atlas = brain_atlas.load_atlas()
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin((-96.0, -130.0, -60.0))
    t1 = sitk.GetArrayFromImage(sitk.Resample(atlas, grid, pose, sitk.sitkLinear, 0.0))
    brain = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(atlas > brain_atlas.BRAIN_LEVEL, sitk.sitkFloat32),
                                                 grid, pose, sitk.sitkLinear, 0.0)) > 0.5
    outside = ndimage.distance_transform_edt(~brain, sampling=spacing[::-1])
    head = np.where(brain, t1, 0.0) + np.where((outside > 4) & (outside <= 10), 200.0, 0.0)
    head += np.random.default_rng(0).normal(0, 5, head.shape)
    image = sitk.GetImageFromArray(head.astype(np.float32))
    image.CopyInformation(grid)
    return image, brain
