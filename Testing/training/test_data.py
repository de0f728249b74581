"""Dataset discovery, loading on the model grid, and training-item sampling (DiffusionSegLib.training.data)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.training import data
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.models.card import LabelInfo, ModelCard, array_patch_size


def _write(array: np.ndarray, path, spacing=None, origin=None, is_vector=False) -> None:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _volume(seed: int, shape=(4, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy int16 volume and a label map with value 1 in one block and 2 in another."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 100, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[1:3, 2:4, 2:4] = 1
    label[2, 5:7, 5:7] = 2
    return image, label


def _msd_dataset(root, n=3) -> None:
    entries = []
    for i in range(n):
        image, label = _volume(i)
        _write(image, root / "imagesTr" / f"case{i}.nii.gz", spacing=(1.0, 1.0, 2.0))
        _write(label, root / "labelsTr" / f"case{i}.nii.gz", spacing=(1.0, 1.0, 2.0))
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "liver", "2": "spleen"}, "training": entries,
            "test": ["./imagesTr/case0.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))


def _card(**kwargs) -> ModelCard:
    defaults = dict(name="t", spatial_dims=2, labels=[LabelInfo("a")], normalization={"kind": "zscore"})
    return ModelCard(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def test_msd_dataset_json_is_read_with_labels_and_splits(tmp_path):
    _msd_dataset(tmp_path)
    cases = data.discover_cases(tmp_path)
    assert [c.name for c in cases] == ["case0", "case1", "case2"]
    assert cases[1].image == (tmp_path / "imagesTr" / "case1.nii.gz").resolve()
    assert cases[1].label == (tmp_path / "labelsTr" / "case1.nii.gz").resolve()
    assert data.default_labels(tmp_path, cases) == {"liver": (1,), "spleen": (2,)}
    test = data.discover_cases(tmp_path, "test")
    assert [(c.name, c.label) for c in test] == [("case0", None)]  # MSD test entries are bare image paths
    assert data.discover_cases(tmp_path, "validation") == []


def test_nnunet_v2_label_table():
    table = {"labels": {"background": 0, "liver": 1, "kidneys": [2, 3]}}
    assert data.labels_from_dataset_json(table) == {"liver": (1,), "kidneys": (2, 3)}


def test_folder_layout_matches_names_and_ignores_channel_suffix(tmp_path):
    for name, value in (("b", 3), ("a", 7)):
        image, label = _volume(value)
        _write(image, tmp_path / "imagesTr" / f"{name}_0000.nrrd")
        _write(label * value // np.maximum(label, 1), tmp_path / "labelsTr" / f"{name}.nrrd")
    (tmp_path / "imagesTr" / "notes.txt").write_text("not an image")
    cases = data.discover_cases(tmp_path)
    assert [(c.name, c.image.name, c.label.name) for c in cases] == [("a", "a_0000.nrrd", "a.nrrd"),
                                                                     ("b", "b_0000.nrrd", "b.nrrd")]
    # No dataset.json: every non-zero value found in the label files, in value order.
    assert data.default_labels(tmp_path, cases) == {"label_3": (3,), "label_7": (7,)}


def test_discovery_errors_are_dataset_errors_naming_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.discover_cases(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no training cases"):
        data.discover_cases(tmp_path)
    image, label = _volume(0)
    _write(image, tmp_path / "imagesTr" / "x.nii.gz")
    _write(image, tmp_path / "imagesTr" / "y.nii.gz")
    _write(label, tmp_path / "labelsTr" / "x.nii.gz")
    with pytest.raises(DatasetError, match="no label file for case.*y"):
        data.discover_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/x.nii.gz",
                                                                      "label": "./labelsTr/missing.nii.gz"}]}))
    with pytest.raises(DatasetError, match="missing.nii.gz"):
        data.discover_cases(tmp_path)


@pytest.mark.parametrize("selection,message", [({"a": 0}, "non-zero"), ({"a": "liver"}, "integers"), ({}, "empty")])
def test_bad_label_selection(selection, message):
    with pytest.raises(DatasetError, match=message):
        data.check_label_selection(selection)


# ---------------------------------------------------------------------------------------------
# Loading on the model grid
# ---------------------------------------------------------------------------------------------


def test_load_case_resamples_in_plane_and_builds_one_channel_per_label(tmp_path):
    _msd_dataset(tmp_path, n=1)
    files = data.discover_cases(tmp_path)[0]
    # 2D model at 2 mm in-plane: (z, y, x) = (4, 8, 8) at 1 mm -> 4 slices of 4 x 4, slices untouched.
    card = _card(spacing=[2.0, 2.0], labels=[LabelInfo("liver"), LabelInfo("both")])
    case = data.load_case(files, card, {"liver": (1,), "both": (1, 2)})
    assert case.image.shape == (1, 4, 4, 4) and case.image.dtype == np.float32
    assert case.mask.shape == (2, 4, 4, 4) and case.mask.dtype == np.uint8
    # Nearest neighbour on a 2x coarser grid: new voxel j samples old index 2j + 0.5 (rounds to 2j + 1 or 2j).
    liver = np.zeros((4, 4, 4), np.uint8)
    liver[1:3, 1, 1] = 1
    assert np.array_equal(case.mask[0], liver)
    both = liver.copy()
    both[2, 3, 3] = 1
    assert np.array_equal(case.mask[1], both)
    # zscore normalization is the inference one: mean ~0 over the voxels above the 1st percentile.
    assert abs(float(case.image.mean())) < 0.2


def test_load_case_slice_axis_moves_to_front(tmp_path):
    _msd_dataset(tmp_path, n=1)
    files = data.discover_cases(tmp_path)[0]
    coronal = data.load_case(files, _card(slice_axis=1), {"liver": (1,)})
    # (z, y, x) = (4, 8, 8) sliced along y: 8 slices of (z, x) = (4, 8).
    assert coronal.image.shape == (1, 8, 4, 8)
    _, label = _volume(0)
    assert np.array_equal(coronal.mask[0], np.moveaxis(label == 1, 1, 0))


def test_label_geometry_mismatch_is_rejected(tmp_path):
    image, label = _volume(0)
    _write(image, tmp_path / "imagesTr" / "c.nii.gz", origin=(0.0, 0.0, 0.0))
    _write(label, tmp_path / "labelsTr" / "c.nii.gz", origin=(5.0, 0.0, 0.0))
    files = data.discover_cases(tmp_path)[0]
    with pytest.raises(DatasetError, match="case c: .*origin"):
        data.load_case(files, _card(), {"liver": (1,)})
    _write(label[:, :4], tmp_path / "labelsTr" / "c.nii.gz")
    with pytest.raises(DatasetError, match="case c: .*size"):
        data.load_case(files, _card(), {"liver": (1,)})


def test_label_absent_from_every_case_is_an_error(tmp_path):
    _msd_dataset(tmp_path, n=2)
    cases = data.discover_cases(tmp_path)
    with pytest.raises(DatasetError, match="'kidney'.*none of the 2 cases"):
        data.load_cases(cases, _card(), {"kidney": (9,)})


def test_png_rgb_case_is_a_single_slice(tmp_path):
    rgb = np.zeros((12, 10, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[4:8, 3:6] = (0, 255, 0)
    mask = np.zeros((12, 10), np.uint8)
    mask[4:8, 3:6] = 255
    _write(rgb, tmp_path / "imagesTr" / "photo.png", is_vector=True)
    _write(mask, tmp_path / "labelsTr" / "photo.png")
    files = data.discover_cases(tmp_path)
    assert data.image_channels(files[0]) == 3
    case = data.load_case(files[0], _card(in_channels=3, normalization={"kind": "rgb"}), {"lesion": (255,)})
    assert case.image.shape == (3, 1, 12, 10)
    assert case.image[:, 0, 0, 0].tolist() == [1.0, -1.0, -1.0]  # 255 -> 1, 0 -> -1
    assert case.image[:, 0, 5, 4].tolist() == [-1.0, 1.0, -1.0]
    assert np.array_equal(case.mask[0, 0], mask == 255)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _slices_case(n_slices=50, fg_slices=range(20, 25)) -> data.Case:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, n_slices, 16, 16)).astype(np.float32)
    mask = np.zeros((1, n_slices, 16, 16), np.uint8)
    for s in fg_slices:
        mask[0, s, 6:10, 6:10] = 1
    return data.Case("c", image, mask)


@pytest.mark.parametrize("fraction,expected", [(0.67, 0.67 + 0.33 * 0.1), (0.0, 0.1)])
def test_slice_sampler_oversamples_foreground(fraction, expected):
    # 5 of 50 slices hold foreground: uniform slices give 10% foreground items; with a foreground
    # fraction f the share is f + (1 - f) * 10%. 2000 draws: binomial sd <= 0.011, bound 0.05.
    sampler = data.PatchSampler([_slices_case()], 2, (16, 16), foreground_fraction=fraction, seed=1)
    draws = [sampler.sample()[1].any() for _ in range(2000)]
    assert abs(np.mean(draws) - expected) < 0.05


def test_batches_have_the_documented_shapes_and_padding():
    case = _slices_case(n_slices=6, fg_slices=[2])
    sampler = data.PatchSampler([case], 2, (24, 20), seed=0)  # larger than the 16 x 16 slices: padded
    images, masks = next(sampler.batches(5))
    assert images.shape == (5, 1, 24, 20) and images.dtype == np.float32
    assert masks.shape == (5, 1, 24, 20) and masks.dtype == np.uint8
    # Padding is symmetric with the image minimum (4 rows above, 2 columns left), mask 0.
    assert np.all(images[:, :, :4] == case.image.min()) and np.all(images[:, :, :, :2] == case.image.min())
    assert not masks[:, :, :4].any()


def test_3d_patches_are_centred_on_foreground():
    image = np.zeros((1, 20, 30, 30), np.float32)
    mask = np.zeros((2, 20, 30, 30), np.uint8)
    mask[0, 2, 3, 25] = 1  # one voxel near a corner: the patch must be shifted to stay inside
    mask[1, 15, 20, 5] = 1
    sampler = data.PatchSampler([data.Case("v", image, mask)], 3, (8, 10, 12), foreground_fraction=1.0, seed=0)
    seen = set()
    for _ in range(20):
        _, m = sampler.sample()
        assert m.shape == (2, 8, 10, 12)
        assert m.sum() == 1  # every draw holds one of the two voxels
        seen.add(int(np.argwhere(m)[0][0]))
    assert seen == {0, 1}  # both labels are drawn


def test_hard_negatives_are_background_voxels_inside_the_foreground_intensity_band():
    image = np.zeros((1, 4, 5), np.float32)
    foreground = np.zeros((1, 4, 5), bool)
    image[0, 0, :] = [10, 20, 30, 40, 50]  # the foreground row: 10th-90th percentile band is 14..46
    foreground[0, 0, :] = True
    image[0, 1, :] = [13, 14, 30, 46, 47]  # background: 14, 30 and 46 are inside the band
    np.testing.assert_array_equal(data.hard_negatives(image, foreground), [[0, 1, 1], [0, 1, 2], [0, 1, 3]])
    assert data.hard_negatives(image, np.zeros_like(foreground)).shape == (0, 3)  # no foreground, no band
    one = np.zeros((1, 10, 10), bool)
    one[0, 0, 0] = True  # 99 background voxels share the foreground's value: thinned at a stride of 11
    assert len(data.hard_negatives(np.full((1, 10, 10), 30.0), one, limit=9)) == 9


def test_hard_negative_items_are_centred_on_look_alike_background():
    # A bright 2 x 2 lesion and a bright background blob of the same intensity far from it; the rest dark.
    image = np.full((1, 1, 40, 40), -1.0, np.float32)
    mask = np.zeros((1, 1, 40, 40), np.uint8)
    image[0, 0, 5:7, 5:7] = 1.0
    mask[0, 0, 5:7, 5:7] = 1
    image[0, 0, 30:33, 30:33] = 1.0  # the look-alike
    case = data.Case("c", image, mask)
    sampler = data.PatchSampler([case], 2, (8, 8), foreground_fraction=0.0, hard_negative_fraction=1.0, seed=0)
    for _ in range(20):
        item, item_mask = sampler.sample()
        assert not item_mask.any() and item[0, 4, 4] == 1.0  # centre pixel: background in the band
    with pytest.raises(ValueError, match="hard_negative_fraction"):
        data.PatchSampler([case], 2, (8, 8), foreground_fraction=0.7, hard_negative_fraction=0.4)


def _task_case(name: str, task: str, value: float, slices: int = 1, fg: bool = True) -> data.Case:
    """A case whose image is constant ``value`` (so an item tells its case); foreground on slice 0 if ``fg``."""
    mask = np.zeros((1, slices, 8, 8), np.uint8)
    mask[0, 0, 3:5, 3:5] = fg
    return data.Case(name, np.full((1, slices, 8, 8), value, np.float32), mask, task)


def test_task_weights_set_each_tasks_share_of_the_items():
    # Lung: three one-slice cases with foreground. Brain: one 9-slice case with foreground on one slice,
    # and a 30-slice case with none. Without weights, foreground items go 3:1 to lung (uniform over
    # foreground cases) and background items 3:39 (uniform over slices). Weights lung 1, brain 3 give
    # brain 3/4 of ALL items; in its pool the foreground case gets every foreground item and, of the
    # background items, the slice share 9/39. 3000 draws: sd <= 0.009, bound 0.04.
    cases = [_task_case(f"l{i}", "lung", float(i)) for i in range(3)]
    cases += [_task_case("b", "brain", 9.0, slices=9), _task_case("e", "brain", 7.0, slices=30, fg=False)]
    plain = data.PatchSampler(cases, 2, (8, 8), foreground_fraction=1.0, seed=2)
    assert abs(np.mean([plain.sample()[0][0, 0, 0] == 9.0 for _ in range(3000)]) - 0.25) < 0.04
    background = data.PatchSampler(cases, 2, (8, 8), foreground_fraction=0.0, seed=2)
    lung_share = np.mean([background.sample()[0][0, 0, 0] < 3 for _ in range(3000)])
    assert abs(lung_share - 3 / 42) < 0.04
    weights = {"lung": 1.0, "brain": 3.0}
    fg = data.PatchSampler(cases, 2, (8, 8), foreground_fraction=1.0, seed=2, task_weights=weights)
    values = np.array([fg.sample()[0][0, 0, 0] for _ in range(3000)])
    assert abs(np.mean(values == 9.0) - 0.75) < 0.04 and not np.any(values == 7.0)
    assert all(abs(np.mean(values == float(i)) - 1 / 12) < 0.04 for i in range(3))
    bg = data.PatchSampler(cases, 2, (8, 8), foreground_fraction=0.0, seed=2, task_weights=weights)
    values = np.array([bg.sample()[0][0, 0, 0] for _ in range(3000)])
    assert abs(np.mean(values < 3) - 0.25) < 0.04
    assert abs(np.mean(values == 9.0) - 0.75 * 9 / 39) < 0.04 and abs(np.mean(values == 7.0) - 0.75 * 30 / 39) < 0.04
    with pytest.raises(DatasetError, match="brain"):  # a task of the cases without a weight
        data.PatchSampler(cases, 2, (8, 8), task_weights={"lung": 1.0})
    with pytest.raises(DatasetError, match="liver"):  # a weighted task with no case
        data.PatchSampler(cases, 2, (8, 8), task_weights={"lung": 1.0, "brain": 1.0, "liver": 1.0})


def test_a_sampler_without_task_weights_keeps_its_random_stream():
    # The items of a single-pool sampler are fixed by its seed: a refactor that adds draws would change them.
    cases = [_task_case(f"l{i}", "lung", float(i), slices=i + 1) for i in range(4)]
    sampler = data.PatchSampler(cases, 2, (8, 8), foreground_fraction=0.5, seed=3)
    # the items of the code before task weights existed (measured once at commit 03d4efe)
    assert [int(sampler.sample()[0][0, 0, 0]) for _ in range(12)] == [0, 2, 0, 1, 2, 2, 3, 3, 1, 0, 0, 2]


def test_array_patch_size_follows_the_card_convention():
    assert array_patch_size([64, 48, 16], 3) == (16, 64, 48)  # card (H, W, D) -> array (D, H, W)
    assert array_patch_size([64, 48], 2) == (64, 48)


def test_augmentation_moves_image_and_mask_together_and_is_seeded():
    image = np.full((1, 1, 32, 32), -1.0, np.float32)
    mask = np.zeros((1, 1, 32, 32), np.uint8)
    mask[0, 0, 8:20, 10:26] = 1
    image[mask.astype(bool)] = 1.0
    aug = data.Augmentation(prob=1.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    sampler = data.PatchSampler([data.Case("c", image, mask)], 2, (32, 32), augmentation=aug, seed=3)
    changed = 0
    for _ in range(10):
        img, m = sampler.sample()
        assert np.mean((img[0] > 0) == m[0].astype(bool)) > 0.98  # bilinear vs nearest: border pixels only
        changed += int(not np.array_equal(m, mask[:, 0]))
    assert changed == 10  # rotation/scale actually applied

    full = data.Augmentation()
    a = data.PatchSampler([_slices_case()], 2, (16, 16), augmentation=full, seed=5)
    b = data.PatchSampler([_slices_case()], 2, (16, 16), augmentation=full, seed=5)
    first = a.batch(4)
    state = a.get_state()
    second = a.batch(4)
    b.set_state(json.loads(json.dumps(state)))  # the state survives JSON (checkpoints store it so)
    again = b.batch(4)
    assert np.array_equal(second[0], again[0]) and np.array_equal(second[1], again[1])
    assert not np.array_equal(first[0], second[0])


def test_flipped_direction_volume_keeps_label_on_its_anatomy(tmp_path):
    # A RAS-like direction (x and y flipped) is reoriented to the card's LPS before slicing;
    # the label must follow the image voxel for voxel.
    image, label = _volume(0, shape=(4, 8, 6))
    image = (image // 10 + 500 * (label > 0)).astype(np.int16)  # labelled voxels are bright
    for kind, array in (("imagesTr", image), ("labelsTr", label)):
        img = sitk.GetImageFromArray(array)
        img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        (tmp_path / kind).mkdir(exist_ok=True)
        sitk.WriteImage(img, str(tmp_path / kind / "c.nii.gz"))
    case = data.load_case(data.discover_cases(tmp_path)[0], _card(spacing=[1.0, 1.0]), {"any": (1, 2)})
    assert case.mask.sum() == (label > 0).sum()
    assert np.array_equal(case.mask[0].astype(bool), case.image[0] > 1.0)
    assert np.array_equal(case.mask[0], (label > 0)[:, ::-1, ::-1])  # y and x flipped to LPS


def test_contrast_phase_augmentation_shifts_each_organ_inside_its_mask_only():
    image = np.zeros((1, 4, 16, 16), np.float32)
    mask = np.zeros((2, 4, 16, 16), np.uint8)
    mask[0, :, 2:8, 2:8] = 1  # organ 0: enhanced by 0.2..0.3
    mask[1, :, 10:14, 10:14] = 1  # organ 1: never enhanced (None)
    aug = data.Augmentation(enabled=True, prob=0.0, label_offsets=((0.2, 0.3), None), label_offset_prob=1.0)
    sampler = data.PatchSampler([data.Case("c", image, mask)], 2, (16, 16), augmentation=aug, seed=0)
    for _ in range(5):
        img, m = sampler.sample()
        inside = img[0][m[0].astype(bool)]
        assert inside.min() == inside.max() and 0.2 <= inside[0] <= 0.3  # one draw per organ and item
        assert np.all(img[0][~m[0].astype(bool)] == 0.0)


def test_contrast_augment_config_is_converted_from_hu_and_checked():
    from DiffusionSegLib.core.errors import DiffusionSegError
    from DiffusionSegLib.training.loop import TrainConfig, _label_offsets

    cfg = TrainConfig(normalization={"kind": "ct_window", "center": 50, "width": 400},
                      contrast_augment={"liver": [0, 80]})
    assert _label_offsets(cfg, ["spleen", "liver"]) == (None, (0.0, 0.4))  # 80 HU of a 400 HU window = 0.4
    with pytest.raises(DiffusionSegError):
        _label_offsets(cfg, ["spleen"])  # names a label the model does not have
    with pytest.raises(DiffusionSegError):
        _label_offsets(TrainConfig(normalization={"kind": "zscore"}, contrast_augment={"liver": [0, 80]}), ["liver"])
